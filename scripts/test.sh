#!/usr/bin/env bash
# The test command of the README (and of CI): set up .venv if needed, lint, run the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k schedule`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${PDMD_VENV:-.venv}
echo "[test] ruff"
"$VENV/bin/ruff" check .
echo "[test] pytest"
set +e
OMP_NUM_THREADS=1 WANDB_MODE=offline "$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "[test] pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit "$rc"
