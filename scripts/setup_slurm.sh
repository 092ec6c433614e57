#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine (CPU only), for tests/test_slurm.py and for trying the
# sbatch scripts without a GPU cluster. Needs root (Debian/Ubuntu: apt-get). Called by scripts/test.sh.
#
# Everything of ours lives under $PDMD_SLURM_PREFIX (default /var/lib/pdmd-slurm): slurm.conf, state,
# spool, logs, pid files. Our daemons listen on their own ports (6917/6918) and we never touch
# /etc/slurm, so a Slurm installation already on the machine is left alone. Clients find the cluster
# through SLURM_CONF=$PDMD_SLURM_PREFIX/slurm.conf (printed at the end).
#
# Idempotent and fast when already set up (~1 s): packages are installed only when missing, the config
# is rewritten (and our daemons restarted, by their pid files) only when it changed, munged/slurmctld/
# slurmd are started only when not answering. Fails loudly (non-zero, with the log tail) otherwise.
set -euo pipefail

PREFIX=${PDMD_SLURM_PREFIX:-/var/lib/pdmd-slurm}
CONF=$PREFIX/slurm.conf
NODE=localhost
PARTITION=cpu
CTLD_PORT=${PDMD_SLURM_PORT:-6917}
SLURMD_PORT=$((CTLD_PORT + 1))
export SLURM_CONF=$CONF

log() { echo "[setup_slurm] $*"; }
die() {
    echo "[setup_slurm] ERROR: $*" >&2
    for f in "$PREFIX/log/slurmctld.log" "$PREFIX/log/slurmd.log"; do
        [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 20 "$f" >&2; }
    done
    exit 1
}

[ "$(id -u)" = 0 ] || die "needs root (it installs packages and starts daemons); run it with sudo"
# One setup at a time (several test runs may start together); the daemons must not inherit the lock (9>&-).
install -d -m 755 "$PREFIX"
exec 9>"$PREFIX/setup.lock"
command -v flock >/dev/null && { flock -w 900 9 || die "another setup_slurm.sh holds $PREFIX/setup.lock"; }

# 1. Packages (only what is missing; --no-install-recommends keeps it to ~10 small packages).
export PATH=$PATH:/usr/sbin:/sbin
missing=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install Slurm and MUNGE yourself"
    log "installing ${missing[*]} (apt-get)"
    # Keep the packages' own service units from starting (we run our daemons with our own config);
    # policy-rc.d is honoured by invoke-rc.d and deb-systemd-invoke. Restored afterwards.
    policy=/usr/sbin/policy-rc.d
    added_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && added_policy=1
    fi
    restore_policy() { if [ "$added_policy" = 1 ]; then rm -f "$policy"; fi; }
    trap restore_policy EXIT
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
        || die "apt-get install slurmctld slurmd slurm-client munge failed"
    restore_policy
    trap - EXIT
fi

# 2. MUNGE (Slurm's authentication): a key, and a munged answering on its socket.
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    install -d -o munge -g munge -m 700 /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge 2>/dev/null || true
    runuser -u munge -- munged 9>&- || die "munged did not start"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null 2>&1 || die "munged is not answering"
fi

# 3. Our slurm.conf: one node called localhost, a CPU partition, no accounting database
# (scontrol show job keeps finished jobs for MinJobAge seconds; jobcomp/filetxt logs every end).
# config_overrides: slurmd takes our CPU count as given, so 2-task tests fit on a 1-core machine too; CPUs per task = real cores per task.
cpus=$(nproc)
[ "$cpus" -ge 2 ] || cpus=2
install -d -m 755 "$PREFIX" "$PREFIX/state" "$PREFIX/spool" "$PREFIX/log"
want=$(cat <<EOF
# Written by scripts/setup_slurm.sh (phased-dmd): a one-node CPU test cluster. Do not edit; rerun it.
ClusterName=pdmd
SlurmctldHost=$NODE
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again cred_expire + 1 s after the requeue (Slurm's default: 120 s).
AuthInfo=cred_expire=5
CredType=cred/munge
StateSaveLocation=$PREFIX/state
SlurmdSpoolDir=$PREFIX/spool
SlurmctldPidFile=$PREFIX/slurmctld.pid
SlurmdPidFile=$PREFIX/slurmd.pid
SlurmctldLogFile=$PREFIX/log/slurmctld.log
SlurmdLogFile=$PREFIX/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$PREFIX/log/jobcomp.log
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=900
KillWait=30
InactiveLimit=0
# Start pending (e.g. requeued) jobs within seconds, not the default minute.
SchedulerParameters=sched_interval=2,bf_interval=2
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)
changed=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$want" ]; then
    printf '%s\n' "$want" > "$CONF"
    changed=1
fi

# A daemon of ours is running when its pid file names a live process of that name.
ours_running() {  # name
    local pid
    pid=$(cat "$PREFIX/$1.pid" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}
stop_ours() {  # name
    local pid
    ours_running "$1" || return 0
    pid=$(cat "$PREFIX/$1.pid")
    log "stopping our $1 (pid $pid): its config changed"
    kill "$pid"
    for _ in $(seq 100); do [ -d "/proc/$pid" ] || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}
if [ "$changed" = 1 ]; then
    stop_ours slurmd
    stop_ours slurmctld
fi

# 4. Daemons.
if ! ours_running slurmctld; then
    log "starting slurmctld (config $CONF)"
    slurmctld -f "$CONF" 9>&- || die "slurmctld did not start"
fi
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
scontrol ping >/dev/null 2>&1 || die "slurmctld is not answering (scontrol ping)"
if ! ours_running slurmd; then
    log "starting slurmd (node $NODE)"
    slurmd -f "$CONF" -N "$NODE" 9>&- || die "slurmd did not start"
fi

# 5. Wait until the node is usable (idle, or busy with someone's jobs).
state=""
for i in $(seq 120); do
    state=$(sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -n 1)
    case "$state" in
        idle|mix|alloc|comp) break ;;
        down*|drain*|drng*|fail*) [ "$i" = 10 ] && scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
done
case "$state" in
    idle|mix|alloc|comp) ;;
    *) die "node $NODE is '$state' after 60 s (sinfo)" ;;
esac
log "cluster up: partition $PARTITION, node $NODE ($state, $cpus CPUs); use SLURM_CONF=$CONF"
