# Shared by slurm/*.sbatch (sourced, not run): run the next pending phase of a Phased DMD run directory
# on this job's nodes, then requeue this job (preempted / crashed within the retry cap) or submit the
# next phase's job. The environment contract is in the sbatch headers and docs/slurm.md.
#
# Design (docs/slurm.md says why):
#   - srun starts one task per GPU; each task runs `python -m pdmd.cli train ... --phase auto` and
#     megatron_adapters.runtime.parallel reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; MASTER_ADDR is the first
#     host of the job's node list, MASTER_PORT follows from the job id.
#   - one job per phase, each job submits the next one (--dependency=afterok on itself) when its phase
#     is done; a rerun on a finished run directory does nothing.
#   - USR1 (from --signal=B:USR1@grace, or `scancel --batch --signal=USR1`) reaches this shell, which
#     forwards it to srun, which forwards it to every task; `scancel --signal=USR1 JOB` reaches the
#     tasks directly. pdmd saves at the next step boundary and exits 75; we then `scontrol requeue`.
#     TERM to this shell (scancel, Slurm preemption, the time limit) is passed on as USR1 (srun would
#     kill the step on TERM), and we do not requeue: Slurm decides what happens to the job.
#   - exit 2 (bad config or usage) and 3 (training diverged) are never retried; other failures are requeued at most
#     PDMD_MAX_RETRIES times per job.
# shellcheck shell=bash

EXIT_PREEMPTED=75
EXIT_DIVERGED=3     # pdmd train: non-finite losses in a row; a retry from the same checkpoint diverges again
EXIT_USAGE=2

pdmd_log() {
    echo "[pdmd-slurm $(date +%H:%M:%S)] $*"
}

pdmd_die() {  # message [exit code]: a problem of the job's setup, never retried
    echo "[pdmd-slurm] ERROR: $1" >&2
    exit "${2:-$EXIT_USAGE}"
}

# One line per event in RUN_DIR/slurm/jobs.log: what happened to which job (tests and users read it).
pdmd_event() {
    mkdir -p "$PDMD_STATE_DIR"
    echo "$(date +%FT%T) job=${SLURM_JOB_ID:-none} restart=${SLURM_RESTART_COUNT:-0} $*" >> "$PDMD_STATE_DIR/jobs.log"
    pdmd_log "$*"
}

# Absolute path: as given if absolute, else relative to the current directory (the submit directory).
pdmd_abspath() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$PWD/$1" ;;
    esac
}

