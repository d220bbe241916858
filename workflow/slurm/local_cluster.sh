#!/usr/bin/env bash
# A single-node Slurm on this machine, for trying workflow/profiles/slurm without a cluster and for
# the tests marked `slurm` (tests/workflow/test_slurm.py):
#
#   workflow/slurm/local_cluster.sh start     # install (apt-get) and start; does nothing if running
#   workflow/slurm/local_cluster.sh status    # exit status 0 when running, 3 when not
#   workflow/slurm/local_cluster.sh stop      # cancel its jobs, stop its daemons
#
# It needs root. Debian's slurm-wlm and munge are installed with apt-get where they are missing.
# What it writes lives in one folder, $BLOCKLORA_SLURM_DIR (default /tmp/blocklora-slurm):
# slurm.conf, gres.conf and cgroup.conf, a munge key and socket of its own, the daemons' state, pid
# files and logs (log/). Slurm's commands read their configuration from /etc/slurm, and inside a
# job the executor plugin runs `srun` with every SLURM_* variable but a few removed (SLURM_CONF
# included), so the three files are linked there; `stop` removes the links. Where /etc/slurm already
# holds a configuration of its own, `start` refuses and leaves it alone, as it does when a slurmctld
# or slurmd that it did not start is running.
#
# The node is this machine: its CPUs and 90 % of its memory (`slurmd -C`), and
# $BLOCKLORA_SLURM_GPUS (default 2) stand-in GPUs: character devices /dev/blocklora-gpu<N> with the
# numbers of /dev/null, declared as gres `gpu`, so that `--gpus=1` gives a job one of them and
# CUDA_VISIBLE_DEVICES naming it. Up to 4 jobs share a core (OverSubscribe=FORCE:4), so that on a
# small machine jobs wait for memory and GPUs, as they would on a GPU node, rather than for cores.
# Partitions `cpu` (the default) and `gpu` both hold the node. No accounting database: `sacct`
# answers that accounting is disabled, and `squeue` shows finished jobs for MinJobAge (1 h).
set -euo pipefail
unset SLURM_CONF # Slurm's commands here talk to this cluster, through /etc/slurm

STATE=${BLOCKLORA_SLURM_DIR:-/tmp/blocklora-slurm}
GPUS=${BLOCKLORA_SLURM_GPUS:-2}
ETC=/etc/slurm
CONFIGS=(slurm.conf gres.conf cgroup.conf)
CONF=$STATE/slurm.conf
MUNGE_SOCKET=$STATE/munge/munge.socket
DEVICE_PREFIX=/dev/blocklora-gpu
SHARE=4 # jobs that may share one core (OverSubscribe=FORCE:4): memory and GPUs are what jobs wait for

usage() {
    echo "usage: $(basename "$0") {start|stop|status}" >&2
    echo "  start   install slurm-wlm and munge if missing, start a one-node cluster in $STATE" >&2
    echo "  stop    cancel its jobs and stop its daemons (the folder and its logs stay)" >&2
    echo "  status  say whether it runs (exit status 0) or not (3), with sinfo and squeue" >&2
}

die() {
    echo "local_cluster.sh: $*" >&2
    exit 1
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "needs root (slurmd runs jobs as their users, and munge and the stand-in GPU devices need root); run it with sudo"
}

alive() { # pid [name]: the process runs (a zombie does not), under that name when one is given
    local stat
    stat=$(cat /proc/"$1"/stat 2>/dev/null) || return 1
    [[ $(awk '{print $1}' <<<"${stat##*)}") != Z ]] || return 1
    [[ -z ${2:-} || $(cat /proc/"$1"/comm 2>/dev/null) == "$2" ]]
}

pid_alive() { # pid file: the daemon it names runs
    [[ -s $1 ]] && alive "$(cat "$1")" "$(basename "$1" .pid)"
}

ours() { # pid -> 0 when it is one of the daemons this script started
    local pid=$1 file
    for file in "$STATE/slurmctld.pid" "$STATE/slurmd.pid"; do
        [[ -s $file && $(cat "$file") == "$pid" ]] && return 0
    done
    return 1
}

foreign_slurm() { # prints the first slurmctld or slurmd process that this script did not start
    local pid
    for pid in $(pgrep -x slurmctld; pgrep -x slurmd); do
        # without an init that reaps them, daemonizing leaves zombies behind: not a running Slurm
        alive "$pid" || continue
        if ! ours "$pid"; then
            echo "$pid ($(tr '\0' ' ' </proc/"$pid"/cmdline 2>/dev/null || echo '?'))"
            return 0
        fi
    done
    return 1
}

