#!/usr/bin/env bash
# The Helm chart, its Grafana dashboard and its Prometheus alerts, checked for real:
#   static  render + `helm lint --strict` (Helm's own library, helm-python-sdk) for the default
#           values and every charts/loraplane/ci/*-values.yaml; every manifest validated against
#           the Kubernetes schemas (kubernetes-validate); CRDs == `loraplane-operator crds`;
#           RBAC == `loraplane-operator rbac`; termination grace periods > drain timeouts;
#           `promtool check rules`; values the chart must refuse; examples/ against schemas.
#   live    real agents (prefill, decode, unified) + the real operator (against an in-memory
#           Kubernetes API) + Debian's prometheus, all on 127.0.0.1, under a short workload; then
#           every alert and every query of every dashboard panel through Prometheus' HTTP API.
#
# Usage: scripts/chart-test.sh [static|live|all]   (default: all)
# Needs: Rust (builds loraplane-agent and loraplane-operator, dev profile), python3 + pip (PyPI),
# apt-get (Debian's `prometheus`, which also ships promtool) when prometheus is missing.
# Idempotent; about 30-60 s once built; every step is bounded in time; it stops what it starts.
set -euo pipefail
export PYTHONDONTWRITEBYTECODE=1
cd "$(dirname "$0")/.."

what="${1:-all}"
case "$what" in static|live|all) ;; *) echo "usage: $0 [static|live|all]" >&2; exit 2 ;; esac

step() { printf '\n=== chart-test: %s (%ss)\n' "$1" "$SECONDS"; }

step "python dependencies (pinned: scripts/chart-test/requirements.txt)"
timeout 300 python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  -r scripts/chart-test/requirements.txt

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  step "Debian's prometheus (server and promtool)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 $sudo apt-get update -qq
  timeout 300 $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
prometheus --version 2>&1 | head -1

step "binaries (dev profile, as scripts/test.sh builds them)"
timeout 900 cargo build --locked -q -p loraplane-agent -p loraplane-operator --bins
target="${CARGO_TARGET_DIR:-target}"
agent="$target/debug/loraplane-agent"
operator="$target/debug/loraplane-operator"

summary=$(mktemp)
trap 'rm -f "$summary"' EXIT
status=0
if [ "$what" != live ]; then
  step "static checks"
  timeout 300 python3 scripts/chart-test/static_checks.py "$operator" | tee -a "$summary" || status=1
fi
if [ "$what" != static ]; then
  step "live checks"
  # The script stops its own processes; `timeout` bounds it if something hangs (SIGTERM first,
  # which it handles by stopping them, then SIGKILL 10 s later).
  timeout -k 10 240 python3 scripts/chart-test/live_check.py "$agent" "$operator" | tee -a "$summary" || status=1
fi

# One closing line over both parts.
awk '/^chart-test (static|live): [0-9]+ passed, [0-9]+ failed/ {
       for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^skipped/) s += $i }
     }
     END { printf "\nchart-test: %d passed, %d failed, %d skipped\n", p, f, s }' "$summary"
step "done"
exit "$status"