# The environment contract, with defaults. Sets the PDMD_* variables the rest uses.
pdmd_defaults() {
    : "${PDMD_CONFIG:?set PDMD_CONFIG to a recipe (configs/*.yaml)}"
    if [ ! -f "$PDMD_CONFIG" ] && [ -f "$PDMD_HOME/$PDMD_CONFIG" ]; then
        PDMD_CONFIG=$PDMD_HOME/$PDMD_CONFIG
    fi
    [ -f "$PDMD_CONFIG" ] || pdmd_die "PDMD_CONFIG=$PDMD_CONFIG: no such recipe (relative paths are tried from $PWD and $PDMD_HOME)"
    PDMD_CONFIG=$(pdmd_abspath "$PDMD_CONFIG")
    : "${PDMD_RUN_DIR:=runs/$(basename "$PDMD_CONFIG" .yaml)}"
    PDMD_RUN_DIR=$(pdmd_abspath "$PDMD_RUN_DIR")
    PDMD_STATE_DIR=$PDMD_RUN_DIR/slurm
    : "${PDMD_OVERRIDES:=}"
    : "${PDMD_DEVICE:=gpu}"
    case "$PDMD_DEVICE" in gpu|cpu) ;; *) pdmd_die "PDMD_DEVICE=$PDMD_DEVICE: use gpu or cpu" ;; esac
    : "${PDMD_MAX_RETRIES:=2}"
    : "${PDMD_MAX_REQUEUES:=50}"
    : "${PDMD_CHAIN:=1}"
    : "${PDMD_SRUN_WAIT:=120}"
    : "${PDMD_SRUN_ARGS:=}"
    : "${PDMD_SBATCH_ARGS:=}"
    : "${PDMD_CONTAINER_IMAGE:=}"
    local n
    for n in PDMD_MAX_RETRIES PDMD_MAX_REQUEUES PDMD_SRUN_WAIT; do
        [[ ${!n} =~ ^[0-9]+$ ]] || pdmd_die "$n=${!n} must be a whole number"
    done
    # Tasks per node: what the allocation says (one per GPU), else one per GPU on the node (8), or 1 on CPU.
    local fallback=8
    [ "$PDMD_DEVICE" = cpu ] && fallback=1
    : "${PDMD_NPROC_PER_NODE:=${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$fallback}}}"
    PDMD_NPROC_PER_NODE=${PDMD_NPROC_PER_NODE%%(*}  # SLURM_NTASKS_PER_NODE may read "8(x2)"
    [[ $PDMD_NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] || pdmd_die "PDMD_NPROC_PER_NODE=$PDMD_NPROC_PER_NODE must be >= 1"
    local cpus=${SLURM_CPUS_ON_NODE:-$PDMD_NPROC_PER_NODE}
    cpus=${cpus%%(*}
    : "${PDMD_CPUS_PER_TASK:=$(( cpus / PDMD_NPROC_PER_NODE > 0 ? cpus / PDMD_NPROC_PER_NODE : 1 ))}"
    if [ -n "$PDMD_CONTAINER_IMAGE" ]; then
        : "${PDMD_PYTHON:=python}"
        : "${PDMD_CONTAINER_MOUNTS:=$PDMD_HOME:$PDMD_HOME,$(dirname "$PDMD_RUN_DIR"):$(dirname "$PDMD_RUN_DIR")}"
        # The batch shell runs outside the container: it reads the manifest with the host's python3.
        : "${PDMD_HOST_PYTHON:=python3}"
    else
        if [ -z "${PDMD_PYTHON:-}" ]; then
            if [ -n "${PDMD_VENV:-}" ]; then PDMD_PYTHON=$PDMD_VENV/bin/python
            elif [ -x "$PDMD_HOME/.venv/bin/python" ]; then PDMD_PYTHON=$PDMD_HOME/.venv/bin/python
            else PDMD_PYTHON=python3; fi
        fi
        command -v "$PDMD_PYTHON" >/dev/null || pdmd_die "PDMD_PYTHON=$PDMD_PYTHON is not an executable (set PDMD_PYTHON or PDMD_VENV)"
        : "${PDMD_HOST_PYTHON:=$PDMD_PYTHON}"
    fi
}

# The phase `--phase auto` will run: its number, "done" when every phase is done, "new" without a manifest.
pdmd_next_phase() {
    "$PDMD_HOST_PYTHON" - "$PDMD_RUN_DIR/manifest.json" <<'EOF'
import json, os, sys
path = sys.argv[1]
if not os.path.isfile(path):
    print("new")
    sys.exit(0)
phases = json.load(open(path))["phases"]
pending = [p["index"] for p in phases if p["status"] != "done"]
print(pending[0] if pending else "done")
EOF
}

# Per-phase settings: PDMD_NODES_PHASE<k> (nodes of phase k's job), PDMD_OVERRIDES_PHASE<k> (appended
# to PDMD_OVERRIDES, e.g. another parallel layout; the layout is not part of the run's identity).
pdmd_phase_var() {  # prefix phase default
    local name="$1$2"
    printf '%s\n' "${!name:-$3}"
}

# Only one job works on a run directory at a time: RUN_DIR/slurm/active_job names it.
pdmd_claim_run_dir() {
    mkdir -p "$PDMD_STATE_DIR"
    local active state
    active=$(cat "$PDMD_STATE_DIR/active_job" 2>/dev/null || true)
    if [ -n "$active" ] && [ "$active" != "$SLURM_JOB_ID" ]; then
        state=$(squeue -h -j "$active" -o %T 2>/dev/null | head -n 1 || true)
        case "$state" in
            PENDING|RUNNING|CONFIGURING|COMPLETING|REQUEUED|REQUEUE_HOLD|REQUEUE_FED|SUSPENDED|RESIZING|SIGNALING|STAGE_OUT|STOPPED)
                pdmd_event "event=busy other_job=$active state=$state (that job works on this run directory; nothing to do)"
                exit 0 ;;
        esac
    fi
    echo "$SLURM_JOB_ID" > "$PDMD_STATE_DIR/active_job"
}

pdmd_count() {  # name: increment RUN_DIR/slurm/job<ID>.<name> and print the new value
    local f="$PDMD_STATE_DIR/job$SLURM_JOB_ID.$1" n
    n=$(( $(cat "$f" 2>/dev/null || echo 0) + 1 ))
    echo "$n" > "$f"
    echo "$n"
}

pdmd_requeue() {  # reason
    pdmd_event "event=requeue reason=$1"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        pdmd_event "event=requeue_failed (rerun the same sbatch command to resume)"
        return 1
    fi
    # Slurm now ends this run of the job (TERM, then KILL); wait for it rather than racing it.
    local sleeper
    sleep 60 &
    sleeper=$!
    wait "$sleeper" 2>/dev/null || true
    kill "$sleeper" 2>/dev/null || true
    return 0
}

# A log file path of this job with its id (a whole number in the file name) put back as %j.
pdmd_log_pattern() {  # path
    local dir=${1%/*} base=${1##*/}
    base=$(sed -E "s/(^|[^0-9])${SLURM_JOB_ID}([^0-9]|\$)/\1%j\2/g" <<<"$base")
    if [ "$dir" = "$1" ]; then printf '%s\n' "$base"; else printf '%s/%s\n' "$dir" "$base"; fi
}

# sbatch options for the next phase's job: this job's partition/account/qos/limits/names/log files.
pdmd_next_job_args() {  # nodes
    local args=(--parsable --nodes="$1" --dependency="afterok:$SLURM_JOB_ID" --kill-on-invalid-dep=yes)
    [ -n "${SLURM_JOB_NAME:-}" ] && args+=(--job-name="$SLURM_JOB_NAME")
    [ -n "${SLURM_JOB_PARTITION:-}" ] && args+=(--partition="$SLURM_JOB_PARTITION")
    [ -n "${SLURM_JOB_ACCOUNT:-}" ] && args+=(--account="$SLURM_JOB_ACCOUNT")
    [ -n "${SLURM_JOB_QOS:-}" ] && args+=(--qos="$SLURM_JOB_QOS")
    [ -n "${SLURM_NTASKS_PER_NODE:-}" ] && args+=(--ntasks-per-node="${SLURM_NTASKS_PER_NODE%%(*}")
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    [ -n "${SLURM_GPUS_PER_NODE:-}" ] && args+=(--gpus-per-node="$SLURM_GPUS_PER_NODE")
    local info limit out err
    info=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null || true)
    limit=$(squeue -h -j "$SLURM_JOB_ID" -o %l 2>/dev/null | head -n 1 || true)
    case "$limit" in ""|UNLIMITED|INFINITE|NOT_SET) ;; *) args+=(--time="$limit") ;; esac
    # Log files: this job's paths with its id put back as %j (the pattern it was submitted with).
    out=$(sed -n 's/^ *StdOut=\(.*\)$/\1/p' <<<"$info" | head -n 1)
    err=$(sed -n 's/^ *StdErr=\(.*\)$/\1/p' <<<"$info" | head -n 1)
    [ -n "$out" ] && args+=(--output="$(pdmd_log_pattern "$out")")
    [ -n "$err" ] && args+=(--error="$(pdmd_log_pattern "$err")")
    printf '%s\n' "${args[@]}"
}

