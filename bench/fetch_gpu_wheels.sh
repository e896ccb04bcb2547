#!/usr/bin/env bash
# The Python packages the prepared GPU runs (bench/gpu_train.py, bench/gpu_sample.py) need that the lent H200 lacks,
# as wheels in .whl/ at the repository root (git-excluded), to travel with the device tool's `carry: [".whl"]`.
#
#   . .venv/bin/activate && bash bench/fetch_gpu_wheels.sh      # here, on the development machine, once
#
# What the scripts import, checked on CPU: torch, numpy, yaml, tqdm (mdtrain's import path; the trainer imports
# wandb, deepspeed, megatron, webdataset and submitit only on paths these scripts do not take), einops, packaging,
# huggingface_hub (the MDLM reference DiT), pytest (the GPU-only tests) -- all already in the H200 image
# (/work/.library/device/KINDS.md) -- and mamba-ssm, which is not. So the set is one wheel:
#
#   mamba-ssm 2.3.2.post1 (the [gpu] extra's pin). PyPI has only its sdist; built with MAMBA_SKIP_CUDA_BUILD it is a
#   pure-Python py3-none-any wheel (Triton kernels, no CUDA extension). Its package __init__ imports the missing
#   selective_scan_cuda extension, so the scripts load mamba_ssm.ops.triton.* without running that __init__
#   (bench/gpu_common.py: load_mamba_triton). Its other requirements (triton>=3.5, einops, packaging, torch) are in
#   the image; tilelang / quack-kernels / apache-tvm-ffi are needed only by code the SSD kernel never imports.
#
# Binary wheels, if one is ever needed, come with the device README's exact command (BINARY below, empty today).
# Install rehearsal (what a `run` call does first), here: see BENCHMARKS.md, GPU section.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude="$(git rev-parse --git-path info/exclude)"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
mkdir -p .whl

BINARY=()   # e.g. BINARY=(somepkg==1.2.3)
for spec in "${BINARY[@]}"; do
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done

MAMBA=mamba-ssm==2.3.2.post1
python3 -c 'import torch' 2>/dev/null || { echo "run this inside the project venv (mamba-ssm's setup.py imports torch)" >&2; exit 1; }
if ! ls .whl/mamba_ssm-2.3.2.post1-py3-none-any.whl >/dev/null 2>&1; then
  work="$(mktemp -d)"
  export MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE   # no CUDA extension; never fetch a prebuilt one
  python3 -m pip download --no-deps --no-binary=:all: --no-build-isolation -d "$work" "$MAMBA"
  python3 -m pip wheel --no-deps --no-build-isolation --no-index -w "$work/wheel" "$work"/mamba_ssm-*.tar.gz
  cp "$work"/wheel/mamba_ssm-2.3.2.post1-py3-none-any.whl .whl/
  rm -rf "$work"
fi
if unzip -l .whl/mamba_ssm-2.3.2.post1-py3-none-any.whl | grep -q '\.so$'; then
  echo "mamba-ssm wheel unexpectedly holds compiled extensions" >&2; exit 1
fi
ls -l .whl/
