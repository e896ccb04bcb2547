"""DeepSpeed ZeRO checkpoints of tensor-parallel models at another TP or DP size, and consolidated.

DeepSpeed writes one model file per TP rank (``mp_rank_XX``) and one optimizer partition per (DP, TP) rank; at
the same layout it reloads them itself. For another TP size (or one plain process) the checkpoint goes through
DeepSpeed's universal format (``ds_to_universal``), whose per-parameter files hold the TP ranks' pieces
concatenated along dim 0 (mdtrain passes no Megatron merge patterns). Here those pieces are merged into the
single-device tensors (``tensor_parallel_layout``), cut for the new TP size, and written back concatenated along
dim 0, which DeepSpeed's universal loader splits evenly by TP rank: fp32 master weights, AdamW moments and step
all follow. ZeRO-3's universal loader does not cut TP pieces of Megatron layers, so for ZeRO-3 x TP each TP rank
gets a folder of its own local tensors (``split_universal_by_tp``), which the loader partitions over the rank's
data-parallel group. The EMA fragments (per global rank, ``ema/rank_XXXXX.pt``) are re-laid-out the same way.
"""
from __future__ import annotations

import glob
import os
import shutil
from typing import Dict, List, Mapping

import torch

from mdtrain.parallel.engines.safe_io import deepspeed_globals, torch_file
from mdtrain.parallel.tensor_parallel_layout import ModelLayout

STATES = ("fp32", "exp_avg", "exp_avg_sq")


def _load(path: str):
    """A file of DeepSpeed's universal format (written by its converter in this job from scanned inputs), read
    weights-only all the same: nothing loaded can run code."""
    return torch_file(path, deepspeed_globals())


def _old_pieces(zero_dir: str, layout: ModelLayout, full: str, old_tp: int,
                state: str) -> List[Dict[str, torch.Tensor]]:
    """Every old TP rank's local tensors of one single-device tensor, from a universal ``zero/`` folder."""
    per_rank: List[Dict[str, torch.Tensor]] = [dict() for _ in range(old_tp)]
    for n, shape in layout.pieces(full, old_tp).items():
        # without Megatron merge patterns the converter concatenates every TP rank's piece along dim 0,
        # replicated ones included (identical copies)
        chunks = _load(os.path.join(zero_dir, n, f"{state}.pt"))["param"].chunk(old_tp, dim=0)
        for r in range(old_tp):
            per_rank[r][n] = chunks[r].reshape(shape)
    return per_rank


