#!/usr/bin/env bash
# Create ./.venv (if missing) and install mdtrain with exact pins. Sourced by quickstart.sh and test.sh.
# Usage: source scripts/setup_env.sh [dev]
set -e
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q -U pip
fi
. .venv/bin/activate
# DS_BUILD_OPS=0: deepspeed's sdist builds no CUDA/C++ ops at install time (they are never needed on CPU).
REQS="-r requirements.txt"
[ "${1:-}" = dev ] && REQS="$REQS -r requirements-dev.txt"
DS_BUILD_OPS=0 python -m pip install -q $REQS
python -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || python -m pip install -q --no-deps -e .
# No network at run time: wandb offline, deepspeed on the CPU accelerator, no hub downloads.
export WANDB_MODE=${WANDB_MODE:-offline} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
