"""Full single-device weights from a checkpoint of any engine, any world size and any TP size, in one plain process
(no process group): what ``mdtrain eval`` / ``sample`` / ``export`` and ``checkpoint.load_from`` read."""
from __future__ import annotations

import os
import warnings
from typing import Dict

import torch

from mdtrain.parallel.engines.base import read_meta
from mdtrain.parallel.engines.safe_io import dcp_load, dcp_metadata, scan_checkpoint


def load_consolidated(path: str, model_state: Dict[str, torch.Tensor], ema: bool) -> Dict[str, torch.Tensor]:
    """fp32 weights (the EMA weights if ``ema`` and the checkpoint has them) of the checkpoint dir ``path``.

    ``model_state`` is a state dict of the single-device model: it gives names, shapes and dtypes (and the buffers,
    which the EMA does not cover). DCP checkpoints (ddp/fsdp) are read without a process group; ZeRO checkpoints
    are converted by the DeepSpeed engine's reader; per-TP-rank pieces are merged by the tensor-parallel layout.
    Every pickle of the checkpoint is scanned first (``safe_io``): a file that could run code is refused.
    """
    scan_checkpoint(path)
    meta = read_meta(path)
    if meta["engine"] == "deepspeed":
        from mdtrain.parallel.engines.zero import consolidated_state_dict
        return consolidated_state_dict(path, model_state, ema=ema and meta["ema"])
    if meta.get("tp_size", 1) > 1:
        from mdtrain.parallel.tensor_parallel_state import load_consolidated as load_tp
        return load_tp(os.path.join(path, "dcp"), model_state, ema, meta["tp_size"], meta["ema"])
    state = {"model": {k: v.clone() for k, v in model_state.items()}}
    if ema and meta["ema"]:
        stored = dcp_metadata(os.path.join(path, "dcp")).state_dict_metadata
        # the EMA covers trainable parameters (fp32 shadows); buffers come from the model
        state["ema"] = {k: v.detach().float().clone() for k, v in model_state.items() if f"ema.{k}" in stored}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp_load(state, os.path.join(path, "dcp"), no_dist=True)
    out = state["model"]
    for k, v in state.get("ema", {}).items():
        out[k] = v.to(out[k].dtype)
    return out
