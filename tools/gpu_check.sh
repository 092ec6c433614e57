#!/usr/bin/env bash
# tools/gpu_check.sh: the GPU path on one H100/H200 in under 8 minutes, offline, with one summary table.
#
#   1. env       GPU, torch/CUDA, Transformer Engine (missing: said, and its checks skipped), megatron-core,
#                and which of the Python modules the project needs are importable
#   2. matmul    the measured dense bf16 matmul rate (8192^3), the yardstick for the block's TFLOP/s
#   3. cuda-tests  the tests marked `cuda` (pytest -m cuda on the files that have any)
#   4. block     tools/bench.py block at Wan2.2-A14B layer size (hidden 5120, 40 heads, ffn 13824), 2 layers,
#                81 frames at 480x832 (32760 tokens), bf16: ours vs diffusers, TFLOP/s and share of peak
#   4b. step     tools/bench.py step: one Phased DMD generator step and one fake step split by part, overhead
#   4c. attention  tools/bench.py attention: the attention core one CP rank runs at A14B size (40 heads x 128,
#                32760 tokens), all_gather vs ulysses shapes at cp 1/2/4/8, and TE's DotProductAttention
#   5. train-*   a tiny two-expert teacher and prompt shards (tools/make_tiny_teacher.py,
#                tools/make_prompt_shards.py), then 3 steps per phase of `pdmd train configs/tiny_wan22.yaml`
#                on CUDA: fp32 local spec, bf16 local spec, bf16 TE spec (when TE imports)
#
# The Python parts (environment probe, matmul rate, run summary) are tools/gpu_check.py.
# Nothing is installed from the network: the project runs from this checkout through PYTHONPATH
# (--install puts it into the current Python with `pip install --no-deps --no-index -e .` instead).
# Usage: bash tools/gpu_check.sh [--dry-run] [--out DIR] [--python PY] [--install] [--record] [--budget S]
#   --dry-run  print the commands, run nothing (works without a GPU)
#   --allow-cpu  rehearse on a machine without CUDA: no matmul, a tiny block, the rest as on a GPU
#   --out DIR  logs, the tiny teacher/shards and run directories (default: a new /tmp/pdmd-gpu-check.*)
#   --record   let the block and step benchmarks append their sections to docs/benchmarks.md
#   --budget S stop starting checks once S seconds have gone (default 450: under 8 minutes in all)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
OUT=""
DRY=0
INSTALL=0
RECORD=0
BUDGET=450
ALLOW_CPU=0

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT=$2; shift ;;
        --python) PY=$2; shift ;;
        --install) INSTALL=1 ;;
        --record) RECORD=1 ;;
        --budget) BUDGET=$2; shift ;;
        --allow-cpu) ALLOW_CPU=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$OUT" ] || OUT=$(mktemp -d /tmp/pdmd-gpu-check.XXXXXX)
mkdir -p "$OUT"
cd "$ROOT" || exit 2

# Offline everywhere: no hub, no W&B, no pip index.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled PIP_NO_INDEX=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
unset RANK WORLD_SIZE LOCAL_RANK MASTER_PORT  # every command here is one process of its own

START=$(date +%s)
NAMES=() STATUS=() SECS=() DETAIL=()
record() { NAMES+=("$1"); STATUS+=("$2"); SECS+=("$3"); DETAIL+=("$4"); }
elapsed() { echo $(( $(date +%s) - START )); }

# run NAME LIMIT CMD...: run CMD (a bash string) with a time limit, log to $OUT/NAME.log, record the result.
# The detail is the last line starting "SUMMARY:" in the log, else its last line.
run() {
    local name=$1 limit=$2 cmd=$3
    if [ "$DRY" = 1 ]; then
        printf '[dry-run] %s (limit %ss):\n    %s\n' "$name" "$limit" "$cmd"
        record "$name" DRY-RUN 0 "not run"
        return 0
    fi
    local left=$(( BUDGET - $(elapsed) ))
    if [ "$left" -lt 20 ]; then
        record "$name" SKIP 0 "time budget (--budget $BUDGET s) spent"
        return 0
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "[gpu_check] $name (limit ${limit}s): $cmd"
    local t0 rc detail status
    t0=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$limit" bash -c "$cmd" >"$OUT/$name.log" 2>&1
    rc=$?
    detail=$(grep '^SUMMARY:' "$OUT/$name.log" | tail -n 1 | sed 's/^SUMMARY: *//')
    [ -n "$detail" ] || detail=$(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1 | cut -c1-160)
    case $rc in
        0) status=PASS ;;
        124|137) status=TIMEOUT; detail="over ${limit}s; $detail" ;;
        77) status=SKIP ;;
        *) status=FAIL; detail="exit $rc; $detail (log: $OUT/$name.log)" ;;
    esac
    record "$name" "$status" $(( $(date +%s) - t0 )) "$detail"
    echo "[gpu_check] $name: $status"
    return 0
}

