#!/usr/bin/env bash
# The test command of the README (and of CI): set up .venv if needed, lint, run the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k schedule`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# tests/test_slurm.py submits the sbatch scripts to a real one-node Slurm cluster on this machine:
# scripts/setup_slurm.sh installs and starts it (needs root; ~1 min the first time, ~0.1 s after).
if [ "$(id -u)" = 0 ] && { [ "${PDMD_SETUP_SLURM:-1}" != 0 ] || [ "${CI:-}" = true ]; }; then
    bash scripts/setup_slurm.sh
elif [ "${CI:-}" = true ]; then
    echo "[test] CI must run as root: the Slurm tests need scripts/setup_slurm.sh" >&2
    exit 1
else
    echo "[test] not setting up Slurm (not root, or PDMD_SETUP_SLURM=0): tests/test_slurm.py skips without a cluster"
fi
VENV=${PDMD_VENV:-.venv}
echo "[test] ruff"
"$VENV/bin/ruff" check .
echo "[test] pytest"
set +e
# --durations: the slowest tests, so the suite can be kept well under 30 minutes on 2 cores
OMP_NUM_THREADS=1 WANDB_MODE=offline "$VENV/bin/python" -m pytest --durations=20 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "[test] pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit "$rc"
