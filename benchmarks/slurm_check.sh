#!/usr/bin/env bash
# The SLURM check (`make slurm-check`, opt-in: root and Debian packages): brings up a one-node SLURM cluster on this
# machine (munge, slurmctld + slurmd on localhost, a minimal slurm.conf: one node with the machine's CPUs and memory,
# one partition, no accounting), runs benchmarks/slurm_check.py through it (a four-job sweep against a local one, a
# job requeued mid-training, a job timed out and requeued at its limit, a job that fails), tears the cluster down
# and leaves one JSON of what happened.
#
#   benchmarks/slurm_check.sh [--out outputs/slurm_check.json] [--keep] [--only "sweep requeue timeout failure"]
#
# Installs slurm-wlm and munge with apt-get when they are missing. Its files live in $SLURM_CHECK_DIR
# (default /tmp/qspeech-slurm-check); the cluster reads its own slurm.conf there (SLURM_CONF), so /etc/slurm is not
# touched. QSPEECH (default: the qspeech next to this script's python, or on PATH) runs the jobs.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
OUT="outputs/slurm_check.json"
KEEP=0
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --only) ONLY="$2"; shift 2 ;;  # e.g. --only "sweep failure"
        *) echo "usage: $0 [--out FILE] [--keep] [--only \"sweep requeue timeout failure\"]" >&2; exit 2 ;;
    esac
done
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
PYTHON="${PYTHON:-$(command -v python3)}"
DIR="${SLURM_CHECK_DIR:-/tmp/qspeech-slurm-check}"

if [ "$(id -u)" != 0 ]; then
    echo "slurm_check: needs root (it installs slurm-wlm and munge and starts their daemons)" >&2
    exit 2
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "slurm_check: installing slurm-wlm and munge"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
fi
"$PYTHON" -c "import hydra_plugins.hydra_submitit_launcher" 2>/dev/null || {
    echo "slurm_check: Hydra's submitit launcher is not installed: pip install 'qspeech[slurm]'" >&2; exit 2; }

rm -rf "$DIR"
mkdir -p "$DIR"/{state,spool,log}
STARTED_MUNGE="" CTLD_PID="" SLURMD_PID=""

alive() { [ -n "$1" ] && [ -e "/proc/$1" ]; }
teardown() {
    set +e
    if alive "$CTLD_PID" || alive "$SLURMD_PID"; then
        SLURM_CONF="$DIR/slurm.conf" scontrol shutdown >/dev/null 2>&1
        for _ in $(seq 30); do
            alive "$CTLD_PID" || alive "$SLURMD_PID" || break
            sleep 1
        done
    fi
    for pid in $SLURMD_PID $CTLD_PID $STARTED_MUNGE; do  # whatever did not stop on shutdown; our munged
        alive "$pid" && kill "$pid"
    done
    echo "slurm_check: cluster stopped"
    [ "$KEEP" = 1 ] || rm -rf "$DIR/state" "$DIR/spool" "$DIR/work"  # the logs stay
}
trap teardown EXIT

# --- munge: the machine's key (the package creates one), a daemon of our own unless one answers already
[ -s /etc/munge/munge.key ] || { mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null || create-munge-key -f; }
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    sleep 1
    STARTED_MUNGE="$(cat /run/munge/munged.pid)"
fi
munge -n | unmunge >/dev/null

# --- slurm.conf: this machine as the only node (its CPUs and memory as slurmd sees them), one partition
HOST="$(hostname -s)"
NODE="$(slurmd -C | head -1)"
cat > "$DIR/slurm.conf" <<EOF
ClusterName=qspeech-check
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# finished jobs stay visible to scontrol (state, restarts, exit code) for the whole check
MinJobAge=3600
KillWait=30
# a requeued job may start again this many seconds after it stopped (the default credential lifetime, 120 s, would
# hold every requeue of the check for two minutes)
AuthInfo=cred_expire=20
$NODE State=UNKNOWN
PartitionName=check Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$DIR/slurm.conf"

T0=$(date +%s)
slurmctld -i
slurmd
sleep 1
CTLD_PID="$(cat "$DIR/slurmctld.pid")" SLURMD_PID="$(cat "$DIR/slurmd.pid")"
for _ in $(seq 60); do
    sinfo -h -o %T 2>/dev/null | grep -q idle && break
    sleep 1
done
sinfo -h -o %T | grep -q idle || { echo "slurm_check: the node did not come up" >&2; tail -20 "$DIR"/log/*.log >&2; exit 1; }
echo "slurm_check: one-node cluster up in $(( $(date +%s) - T0 )) s: $(sinfo -h -o '%P %D node, %c CPUs, %m MB')"

cd "$DIR"
set +e
"$PYTHON" "$HERE/slurm_check.py" --work "$DIR/work" --out "$OUT" --cluster-up-s "$(( $(date +%s) - T0 ))" ${ONLY:+--only $ONLY}
RC=$?
T1=$(date +%s)
trap - EXIT
teardown
LEFT="$(for pid in $CTLD_PID $SLURMD_PID; do alive "$pid" && echo "$pid"; done)"
"$PYTHON" - "$OUT" "$(( $(date +%s) - T1 ))" "$LEFT" <<'EOF'
import json, sys
path, seconds, left = sys.argv[1], float(sys.argv[2]), sys.argv[3].split()
data = json.loads(open(path).read())
data["teardown"] = {"seconds": seconds, "daemons_left": left, "ok": not left}
data["ok"] = bool(data.get("ok")) and not left
open(path, "w").write(json.dumps(data, indent=2) + "\n")
EOF
echo "slurm_check: $OUT"
exit $RC