skip_unless() {  # skip_unless NAME MODULE...: record SKIP when a module the check needs is missing
    local name=$1 m missing=()
    shift
    [ "$DRY" = 1 ] && return 0
    for m in "$@"; do
        case ",$MISSING," in *",$m,"*) missing+=("$m") ;; esac
    done
    if [ ${#missing[@]} -gt 0 ]; then
        record "$name" SKIP 0 "not importable here: ${missing[*]} (install offline from a wheelhouse: pip install --no-index --find-links DIR ...)"
        return 1
    fi
    return 0
}

summary() {
    echo
    echo "gpu_check summary ($(elapsed) s in all; logs in $OUT)"
    echo "| check | status | seconds | detail |"
    echo "|---|---|---|---|"
    local i bad=0
    for i in "${!NAMES[@]}"; do
        echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECS[$i]} | ${DETAIL[$i]} |"
        case ${STATUS[$i]} in FAIL|TIMEOUT) bad=1 ;; esac
    done
    return $bad
}

# -- 0. optional install (no network) ----------------------------------------------------------------
if [ "$INSTALL" = 1 ]; then
    run install 120 "\"$PY\" -m pip install --no-deps --no-index --no-build-isolation -e \"$ROOT\""
fi

# -- 1. environment ----------------------------------------------------------------------------------
run env 60 "\"$PY\" tools/gpu_check.py env"
MISSING="" TE=0
if [ "$DRY" = 0 ]; then
    MISSING=$(sed -n 's/^missing=//p' "$OUT/env.log" | tail -n 1)
    TE=$(sed -n 's/^te=//p' "$OUT/env.log" | tail -n 1)
    if [ "$ALLOW_CPU" = 1 ] && [ "${STATUS[-1]}" = FAIL ] && grep -q "^missing=" "$OUT/env.log"; then
        echo "[gpu_check] --allow-cpu: rehearsing without CUDA"
    elif [ "${STATUS[-1]}" != PASS ]; then
        echo "gpu_check: no CUDA device (or no torch) here: this script checks the GPU path; --dry-run shows its commands" >&2
        summary
        exit 2
    fi
fi

# -- 2. the bf16 matmul rate --------------------------------------------------------------------------
if [ "$ALLOW_CPU" = 1 ]; then
    record matmul SKIP 0 "--allow-cpu: needs CUDA"
else
    run matmul 60 "\"$PY\" tools/gpu_check.py matmul"
fi

# -- 3. the CUDA tests --------------------------------------------------------------------------------
CUDA_FILES=$(grep -l 'pytest.mark.cuda' tests/test_*.py 2>/dev/null | tr '\n' ' ')
if [ -z "$CUDA_FILES" ]; then
    record cuda-tests SKIP 0 "no test is marked cuda"
elif skip_unless cuda-tests pytest megatron.core diffusers omegaconf; then
    run cuda-tests 240 "\"$PY\" -m pytest -m cuda -q -s -p no:cacheprovider $CUDA_FILES"
fi

