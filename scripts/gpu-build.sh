#!/usr/bin/env bash
# Builds HERE (no GPU or CUDA toolkit needed) exactly what scripts/gpu-check.sh runs on a GPU
# machine, all with `--features cuda`, strips it into one ignored folder, checks its size and
# prints what to hand the device tool:
#
#   target/gpu-carry/cuda_parity      the kernels' parity tests (loraplane-kernels)
#   target/gpu-carry/cuda_oracle      the engine's CUDA oracle suite (loraplane-agent)
#   target/gpu-carry/loraplane-bench  the benchmarks (the agent library inside), for
#                                     `loraplane-bench hetero`
#
#   scripts/gpu-build.sh            # then: carry ["target/gpu-carry"], run scripts/gpu-check.sh
#
# The test binaries use the test profile, as `cargo test` does. The bench binary must be
# optimised (it generates the fixture model and drives every step), but a release build
# recompiles every dependency with thin LTO; by default (GPU_BUILD_PROFILE=fast) it is built in
# the dev profile with the agent and bench crates at opt-level 3, reusing the optimised
# dependencies of the ordinary debug build (the workspace already optimises every dependency
# and the kernels in dev). Set GPU_BUILD_PROFILE=release for a release build (README.md "GPUs"
# gives both build times).
#
# The device tool carries the working tree plus at most 8 ignored paths, 64 MiB in all: the
# script fails if the carried folder exceeds GPU_CARRY_MAX_MIB (48) or the tree plus the folder
# exceeds 60 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${GPU_BUILD_PROFILE:-fast}
dest=target/gpu-carry
max_mib=${GPU_CARRY_MAX_MIB:-48}
export CARGO_TERM_COLOR=never

case $profile in
  fast) bench_flags=(--config 'profile.dev.package.loraplane-agent.opt-level=3'
    --config 'profile.dev.package.loraplane-bench.opt-level=3') ;;
  release) bench_flags=(--release) ;;
  *) echo "gpu-build: GPU_BUILD_PROFILE must be fast or release, not '$profile'" >&2; exit 2 ;;
esac

# The executable of target NAME among cargo's JSON messages (one compiler-artifact line per
# target; `cargo test --test X` also builds the package's binaries, so the name must match).
executable() {
  grep -F "\"name\":\"$1\"" | grep -o '"executable":"[^"]*"' | sed 's/^"executable":"//; s/"$//' \
    | tail -1
}

started=$SECONDS
echo "gpu-build: test binaries (test profile, --features cuda)" >&2
parity=$(cargo test --locked -p loraplane-kernels --features cuda --test cuda_parity --no-run \
  --message-format=json-render-diagnostics | executable cuda_parity)
oracle=$(cargo test --locked -p loraplane-agent --features cuda --test cuda_oracle --no-run \
  --message-format=json-render-diagnostics | executable cuda_oracle)
tests_s=$((SECONDS - started))

echo "gpu-build: loraplane-bench ($profile, --features cuda)" >&2
t=$SECONDS
bench=$(cargo build --locked -p loraplane-bench --features cuda --bin loraplane-bench \
  "${bench_flags[@]}" --message-format=json-render-diagnostics | executable loraplane-bench)
bench_s=$((SECONDS - t))

for f in "$parity" "$oracle" "$bench"; do
  if [ -z "$f" ] || [ ! -x "$f" ]; then
    echo "gpu-build: cargo reported no executable (got '$f')" >&2
    exit 1
  fi
done

rm -rf "$dest"
mkdir -p "$dest"
# Stripped copies: debug info is most of a binary's size, and the GPU run needs none of it.
strip -o "$dest/cuda_parity" "$parity"
strip -o "$dest/cuda_oracle" "$oracle"
strip -o "$dest/loraplane-bench" "$bench"
cat >"$dest/BUILD-INFO" <<EOF
built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n) from $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo ' (with uncommitted changes)')
bench profile: $profile; test binaries: test profile; features: cuda
build seconds: tests $tests_s, bench $bench_s
$(ldd --version | head -1)
EOF

mib() { echo $((($1 + 1048575) / 1048576)); }
carried=$(du -cb "$dest" | tail -1 | cut -f1)
# What else travels: tracked files and untracked ones git does not ignore (and shared/).
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null \
  | tail -1 | cut -f1)
shared=0
[ -d shared ] && shared=$(du -sb shared | cut -f1)

# The newest glibc symbol version each binary needs: a GPU machine with an older glibc cannot
# run it (gpu-check's `binaries` step would say so).
glibc=$(objdump -T "$dest"/* 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1 || true)

echo
ls -l "$dest"
echo "gpu-build: built in $((SECONDS - started)) s (test binaries ${tests_s} s, bench ${bench_s} s)"
echo "gpu-build: carried $(mib "$carried") MiB; working tree $(mib "$tree") MiB, shared/ $(mib "$shared") MiB"
echo "gpu-build: needs ${glibc:-an unknown glibc} or newer on the GPU machine"
if [ "$carried" -gt $((max_mib * 1048576)) ]; then
  echo "gpu-build: FAILED: $dest is $(mib "$carried") MiB, over the ${max_mib} MiB allowed" >&2
  exit 1
fi
if [ $((carried + tree + shared)) -gt $((60 * 1048576)) ]; then
  echo "gpu-build: FAILED: the working tree and $dest come to" \
    "$(mib $((carried + tree + shared))) MiB; the device tool carries at most 64" >&2
  exit 1
fi
echo
echo "Device tool, from this checkout:"
echo "  carry:   [\"$dest\"]"
echo "  command: bash scripts/gpu-check.sh \$OUT"
echo "  timeout_s: 540 (the script keeps to 480 s)"
