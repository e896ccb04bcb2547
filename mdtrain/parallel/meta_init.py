"""Deferred initialisation: a model built on the meta device gets only this rank's pieces of its parameters
allocated and filled, with the values the single-device model would have had.

``modeling.build_objective_and_model(..., meta=True)`` builds the backbone on the meta device (no memory) and
returns its ``DeferredInit`` (seed and ``init_plan``); tensor parallelism swaps in its layers on the meta device
too. Each engine then allocates what it keeps and fills it through ``fill_piece``:

* ddp and ZeRO-0/1/2 keep whole (TP-local) parameters: ``materialize_whole``;
* fsdp keeps a block of rows of each (TP-local) parameter: ``materialize_fsdp`` after ``fully_shard``;
* ZeRO-3 keeps a flat partition of each (TP-local) parameter: ``zero3_partition`` fills the partition DeepSpeed
  would have cut out of the whole parameter, without the whole parameter ever existing.

Values are keyed per element (``mdtrain.models.init``), so the consolidated initial weights are the same for
every engine, world size and TP size. Parameters that were built for real (an objective's, e.g. GenMD4's
schedule) keep their values. Peak memory per rank: its own pieces plus one block of index/uniform buffers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from mdtrain.models.init import HASH_CHUNK, DeferredInit, keyed_values, param_key
from mdtrain.parallel.tensor_parallel_layout import ModelLayout

__all__ = ["has_meta", "materialize_whole", "materialize_fsdp", "materialize_zero3", "Piece", "pieces_of",
           "fill_piece"]


def has_meta(module: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in module.parameters())


@dataclass(frozen=True)
class Piece:
    """Where a local parameter comes from: the single-device tensor ``full`` (of ``full_shape``), cut along
    ``dim`` by ``index`` (tensor parallelism; None: held whole), giving the local ``shape``."""
    full: str
    full_shape: Tuple[int, ...]
    shape: Tuple[int, ...]
    dim: Optional[int] = None
    index: Optional[torch.Tensor] = None


def pieces_of(module: nn.Module, shapes: Optional[Dict[str, Tuple[int, ...]]] = None) -> Dict[str, Piece]:
    """name -> Piece for every parameter of ``module`` (single-device names; TP-local shapes under TP).
    ``shapes`` overrides the local shapes (FSDP's parameters report their global shape, which is the same)."""
    from mdtrain.parallel.tensor_parallel_state import tp_of
    info = tp_of(module)
    out = {}
    for name, p in module.named_parameters():
        shape = tuple(shapes[name] if shapes else p.shape)
        if info is None:
            out[name] = Piece(name, shape, shape)
            continue
        layout: ModelLayout = info.layout
        full, dim, index = layout.cut(name, info.rank, info.size)
        out[name] = Piece(full, tuple(layout.shapes[full]), shape, dim, index)
    return out


def _full_index(piece: Piece, start: int, count: int, device) -> torch.Tensor:
    """Flat indices into the full tensor of local flat elements [start, start + count) (-1: padding)."""
    local = torch.arange(start, start + count, dtype=torch.int64)
    shape, full_shape = piece.shape, piece.full_shape
    full_strides = [1] * len(full_shape)
    for d in range(len(full_shape) - 2, -1, -1):
        full_strides[d] = full_strides[d + 1] * full_shape[d + 1]
    out = torch.zeros_like(local)
    pad = torch.zeros_like(local, dtype=torch.bool)
    rest = local
    for d in range(len(shape) - 1, -1, -1):  # local multi-index, innermost first
        i, rest = rest % shape[d], rest // shape[d]
        if d == piece.dim:
            i = piece.index[i]
            pad |= i < 0
        out += i.clamp(min=0) * full_strides[d]
    out[pad] = -1
    return out.to(device)


@torch.no_grad()
def fill_piece(dst: torch.Tensor, piece: Piece, init: DeferredInit, start: int = 0) -> None:
    """Fill ``dst`` (any shape, contiguous) with local flat elements [start, start + dst.numel()) of ``piece``."""
    flat = dst.view(-1)
    spec = init.plan[piece.full]
    key = param_key(init.seed, piece.full)
    for s in range(0, flat.numel(), HASH_CHUNK):
        n = min(HASH_CHUNK, flat.numel() - s)
        idx = _full_index(piece, start + s, n, dst.device)
        flat[s:s + n] = keyed_values(spec, key, idx, dtype=dst.dtype)


def _check_plan(module: nn.Module, pieces: Dict[str, Piece], init: DeferredInit, real: set) -> None:
    missing = sorted(n for n, pc in pieces.items() if n not in real and pc.full not in init.plan)
    if missing:
        raise KeyError(f"the init plan does not cover {missing[:5]} (a parameter added after building?)")


def _owners(module: nn.Module) -> Dict[int, list]:
    """id(parameter) -> every (module, attribute) that holds it (a tied head and embedding share one)."""
    out: Dict[int, list] = {}
    for m in module.modules():
        for leaf, p in m._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((m, leaf))
    return out


def _replace_param(owners: Dict[int, list], old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    """Swap a (meta) parameter for one holding ``data`` wherever it is held, keeping its attributes (Megatron's
    TP marks) and its ties."""
    new = nn.Parameter(data, requires_grad=old.requires_grad)
    new.__dict__.update({k: v for k, v in old.__dict__.items() if not k.startswith("_")})
    for m, leaf in owners.pop(id(old)):
        m._parameters[leaf] = new
    owners[id(new)] = []
    return new


@torch.no_grad()
def materialize_whole(module: nn.Module, init: DeferredInit, device: torch.device) -> None:
    """Allocate every meta parameter whole on ``device`` and fill it (ddp, ZeRO-0/1/2: each rank keeps its
    TP-local parameters whole)."""
    pieces = pieces_of(module)
    real = {n for n, p in module.named_parameters() if p.device.type != "meta"}
    _check_plan(module, pieces, init, real)
    owners = _owners(module)
    for name, p in list(module.named_parameters()):
        if name in real:
            continue
        data = torch.empty(p.shape, dtype=p.dtype, device=device)
        fill_piece(data, pieces[name], init)
        _replace_param(owners, p, data)
    for name, b in list(module.named_buffers()):
        if b.device.type == "meta":
            raise RuntimeError(f"buffer {name} is on the meta device: deferred init fills parameters only")


def _fsdp_row_offset(p) -> int:
    """First row (dim 0) of the global tensor that this rank's FSDP2 shard holds (torch.chunk's split)."""
    from torch.distributed.tensor import Shard
    (placement,) = p.placements
    if not (isinstance(placement, Shard) and placement.dim == 0):
        raise RuntimeError(f"FSDP2 shard placement {placement} is not Shard(0)")
    mesh = p.device_mesh
    rows = p.shape[0]
    chunk = -(-rows // mesh.size())
    start = min(rows, mesh.get_local_rank() * chunk)
    if p.to_local().shape[0] != max(0, min(chunk, rows - start)):
        raise RuntimeError(f"unexpected FSDP2 shard: {tuple(p.to_local().shape)} rows of {rows} at {start}")
    return start


@torch.no_grad()
def materialize_fsdp(module: nn.Module, init: DeferredInit, device: torch.device) -> None:
    """After ``fully_shard`` on a meta model: allocate every rank's shards (``to_empty``) and fill them; the
    parameters that were real before keep their values."""
    params = dict(module.named_parameters())
    real = {n: p.to_local().clone() for n, p in params.items() if p.to_local().device.type != "meta"}
    pieces = pieces_of(module)
    _check_plan(module, pieces, init, set(real))
    module.to_empty(device=device)
    for name, p in module.named_parameters():
        local = p.to_local()
        if name in real:
            local.copy_(real[name])
        elif local.numel():
            row = int(torch.Size(p.shape[1:]).numel())
            fill_piece(local, pieces[name], init, start=_fsdp_row_offset(p) * row)


@torch.no_grad()
def materialize_zero3(module: nn.Module, init: DeferredInit, device: torch.device, dtype: torch.dtype,
                      ds_config: dict, dp_group=None, mpu=None) -> None:
    """Turn every parameter into a DeepSpeed ZeRO-3 parameter that holds only this rank's flat partition, filled
    with its keyed values, before ``deepspeed.initialize`` (which then finds them partitioned, as after
    ``deepspeed.zero.Init``). ``zero.Init`` itself materialises each module's parameters whole and broadcasts
    them from rank 0 before cutting; here the whole parameter never exists. Real (non-meta) parameters are cut
    from their values."""
    from deepspeed.runtime.zero.partition_parameters import Init, PartitionedParamStatus

    zinit = Init(module=None, data_parallel_group=dp_group, config_dict_or_path=ds_config, mpu=mpu, dtype=dtype,
                 remote_device=None)
    pieces = pieces_of(module)
    real = {n for n, p in module.named_parameters() if p.device.type != "meta"}
    _check_plan(module, pieces, init, real)
    owners = _owners(module)
    for name, p in list(module.named_parameters()):
        values = p.detach().to(device=device, dtype=dtype).reshape(-1) if name in real else None
        # a stand-in with the parameter's shape and no memory: DeepSpeed reads shape and numel from it
        stand_in = torch.empty(1, dtype=dtype, device=device).expand(p.shape)
        param = _replace_param(owners, p, stand_in)
        zinit._convert_to_deepspeed_param(param)
        world, rank = zinit._partition_world_size(param), zinit._partition_rank(param)
        aligned = zinit._aligned_size(param)
        size = aligned // world
        start = rank * size
        if values is not None:
            part = torch.zeros(size, dtype=dtype, device=device)
            n = max(0, min(size, values.numel() - start))
            part[:n] = values[start:start + n]
        else:
            part = zero3_partition(param, pieces[name], init, start, size, device, dtype)
        part.requires_grad = False
        part.ds_numel, part.status, part.final_location = size, PartitionedParamStatus.AVAILABLE, None
        param.ds_tensor, param.ds_numel_aligned = part, aligned
        param.partition()  # finds the partition in place: only releases the stand-in


def zero3_partition(param: nn.Parameter, piece: Piece, init: DeferredInit, part_start: int, part_numel: int,
                    device, dtype) -> torch.Tensor:
    """ZeRO-3's partition of a parameter: flat elements [part_start, part_start + part_numel) of the (TP-local)
    tensor, zero beyond its end (DeepSpeed pads the last partition)."""
    out = torch.zeros(part_numel, dtype=dtype, device=device)
    n = max(0, min(part_numel, param.numel() - part_start))
    if n:
        fill_piece(out[:n], piece, init, start=part_start)
    return out