# -- 4. the block benchmark at A14B layer size ----------------------------------------------------------
BLOCK_ARGS="--hidden 5120 --heads 40 --layers 2 --ffn 13824 --frames 21 --height 60 --width 104 --text-len 512 --reps 5"
[ "$ALLOW_CPU" = 1 ] && BLOCK_ARGS="--hidden 32 --heads 2 --layers 2 --ffn 48 --frames 2 --height 4 --width 4 --channels 4 --text-len 5 --text-dim 24 --reps 1"
[ "$RECORD" = 1 ] || BLOCK_ARGS="$BLOCK_ARGS --no-record"
if skip_unless block megatron.core diffusers; then
    run block 240 "\"$PY\" tools/bench.py block $BLOCK_ARGS && echo \"SUMMARY: TFLOP/s \$(grep -o 'fwd+bwd ours [^;]*' \"$OUT/block.log\" | head -n 1); ours/diffusers fwd+bwd \$(grep -m1 '^| fwd+bwd | wall' \"$OUT/block.log\" | cut -d'|' -f6 | tr -d ' ')\""
fi

# -- 4b. one generator step and one fake step, split by part (bench step, 2048 tokens) --------------------
if skip_unless step megatron.core diffusers omegaconf; then
    STEP_ARGS="--reps 3 --set train.latent_shape=[4,8,32,32]"
    [ "$RECORD" = 1 ] || STEP_ARGS="$STEP_ARGS --no-record"
    run step 120 "\"$PY\" tools/bench.py step $STEP_ARGS && echo \"SUMMARY: \$(grep -o 'overhead target.*' \"$OUT/step.log\" | head -n 1)\""
fi

# -- 4c. the attention core one CP rank runs, all_gather vs ulysses shapes (and TE's), A14B sizes --------
ATTN_ARGS="--heads 40 --head-dim 128 --tokens 32760 --cp 1 2 4 8 --reps 5"
[ "$ALLOW_CPU" = 1 ] && ATTN_ARGS="--heads 4 --head-dim 16 --tokens 256 --cp 1 2 4 --reps 1"
[ "$RECORD" = 1 ] || ATTN_ARGS="$ATTN_ARGS --no-record"
if skip_unless attention megatron.core diffusers; then
    run attention 120 "\"$PY\" tools/bench.py attention $ATTN_ARGS && echo \"SUMMARY: cp=4 fwd+bwd ms \$(grep '^| 4 |' \"$OUT/attention.log\" | cut -d'|' -f3,5 | tr '\n' ' ')\""
fi

# -- 5. tiny-model training steps on CUDA -------------------------------------------------------------
TRAIN_MODS="megatron.core diffusers transformers omegaconf webdataset safetensors psutil sentencepiece"
PREP="\"$PY\" -c 'from data.tiny_encoders import save_tiny_encoder; save_tiny_encoder(\"umt5\", \"$OUT/encoder\")' \
 && \"$PY\" tools/make_tiny_teacher.py --out \"$OUT/teacher\" --text-dim 24 \
 && \"$PY\" tools/make_prompt_shards.py --prompts data/demo_prompts.txt --out \"$OUT/shards\" --encoder umt5 \
    --encoder-path \"$OUT/encoder\" --max-length 32 --dtype fp32 --samples-per-shard 8 --batch-size 8 --no-progress"
if skip_unless train-prep $TRAIN_MODS; then
    run train-prep 120 "$PREP"
    PREP_STATUS=${STATUS[-1]}
    TRAIN_COMMON="model.teacher.path=$OUT/teacher data.shards=$OUT/shards train.steps=3 train.checkpoint_every=3 wandb.mode=disabled"
    for variant in fp32 bf16 te; do
        case $variant in
            fp32) extra="" ;;
            bf16) extra="model.dtype=bf16" ;;
            te) extra="model.dtype=bf16 model.spec=te" ;;
        esac
        if [ "$variant" = te ] && [ "$DRY" = 0 ] && [ "$TE" != 1 ]; then
            record train-te SKIP 0 "Transformer Engine is not importable here (see env)"
            continue
        fi
        if [ "$PREP_STATUS" != PASS ] && [ "$PREP_STATUS" != DRY-RUN ]; then
            record "train-$variant" SKIP 0 "train-prep did not pass"
            continue
        fi
        run "train-$variant" 120 "\"$PY\" -m pdmd.cli train configs/tiny_wan22.yaml --run-dir \"$OUT/run-$variant\" $TRAIN_COMMON $extra && \"$PY\" tools/gpu_check.py metrics \"$OUT/run-$variant\""
    done
fi

summary
