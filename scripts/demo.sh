#!/usr/bin/env bash
# The README's first command: set up .venv if needed and run the demo on its embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# No OMP_NUM_THREADS=1 here: the teacher fit and the sampling use both cores (the distillations one each).
exec "${PDMD_VENV:-.venv}/bin/pdmd" demo "$@"
