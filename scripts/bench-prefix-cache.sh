#!/usr/bin/env bash
# The prefix cache on against off on one workload, in ONE command (issue 14's benchmark):
#
#   scripts/bench-prefix-cache.sh [WORKLOAD]   # default bench/workloads/shared-prompt.toml
#
# Runs `loraplane-bench serving --serve` in interleaved rounds — the agent with its default
# `--prefix-cache per-tenant`, then with `--prefix-cache off` — prints each round's TTFT p50 and
# output tok/s of both and their ratios, and a last pass checks that both give the same greedy
# tokens and log-probabilities.
#
# Environment: ROUNDS (default 3), PRESET (small), OUT (bench-results/prefix-cache-NAME),
# LORAPLANE_BENCH_CACHE_DIR (fixtures, default ~/.cache/loraplane/bench-fixtures), BENCH (a
# loraplane-bench binary to use instead of building the release one).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
workload="$(realpath "${1:-${root}/bench/workloads/shared-prompt.toml}")"
name="$(basename "${workload}")"
name="${name%.*}"
rounds="${ROUNDS:-3}"
preset="${PRESET:-small}"
out="$(realpath -m "${OUT:-${root}/bench-results/prefix-cache-${name}}")"
cache="${LORAPLANE_BENCH_CACHE_DIR:-${HOME}/.cache/loraplane/bench-fixtures}"
mkdir -p "${out}" "${cache}"

if [[ -n "${BENCH:-}" ]]; then
    bench_bin="$(realpath "${BENCH}")"
else
    echo "== building the release benchmarks" >&2
    (cd "${root}" && cargo build --release --locked -p loraplane-bench)
    bench_bin="${root}/target/release/loraplane-bench"
fi
bench=("${bench_bin}" serving --workload "${workload}" --preset "${preset}" --cache-dir "${cache}"
    --serve --repeats 1)

for i in $(seq "${rounds}"); do
    echo "== round ${i}/${rounds}: cache on" >&2
    "${bench[@]}" --out "${out}/round${i}-on" >"${out}/round${i}-on.txt"
    echo "== round ${i}/${rounds}: cache off" >&2
    "${bench[@]}" --serve-arg=--prefix-cache=off --out "${out}/round${i}-off" >"${out}/round${i}-off.txt"
done

echo "== outputs: greedy tokens and log-probabilities, cache on and off" >&2
"${bench[@]}" --logprobs --save-outputs "${out}/outputs-on.jsonl" --out "${out}/check-on" >/dev/null
"${bench[@]}" --serve-arg=--prefix-cache=off --logprobs --save-outputs "${out}/outputs-off.jsonl" \
    --out "${out}/check-off" >/dev/null

echo
echo "prefix cache on against off, workload ${name} (${preset} model), ${rounds} interleaved rounds:"
python3 - "${out}" "${rounds}" <<'PY'
import json, statistics, sys
out, n = sys.argv[1], int(sys.argv[2])
rows = []
for i in range(1, n + 1):
    on, off = (json.load(open(f"{out}/round{i}-{m}/serving.json"))["data"] for m in ("on", "off"))
    r = {
        "round": i,
        "ttft_p50_on_ms": on["figures"]["ttft_s"]["p50"] * 1e3,
        "ttft_p50_off_ms": off["figures"]["ttft_s"]["p50"] * 1e3,
        "tok_s_on": on["output_tok_s"],
        "tok_s_off": off["output_tok_s"],
    }
    r["ttft_ratio"] = r["ttft_p50_on_ms"] / r["ttft_p50_off_ms"]
    r["tok_s_ratio"] = r["tok_s_on"] / r["tok_s_off"]
    rows.append(r)
    print(f"round {i}: TTFT p50 {r['ttft_p50_on_ms']:.0f} ms on / {r['ttft_p50_off_ms']:.0f} ms off "
          f"(ratio {r['ttft_ratio']:.2f}); output {r['tok_s_on']:.1f} / {r['tok_s_off']:.1f} tok/s "
          f"(ratio {r['tok_s_ratio']:.2f})")
med = {k: statistics.median(r[k] for r in rows) for k in ("ttft_ratio", "tok_s_ratio")}
print(f"median: TTFT p50 ratio {med['ttft_ratio']:.2f} (target <= 0.33), output tok/s ratio {med['tok_s_ratio']:.2f}")
json.dump({"rounds": rows, "median": med}, open(f"{out}/summary.json", "w"), indent=2)
PY
python3 "${root}/scripts/peft-baseline/report.py" compare "${out}/outputs-on.jsonl" "${out}/outputs-off.jsonl"
echo "results: ${out}"
