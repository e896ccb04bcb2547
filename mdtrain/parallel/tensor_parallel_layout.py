"""Where every tensor of a tensor-parallel model lives: how a single-device tensor is cut into per-rank pieces
and put back together, and which configurations can be cut at all.

No Megatron and no process group here, so checkpoint tools (export, consolidation, re-splitting at another TP
size) use it in one plain process. ``mdtrain.parallel.tensor_parallel`` builds the model with exactly these cuts.

A full tensor is a run of consecutive segments along one dim; each segment is either split into ``tp`` equal
chunks (rank r keeps chunk r) or replicated (every rank keeps all of it). A rank stores the chunks of the split
segments, concatenated, under the full tensor's own name, and the replicated segments (if the tensor mixes both,
as Mamba's ``in_proj`` does with its B/C rows) as a separate replicated tensor named ``replicated_name``. The
vocabulary tensors are the one uneven case: chunks of ceil(V / tp) rows, the last ones zero-padded to that size
(megatron's padded vocabulary), so every rank's piece has the same shape.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from mdtrain.configtools import ConfigError


@dataclass(frozen=True)
class Segment:
    size: int    # extent along the layout's dim in the full tensor
    split: bool  # True: cut into tp equal chunks; False: every rank holds all of it


@dataclass(frozen=True)
class TensorLayout:
    """How one full (single-device) tensor maps onto the per-rank tensors."""
    name: str
    dim: int
    segments: Tuple[Segment, ...]
    vocab: bool = False                   # one uneven segment, zero-padded chunks of ceil(n / tp)
    replicated_name: Optional[str] = None  # where the replicated segments live (mixed tensors only)

    # -- sizes -------------------------------------------------------------------------------------------------
    def chunk(self, seg: Segment, tp: int) -> int:
        if self.vocab:
            return math.ceil(seg.size / tp)
        return seg.size // tp if seg.split else seg.size

    def check(self, tp: int) -> Optional[str]:
        """None if ``tp`` can cut this tensor, else why not."""
        if self.vocab:
            return None
        for seg in self.segments:
            if seg.split and seg.size % tp:
                return f"{self.name}: {seg.size} along dim {self.dim} is not divisible by tp={tp}"
        return None

    def local_shapes(self, full_shape: Sequence[int], tp: int) -> Dict[str, Tuple[int, ...]]:
        """Shapes of the per-rank tensors (identical on every rank)."""
        out = {}
        split = sum(self.chunk(s, tp) for s in self.segments if s.split)
        rep = sum(s.size for s in self.segments if not s.split)
        for name, n in ((self.name, split), (self.replicated_name, rep)):
            if name is not None and n:
                shape = list(full_shape)
                shape[self.dim] = n
                out[name] = tuple(shape)
        return out

    # -- full -> pieces ----------------------------------------------------------------------------------------
    def shard(self, full: torch.Tensor, rank: int, tp: int) -> Dict[str, torch.Tensor]:
        """This rank's tensors (copies) cut from the full tensor."""
        if self.vocab:
            (seg,) = self.segments
            c = self.chunk(seg, tp)
            lo, hi = min(seg.size, rank * c), min(seg.size, (rank + 1) * c)
            piece = full.narrow(self.dim, lo, hi - lo)
            pad = list(full.shape)
            pad[self.dim] = c - (hi - lo)
            return {self.name: torch.cat([piece, full.new_zeros(pad)], dim=self.dim).contiguous()}
        split, rep, start = [], [], 0
        for seg in self.segments:
            part = full.narrow(self.dim, start, seg.size)
            if seg.split:
                c = seg.size // tp
                split.append(part.narrow(self.dim, rank * c, c))
            else:
                rep.append(part)
            start += seg.size
        out = {self.name: torch.cat(split, dim=self.dim).contiguous()} if split else {}
        if rep:
            out[self.replicated_name] = torch.cat(rep, dim=self.dim).contiguous()
        return out

    def local_index(self, rank: int, tp: int) -> Dict[str, torch.Tensor]:
        """Per local tensor, the index along ``dim`` into the full tensor of each of its rows (-1: padding): what
        ``shard`` cuts, without the data (deferred init fills a rank's pieces from these)."""
        n = self.segments_total()
        shape = [1] * (self.dim + 1)
        shape[self.dim] = n
        pos = torch.arange(1, n + 1, dtype=torch.int64).view(shape)
        return {k: v.reshape(-1) - 1 for k, v in self.shard(pos, rank, tp).items()}

    def segments_total(self) -> int:
        return sum(s.size for s in self.segments)

    # -- pieces -> full ----------------------------------------------------------------------------------------
    def merge(self, per_rank: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """The full tensor from every rank's tensors (``per_rank[r]`` maps local names to rank r's tensors)."""
        tp = len(per_rank)
        if self.vocab:
            (seg,) = self.segments
            return torch.cat([p[self.name] for p in per_rank], dim=self.dim).narrow(self.dim, 0, seg.size)
        parts, s_off, r_off = [], 0, 0
        for seg in self.segments:
            if seg.split:
                c = seg.size // tp
                parts.extend(p[self.name].narrow(self.dim, s_off, c) for p in per_rank)
                s_off += c
            else:
                parts.append(per_rank[0][self.replicated_name].narrow(self.dim, r_off, seg.size))
                r_off += seg.size
        return torch.cat(parts, dim=self.dim)


def _rows(name, n, dim=0):
    return TensorLayout(name, dim, (Segment(n, True),))


def _vocab(name, n):
    return TensorLayout(name, 0, (Segment(n, True),), vocab=True)


def _mixed(name, sizes_split, replicated_name):
    return TensorLayout(name, 0, tuple(Segment(n, s) for n, s in sizes_split), replicated_name=replicated_name)


def bc_name(name: str) -> str:
    """Local name of the replicated B/C part of a Mamba tensor: ``...in_proj.weight`` -> ``...in_proj.bc_weight``."""
    head, leaf = name.rsplit(".", 1)
    return f"{head}.bc_{leaf}"


# Stable parameter names of mdtrain's backbones (models/README.md, "Tensor parallelism").
_ROW = re.compile(r"(^|\.)(attn\.qkv|mlp\.fc1|mlp\.gate|adaLN_modulation|final_adaLN)\.(weight|bias)$")
_COL = re.compile(r"(^|\.)(attn\.out|mlp\.fc2|mixer\.out_proj)\.weight$")
_VOCAB = re.compile(r"^(embed\.weight|head\.weight|head\.bias)$")
_MAMBA_HEADS = re.compile(r"(^|\.)mixer\.(fwd|rev)\.(dt_bias|A_log|D|norm_weight)$")
_MAMBA_IN = re.compile(r"(^|\.)mixer\.in_proj\.weight$")
_MAMBA_CONV = re.compile(r"(^|\.)mixer\.(fwd|rev)\.conv1d\.(weight|bias)$")


class ModelLayout:
    """Layouts of every tensor a single-device state dict holds; tensors not listed are replicated as is."""

    def __init__(self, tensors: Dict[str, TensorLayout], shapes: Dict[str, Tuple[int, ...]]):
        self.tensors = tensors
        self.shapes = shapes  # full shapes of every tensor of the single-device state dict

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> "ModelLayout":
        """Derive the cuts from the single-device names and shapes (``{name: tensor.shape}``).

        Mamba's segment sizes come from its own tensors: d_inner = norm_weight's size, n_heads = dt_bias's,
        2 * d_state = conv1d rows - d_inner."""
        shapes = {k: tuple(v) for k, v in shapes.items()}
        out: Dict[str, TensorLayout] = {}
        for name, shape in shapes.items():
            if _VOCAB.match(name):
                out[name] = _vocab(name, shape[0])
            elif _ROW.search(name):
                out[name] = _rows(name, shape[0])
            elif _COL.search(name):
                out[name] = _rows(name, shape[1], dim=1)
            elif _MAMBA_HEADS.search(name):
                out[name] = _rows(name, shape[0])
            elif _MAMBA_IN.search(name):
                mixer = name[: -len("in_proj.weight")]
                di, nh = shapes[mixer + "fwd.norm_weight"][0], shapes[mixer + "fwd.dt_bias"][0]
                bc = shape[0] - 2 * di - nh
                out[name] = _mixed(name, ((di, True), (di, True), (bc, False), (nh, True)), bc_name(name))
            elif _MAMBA_CONV.search(name):
                direction = name.rsplit(".", 2)[0] + "."
                di = shapes[direction + "norm_weight"][0]
                out[name] = _mixed(name, ((di, True), (shape[0] - di, False)), bc_name(name))
        return cls(out, shapes)

    def check(self, tp: int) -> List[str]:
        return [p for p in (t.check(tp) for t in self.tensors.values()) if p]

    def pieces(self, name: str, tp: int) -> Dict[str, Tuple[int, ...]]:
        """Local names and shapes of a single-device tensor's pieces on a rank of a ``tp``-way model."""
        t = self.tensors.get(name)
        if tp == 1 or t is None:
            return {name: self.shapes[name]}
        return t.local_shapes(self.shapes[name], tp)

    def split_set(self, tp: int) -> set:
        """Local names whose tensors differ between TP ranks (the split parts); empty for ``tp`` 1."""
        if tp == 1:
            return set()
        return {n for t in self.tensors.values() for n in t.local_shapes(self.shapes[t.name], tp) if n == t.name}

    def local_shapes(self, tp: int) -> Dict[str, Tuple[int, ...]]:
        """Every local tensor's shape on a rank of a ``tp``-way model."""
        out = {}
        for name in self.shapes:
            out.update(self.pieces(name, tp))
        return out

    def cut(self, local: str, rank: int, tp: int) -> Tuple[str, Optional[int], Optional[torch.Tensor]]:
        """(full name, dim, index along dim into the full tensor, -1 = padding) of a local tensor of a rank of a
        ``tp``-way model; dim and index are None for a tensor held whole."""
        full = self.full_name(local)
        t = self.tensors.get(full)
        if tp == 1 or t is None:
            return full, None, None
        return full, t.dim, t.local_index(rank, tp)[local]

    def full_name(self, local: str) -> str:
        """The single-device tensor a local tensor belongs to."""
        for t in self.tensors.values():
            if local == t.replicated_name:
                return t.name
        return local

    def shard_state_dict(self, full: Mapping[str, torch.Tensor], rank: int, tp: int) -> Dict[str, torch.Tensor]:
        """A rank's local tensors cut from single-device ones (any subset of the model's names; ``tp`` 1: as is)."""
        if tp == 1:
            return dict(full)
        out = {}
        for name, value in full.items():
            t = self.tensors.get(name)
            out.update(t.shard(value, rank, tp) if t else {name: value})
        return out

    def merge_state_dicts(self, per_rank: Sequence[Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Single-device tensors from every TP rank's local ones (replicated ones from rank 0). Any subset of the
        model's tensors (e.g. parameters only); one rank: returned as is."""
        if len(per_rank) == 1:
            return dict(per_rank[0])
        present = {self.full_name(n) for n in per_rank[0]}
        out = {}
        for name in self.shapes:
            if name in present:
                t = self.tensors.get(name)
                out[name] = t.merge(per_rank) if t else per_rank[0][name]
        return out


# ----------------------------------------------------------------------------------------------------------------
# configuration checks (megatron-free: called from config validation)


def check_config(cfg) -> None:
    """Raise ConfigError if ``parallel.tp > 1`` cannot run with this config; say what to change."""
    tp = cfg.parallel.tp
    if tp < 1:
        raise ConfigError(f"parallel.tp must be >= 1, got {tp}")
    if tp == 1:
        return
    from mdtrain.models.flavors import resolve
    dims = resolve(cfg.model)
    problems = model_problems(dims, tp)
    if problems:
        raise ConfigError(f"parallel.tp={tp} cannot split model '{cfg.model.name}/{cfg.model.flavor}': "
                          + "; ".join(problems))


def model_problems(dims, tp: int) -> List[str]:
    """Why a backbone of these dims cannot be split ``tp`` ways (empty list: it can)."""
    d = dims.d_model
    out = []
    if dims.name == "llama":
        from mdtrain.models.llama import resolve_llama
        spec = resolve_llama(dims)
        if spec.n_kv_heads % tp:
            out.append(f"the {spec.n_kv_heads} key/value heads (model.llama.n_kv_heads) are not divisible by tp={tp} "
                       "(query groups are split whole)")
        if spec.ffn_hidden % tp:
            out.append(f"the MLP hidden size {spec.ffn_hidden} is not divisible by tp={tp}")
        return out
    if dims.name == "dimamba":
        heads = 2 * d // dims.head_dim  # d_inner / head dim (models/mamba.py: EXPAND = 2)
        if heads % tp:
            out.append(f"the Mamba mixer's {heads} SSM heads (2 x model.n_heads) are not divisible by tp={tp}")
    else:
        if dims.n_heads % tp:
            out.append(f"model.n_heads={dims.n_heads} is not divisible by tp={tp} (heads are split whole)")
        hidden = dims.variant.mlp_hidden(d)
        if hidden % tp:
            out.append(f"the MLP hidden size {hidden} is not divisible by tp={tp}")
    if dims.name != "causal":  # adaLN: 6d per DiT block, 3d per Mamba block, 2d before the head
        widths = (2 * d, 3 * d) if dims.name == "dimamba" else (2 * d, 6 * d)
        if any(w % tp for w in widths):
            out.append(f"model.d_model={d}: the adaLN modulation widths {widths} are not all divisible by tp={tp}")
    return out
