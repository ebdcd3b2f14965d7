#!/usr/bin/env bash
# The CUDA backend on a real GPU, in one run of at most 8 minutes (issue 17). Runs ON THE GPU
# MACHINE, from the repository root of a working tree that carries the binaries
# scripts/gpu-build.sh built here (target/gpu-carry/); needs no cargo, network or package.
#
#   scripts/gpu-check.sh OUTDIR
#
# Steps, each under its own `timeout`, all within GPU_CHECK_BUDGET_S (480 s); a failed step
# does not stop the next:
#   device         nvidia-smi sees a GPU and the driver library (libcuda.so.1) is installed
#   cuda-libs      scripts/gpu-env.sh locates NVRTC and cuBLAS
#   binaries       the carried binaries are there and start (a glibc mismatch shows here)
#   kernel-parity  every CUDA kernel against its CPU reference (cuda_parity)
#   cuda-oracle    the engine's oracle workload on CUDA against the CPU engine (cuda_oracle)
#   hetero         `loraplane-bench hetero --device cuda:0 --dtype bf16 --preset bench
#                  --layers 8`, which
#                  also reads the decode step against the device-to-device copy bandwidth
# Without a device the GPU steps are refused, saying why; the summary is written either way.
#
# OUTDIR receives summary.md and summary.json (per step: status, seconds, key figures, the
# tail of its log on failure), hetero.md and hetero.json when the bench ran, and logs.tar.gz
# (every log, the bench's plots). Exit status 0 only if every step passed.
#
# Settings (environment): GPU_CHECK_LAYERS (8; the Llama-3-8B-shaped `bench` preset has 32
# layers, whose fixture alone takes minutes to generate and load, see README.md "GPUs"),
# GPU_CHECK_BUDGET_S (480), GPU_CHECK_CACHE (fixture cache, /tmp/loraplane-gpu-check, reused
# by a rerun on the same machine), GPU_CARRY (target/gpu-carry).
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: scripts/gpu-check.sh OUTDIR" >&2
  exit 2
fi
out=$1
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 2

carry=${GPU_CARRY:-target/gpu-carry}
layers=${GPU_CHECK_LAYERS:-8}
budget=${GPU_CHECK_BUDGET_S:-480}
cache=${GPU_CHECK_CACHE:-/tmp/loraplane-gpu-check}
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
results=$work/results.tsv
: >"$results"
started=$(date +%s)
export RUST_BACKTRACE=1
# The step functions run in child shells (see run_step): what they read is exported.
export carry layers cache work

# Why the GPU steps cannot run (empty: they can), and why the carried binaries cannot.
no_device=""
no_binaries=""

elapsed() { echo $(($(date +%s) - started)); }

# record NAME STATUS SECONDS NOTE: one line of results.tsv (tabs and newlines in NOTE flattened).
record() {
  local note=${4//$'\t'/ }
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${note//$'\n'/ }" >>"$results"
  printf '[gpu-check %4ss] %-13s %-8s %s\n' "$(elapsed)" "$1" "$2" "$note"
}

# cause LOG: the line of a failed step's log that says why: a test's panic, the innermost
# `Caused by:` of an error, or else the last line.
cause() {
  awk '
    /panicked at/ { getline msg; if (!panic) panic = msg; next }
    /^Caused by:/ { getline c; sub(/^ +/, "", c); caused = c; next }
    /^Error: / && !error { error = substr($0, 8) }
    NF { last = $0 }
    END { print (panic ? panic : caused ? caused : error ? error : last) }' "$1" | cut -c1-200
}

# run_step NAME LIMIT_S NEEDS COMMAND...: runs COMMAND (a program, or a function of this
# script) with its output in $work/NAME.log under `timeout` (at most LIMIT_S, and never past the
# budget). NEEDS is `gpu` (refused without a device or the binaries), `bin` (refused without
# the carried binaries) or `-`.
run_step() {
  local name=$1 limit=$2 needs=$3
  shift 3
  local log=$work/$name.log
  local reason=""
  case $needs in
    gpu) reason=${no_device:+no CUDA device: $no_device}
         [ -z "$reason" ] && reason=${no_binaries:+carried binaries unusable: $no_binaries} ;;
    bin) reason=${no_binaries:+carried binaries unusable: $no_binaries} ;;
  esac
  if [ -n "$reason" ]; then
    echo "refused: $reason" >"$log"
    record "$name" refused 0 "$reason"
    return
  fi
  local left=$((budget - $(elapsed)))
  if [ "$left" -lt 15 ]; then
    echo "skipped: the ${budget} s budget is spent" >"$log"
    record "$name" skipped 0 "the ${budget} s budget is spent"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0 t1 rc
  t0=$(date +%s.%N)
  if [ "$(type -t "$1")" = function ]; then
    # `timeout` runs programs: a function runs in a bash that is given its definition.
    timeout --kill-after=10 "$limit" bash -c "$(declare -f "$1"); $1" >"$log" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  fi
  rc=$?
  t1=$(date +%s.%N)
  local secs
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    record "$name" timeout "$secs" "killed after its ${limit} s limit"
  elif [ "$rc" -ne 0 ]; then
    record "$name" fail "$secs" "exit status $rc: $(cause "$log")"
  elif grep -q "SKIPPED: no CUDA device" "$log"; then
    # The test binaries pass by skipping without a device: on a GPU machine that is a failure.
    record "$name" fail "$secs" "the tests skipped: the binary found no CUDA device"
  else
    record "$name" pass "$secs" ""
  fi
}