install_packages() {
    local missing=()
    local tool
    for tool in slurmctld slurmd sbatch squeue scontrol; do
        command -v "$tool" >/dev/null || missing=(slurm-wlm)
    done
    command -v munged >/dev/null || missing+=(munge)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get here; install ${missing[*]} (Slurm and MUNGE) another way"
    echo "installing ${missing[*]} with apt-get ..."
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } >"$STATE/log/apt-get.log" 2>&1; then
        tail -n 5 "$STATE/log/apt-get.log" >&2
        die "apt-get could not install slurm-wlm and munge (no network to the Debian mirror?); log: $STATE/log/apt-get.log"
    fi
}

write_if_changed() { # path <- stdin, atomically; exit status 0 when the file changed
    local tmp
    tmp=$(mktemp "$1.XXXXXX")
    cat >"$tmp"
    chmod 644 "$tmp"
    if [[ -f $1 ]] && cmp -s "$tmp" "$1"; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$1"
}

write_config() { # exit status 0 when a file changed
    local node host cpus memory changed=1 cgroup=cgroup/v1
    host=$(hostname -s)
    node=$(slurmd -C | head -n 1) || die "slurmd -C could not describe this machine"
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node")
    memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    [[ -n $cpus && -n $memory ]] || die "cannot read CPUs and RealMemory from slurmd -C: $node"
    node=${node/RealMemory=$memory/RealMemory=$((memory * 9 / 10))}
    [[ -f /sys/fs/cgroup/cgroup.controllers ]] && cgroup=cgroup/v2 # a unified (v2-only) hierarchy
    write_if_changed "$CONF" <<EOF && changed=0
# Written by workflow/slurm/local_cluster.sh: a one-node Slurm on $host. Regenerated by each start.
ClusterName=blocklora
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
GresTypes=gpu
ReturnToService=2
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MinJobAge=3600
SchedulerParameters=bf_interval=5
$node NodeAddr=127.0.0.1 Gres=gpu:$GPUS State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE OverSubscribe=FORCE:$SHARE State=UP
PartitionName=gpu Nodes=$host MaxTime=INFINITE OverSubscribe=FORCE:$SHARE State=UP
EOF
    write_if_changed "$STATE/gres.conf" <<EOF && changed=0
NodeName=$host Name=gpu File=${DEVICE_PREFIX}[0-$((GPUS - 1))]
EOF
    write_if_changed "$STATE/cgroup.conf" <<EOF && changed=0
CgroupPlugin=$cgroup
IgnoreSystemd=yes
EOF
    return $changed
}

foreign_config() { # prints the first file of /etc/slurm that is not a link to this folder's
    local name
    for name in "${CONFIGS[@]}"; do
        if [[ -e $ETC/$name || -L $ETC/$name ]] && [[ $(readlink "$ETC/$name") != "$STATE/$name" ]]; then
            echo "$ETC/$name"
            return 0
        fi
    done
    return 1
}

link_config() {
    local name
    mkdir -p "$ETC"
    for name in "${CONFIGS[@]}"; do
        [[ $(readlink "$ETC/$name" 2>/dev/null) == "$STATE/$name" ]] || ln -sfn "$STATE/$name" "$ETC/$name"
    done
}

unlink_config() {
    local name
    for name in "${CONFIGS[@]}"; do
        [[ -L $ETC/$name && $(readlink "$ETC/$name") == "$STATE/$name" ]] && rm -f "$ETC/$name"
    done
    return 0
}

start_munge() {
    if [[ -S $MUNGE_SOCKET ]] && munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; then
        return 0
    fi
    mkdir -p "$STATE/munge"
    chmod 700 "$STATE/munge"
    if [[ ! -s $STATE/munge/munge.key ]]; then
        dd if=/dev/urandom of="$STATE/munge/munge.key.tmp" bs=1024 count=1 status=none
        chmod 400 "$STATE/munge/munge.key.tmp"
        mv -f "$STATE/munge/munge.key.tmp" "$STATE/munge/munge.key"
    fi
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    munged --force --socket="$MUNGE_SOCKET" --key-file="$STATE/munge/munge.key" \
        --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge/munged.seed" ||
        die "munged did not start; log: $STATE/log/munged.log"
    munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null ||
        die "munge does not answer on $MUNGE_SOCKET; log: $STATE/log/munged.log"
}

make_devices() {
    local i
    for ((i = 0; i < GPUS; i++)); do
        [[ -c $DEVICE_PREFIX$i ]] && continue
        rm -f "$DEVICE_PREFIX$i"
        mknod "$DEVICE_PREFIX$i" c 1 3 2>/dev/null ||
            die "cannot create the stand-in GPU device $DEVICE_PREFIX$i (mknod is not allowed here)"
    done
}

