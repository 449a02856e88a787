#!/bin/bash
# From ../shared/slurm/slurm-ns.sh (the team's verified harness); adapted: the host-side
# wrappers carry SLURMNS_BASE, so a daemon can call them with its own environment.
#
# Single-node Slurm 22.05 (Debian bookworm packages) inside private Linux
# namespaces: pid, mount, uts, ipc, cgroup and (by default) net.
# Nothing on the host changes: all state/logs/spool live under $SLURMNS_BASE;
# /run (tmpfs), /etc/slurm and /etc/hosts are private mounts seen only inside.
#
#   slurm-ns.sh start            # fresh state, boot munged+slurmctld+slurmd, wait until node idle
#   slurm-ns.sh exec CMD ARGS..  # run a command inside the namespaces (sbatch, squeue, a test runner...)
#   slurm-ns.sh stop             # graceful stop; PID-namespace teardown kills every leftover (jobs too)
#   slurm-ns.sh status           # exit 0 if running
#   $SLURMNS_BASE/bin/           # sbatch/squeue/scancel/scontrol/sinfo/srun wrappers usable from the host
#
# Env knobs:
#   SLURMNS_BASE=DIR                      state dir (required; wiped on start)
#   SLURMNS_AUTH=munge|none               auth/munge (private munged) or auth/none (+cred/none; 22.05 still ships them)
#   SLURMNS_NET=private|host              private: own net ns (only lo); host: share the host network
#                                         (daemons then listen on the host's ports below; jobs can reach host services)
#   SLURMNS_PORT=6817                     slurmctld port; slurmd uses PORT+1
#   SLURMNS_NODE=slurmnode                hostname inside the namespace = Slurm NodeName
#   SLURMNS_CRED_EXPIRE=5                 also the minimum delay before a requeued job restarts (Slurm default 120)
#   SLURMNS_SCHED_PARAMS=sched_interval=2,bf_interval=1
#   SLURMNS_DEBUG=info
#   SLURMNS_CPUS=N                        CPUs the node offers (default: nproc; more than the
#                                         machine has, e.g. to run 20 light jobs at once)
set -euo pipefail

BASE=${SLURMNS_BASE:?set SLURMNS_BASE to a directory of its own, on a path with no group- or world-writable parent (munged checks)}
AUTH=${SLURMNS_AUTH:-munge}
NET=${SLURMNS_NET:-private}
PORT=${SLURMNS_PORT:-6817}
NODE=${SLURMNS_NODE:-slurmnode}
CRED_EXPIRE=${SLURMNS_CRED_EXPIRE:-5}
SCHED_PARAMS=${SLURMNS_SCHED_PARAMS:-sched_interval=2,bf_interval=1}
DEBUG=${SLURMNS_DEBUG:-info}
SELF=$(readlink -f "$0")
log() { echo "[$(date +%T.%3N)] $*" >&2; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}'; }

ns_init_pid() {   # host PID of the namespace's PID 1 (= the child of unshare)
    local upid
    upid=$(cat "$BASE/unshare.pid" 2>/dev/null) || return 1
    kill -0 "$upid" 2>/dev/null || return 1
    ps -o pid= --ppid "$upid" | tr -d ' ' | head -n1
}

