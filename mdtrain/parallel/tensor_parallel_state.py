"""State of a tensor-parallel model outside its forward: gradient norms, full (single-device) state dicts, and
checkpoints written per TP rank that load at the same layout, at another TP size, or into one plain process.

Megatron-free (torch.distributed and DCP only, read through ``engines.safe_io``), so the engines and ``mdtrain
export`` use it without importing Megatron. A model's cuts come from ``tensor_parallel_layout.ModelLayout``.

DCP checkpoint keys under TP: a tensor that differs between TP ranks (the split part of a weight, its AdamW
moments, its EMA shadow) is stored as ``tp{rank}.{name}``; replicated tensors keep their plain name and are
written once (DCP de-duplicates identical keys; data-parallel replicas of a TP rank likewise). A checkpoint
written with ``tp_size`` 1 has plain names only. Loading at another TP size reads every old rank's pieces,
merges them into full tensors and cuts this rank's pieces out again (weights, AdamW state and EMA alike).
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Mapping

import torch
import torch.distributed as dist

from mdtrain.parallel.engines.safe_io import dcp_load, dcp_metadata
from mdtrain.parallel.tensor_parallel_layout import ModelLayout

Tensors = Dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# what the engines call (each a no-op passthrough for a model without tensor parallelism)


def tp_of(module: torch.nn.Module):
    """The ``TPInfo`` that ``apply_tensor_parallel`` attached, or None (a single-device model)."""
    return getattr(module, "_mdtrain_tp", None)


def layout_of(module: torch.nn.Module) -> ModelLayout:
    info = tp_of(module)
    if info is not None:
        return info.layout
    # ZeRO-3 parameters hold an empty tensor between uses; their shape is ds_shape
    return ModelLayout.from_shapes({k: getattr(v, "ds_shape", v.shape)
                                    for k, v in module.state_dict(keep_vars=True).items()})


def engine_clip(module: torch.nn.Module, max_norm: float, fallback) -> float:
    """Clip and return the global gradient norm: TP-aware for a TP model, else ``fallback(params, max_norm)``."""
    info = tp_of(module)
    if info is None:
        return fallback(list(module.parameters()), max_norm)
    split = info.layout.split_set(info.size)
    return clip_grad_norm([(n in split, p) for n, p in module.named_parameters()], max_norm, info.group,
                          first=info.rank == 0)


def engine_checkpoint_state(module: torch.nn.Module, state: dict) -> dict:
    """The engine's DCP dict as written to disk: TP-split tensors under ``tp{rank}.`` keys."""
    info = tp_of(module)
    return state if info is None else rename_for_checkpoint(state, info.layout, info.rank, info.size)


def engine_load(module: torch.nn.Module, state: dict, path: str, old_tp: int, **dcp_kwargs) -> dict:
    """Fill the engine's DCP dict (``state``: this process's names and shapes) from the checkpoint at ``path``
    (its ``dcp/`` folder) written by ``old_tp`` TP ranks; returns the filled dict (EMA shadows in place)."""
    info = tp_of(module)
    new_tp, rank = (info.size, info.rank) if info is not None else (1, 0)
    if old_tp == new_tp:
        view = engine_checkpoint_state(module, state)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp_load(view, path, **dcp_kwargs)
        return restore_from_checkpoint(view) if info is not None else view
    out = load_resharded(path, layout_of(module), old_tp, rank, new_tp, state, **dcp_kwargs)
    if "ema" in out:  # the engine's EMA shadows are live tensors: fill them in place
        with torch.no_grad():
            for k, v in out["ema"].items():
                state["ema"][k].copy_(v)
        out["ema"] = state["ema"]
    return out


def engine_full_state_dict(module: torch.nn.Module, keep: bool = True) -> Tensors:
    """Single-device weights of a TP model where ``keep`` ({} elsewhere). Collective over its TP group (and the
    data-parallel mesh for FSDP2)."""
    return full_state_dict(module, tp_of(module), keep)


# ----------------------------------------------------------------------------------------------------------------
# gradient norm


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def clip_grad_norm(params, max_norm: float, tp_group, first: bool) -> float:
    """The global L2 gradient norm of a TP model, then clip in place as ``torch.nn.utils.clip_grad_norm_`` does;
    every rank returns the same norm. ``params``: (split, parameter) pairs, ``split`` True for a parameter whose
    values differ between TP ranks (summed over them) and False for a replicated one (counted once: on the first
    TP rank, ``first``).

    Plain gradients must already be reduced over data-parallel ranks (after DDP's all-reduce) and are summed over
    the TP group; FSDP2's sharded gradients (DTensors over the data-parallel mesh) are summed over every rank."""
    params = [(split, p) for split, p in params if p.grad is not None]
    sharded = any(hasattr(p.grad, "to_local") for _, p in params)
    grads = [_local(p.grad) for _, p in params]
    dev = grads[0].device if grads else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float64, device=dev)
    for (split, _), g in zip(params, grads):
        if split or first:  # replicated gradients are identical on every TP rank: count them once
            sq += g.detach().double().pow(2).sum()
    if sharded:  # dp shards x TP ranks = the whole mesh
        dist.all_reduce(sq)
    else:
        dist.all_reduce(sq, group=tp_group)
    norm = float(sq.sqrt())
    if max_norm > 0 and math.isfinite(norm):
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_(grads, coef)
    return norm


