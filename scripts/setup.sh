#!/usr/bin/env bash
# Set up a CPU environment in .venv: torch pinned to the local CPU wheel (an unpinned torch pulls a
# multi-GB CUDA build), then this project (editable, with dev extras) under the same constraint.
# Re-running is cheap: a stamp of pyproject.toml + constraints.txt skips an up-to-date install.
# GPU users do not use this script: see README ("On a GPU cluster").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${PDMD_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.pdmd-setup-stamp"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import pdmd, torch, megatron.core" 2>/dev/null; then
    echo "[setup] $VENV is up to date"
    exit 0
fi
pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
echo "[setup] installing torch (pinned by constraints.txt)"
pip_install -c constraints.txt torch
echo "[setup] installing phased-dmd and its dependencies"
pip_install -c constraints.txt -e ".[dev]"
echo "$want" > "$stamp"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)' 2>/dev/null)"