running() { # our slurmctld and slurmd are alive and the controller answers
    pid_alive "$STATE/slurmctld.pid" && pid_alive "$STATE/slurmd.pid" &&
        scontrol ping 2>/dev/null | grep -q "is UP"
}

node_state() {
    sinfo -h -N -o %T 2>/dev/null | head -n 1
}

wait_for_node() {
    local state deadline=$((SECONDS + 60))
    while ((SECONDS < deadline)); do
        state=$(node_state)
        case $state in
        idle | mixed | allocated) return 0 ;;
        drain* | down*)
            # a drain left over from an earlier configuration: the node is registered again now
            scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true
            ;;
        esac
        sleep 1
    done
    tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
    die "the node did not become ready (state: ${state:-none}); logs in $STATE/log"
}

cmd_start() {
    need_root
    local foreign
    if foreign=$(foreign_slurm); then
        die "a Slurm that this script did not start is running here (pid $foreign); it is left alone. Use that cluster with workflow/profiles/slurm, or stop it before starting this one"
    fi
    if foreign=$(foreign_config); then
        die "$foreign is not this script's: this machine has a Slurm configuration of its own, which is left alone. Use that cluster with workflow/profiles/slurm"
    fi
    mkdir -p "$STATE/log" "$STATE/slurmctld" "$STATE/slurmd"
    chmod 755 "$STATE"
    install_packages
    local changed=1
    write_config && changed=0
    if running; then
        if ((changed == 0)); then
            echo "configuration changed: restarting the local cluster"
            cmd_stop >/dev/null
        else
            wait_for_node
            echo "the local cluster is already running ($STATE)"
            return 0
        fi
    fi
    start_munge
    make_devices
    link_config
    pid_alive "$STATE/slurmctld.pid" || {
        # -c: a clean start (no jobs or node states of an earlier run)
        slurmctld -c || die "slurmctld did not start; log: $STATE/log/slurmctld.log"
    }
    local started=$SECONDS
    until scontrol ping 2>/dev/null | grep -q "is UP"; do
        # it writes its pid file once it has daemonized: give it a few seconds before asking
        if ((SECONDS > started + 30)) || { ((SECONDS > started + 3)) && ! pid_alive "$STATE/slurmctld.pid"; }; then
            tail -n 20 "$STATE/log/slurmctld.log" >&2 || true
            die "slurmctld does not answer; log: $STATE/log/slurmctld.log"
        fi
        sleep 0.5
    done
    pid_alive "$STATE/slurmd.pid" || {
        slurmd || {
            tail -n 20 "$STATE/log/slurmd.log" >&2 || true
            die "slurmd did not start; log: $STATE/log/slurmd.log"
        }
    }
    wait_for_node
    echo "the local cluster runs: $(hostname -s), partitions cpu and gpu, $GPUS stand-in GPUs"
    echo "sbatch, squeue and snakemake --workflow-profile workflow/profiles/slurm now use it"
}

stop_pid() { # pid file of one of its daemons: TERM, wait up to 20 s, then KILL
    local pid name i
    [[ -s $1 ]] || return 0
    pid=$(cat "$1")
    name=$(basename "$1" .pid)
    if alive "$pid" "$name"; then
        kill "$pid" 2>/dev/null || true
        for ((i = 0; i < 40; i++)); do
            alive "$pid" "$name" || break
            sleep 0.5
        done
        if alive "$pid" "$name"; then kill -9 "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$1"
}

cmd_stop() {
    need_root
    if [[ -f $CONF ]] && pid_alive "$STATE/slurmctld.pid"; then
        local jobs
        jobs=$(squeue -h -o %i -t PENDING,RUNNING,SUSPENDED,CONFIGURING,COMPLETING 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            local i
            for ((i = 0; i < 30; i++)); do
                [[ -z $(squeue -h -o %i -t RUNNING,COMPLETING 2>/dev/null) ]] && break
                sleep 1
            done
        fi
    fi
    stop_pid "$STATE/slurmd.pid"
    stop_pid "$STATE/slurmctld.pid"
    if [[ -S $MUNGE_SOCKET ]]; then
        munged --stop --socket="$MUNGE_SOCKET" >/dev/null 2>&1 || true
    fi
    local i
    for ((i = 0; i < 64; i++)); do
        [[ -c $DEVICE_PREFIX$i ]] && rm -f "$DEVICE_PREFIX$i"
    done
    unlink_config
    echo "the local cluster is stopped (logs stay in $STATE/log)"
}

cmd_status() {
    if [[ -f $CONF ]] && ! foreign_config >/dev/null && running; then
        echo "running: $STATE"
        sinfo
        squeue
        return 0
    fi
    echo "not running (state folder: $STATE)"
    return 3
}

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
help | -h | --help) usage ;;
*)
    usage
    exit 2
    ;;
esac
