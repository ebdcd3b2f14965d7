#!/usr/bin/env bash
# Creates (once) the HF PEFT baseline's own Python virtual environment from requirements.txt
# and prints the path of its python. Reinstalls when requirements.txt changes.
#
#   scripts/peft-baseline/setup-venv.sh            # → ~/.cache/loraplane/peft-venv/bin/python
#   LORAPLANE_PEFT_VENV=/some/dir scripts/peft-baseline/setup-venv.sh
#
# Needs python3 (3.9–3.12) with the venv module and access to PyPI; torch from PyPI is a large
# download (about 3 GB with its CUDA libraries on x86-64 Linux), made once.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${LORAPLANE_PEFT_VENV:-${HOME}/.cache/loraplane/peft-venv}"
python="${PYTHON:-python3}"
stamp="${venv}/.requirements.sha256"
want="$(sha256sum "${here}/requirements.txt" | cut -d' ' -f1)"

if [[ -x "${venv}/bin/python" && -f "${stamp}" && "$(cat "${stamp}")" == "${want}" ]]; then
    echo "${venv}/bin/python"
    exit 0
fi
echo "peft-baseline: creating ${venv} (torch, transformers, peft from PyPI)…" >&2
mkdir -p "$(dirname "${venv}")"
"${python}" -m venv "${venv}"
"${venv}/bin/python" -m pip install --quiet -r "${here}/requirements.txt" >&2
echo "${want}" > "${stamp}"
echo "${venv}/bin/python"