write_configs() {
    local cpus mem
    cpus=${SLURMNS_CPUS:-$(nproc)}
    # RealMemory must not exceed what slurmd detects (node would be drained): ~5% under MemTotal.
    mem=$(awk '/^MemTotal:/ {printf "%d", $2/1024*0.95}' /proc/meminfo)
    if [ "$AUTH" = none ]; then
        AUTHLINES="AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=$CRED_EXPIRE"
    else
        AUTHLINES="AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$BASE/run/munge/munge.socket.2,cred_expire=$CRED_EXPIRE"
    fi
    cat > "$BASE/etc/slurm.conf" <<EOF
ClusterName=probe
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
$AUTHLINES
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
StateSaveLocation=$BASE/spool/slurmctld
SlurmdSpoolDir=$BASE/spool/slurmd
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=$DEBUG
SlurmdDebug=$DEBUG
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=$SCHED_PARAMS
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# without a default, every job would claim the node's whole memory => 1 job at a time
DefMemPerCPU=$((mem / cpus / 4))
ReturnToService=2
RequeueExit=75
KillWait=5
MinJobAge=3600
SlurmdParameters=config_overrides
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # Slurm 22.05 slurmd always loads a cgroup plugin; with autodetect it picks
    # cgroup/v1 on a v1/hybrid host (nothing is written there with
    # proctrack/linuxproc + task/none). On a pure cgroup v2 host without systemd
    # use:  CgroupPlugin=cgroup/v2 / IgnoreSystemd=yes / CgroupAutomount=yes
    printf 'CgroupPlugin=autodetect\n' > "$BASE/etc/cgroup.conf"
    printf '127.0.0.1 localhost %s\n::1 localhost ip6-localhost\n' "$NODE" > "$BASE/etc/hosts"

    # host-side wrappers: put $BASE/bin first in PATH to use sbatch & co from outside
    local c
    for c in sbatch squeue scancel scontrol sinfo srun salloc sattach sprio; do
        {
            echo '#!/bin/bash'
            # already inside the namespaces (e.g. sbatch called from a job): /etc/slurm is our bind mount
            echo "[ /etc/slurm/slurm.conf -ef '$BASE/etc/slurm.conf' ] && exec /usr/bin/$c \"\$@\""
            if [ "$NET" = private ]; then
                echo "SLURMNS_BASE='$BASE' exec '$SELF' exec /usr/bin/$c \"\$@\""
            else
                echo "SLURM_CONF='$BASE/etc/slurm.conf' exec /usr/bin/$c \"\$@\""
            fi
        } > "$BASE/bin/$c"
        chmod 755 "$BASE/bin/$c"
    done
}

case ${1:-} in
start)
    if [ -n "$(ns_init_pid 2>/dev/null || true)" ]; then log "already running ($BASE)"; exit 1; fi
    t0=$(date +%s.%N)
    rm -rf "$BASE"
    mkdir -p "$BASE"/{etc,bin,spool/slurmctld,spool/slurmd,log,run/munge,munge,jobs}
    chmod 755 "$BASE" "$BASE/run"
    write_configs
    if [ "$AUTH" = munge ]; then
        # munged is picky: key 0400 owned by munge, no group/other-writable dirs on the paths
        chown munge:munge "$BASE/munge" "$BASE/run/munge"
        chmod 700 "$BASE/munge"; chmod 755 "$BASE/run/munge"
        mungekey --create --keyfile="$BASE/munge/munge.key" --bits=1024
        chown munge:munge "$BASE/munge/munge.key"; chmod 400 "$BASE/munge/munge.key"
    fi
    NSFLAGS=(--pid --fork --kill-child --mount --uts --ipc --cgroup --mount-proc)
    [ "$NET" = private ] && NSFLAGS+=(--net)
    # setsid: own session, detached from the caller; --kill-child: if unshare dies, the
    # namespace's PID 1 gets SIGKILL and the kernel kills everything inside.
    setsid unshare "${NSFLAGS[@]}" "$SELF" _init </dev/null >"$BASE/log/init.log" 2>&1 &
    echo $! > "$BASE/unshare.pid"
    for _ in $(seq 1 600); do
        [ -e "$BASE/ready" ] && break
        if [ -e "$BASE/failed" ] || ! kill -0 "$(cat "$BASE/unshare.pid")" 2>/dev/null; then
            log "start FAILED; logs in $BASE/log/"; tail -n 20 "$BASE/log/init.log" "$BASE/log/slurmd.log" "$BASE/log/slurmctld.log" >&2 || true
            exit 1
        fi
        sleep 0.1
    done
    [ -e "$BASE/ready" ] || { log "start timed out (60 s)"; "$SELF" stop || true; exit 1; }
    log "cluster up in $(elapsed "$t0") s (ns init pid $(ns_init_pid))"
    ;;