# --- device: a GPU the driver sees, and the driver library the binaries dlopen -------------
device_check() {
  local ok=1
  if command -v nvidia-smi >/dev/null; then
    if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; then
      echo "nvidia-smi failed"
      ok=0
    elif [ -z "$(nvidia-smi -L 2>/dev/null)" ]; then
      echo "nvidia-smi lists no GPU"
      ok=0
    fi
  else
    echo "nvidia-smi not found"
    ok=0
  fi
  local libcuda
  libcuda=$( (ldconfig -p 2>/dev/null | grep -o '/[^ ]*/libcuda\.so\.1$';
              find /usr/local/nvidia /usr/lib /usr/lib64 /lib -name 'libcuda.so.1' 2>/dev/null) \
            | head -1)
  if [ -n "$libcuda" ]; then
    echo "driver library: $libcuda"
  else
    echo "libcuda.so.1 not found"
    ok=0
  fi
  [ "$ok" -eq 1 ]
}
run_step device 20 - device_check
if [ "$(tail -1 "$results" | cut -f2)" != pass ]; then
  no_device=$(grep -E 'not found|failed|no GPU' "$work/device.log" | paste -sd ';' - | sed 's/;/; /g')
  no_device=${no_device:-see the device step}
fi

# --- cuda-libs: NVRTC and cuBLAS under the names cudarc loads. gpu-env.sh searches the disk,
# so it runs under the step's timeout in a child; its LD_LIBRARY_PATH is taken over from there.
cuda_libs() {
  # shellcheck source=scripts/gpu-env.sh disable=SC1091 # (checked on its own)
  . scripts/gpu-env.sh
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  local ok=1 name
  for name in nvrtc cublas cublasLt; do
    [ -e "/tmp/loraplane-culib/lib$name.so" ] || { echo "lib$name not found"; ok=0; }
  done
  [ "$ok" -eq 1 ]
}
run_step cuda-libs 90 - cuda_libs
libpath=$(grep '^LD_LIBRARY_PATH=' "$work/cuda-libs.log" | tail -1)
[ -n "$libpath" ] && export LD_LIBRARY_PATH=${libpath#LD_LIBRARY_PATH=}

# --- binaries: carried and runnable here ----------------------------------------------------
binaries_check() {
  local ok=1 b
  for b in cuda_parity cuda_oracle loraplane-bench; do
    if [ ! -x "$carry/$b" ]; then
      echo "$carry/$b not found: run scripts/gpu-build.sh on the build machine and carry $carry"
      ok=0
    fi
  done
  [ "$ok" -eq 1 ] || return 1
  local listed bad=""
  sed 's/^/build: /' "$carry/BUILD-INFO" 2>/dev/null
  for b in cuda_parity cuda_oracle; do
    if listed=$("$carry/$b" --list 2>&1); then
      echo "$b: $(grep -c ': test$' <<<"$listed") tests"
    else
      bad+="$b does not start: $(head -1 <<<"$listed"); "
    fi
  done
  if ! listed=$("$carry/loraplane-bench" --version 2>&1); then
    bad+="loraplane-bench does not start: $(head -1 <<<"$listed"); "
  fi
  echo "$listed"
  # The reason last: the summary's note is a failed step's last line.
  [ -z "$bad" ] || { echo "$bad"; return 1; }
}
run_step binaries 20 - binaries_check
if [ "$(tail -1 "$results" | cut -f2)" != pass ]; then
  no_binaries=$(grep -m1 -E 'not found|GLIBC|error' "$work/binaries.log" || true)
  no_binaries=${no_binaries:-see the binaries step}
fi

# --- the GPU steps --------------------------------------------------------------------------
run_step kernel-parity 100 gpu "$carry/cuda_parity"
run_step cuda-oracle 180 gpu "$carry/cuda_oracle"
hetero_run() {
  echo "fixture cache: $cache (free space below)"
  mkdir -p "$cache" && df -h "$cache"
  # anyhow's error chain says what failed; a backtrace of the bench's main would bury it.
  RUST_BACKTRACE=0 "$carry/loraplane-bench" hetero --device cuda:0 --dtype bf16 --preset bench \
    --layers "$layers" --cache-dir "$cache" --out "$work/hetero"
}
run_step hetero 420 gpu hetero_run

# --- summary ------------------------------------------------------------------------------
failed=$(grep -cv $'\tpass\t' "$results")
for f in hetero.md hetero.json; do
  [ -f "$work/hetero/$f" ] && cp "$work/hetero/$f" "$out/$f"
done
total=$(elapsed)
host=$(uname -n)
if command -v python3 >/dev/null; then
  python3 - "$work" "$out" "$total" "$layers" "$host" <<'PY'
import json, os, re, sys

work, out, total, layers, host = sys.argv[1:6]
TAIL = 40


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def figures(name, log):
    """The key figures of a step, from its log (and the bench's JSON)."""
    f = {}
    result = re.findall(r"^test result: .*$", log, re.M)
    if result:
        f["tests"] = result[-1]
    if name == "device":
        f["gpu"] = [l for l in log.splitlines() if "," in l and "MiB" in l]
    elif name == "cuda-libs":
        f["libraries"] = [l.split(" -> ")[-1] for l in log.splitlines() if " -> " in l]
    elif name == "binaries":
        f["versions"] = [l for l in log.splitlines() if l.startswith("loraplane-bench")]
        f["build"] = [l[len("build: "):] for l in log.splitlines() if l.startswith("build: ")]
    elif name == "kernel-parity":
        f["parity"] = re.findall(r"^parity: (.*)$", log, re.M)
    elif name == "cuda-oracle":
        f["oracle"] = re.findall(r"^oracle: (.*)$", log, re.M)
    elif name == "hetero":
        f["layers"] = int(layers)
        try:
            with open(os.path.join(work, "hetero", "hetero.json")) as h:
                data = json.load(h).get("data", {})
        except (OSError, ValueError):
            data = {}
        for key in ("decode_ratio", "prefill_ratio"):
            if isinstance(data.get(key), dict):
                f[key] = data[key].get("median")
        roof = data.get("decode_roofline") or {}
        if roof:
            f["copy_bandwidth_gbps"] = roof["copy_bandwidth"]["best_bps"] / 1e9
            for mode in ("base", "adapters"):
                m = roof[mode]
                f[f"decode_{mode}_step_ms"] = m["step_s"] * 1e3
                f[f"decode_{mode}_bytes"] = sum(m["bytes"].values())
                f[f"decode_{mode}_share_of_copy_bandwidth"] = m["share_of_copy_bandwidth"]
            f["lora_path_share_of_roofline"] = roof["adapters"]["lora_path_share_of_roofline"]
        f["progress"] = [l for l in log.splitlines() if l.startswith("[hetero")][-3:]
    return f


steps = []
for line in read(os.path.join(work, "results.tsv")).splitlines():
    name, status, seconds, note = (line.split("\t") + [""] * 4)[:4]
    log = read(os.path.join(work, name + ".log"))
    step = {"name": name, "status": status, "seconds": float(seconds or 0), "note": note,
            "figures": figures(name, log)}
    if status != "pass":
        step["log_tail"] = log.splitlines()[-TAIL:]
    steps.append(step)
ok = bool(steps) and all(s["status"] == "pass" for s in steps)
summary = {"ok": ok, "host": host, "seconds": int(total), "steps": steps}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


md = [f"# gpu-check: {'all steps passed' if ok else 'FAILED'}", "",
      f"Host `{host}`, {total} s in all.", "",
      "| step | status | seconds | note |", "|---|---|---|---|"]
for s in steps:
    md.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['note']} |")
