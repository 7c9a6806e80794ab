#!/usr/bin/env bash
# A single-node Slurm cluster in a directory, for tests and benchmarks (facts: ../shared/spec/SLURM.md).
#
#   ci/slurm.sh start DIR   installs slurmctld, slurmd, slurm-client and munge if missing, starts
#                           munged, slurmctld and slurmd with their state, sockets, logs and pid
#                           files in DIR, and waits until the node is idle. Already running: no-op.
#   ci/slurm.sh stop DIR    cancels the cluster's jobs, then stops the daemons started in DIR by their
#                           recorded pids (TERM, then KILL after 10 s), in reverse order. Nothing
#                           running: no-op.
#   ci/slurm.sh env DIR     prints `export SLURM_CONF=DIR/slurm.conf`.
#
# Ports: SLURM_CTLD_PORT (default 6817) and SLURMD_PORT (default 6818). Needs root (the daemons run
# as root, munged as the `munge` user); no systemd, no cgroups (proctrack/linuxproc, task/none).
set -euo pipefail

die() { echo "ci/slurm.sh: $*" >&2; exit 1; }

[ $# -eq 2 ] || die "usage: ci/slurm.sh start|stop|env DIR"
action=$1
mkdir -p "$2"
DIR=$(cd "$2" && pwd)
CONF=$DIR/slurm.conf
NODE=$(hostname -s)
# Order matters: stopped in reverse.
DAEMONS=(munged slurmctld slurmd)

# Whether pid $1 is a live process (a zombie, which lingers ~2 s under this init, is not).
alive() {
    local stat
    stat=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ -n $stat && $stat != Z* ]]
}

# The pid recorded for daemon $1, or nothing.
pid_of() {
    local file=$DIR/$1.pid
    [ -s "$file" ] && tr -dc 0-9 <"$file" || true
}

install_packages() {
    if [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ] && command -v srun >/dev/null; then
        return
    fi
    [ "$(id -u)" -eq 0 ] || die "slurm is not installed and installing it needs root"
    echo "ci/slurm.sh: installing slurmctld slurmd slurm-client munge" >&2
    apt-get -o DPkg::Lock::Timeout=300 update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >&2 || die "installing the slurm packages failed"
}

munge_key() {
    local key=/etc/munge/munge.key
    if [ ! -s $key ]; then
        mkdir -p /etc/munge
        head -c 1024 /dev/urandom >$key
    fi
    chown munge:munge $key
    chmod 400 $key
}

write_conf() {
    local ctld_port=${SLURM_CTLD_PORT:-6817} slurmd_port=${SLURMD_PORT:-6818}
    local mem_mib cpus
    # Not nproc, which follows OMP_NUM_THREADS.
    cpus=$(getconf _NPROCESSORS_ONLN)
    mem_mib=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
    mkdir -p "$DIR/state" "$DIR/spool"
    cat >"$CONF.tmp" <<EOF
# Written by ci/slurm.sh: a single-node cluster in $DIR.
ClusterName=halo
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=3600
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mib State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

start() {
    local running=0 d
    for d in "${DAEMONS[@]}"; do
        local pid
        pid=$(pid_of "$d")
        if [ -n "$pid" ] && alive "$pid"; then running=$((running + 1)); fi
    done
    if [ $running -eq ${#DAEMONS[@]} ]; then
        echo "ci/slurm.sh: already running in $DIR" >&2
        return
    fi
    [ $running -eq 0 ] || { stop; }
    install_packages
    munge_key
    # munged refuses a socket directory it does not own with mode 711; it must reach it through DIR.
    chmod go+x "$DIR"
    runuser -u munge -- test -x "$DIR" || die "the munge user cannot reach $DIR (a parent directory is not searchable by others): use a directory such as \$(mktemp -d)"
    mkdir -p "$DIR/munge"
    chown munge:munge "$DIR/munge"
    chmod 711 "$DIR/munge"
    rm -f "$DIR"/*.pid
    runuser -u munge -- /usr/sbin/munged --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" \
        || die "munged did not start; see $DIR/munge/munged.log"
    cp "$DIR/munge/munged.pid" "$DIR/munged.pid"
    write_conf
    /usr/sbin/slurmctld -c -f "$CONF" || die "slurmctld did not start; see $DIR/slurmctld.log"
    /usr/sbin/slurmd -f "$CONF" || die "slurmd did not start; see $DIR/slurmd.log"
    local deadline=$((SECONDS + 30)) state=""
    while [ $SECONDS -lt $deadline ]; do
        state=$(SLURM_CONF=$CONF sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
        if [ "$state" = idle ]; then
            echo "ci/slurm.sh: node $NODE idle; export SLURM_CONF=$CONF" >&2
            return
        fi
        sleep 0.1
    done
    die "node $NODE not idle after 30 s (state: '${state}'); see $DIR/slurmctld.log and $DIR/slurmd.log"
}

stop() {
    local i d pid
    # Jobs first: their steps (slurmstepd and the tasks) would outlive the daemons.
    pid=$(pid_of slurmctld)
    if [ -n "$pid" ] && alive "$pid"; then
        local jobs deadline=$((SECONDS + 10))
        jobs=$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086 # one argument per job id
            SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
            while [ -n "$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null || true)" ] && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
        fi
    fi
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        d=${DAEMONS[$i]}
        pid=$(pid_of "$d")
        [ -n "$pid" ] || continue
        if alive "$pid"; then
            kill -TERM "$pid" 2>/dev/null || true
            local deadline=$((SECONDS + 10))
            while alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
            if alive "$pid"; then
                echo "ci/slurm.sh: $d (pid $pid) ignored SIGTERM for 10 s; killing it" >&2
                kill -KILL "$pid" 2>/dev/null || true
            fi
        fi
        rm -f "$DIR/$d.pid"
    done
}

case $action in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) die "unknown action '$action': expected start, stop or env" ;;
esac
