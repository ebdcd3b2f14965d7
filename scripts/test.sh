#!/usr/bin/env bash
# The project's one test command: installs what the tests need, then runs every check and test.
# CI runs exactly this (see .ci/run); run it locally the same way: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export RUST_BACKTRACE=1

step() { printf '\n=== %s (%ss)\n' "$1" "$SECONDS"; }

step "toolchain"
cargo --version
rustup component list --installed 2>/dev/null | grep -E '^(rustfmt|clippy)' \
  || rustup component add rustfmt clippy

step "python clients of the e2e tests (pinned: e2e/clients/requirements.txt)"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  -r e2e/clients/requirements.txt

step "emulators of the e2e tests (pinned: e2e/clients/package.json, package-lock.json)"
npm ci --prefix e2e/clients --no-audit --no-fund --ignore-scripts --loglevel=error

step "format"
cargo fmt --all -- --check

step "clippy (workspace lints, warnings are errors)"
cargo clippy --locked --workspace --all-targets -- -D warnings

step "cuda feature builds without a CUDA toolkit"
cargo check --locked -p loraplane-kernels -p loraplane-agent -p loraplane-bench --features cuda
cargo clippy --locked -p loraplane-kernels -p loraplane-agent -p loraplane-bench --features cuda \
  --all-targets -- -D warnings

step "binaries the e2e tests start (same profile as the tests)"
cargo build --locked -p loraplane-agent -p loraplane-operator --bins

step "helm chart, dashboard and alerts (scripts/chart-test.sh)"
scripts/chart-test.sh

step "tests"
cargo test --locked --workspace --no-fail-fast

step "CUDA launch plans and parameter layouts (CPU-only; GPU parity tests skip without a device)"
cargo test --locked -p loraplane-kernels --features cuda --lib --test cuda_parity

step "CUDA kernels' .cu sources emulated on the CPU against the reference (scripts/cuda-emu)"
# Its own cargo project (g++ >= 12): fails naming any construct it cannot emulate.
scripts/cuda-emu/run.sh

step "done"