for s in steps:
    md += ["", f"## {s['name']}: {s['status']}", ""]
    for k, v in s["figures"].items():
        if isinstance(v, list):
            if v:
                md.append(f"- {k}:")
                md += [f"  - {x}" for x in v]
        elif v is not None:
            md.append(f"- {k}: {fmt(v)}")
    if "log_tail" in s:
        md += ["", f"Last {TAIL} lines of the log:", "", "```"] + s["log_tail"] + ["```"]
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(md) + "\n")
PY
else
  # No Python: the statuses alone, still in both forms.
  {
    echo "# gpu-check (python3 missing: statuses only)"
    echo
    echo "| step | status | seconds | note |"
    echo "|---|---|---|---|"
    awk -F'\t' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }' "$results"
  } >"$out/summary.md"
  awk -F'\t' -v total="$total" '
    function esc(s) { gsub(/\\/, "\\\\", s); gsub(/"/, "\\\"", s); return s }
    BEGIN { printf "{\"seconds\": %d, \"steps\": [", total }
    { printf "%s{\"name\": \"%s\", \"status\": \"%s\", \"seconds\": %s, \"note\": \"%s\"}",
        (NR > 1 ? ", " : ""), esc($1), esc($2), $3 + 0, esc($4) }
    END { print "]}" }' "$results" >"$out/summary.json"
fi
tar -czf "$out/logs.tar.gz" -C "$work" . 2>/dev/null
rm -rf "$work"

echo
cat "$out/summary.md"
[ "$failed" -eq 0 ]
