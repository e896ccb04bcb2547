#!/usr/bin/env bash
# Stop the test cluster started by tests/slurm/setup.sh: by the pids it recorded (never by name), TERM, then KILL.
S=${MDTRAIN_SLURM_DIR:-/tmp/mdtrain-slurm}
alive() { [ -d /proc/$1 ] && [ "$(awk '{print $3}' /proc/$1/stat 2>/dev/null)" != Z ]; }
pids=""
for f in "$S/slurmd.pid" "$S/slurmctld.pid" /run/munge/munged.pid; do
  [ -f "$f" ] || continue
  p=$(cat "$f")
  [ -n "$p" ] && alive "$p" && kill "$p" 2>/dev/null && pids="$pids $p"
done
left=$pids
for _ in $(seq 1 40); do
  left=""
  for p in $pids; do alive "$p" && left="$left $p"; done
  [ -z "$left" ] && break
  sleep 0.25
done
for p in $left; do kill -9 "$p" 2>/dev/null; done
rm -f "$S/slurmd.pid" "$S/slurmctld.pid"
[ -n "$pids" ] && echo "SLURM test cluster stopped (pids$pids)"
exit 0