pdmd_submit_next() {  # phase
    local nodes script id
    nodes=$(pdmd_phase_var PDMD_NODES_PHASE "$1" "${SLURM_JOB_NUM_NODES:-1}")
    script=${PDMD_SCRIPT:?}
    local args=() extra=()
    mapfile -t args < <(pdmd_next_job_args "$nodes")
    read -r -a extra <<<"$PDMD_SBATCH_ARGS"  # split on spaces, no globbing
    args+=("${extra[@]}")
    # A clean environment for the next job: none of this job's SLURM_*/SRUN_* (srun would read them as
    # options) except SLURM_CONF; the PDMD_* contract, SBATCH_* defaults and the user's own variables
    # travel (--export=ALL).
    local unset_args=() v
    for v in $(compgen -e); do
        case "$v" in SLURM_CONF) ;; SLURM_*|SRUN_*) unset_args+=(-u "$v") ;; esac
    done
    if ! id=$(env "${unset_args[@]}" sbatch "${args[@]}" "$script"); then
        pdmd_event "event=submit_failed phase=$1 (submit it yourself: sbatch $script, same environment)"
        return 1
    fi
    id=${id%%;*}
    echo "$id" > "$PDMD_STATE_DIR/active_job"
    pdmd_event "event=submitted next_job=$id phase=$1 nodes=$nodes"
}

