#!/usr/bin/env bash
# loraplane against Hugging Face transformers + PEFT on one workload, in ONE command:
#
#   scripts/bench-vs-peft.sh [WORKLOAD]     # default bench/workloads/canonical.toml
#
# Builds the release benchmarks (loraplane-bench), creates the PEFT baseline's Python environment
# (scripts/peft-baseline/setup-venv.sh), writes the fixture model (`small` preset) and the
# workload's adapters, then runs `loraplane-bench serving` in interleaved rounds —
# loraplane (`--serve`), then the PEFT server (scripts/peft-baseline/server.py), started in
# turn, one at a time — and prints each round's output tok/s ratio and their median. A last
# pass asks both for log-probabilities and checks that their greedy outputs are identical token
# for token.
#
# Environment: ROUNDS (default 3, at least 3), PRESET (small), OUT (bench-results/vs-peft-NAME),
# LORAPLANE_BENCH_CACHE_DIR (fixtures, default ~/.cache/loraplane/bench-fixtures),
# LORAPLANE_PEFT_VENV (the Python environment), BENCH (a loraplane-bench binary to use instead
# of building the release one), SERVE_ARGS (extra `serve` flags for loraplane,
# space-separated), PEFT_ARGS (extra flags for server.py, e.g. "--max-batch 32").
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
workload="$(realpath "${1:-${root}/bench/workloads/canonical.toml}")"
name="$(basename "${workload}")"
name="${name%.*}"
rounds="${ROUNDS:-3}"
preset="${PRESET:-small}"
out="$(realpath -m "${OUT:-${root}/bench-results/vs-peft-${name}}")"
cache="${LORAPLANE_BENCH_CACHE_DIR:-${HOME}/.cache/loraplane/bench-fixtures}"
if (( rounds < 3 )); then
    echo "ROUNDS must be at least 3" >&2
    exit 2
fi
mkdir -p "${out}" "${cache}"

if [[ -n "${BENCH:-}" ]]; then
    bench_bin="$(realpath "${BENCH}")"
    echo "== using the bench binary ${bench_bin}" >&2
else
    echo "== building the release benchmarks" >&2
    (cd "${root}" && cargo build --release --locked -p loraplane-bench)
    bench_bin="${root}/target/release/loraplane-bench"
fi
echo "== the PEFT baseline's Python environment" >&2
python="$("${root}/scripts/peft-baseline/setup-venv.sh")"

# --repeats: of the GEMM-peak and bandwidth measurements behind each run's roofline.
bench=("${bench_bin}" serving --workload "${workload}" --preset "${preset}" --cache-dir "${cache}"
    --repeats 3)
echo "== fixtures: ${preset} model and the adapters of ${name}" >&2
prepared="$("${bench[@]}" --prepare-only --out "${out}/prepare")"
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "${prepared}" "$1"; }
model="$(field model)"
adapters="$(field adapters)"

peft_pid=""
stop_peft() {
    if [[ -n "${peft_pid}" ]]; then
        kill "${peft_pid}" 2>/dev/null || true
        wait "${peft_pid}" 2>/dev/null || true
        peft_pid=""
    fi
}
trap stop_peft EXIT

# Starts the PEFT server and sets peft_url once it prints its listening line.
start_peft() {
    local log="$1"
    # shellcheck disable=SC2086 # PEFT_ARGS is a list of flags.
    "${python}" "${root}/scripts/peft-baseline/server.py" --model "${model}" \
        --adapters "${adapters}" --port 0 ${PEFT_ARGS:-} >"${log}.stdout" 2>"${log}" &
    peft_pid=$!
    for _ in $(seq 600); do
        if [[ -s "${log}.stdout" ]]; then
            peft_url="http://$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["http"])' "${log}.stdout")"
            return 0
        fi
        if ! kill -0 "${peft_pid}" 2>/dev/null; then
            echo "the PEFT server did not start; its log (${log}):" >&2
            cat "${log}" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "the PEFT server did not start within 300 s (${log})" >&2
    exit 1
}

serve_args=()
for a in ${SERVE_ARGS:-}; do
    serve_args+=("--serve-arg=${a}")
done

for i in $(seq "${rounds}"); do
    echo "== round ${i}/${rounds}: loraplane" >&2
    "${bench[@]}" --serve "${serve_args[@]}" --out "${out}/round${i}-loraplane" >"${out}/round${i}-loraplane.txt"
    echo "== round ${i}/${rounds}: HF PEFT" >&2
    start_peft "${out}/round${i}-peft.log"
    "${bench[@]}" --url "${peft_url}" --out "${out}/round${i}-peft" >"${out}/round${i}-peft.txt"
    stop_peft
    python3 -c 'import json,sys
a, b = (json.load(open(p))["data"]["output_tok_s"] for p in sys.argv[1:3])
print(f"round {sys.argv[3]}: loraplane {a:.1f} tok/s, PEFT {b:.1f} tok/s, ratio {a / b:.2f}")' \
        "${out}/round${i}-loraplane/serving.json" "${out}/round${i}-peft/serving.json" "${i}" >&2
done

echo "== outputs: greedy tokens and log-probabilities of both" >&2
"${bench[@]}" --quick --serve "${serve_args[@]}" --logprobs \
    --save-outputs "${out}/outputs-loraplane.jsonl" --out "${out}/check-loraplane" >/dev/null
start_peft "${out}/check-peft.log"
"${bench[@]}" --quick --url "${peft_url}" --logprobs \
    --save-outputs "${out}/outputs-peft.jsonl" --out "${out}/check-peft" >/dev/null
stop_peft

echo
echo "loraplane against HF PEFT, workload ${name} (${preset} model), ${rounds} interleaved rounds:"
python3 "${root}/scripts/peft-baseline/report.py" rounds "${out}" "${rounds}"
python3 "${root}/scripts/peft-baseline/report.py" compare \
    "${out}/outputs-loraplane.jsonl" "${out}/outputs-peft.jsonl"
echo "results: ${out}"
