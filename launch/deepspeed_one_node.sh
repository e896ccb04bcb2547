#!/usr/bin/env bash
# mdtrain under the DeepSpeed launcher on one node, with the DeepSpeed engine (ZeRO stage: parallel.zero_stage).
#
#   bash launch/deepspeed_one_node.sh CONFIG.yaml [key=value ...]            # all the node's GPUs
#   NUM_GPUS=2 bash launch/deepspeed_one_node.sh CONFIG.yaml [key=value ...]  # on a CPU: 2 processes, gloo
#
# The launcher starts NUM_GPUS copies of `mdtrain --local_rank=N train CONFIG ...` with RANK / WORLD_SIZE /
# LOCAL_RANK / MASTER_ADDR=127.0.0.1 / MASTER_PORT set. On a machine without GPUs export DS_ACCELERATOR=cpu first
# (scripts/setup_env.sh does). Overrides after the config win over parallel.engine=deepspeed. Exit status: 0 done,
# 143 when the workers stopped for SIGUSR2/SIGTERM after their checkpoint (the launcher passes on the first non-zero
# worker status), else that status.
set -euo pipefail
if [ $# -lt 1 ]; then sed -n '2,12p' "$0" >&2; exit 2; fi
config=$1
shift
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
[ "${NUM_GPUS:-0}" -ge 1 ] || NUM_GPUS=1
if ! command -v mdtrain >/dev/null; then
  echo "mdtrain is not on PATH: activate its environment first (. .venv/bin/activate)" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # as torchrun does; the deepspeed launcher leaves it unset
cmd=(deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" "$(command -v mdtrain)"
     train "$config" parallel.engine=deepspeed "$@")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