pdmd_main() {
    pdmd_defaults
    [ -n "${SLURM_JOB_ID:-}" ] || pdmd_die "not inside a Slurm job: submit with sbatch $PDMD_SCRIPT"
    local phase
    phase=$(pdmd_next_phase) || pdmd_die "cannot read $PDMD_RUN_DIR/manifest.json"
    if [ "$phase" = done ]; then
        pdmd_event "event=skip (every phase of $PDMD_RUN_DIR is done; nothing to run)"
        return 0
    fi
    pdmd_claim_run_dir
    [ "$phase" = new ] && phase=1
    local nodes=${SLURM_JOB_NUM_NODES:-1}
    local want_nodes
    want_nodes=$(pdmd_phase_var PDMD_NODES_PHASE "$phase" "$nodes")
    [ "$want_nodes" = "$nodes" ] || pdmd_log "warning: PDMD_NODES_PHASE$phase=$want_nodes but this job has $nodes nodes; running on $nodes"

    # Rendezvous and per-task environment, given to srun only (the next job must not inherit it).
    local master_addr
    master_addr=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1)
    [ -n "$master_addr" ] || master_addr=${SLURM_JOB_NODELIST:-localhost}
    local task_env=(
        "MASTER_ADDR=$master_addr"
        "MASTER_PORT=${PDMD_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
        "PYTHONPATH=$PDMD_HOME${PYTHONPATH:+:$PYTHONPATH}"
        "PYTHONUNBUFFERED=1"
    )
    if [ "$PDMD_DEVICE" = cpu ]; then
        # No CUDA for torch: megatron_adapters.runtime.parallel then starts gloo and the CPU redirections.
        task_env+=("CUDA_VISIBLE_DEVICES=" "OMP_NUM_THREADS=${OMP_NUM_THREADS:-$PDMD_CPUS_PER_TASK}")
    else
        task_env+=(
            "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}"
            # Megatron's TP/SP communication overlap needs kernels queued in issue order.
            "CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
            # A collective that fails or times out tears the process down instead of hanging;
            # srun --wait then ends the other tasks and the job counts as a crash (retry cap).
            "TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
            "NCCL_DEBUG=${NCCL_DEBUG:-WARN}"
        )
    fi
    local overrides=() extra=()
    # Space-separated lists (the documented contract), split without globbing: [..] in values stays.
    read -r -a overrides <<<"$PDMD_OVERRIDES $(pdmd_phase_var PDMD_OVERRIDES_PHASE "$phase" "")"
    read -r -a extra <<<"$PDMD_SRUN_ARGS"
    local srun_args=(
        --nodes="$nodes" --ntasks-per-node="$PDMD_NPROC_PER_NODE" --cpus-per-task="$PDMD_CPUS_PER_TASK"
        --kill-on-bad-exit=0 --wait="$PDMD_SRUN_WAIT" --label
    )
    if [ -n "$PDMD_CONTAINER_IMAGE" ]; then
        srun_args+=(--container-image="$PDMD_CONTAINER_IMAGE" --container-mounts="$PDMD_CONTAINER_MOUNTS"
                    --container-workdir="$PWD")
    fi
    srun_args+=("${extra[@]}")
    local cmd=("$PDMD_PYTHON" -m pdmd.cli train "$PDMD_CONFIG" --run-dir "$PDMD_RUN_DIR" --phase auto
               "${overrides[@]}")
    pdmd_event "event=start phase=$phase nodes=$nodes tasks_per_node=$PDMD_NPROC_PER_NODE device=$PDMD_DEVICE"
    pdmd_log "srun ${srun_args[*]} ${cmd[*]}"

    # srun in the background, so that the traps run at once (bash defers them during a foreground command).
    PDMD_SIGNALLED=""
    PDMD_TERMINATED=0
    PDMD_SRUN_PID=""
    trap 'pdmd_on_signal USR1' USR1
    trap 'pdmd_on_signal TERM' TERM
    env "${task_env[@]}" srun "${srun_args[@]}" "${cmd[@]}" &
    PDMD_SRUN_PID=$!
    local rc
    while :; do
        wait "$PDMD_SRUN_PID"
        rc=$?
        kill -0 "$PDMD_SRUN_PID" 2>/dev/null || break
    done
    PDMD_SRUN_PID=""
    pdmd_event "event=exit phase=$phase rc=$rc${PDMD_SIGNALLED:+ signal=$PDMD_SIGNALLED}"
    pdmd_after_exit "$rc" "$phase"
}

