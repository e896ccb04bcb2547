#!/usr/bin/env bash
# Start a one-node SLURM cluster on 127.0.0.1 for the launcher tests (needs root and Debian's slurm-wlm + munge:
# `apt-get install -y --no-install-recommends slurm-wlm munge`). Idempotent: daemons already up are kept.
#
#   bash tests/slurm/setup.sh            # state, logs and slurm.conf under $MDTRAIN_SLURM_DIR (/tmp/mdtrain-slurm)
#   source /tmp/mdtrain-slurm/env.sh     # SLURM_CONF, and PATH with the sacct stand-in (tests/slurm/bin) first
#   bash tests/slurm/teardown.sh         # stops the daemons by pid
#
# Choices that keep the test round trips short (see ../shared/notes/dependencies-on-cpu.md §10):
#   AuthInfo=cred_expire=10  a requeued job is held for cred_expire seconds (default 120) before it may restart;
#   no slurmdbd              so `sacct` is replaced by tests/slurm/bin/sacct, which reads `scontrol show job`;
#   MinJobAge=600            finished jobs stay visible to scontrol (hence to the stand-in) for 10 minutes;
#   sched_interval=2         a requeued job starts again within seconds of its hold ending, not at the next
#                            minute's scheduling pass.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
S=${MDTRAIN_SLURM_DIR:-/tmp/mdtrain-slurm}
for exe in slurmctld slurmd munged sinfo; do
  if ! command -v $exe >/dev/null && [ ! -x /usr/sbin/$exe ]; then
    echo "tests/slurm/setup.sh: $exe not found: apt-get install -y --no-install-recommends slurm-wlm munge" >&2
    exit 1
  fi
done
mkdir -p "$S/state" "$S/spool" "$S/log" /run/munge /var/log/munge /var/lib/munge /etc/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge

# munge: one key, one daemon (a stale socket from a dead daemon is removed first)
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
if ! munge -n </dev/null >/dev/null 2>&1; then
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged
fi

host=$(hostname -s)
cpus=$(nproc)
mem=$(awk '/MemTotal/ {print int($2 / 1024) - 1024}' /proc/meminfo)
cat > "$S/slurm.conf" <<CONF
# written by mdtrain tests/slurm/setup.sh: a one-node test cluster on loopback
ClusterName=mdtrain-test
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=600
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
cat > "$S/env.sh" <<ENV
export SLURM_CONF=$S/slurm.conf
export PATH=$here/bin:\$PATH
ENV
export SLURM_CONF=$S/slurm.conf

alive() { [ -f "$1" ] && p=$(cat "$1") && [ -d /proc/$p ] && [ "$(awk '{print $3}' /proc/$p/stat)" != Z ]; }
alive "$S/slurmctld.pid" || /usr/sbin/slurmctld -c   # -c: start from a clean job state
alive "$S/slurmd.pid" || /usr/sbin/slurmd
for _ in $(seq 1 120); do
  sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)' && break
  sleep 0.5
done
if ! sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
  echo "tests/slurm/setup.sh: the node did not come up; logs in $S/log" >&2
  sinfo >&2 || true
  tail -n 20 "$S/log/slurmctld.log" "$S/log/slurmd.log" >&2 || true
  exit 1
fi
sinfo
echo "SLURM test cluster up: source $S/env.sh"
