#!/usr/bin/env bash
# mdtrain under torchrun, on one node or several. Every process runs `python -m mdtrain train CONFIG [key=value ...]`
# and joins the process group from torchrun's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
#
#   one node, all its GPUs:  bash launch/torchrun.sh CONFIG.yaml [key=value ...]
#   CPU, 2 processes:        NPROC=2 bash launch/torchrun.sh CONFIG.yaml [key=value ...]
#   N nodes: on each node    NNODES=N NPROC=8 RDZV_HOST=<first node> RDZV_ID=<any run name> \
#                            bash launch/torchrun.sh CONFIG.yaml [key=value ...]
#
# NPROC defaults to the number of GPUs (1 without any). Re-running the same command on the same train.run_dir
# resumes from the newest checkpoint. The commands it runs are printed first. It runs torchrun's own launcher through
# `python -m mdtrain.launch.torchrun` (same arguments), which exits with 143 when the workers stopped for a
# SIGUSR2/SIGTERM after their checkpoint (plain torchrun exits with 1 then), 0 when done, 1 on a failure.
set -euo pipefail
if [ $# -lt 1 ]; then sed -n '2,13p' "$0" >&2; exit 2; fi
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
[ "${NPROC:-0}" -ge 1 ] || NPROC=1
NNODES=${NNODES:-1}
if [ "$NNODES" -eq 1 ]; then
  # --standalone: a local rendezvous on a free port, nothing to configure
  cmd=("${PYTHON:-python}" -m mdtrain.launch.torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC"
       -m mdtrain train "$@")
else
  cmd=("${PYTHON:-python}" -m mdtrain.launch.torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC" --rdzv-backend c10d
       --rdzv-endpoint "${RDZV_HOST:?set RDZV_HOST to the first node}:${RDZV_PORT:-29500}"
       --rdzv-id "${RDZV_ID:-mdtrain}" -m mdtrain train "$@")
fi
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