_init)
    # ---------------- PID 1 of the new PID namespace ----------------
    set -x
    mount --make-rprivate /
    hostname "$NODE"
    if [ "$NET" = private ]; then
        ip link set lo up
        # Slurm binds with getaddrinfo(NULL, AF_INET, AI_PASSIVE|AI_ADDRCONFIG); glibc's
        # AI_ADDRCONFIG ignores 127.x, so with only loopback it fails ("Unable to resolve
        # (null)" / "Address family not supported"). A non-127 address on lo fixes it.
        ip addr add 10.254.254.1/32 dev lo
    fi
    mount -t tmpfs -o mode=755,size=16m tmpfs /run
    mkdir -p /etc/slurm
    mount --bind "$BASE/etc" /etc/slurm       # default config path for commands inside
    mount --bind "$BASE/etc/hosts" /etc/hosts
    PIDS=()
    shutdown_all() {
        set +e
        for ((i=${#PIDS[@]}-1; i>=0; i--)); do kill -TERM "${PIDS[i]}" 2>/dev/null; wait "${PIDS[i]}"; done
        exit 0       # PID 1 exits -> kernel SIGKILLs whatever is left in the namespace (jobs, slurmstepd)
    }
    trap shutdown_all TERM INT
    if [ "$AUTH" = munge ]; then
        setpriv --reuid=munge --regid=munge --init-groups \
            munged -F --key-file="$BASE/munge/munge.key" --log-file="$BASE/log/munged.log" \
                   --seed-file="$BASE/munge/munged.seed" --pid-file="$BASE/run/munge/munged.pid" \
                   --socket="$BASE/run/munge/munge.socket.2" 2>>"$BASE/log/munged.out" &
        PIDS+=($!)
        for _ in $(seq 1 100); do [ -S "$BASE/run/munge/munge.socket.2" ] && break; sleep 0.05; done
        munge -S "$BASE/run/munge/munge.socket.2" -n | unmunge -S "$BASE/run/munge/munge.socket.2" >/dev/null
    fi
    slurmctld -D -i >>"$BASE/log/slurmctld.out" 2>&1 &
    PIDS+=($!)
    slurmd -D >>"$BASE/log/slurmd.out" 2>&1 &
    PIDS+=($!)
    st=
    for _ in $(seq 1 600); do
        st=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
        [ "$st" = idle ] && break
        for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null || { touch "$BASE/failed"; shutdown_all; }; done
        sleep 0.1
    done
    if [ "$st" != idle ]; then touch "$BASE/failed"; shutdown_all; fi
    echo "${PIDS[*]}" > "$BASE/run/daemon.pids"   # PIDs as seen inside the namespace
    touch "$BASE/ready"
    set +x
    while :; do sleep 3600 & wait $! || true; done
    ;;
exec)
    shift
    pid=$(ns_init_pid 2>/dev/null || true)
    [ -n "$pid" ] || { log "cluster not running ($BASE)"; exit 1; }
    PATH=$(echo "$PATH" | tr ':' '\n' | grep -vxF "$BASE/bin" | paste -sd:)   # no wrapper recursion
    # -n is a no-op when the cluster shares the host network
    exec nsenter -t "$pid" -m -u -i -n -p -C --wd="$PWD" -- "$@"
    ;;
stop)
    t0=$(date +%s.%N)
    upid=$(cat "$BASE/unshare.pid" 2>/dev/null || true)
    if [ -z "$upid" ] || ! kill -0 "$upid" 2>/dev/null; then log "not running"; rm -f "$BASE/unshare.pid"; exit 0; fi
    ipid=$(ns_init_pid 2>/dev/null || true)
    [ -n "$ipid" ] && kill -TERM "$ipid" 2>/dev/null || true
    for _ in $(seq 1 300); do kill -0 "$upid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$upid" 2>/dev/null; then
        log "graceful stop timed out after 30 s: SIGKILL to unshare $upid (--kill-child tears down the PID ns)"
        kill -KILL "$upid" 2>/dev/null || true
        for _ in $(seq 1 100); do [ -n "$ipid" ] && kill -0 "$ipid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$BASE/unshare.pid" "$BASE/ready"
    log "cluster stopped in $(elapsed "$t0") s"
    ;;
status)
    pid=$(ns_init_pid 2>/dev/null || true)
    if [ -n "$pid" ]; then echo "running (ns init pid $pid, base $BASE)"; exit 0; fi
    echo "stopped"; exit 3
    ;;
*)
    echo "usage: $0 start|exec CMD...|stop|status" >&2; exit 2 ;;
esac