# ----------------------------------------------------------------------------------------------------------------
# full <-> local state dicts


def gather_full(local: Mapping[str, torch.Tensor], layout: ModelLayout, tp_group, keep: bool = True) -> Tensors:
    """The single-device state dict (CPU, detached) from every TP rank's ``local``; collective over ``tp_group``
    (and over the data-parallel mesh for FSDP2's DTensors, which are gathered first). Returns it where ``keep``
    ({} elsewhere; only one tensor is ever held there at a time). Pieces of one tensor have the same shape on all
    TP ranks (vocab rows are padded)."""
    size = dist.get_world_size(tp_group)
    split = layout.split_set(size)
    by_full: Dict[str, List[str]] = {}
    for name in sorted(local):
        by_full.setdefault(layout.full_name(name), []).append(name)
    out: Tensors = {}
    for full, names in by_full.items():
        per_rank: List[Tensors] = [dict() for _ in range(size)]
        for name in names:
            t = local[name].detach()
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            if name in split:
                parts = [torch.empty_like(t) for _ in range(size)]
                dist.all_gather(parts, t.contiguous(), group=tp_group)
            else:
                parts = [t] * size
            for r in range(size):
                per_rank[r][name] = parts[r].cpu()
        if keep:
            out.update(layout.merge_state_dicts(per_rank))
    return out


def full_state_dict(module: torch.nn.Module, info, keep: bool = True) -> Tensors:
    """The single-device state dict of a TP model (names and shapes as without TP), where ``keep``. Collective."""
    return gather_full(module.state_dict(), info.layout, info.group, keep)


# ----------------------------------------------------------------------------------------------------------------
# checkpoint keys


def ckpt_key(name: str, rank: int, split: set) -> str:
    return f"tp{rank}.{name}" if name in split else name


def _parse_key(key: str):
    """(rank, local name) of a ``tp{rank}.`` key, (None, key) for a plain one."""
    head, _, rest = key.partition(".")
    if head.startswith("tp") and head[2:].isdigit() and rest:
        return int(head[2:]), rest
    return None, key


def rename_for_checkpoint(state: dict, layout: ModelLayout, rank: int, tp: int) -> dict:
    """The engine's DCP dict ({"model", "optim", "ema"}) with this rank's split tensors under ``tp{rank}.`` keys.

    Optimizer ``param_groups`` keep plain names: they are identical on every TP rank."""
    split = layout.split_set(tp)
    out = dict(state)
    for key in ("model", "ema"):
        if key in state:
            out[key] = {ckpt_key(n, rank, split): v for n, v in state[key].items()}
    if "optim" in state:
        out["optim"] = dict(state["optim"],
                            state={ckpt_key(n, rank, split): v for n, v in state["optim"]["state"].items()})
    return out