# USR1 and TERM to this shell both become USR1 for srun, which passes it to every task: pdmd then
# saves at the next step boundary and exits 75 (TERM would make srun kill the step before pdmd saves).
pdmd_on_signal() {  # USR1|TERM
    PDMD_SIGNALLED=$1
    [ "$1" = TERM ] && PDMD_TERMINATED=1
    if [ -n "$PDMD_SRUN_PID" ]; then
        pdmd_log "$1: asking pdmd to checkpoint and stop"
        kill -USR1 "$PDMD_SRUN_PID" 2>/dev/null || true
    fi
}

pdmd_after_exit() {  # rc phase
    local rc=$1 phase=$2 next n restarts
    if [ "$rc" = 0 ]; then
        next=$(pdmd_next_phase) || { pdmd_event "event=error (cannot read the manifest after phase $phase)"; exit 1; }
        if [ "$next" = done ]; then
            pdmd_event "event=finished (every phase of $PDMD_RUN_DIR is done)"
        elif [ "$next" = "$phase" ]; then
            pdmd_event "event=error (pdmd exited 0 but phase $phase is not done)"
            exit 1
        elif [ "$PDMD_CHAIN" = 1 ]; then
            pdmd_submit_next "$next" || exit 1
        else
            pdmd_event "event=stop next_phase=$next (PDMD_CHAIN=0: submit it yourself)"
        fi
        exit 0
    fi
    if [ "$PDMD_TERMINATED" = 1 ]; then
        pdmd_event "event=terminated rc=$rc (Slurm is ending this job: cancel, preemption or time limit; it decides about a requeue)"
        exit "$rc"
    fi
    if [ "$rc" = "$EXIT_PREEMPTED" ]; then
        restarts=${SLURM_RESTART_COUNT:-0}
        n=$(pdmd_count requeues)
        if [ "$n" -gt "$PDMD_MAX_REQUEUES" ]; then
            pdmd_event "event=give_up reason=preempted requeues=$((n - 1)) (the cap PDMD_MAX_REQUEUES is $PDMD_MAX_REQUEUES; restarts so far: $restarts)"
            exit "$rc"
        fi
        pdmd_requeue "preempted ($n of at most $PDMD_MAX_REQUEUES)" || exit "$rc"
        exit "$rc"
    fi
    if [ "$rc" = "$EXIT_DIVERGED" ]; then
        pdmd_event "event=give_up reason=diverged rc=$rc (training diverged: lower the learning rate or CFG scale, then rerun the same sbatch command to resume from the last good checkpoint)"
        exit "$rc"
    fi
    if [ "$rc" = "$EXIT_USAGE" ]; then
        pdmd_event "event=give_up reason=usage rc=$rc (a configuration or usage error does not go away on retry: fix it and resubmit)"
        exit "$rc"
    fi
    n=$(pdmd_count crashes)
    if [ "$n" -gt "$PDMD_MAX_RETRIES" ]; then
        pdmd_event "event=give_up reason=crash rc=$rc crashes=$n (the retry cap PDMD_MAX_RETRIES is $PDMD_MAX_RETRIES: fix the cause and rerun the same sbatch command to resume)"
        exit "$rc"
    fi
    pdmd_requeue "crash rc=$rc (retry $n of at most $PDMD_MAX_RETRIES)" || exit "$rc"
    exit "$rc"
}