def _merge(layout: ModelLayout, full: str, per_rank: List[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    t = layout.tensors.get(full)
    return t.merge(per_rank) if (t is not None and len(per_rank) > 1) else per_rank[0][full]


def relayout_universal(zero_dir: str, layout: ModelLayout, old_tp: int, new_tp: int) -> None:
    """Rewrite a universal ``zero/`` folder written from ``old_tp`` TP ranks for loading by ``new_tp`` ranks."""
    new_split = layout.split_set(new_tp)
    fulls = sorted({layout.full_name(n) for n in os.listdir(zero_dir) if os.path.isdir(os.path.join(zero_dir, n))})
    staged: Dict[str, Dict[str, dict]] = {}
    for full in fulls:
        if full not in layout.shapes:
            continue
        first_piece = next(iter(layout.pieces(full, old_tp)))
        step = os.path.join(zero_dir, first_piece, "step.pt")
        for state in STATES:
            value = _merge(layout, full, _old_pieces(zero_dir, layout, full, old_tp, state))
            cuts = [layout.shard_state_dict({full: value}, r, new_tp) for r in range(new_tp)]
            for m in cuts[0]:
                data = torch.cat([c[m] for c in cuts], dim=0) if m in new_split else cuts[0][m]
                staged.setdefault(m, {})[state] = {"param": data, "cat_dim": 0}
        for m in layout.pieces(full, new_tp):
            staged.setdefault(m, {})["step"] = _load(step) if os.path.exists(step) else None
    for n in os.listdir(zero_dir):  # replace every per-parameter folder, keep optimizer_state.pt
        if os.path.isdir(os.path.join(zero_dir, n)):
            shutil.rmtree(os.path.join(zero_dir, n))
    for m, files in staged.items():
        os.makedirs(os.path.join(zero_dir, m), exist_ok=True)
        for state, value in files.items():
            if value is not None:
                torch.save(value, os.path.join(zero_dir, m, f"{state}.pt"))


def split_universal_by_tp(zero_dir: str, layout: ModelLayout, tp: int) -> None:
    """ZeRO-3 x TP: next to a universal ``zero/`` folder already laid out for ``tp`` ranks (``relayout_universal``),
    write ``tp{r}/zero/`` holding TP rank r's own local tensors, which DeepSpeed's ZeRO-3 universal loader then
    partitions over that rank's data-parallel group (it does not cut TP pieces itself for Megatron layers)."""
    split = layout.split_set(tp)
    root = os.path.dirname(zero_dir)
    for r in range(tp):
        os.makedirs(os.path.join(root, f"tp{r}", "zero"), exist_ok=True)
        shutil.copy2(os.path.join(zero_dir, "optimizer_state.pt"), os.path.join(root, f"tp{r}", "zero"))
    for n in sorted(os.listdir(zero_dir)):
        src = os.path.join(zero_dir, n)
        if not os.path.isdir(src):
            continue
        for f in sorted(os.listdir(src)):
            rec = _load(os.path.join(src, f))
            for r in range(tp):
                out = os.path.join(root, f"tp{r}", "zero", n)
                os.makedirs(out, exist_ok=True)
                if isinstance(rec, dict) and n in split:
                    rec_r = dict(rec, param=rec["param"].chunk(tp, dim=0)[r].clone())
                else:
                    rec_r = rec
                torch.save(rec_r, os.path.join(out, f))


def load_zero3_universal(optimizer, folder: str) -> None:
    """Load a ZeRO-3 optimizer (fp32 partitions, AdamW moments, step) from a universal folder holding this TP
    rank's tensors (``split_universal_by_tp``), around DeepSpeed's checkpoint prologue / epilogue (which release
    and re-gather the persistent parameters)."""
    optimizer.checkpoint_event_prologue()
    optimizer.load_hp_checkpoint_state_from_checkpoint_dir_stage3(folder)
    optimizer.checkpoint_event_epilogue()


def universal_full_weights(zero_dir: str, layout: ModelLayout, old_tp: int) -> Dict[str, torch.Tensor]:
    """The single-device fp32 master weights from a universal ``zero/`` folder written from ``old_tp`` ranks."""
    fulls = sorted({layout.full_name(n) for n in os.listdir(zero_dir) if os.path.isdir(os.path.join(zero_dir, n))})
    return {f: _merge(layout, f, _old_pieces(zero_dir, layout, f, old_tp, "fp32")) for f in fulls
            if f in layout.shapes}


def ema_full(path: str, layout: ModelLayout, old_tp: int, old_world: int) -> Dict[str, torch.Tensor]:
    """Single-device EMA weights from the per-rank EMA fragments of a DeepSpeed checkpoint at ``path``.

    Rank g held dp rank g // old_tp, TP rank g % old_tp (the ("dp", "tp") mesh); its file maps each local
    parameter to {"start": offset in the flattened local tensor, "data": fp32 piece}."""
    shapes = layout.local_shapes(old_tp)
    flat: List[Dict[str, torch.Tensor]] = [dict() for _ in range(old_tp)]
    for g in range(old_world):
        f = os.path.join(path, "ema", f"rank_{g:05d}.pt")
        for name, rec in torch_file(f).items():
            shape = shapes[name]
            buf = flat[g % old_tp].setdefault(name, torch.zeros(torch.Size(shape).numel()))
            buf[rec["start"]:rec["start"] + rec["data"].numel()] = rec["data"].float()
    per_rank = [{n: v.view(shapes[n]) for n, v in d.items()} for d in flat]
    fulls = sorted({layout.full_name(n) for n in per_rank[0]})
    return {f: _merge(layout, f, per_rank) for f in fulls}


def universal_checkpoint_dirs(tmp: str, tag: str) -> str:
    """The ``zero/`` folder of a universal checkpoint written by ds_to_universal under ``tmp/tag``."""
    zero = os.path.join(tmp, tag, "zero")
    if not os.path.isdir(zero):
        found = glob.glob(os.path.join(tmp, "**", "zero"), recursive=True)
        if not found:
            raise FileNotFoundError(f"no zero/ folder in the universal checkpoint under {tmp}")
        zero = found[0]
    return zero


def ema_local(path: str, layout: ModelLayout, old_tp: int, old_world: int, rank: int,
              tp: int) -> Dict[str, torch.Tensor]:
    """This TP rank's EMA tensors at ``tp`` from a checkpoint written by ``old_world`` ranks with ``old_tp``."""
    return layout.shard_state_dict(ema_full(path, layout, old_tp, old_world), rank, tp)


def consolidated(path: str, model_state: Mapping[str, torch.Tensor], ema: bool, meta: dict, to_universal) -> dict:
    """Single-device weights (EMA weights if ``ema`` and saved) of a TP DeepSpeed checkpoint, in one process.

    ``to_universal(input_folder, output_folder)`` runs DeepSpeed's converter (the engine's wrapper)."""
    import tempfile

    layout = ModelLayout.from_shapes({k: v.shape for k, v in model_state.items()})
    tmp = tempfile.mkdtemp(prefix=".universal-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        to_universal(os.path.join(path, "deepspeed", "state"), os.path.join(tmp, "state"))
        full = universal_full_weights(universal_checkpoint_dirs(tmp, "state"), layout, meta["tp_size"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    missing = sorted(set(model_state) - set(full))
    if missing:
        raise RuntimeError(f"{path}: the checkpoint has no {missing[:5]} (another model than the config's?)")
    if ema and meta.get("ema"):
        full.update(ema_full(path, layout, meta["tp_size"], meta["world_size"]))
    return {k: full[k].detach().to(v.dtype).clone() for k, v in model_state.items()}