def restore_from_checkpoint(state: dict) -> dict:
    """Undo ``rename_for_checkpoint`` (after ``dcp.load`` filled the renamed dict in place)."""
    strip = lambda d: {_parse_key(k)[1]: v for k, v in d.items()}  # noqa: E731
    out = dict(state)
    for key in ("model", "ema"):
        if key in state:
            out[key] = strip(state[key])
    if "optim" in state:
        out["optim"] = dict(state["optim"], state=strip(state["optim"]["state"]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# reading a checkpoint written at another TP size


def _template(layout: ModelLayout, old_tp: int, like: Mapping[str, torch.Tensor]) -> Tensors:
    """Empty CPU tensors under the keys that a checkpoint written by ``old_tp`` ranks holds for the tensors of
    ``like`` (this process's tensors of one family: weights, EMA shadows or one AdamW state; any layout).
    0-dim tensors (AdamW's step) are one value per parameter piece."""
    split = layout.split_set(old_tp)
    refs: Tensors = {}
    for k, v in like.items():
        refs.setdefault(layout.full_name(k), v)
    out = {}
    for full, ref in refs.items():
        for n, shape in layout.pieces(full, old_tp).items():
            for r in (range(old_tp) if n in split else [0]):
                out[ckpt_key(n, r, split)] = torch.empty(() if ref.dim() == 0 else shape, dtype=ref.dtype)
    return out


def _relayout(loaded: Mapping[str, torch.Tensor], layout: ModelLayout, old_tp: int, rank: int, tp: int,
              like: Mapping[str, torch.Tensor]) -> Tensors:
    """Old-layout tensors (keys as ``_template``) -> single-device tensors -> this rank's pieces, cast and placed
    like ``like``."""
    per_rank: List[Tensors] = [dict() for _ in range(old_tp)]
    scalars: Tensors = {}
    for key, v in loaded.items():
        r, name = _parse_key(key)
        if v.dim() == 0:
            scalars.setdefault(layout.full_name(name), v)
            continue
        for rr in (range(old_tp) if r is None else [r]):
            per_rank[rr][name] = v
    full = layout.merge_state_dicts(per_rank) if per_rank[0] else {}
    local = layout.shard_state_dict(full, rank, tp)
    out = {}
    for n, t in like.items():
        v = scalars[layout.full_name(n)] if t.dim() == 0 else local[n]
        out[n] = _placed_like(v, t)
    return out


def _placed_like(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``v`` (a whole local tensor) cast and placed like ``t``: for an FSDP2 DTensor, this rank's shard of it
    (cut locally, no communication)."""
    if hasattr(t, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(v.to(device=t.device, dtype=t.dtype), t.device_mesh, t.placements,
                                 src_data_rank=None)
    return v.to(device=t.device, dtype=t.dtype).clone()


def _batches(layout: ModelLayout, fulls, budget: int) -> List[List[str]]:
    """Full tensor names in groups of at most ``budget`` bytes (fp32) each (one tensor alone may exceed it)."""
    out: List[List[str]] = []
    size = budget
    for full in fulls:
        n = 4 * int(torch.Size(layout.shapes[full]).numel())
        if size + n > budget:
            out.append([])
            size = 0
        out[-1].append(full)
        size += n
    return out


def load_resharded(path: str, layout: ModelLayout, old_tp: int, rank: int, tp: int, current: dict,
                   budget: int = 1 << 28, **dcp_kwargs) -> dict:
    """Read a DCP checkpoint written by ``old_tp`` TP ranks into this rank's pieces at ``tp``.

    ``current`` is the engine's dict for this process ({"model", "optim", "ema"}, current names and shapes) and
    gives structure, dtypes and devices (FSDP2 DTensors get this rank's shard). Returns a dict of that structure
    holding the checkpoint's values; the optimizer's ``param_groups`` stay this process's (hyperparameters come
    from the config, and parameter names differ between layouts). Tensors are read, merged and re-cut a group of
    at most ``budget`` bytes (per family) at a time, so a rank holds its own pieces plus one such group."""
    families = {key: current[key] for key in ("model", "ema") if key in current}
    if "optim" in current:  # AdamW's per-parameter {"step", "exp_avg", "exp_avg_sq"}: one family per state key
        states = current["optim"]["state"]
        for k in sorted({k for st in states.values() for k in st}):
            families[("optim", k)] = {n: st[k] for n, st in states.items() if k in st}
    fulls = sorted({layout.full_name(n) for like in families.values() for n in like})
    new: Dict[object, Tensors] = {key: {} for key in families}
    for batch in _batches(layout, fulls, budget):
        chosen = set(batch)
        likes = {key: {n: v for n, v in like.items() if layout.full_name(n) in chosen}
                 for key, like in families.items()}
        templates = {key: _template(layout, old_tp, like) for key, like in likes.items() if like}
        request = {key: templates[key] for key in ("model", "ema") if key in templates}
        optim = {}
        for key, tmpl in templates.items():
            if isinstance(key, tuple):
                for ck, t in tmpl.items():
                    optim.setdefault(ck, {})[key[1]] = t
        if optim:
            request["optim"] = {"state": optim}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp_load(request, path, **dcp_kwargs)
        for key, tmpl in templates.items():
            new[key].update(_relayout(tmpl, layout, old_tp, rank, tp, likes[key]))
    out = dict(current)
    optim_state: Dict[str, dict] = {}
    for key, values in new.items():
        if isinstance(key, tuple):
            for n, v in values.items():
                optim_state.setdefault(n, {})[key[1]] = v
        else:
            out[key] = values
    if "optim" in current:
        out["optim"] = dict(current["optim"], state=optim_state)
    return out


# ----------------------------------------------------------------------------------------------------------------
# one plain process (export / eval / sample)


def load_consolidated(path: str, model_state: Mapping[str, torch.Tensor], ema: bool, tp_size: int,
                      has_ema: bool) -> Tensors:
    """Full weights of the single-device model from a DCP checkpoint (``path``: its ``dcp/`` folder) written by
    ``tp_size`` TP ranks, in one process without a process group; EMA weights where ``ema`` and the checkpoint
    has them (the EMA covers trainable parameters; buffers come from the weights)."""
    layout = ModelLayout.from_shapes({k: v.shape for k, v in model_state.items()})
    current = {"model": {k: v.detach() for k, v in model_state.items()}}
    if ema and has_ema:
        stored = dcp_metadata(path).state_dict_metadata
        split = layout.split_set(tp_size)
        current["ema"] = {k: v.detach().float() for k, v in model_state.items()
                          if any(f"ema.{ckpt_key(n, 0, split)}" in stored for n in layout.pieces(k, tp_size))}
    out = load_resharded(path, layout, tp_size, 0, 1, current, no_dist=True)
    model = out["model"]
    for k, v in out.get("ema", {}).items():
        model[k] = v.to(model[k].dtype)
    return model
