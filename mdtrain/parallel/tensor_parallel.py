"""Tensor parallelism for mdtrain's single-device backbones, applied from outside with Megatron-core's layers and
process groups.

``apply_tensor_parallel(model, ctx, objective)`` replaces, in place and under the same parameter names:

* DiT / causal attention: ``qkv`` column-parallel (whole heads per rank: the qkv rows are laid out per head),
  ``out`` row-parallel; MLP: ``fc1`` (and md4's ``gate``) column-parallel, ``fc2`` row-parallel; the Llama
  backbone the same way, whole key/value groups per rank (its qkv rows are laid out per group), its tied
  embedding and head sharing one vocabulary shard;
* every adaLN modulation (per block and before the head): column-parallel, output gathered (the residual stream
  is replicated, so every rank needs all shifts, scales and gates);
* the token embedding (``VocabParallelEmbedding``) and the output head: split along the vocabulary; the head
  returns this rank's logit columns only, and the objective that reads them gets a reader of those columns
  (``tensor_parallel_vocab.reader``; exact SUBS: the mask logit suppressed on the rank that owns it), so training
  never gathers the full logits;
* Mamba: ``in_proj`` split by SSM heads (z, x and dt rows; the B/C rows are shared by all heads, so they stay
  replicated, with their gradients summed over TP ranks), each direction's conv channels, dt_bias, A_log, D and
  gated-norm weight split with the heads (the norm's mean over d_inner is all-reduced), ``out_proj`` row-parallel.

Megatron's layers run on CPU with ``use_cpu_initialization=True``; the weights are never initialised by
Megatron but cut from the single-device model (``tensor_parallel_layout``), so a TP model starts exactly where
the single-device one does. A model on the meta device (deferred init) gets its layers on the meta device: the
engine then fills this rank's pieces with the single-device values (``meta_init``). Megatron's CUDA RNG tracker serves dropout inside TP regions on GPU; on CPU a
keyed generator does the same job (``region_rng``). Sequence parallelism is not used (Megatron's needs CUDA).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                           copy_to_tensor_model_parallel_region)

from mdtrain import rng
from mdtrain.models.backbone import Backbone
from mdtrain.models.layers import MLP
from mdtrain.models.llama import GroupedAttention, LlamaMLP
from mdtrain.models.mamba import BiMamba, SSMDirection
from mdtrain.models.transformer import SelfAttention
from mdtrain.parallel.tensor_parallel_layout import ModelLayout, model_problems
from mdtrain.objectives.protocol import make_model_fn
from mdtrain.parallel.tensor_parallel_vocab import VocabShard, gather_vocab_logits
from mdtrain.parallel.tensor_parallel_vocab import reader as vocab_reader

log = logging.getLogger(__name__)

__all__ = ["apply_tensor_parallel", "TPInfo", "tp_info", "sampling_model_fn", "MegatronMPU", "region_rng",
           "megatron_groups"]


# ----------------------------------------------------------------------------------------------------------------
# process groups


@dataclass
class TPInfo:
    """What a tensor-parallel model knows about its split (``model._mdtrain_tp``)."""
    size: int
    rank: int
    group: object          # megatron's tensor-parallel group (= the ("dp", "tp") mesh's tp dim)
    dp_group: object       # megatron's data-parallel group (= the mesh's dp dim)
    layout: ModelLayout
    vocab: VocabShard
    dropout: float


def megatron_groups(ctx):
    """Initialise Megatron's ``parallel_state`` for ``ctx.tp_size`` (once) and check that its groups are the
    ("dp", "tp") mesh of ``mdtrain.parallel.dist``: tensor-parallel ranks consecutive, data-parallel outer."""
    if not (dist.is_available() and dist.is_initialized()) or ctx.mesh is None:
        raise RuntimeError(f"parallel.tp={ctx.tp_size} needs a process group: call "
                           f"mdtrain.parallel.dist.init_distributed(tp={ctx.tp_size}) under torchrun / srun first")
    if parallel_state.model_parallel_is_initialized():
        have = parallel_state.get_tensor_model_parallel_world_size()
        if have != ctx.tp_size:
            raise RuntimeError(f"Megatron's parallel_state was initialised with tp={have}, this run has "
                               f"parallel.tp={ctx.tp_size}")
    else:
        # the gloo copies Megatron can add are for its own distributed optimizer, which mdtrain does not use
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=ctx.tp_size,
                                                 create_gloo_process_groups=False)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    dp_group = parallel_state.get_data_parallel_group()
    for name, mine, theirs in (("tp", ctx.mesh["tp"].get_group(), tp_group),
                               ("dp", ctx.mesh["dp"].get_group(), dp_group)):
        if dist.get_process_group_ranks(mine) != dist.get_process_group_ranks(theirs):
            raise RuntimeError(f"Megatron's {name} group {dist.get_process_group_ranks(theirs)} differs from the "
                               f"mesh's {dist.get_process_group_ranks(mine)}")
    return tp_group, dp_group


class MegatronMPU:
    """The model-parallel unit DeepSpeed takes (``deepspeed.initialize(mpu=...)``): ZeRO then partitions over the
    data-parallel group only, counts TP-split gradients once per rank and replicated ones once in its norm, and
    names checkpoint files per TP rank. Backed by Megatron's parallel_state; no pipeline parallelism."""

    def get_model_parallel_rank(self):
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self):
        return parallel_state.get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self):
        return parallel_state.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return parallel_state.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return parallel_state.get_data_parallel_group()

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(parallel_state.get_data_parallel_group())

    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_rank(self):
        return 0


# ----------------------------------------------------------------------------------------------------------------
# communication pieces Megatron lacks on CPU (its gather allocates on the current CUDA device)


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim; backward keeps this rank's chunk (the consumer is replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank, ctx.width = group, dist.get_rank(group), x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        return g.narrow(-1, ctx.rank * ctx.width, ctx.width).contiguous(), None


class _AllReduceBoth(torch.autograd.Function):
    """Sum over TP ranks in forward and backward: for a quantity every rank computes a part of and then uses
    differently (Mamba's mean over d_inner, applied to each rank's own channels)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone().contiguous()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        g = g.clone().contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


# ----------------------------------------------------------------------------------------------------------------
# layers: Megatron's, returning plain tensors, with no ``_extra_state`` (state dicts keep single-device names)


class _Plain:
    get_extra_state = nn.Module.get_extra_state  # no "_extra_state" entry in state dicts
    set_extra_state = nn.Module.set_extra_state

    def _drop_megatron_hooks(self):
        self._load_state_dict_pre_hooks.clear()  # Megatron's hook adds "_extra_state" keys to loaded dicts


class ColumnLinear(_Plain, ColumnParallelLinear):
    """y = x W_r^T (+ b_r): this rank's output columns; the input gradient is all-reduced over TP."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._drop_megatron_hooks()

    def forward(self, x):
        return super().forward(x)[0]


class GatheredColumnLinear(ColumnLinear):
    """Column-parallel with the output gathered: the adaLN modulations, which the replicated stream reads whole."""

    def forward(self, x):
        return _GatherLastDim.apply(super().forward(x), self.tp_group)


class RowLinear(_Plain, RowParallelLinear):
    """y = all-reduce(x_r W_r^T) + b: input columns split, output replicated."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._drop_megatron_hooks()

    def forward(self, x):
        return super().forward(x)[0]


class VocabEmbedding(_Plain, VocabParallelEmbedding):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._drop_megatron_hooks()


class VocabHead(ColumnLinear):
    """The output head split along the (padded) vocabulary; returns this rank's ``width`` real columns."""

    def __init__(self, *args, width: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.width = width

    def forward(self, x):
        out = super().forward(x)
        return out if out.shape[-1] == self.width else out[..., :self.width]


class MambaInProj(nn.Module):
    """Mamba's in_proj: rows [z_r, x_r, dt_r] of this rank's heads (``weight``) and the B/C rows every head reads
    (``bc_weight``, replicated). Output laid out [z_r, x_r, B, C, dt_r], as BiMamba.forward splits it."""

    def __init__(self, d_model: int, d_inner_local: int, bc: int, heads_local: int, group):
        super().__init__()
        self.sizes, self.group = (d_inner_local, d_inner_local, heads_local), group
        self.weight = nn.Parameter(torch.empty(2 * d_inner_local + heads_local, d_model))
        self.bc_weight = nn.Parameter(torch.empty(bc, d_model))

    def forward(self, u):
        u = copy_to_tensor_model_parallel_region(u, group=self.group)  # every row's input grad is partial
        z, x, dt = self.weight.split(self.sizes)
        # B/C feed only this rank's heads here: their weight gradient is summed over TP ranks
        bc = copy_to_tensor_model_parallel_region(self.bc_weight, group=self.group)
        return F.linear(u, torch.cat([z, x, bc, dt]))


class MambaConv(nn.Module):
    """A direction's depthwise causal conv over [x_r channels (``weight``, ``bias``), B/C channels (``bc_*``)]."""

    def __init__(self, channels_local: int, bc: int, kernel: int, group):
        super().__init__()
        self.kernel, self.group = kernel, group
        self.weight = nn.Parameter(torch.empty(channels_local, 1, kernel))
        self.bias = nn.Parameter(torch.empty(channels_local))
        self.bc_weight = nn.Parameter(torch.empty(bc, 1, kernel))
        self.bc_bias = nn.Parameter(torch.empty(bc))

    def forward(self, x):
        w = torch.cat([self.weight, copy_to_tensor_model_parallel_region(self.bc_weight, group=self.group)])
        b = torch.cat([self.bias, copy_to_tensor_model_parallel_region(self.bc_bias, group=self.group)])
        return F.conv1d(x, w, b, padding=self.kernel - 1, groups=w.shape[0])


class TPSSMDirection(SSMDirection):
    """A scan direction over this rank's heads; the gated RMSNorm's mean runs over all of d_inner."""

    _tp_group = None
    _d_inner_full = 0

    def gate_norm(self, y, z):
        with torch.autocast(y.device.type, enabled=False):
            y = y.float() * F.silu(z.float())
            ss = _AllReduceBoth.apply(y.pow(2).sum(-1, keepdim=True), self._tp_group)
            return y * torch.rsqrt(ss / self._d_inner_full + 1e-5) * self.norm_weight.float()


class TPSelfAttention(SelfAttention):
    """Attention over this rank's heads; attention dropout draws from the TP-region generator."""

    def forward(self, *args, **kwargs):
        if not (self.training and self.dropout > 0):
            return super().forward(*args, **kwargs)
        with region_rng(self._tp_rank, self.qkv.weight.device):
            return super().forward(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# dropout randomness


@contextlib.contextmanager
def region_rng(tp_rank: int, device: torch.device):
    """Randomness inside a TP region (dropout on this rank's heads): a generator of its own per TP rank.

    Its seed is one draw from the replicated CPU stream keyed with the TP rank, so the ranks' masks differ, a
    step's masks repeat exactly under activation checkpointing (which replays that stream), and the stream
    itself advances identically on every rank. On CUDA the state lives in Megatron's RNG tracker."""
    seed = rng.key(int(torch.randint(0, 2 ** 62, (1,))), tp_rank)
    if device.type == "cuda":
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        tracker = get_cuda_rng_tracker()
        tracker.reset()
        tracker.add("model-parallel-rng", seed)
        with tracker.fork("model-parallel-rng"):
            yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _sync_replicated_rng(module, args):
    """Forward pre-hook: every TP rank of a data-parallel rank continues the first one's RNG stream, so dropout
    outside TP regions (residual branches, embeddings) is identical on the copies of the replicated activations."""
    info: TPInfo = module._mdtrain_tp
    if not module.training or info.dropout <= 0:
        return
    src = dist.get_global_rank(info.group, 0)
    device = next(module.parameters()).device
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    for i, st in enumerate(states):
        buf = st.to(device)
        dist.broadcast(buf, src=src, group=info.group)
        states[i] = buf.cpu()
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


# ----------------------------------------------------------------------------------------------------------------
# applying


def _mark_split(module: nn.Module, layout: ModelLayout, tp: int) -> None:
    """Megatron's parameter attributes: DeepSpeed's gradient norms count split parameters on every rank and
    replicated ones once (mdtrain's own norm reads the split set from the layout by name)."""
    params = dict(module.named_parameters())
    for name in layout.split_set(tp):
        if name in params:  # (Megatron's setter refuses parameters it already marked, e.g. column biases)
            p = params[name]
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, layout.tensors[name].dim, 1


def apply_tensor_parallel(model: nn.Module, ctx, objective) -> nn.Module:
    """Split ``model`` (a single-device mdtrain backbone, weights already final) over ``ctx.tp_size`` ranks in place.

    Parameter names stay those of the single-device model, plus ``bc_weight`` / ``bc_bias`` beside Mamba's
    ``in_proj`` and convs (their replicated B/C parts). The model's forward returns this rank's vocabulary
    columns of the logits, so ``objective`` (the one that will read them) gets a reader of those columns;
    ``sampling_model_fn`` gathers full logits. Call before activation checkpointing, compile and the data-parallel
    engine (the trainer does)."""
    tp = ctx.tp_size
    if tp == 1:
        return model
    if not isinstance(model, Backbone):
        raise TypeError(f"apply_tensor_parallel expects an mdtrain backbone, got {type(model).__name__}")
    problems = model_problems(model.dims, tp)
    full_state = model.state_dict()
    layout = ModelLayout.from_shapes({k: v.shape for k, v in full_state.items()})
    problems += layout.check(tp)
    if problems:
        raise ValueError(f"parallel.tp={tp} cannot split this model: " + "; ".join(problems))
    tp_group, dp_group = megatron_groups(ctx)
    rank = dist.get_rank(tp_group)
    ref = model.embed.weight
    device, dtype = ref.device, ref.dtype
    meta = device.type == "meta"  # deferred init: the layers are swapped on the meta device, filled by the engine
    cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                              perform_initialization=False, params_dtype=dtype, sequence_parallel=False,
                              gradient_accumulation_fusion=False)
    kw = {"config": cfg, "init_method": nn.init.zeros_, "tp_group": tp_group}

    def col(lin: nn.Linear, cls=ColumnLinear):
        return cls(lin.in_features, lin.out_features, bias=lin.bias is not None, gather_output=False, **kw)

    def row(lin: nn.Linear):
        return RowLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, input_is_parallel=True,
                         skip_bias_add=False, **kw)

    vocab = model.vocab_size
    shard = VocabShard.of(vocab, rank, tp, tp_group)
    padded = shard.padded * tp  # Megatron's vocabulary padded to a multiple of tp
    tied = model.head.weight is model.embed.weight
    with torch.device("meta") if meta else contextlib.nullcontext():
        model.embed = VocabEmbedding(padded, model.dims.d_model, **kw)
        model.head = VocabHead(model.head.in_features, padded, bias=model.head.bias is not None,
                               gather_output=False, width=shard.width, **kw)
        if tied:  # both hold the same vocabulary rows on a rank, so the tie survives the split
            model.head.weight = model.embed.weight
        if model.final_adaLN is not None:
            model.final_adaLN = col(model.final_adaLN, GatheredColumnLinear)
        for m in list(model.modules()):
            if isinstance(m, SelfAttention):
                m.qkv, m.out = col(m.qkv), row(m.out)
                m.__class__ = TPSelfAttention  # same attributes and names; only forward's RNG handling differs
                m._tp_rank = rank
            elif isinstance(m, GroupedAttention):  # whole key/value groups per rank (qkv rows laid out per group)
                m.qkv, m.out = col(m.qkv), row(m.out)
            elif isinstance(m, (MLP, LlamaMLP)):
                m.fc1, m.fc2 = col(m.fc1), row(m.fc2)
                if m.gate is not None:
                    m.gate = col(m.gate)
            elif isinstance(m, BiMamba):
                _split_mamba(m, tp, tp_group, kw)
            if isinstance(getattr(m, "adaLN_modulation", None), nn.Linear):
                m.adaLN_modulation = col(m.adaLN_modulation, GatheredColumnLinear)
    if not meta:
        local = layout.shard_state_dict(full_state, rank, tp)
        model.to(device=device, dtype=dtype)
        model.load_state_dict(local, strict=True)  # every new layer gets exactly its cut of the single-device weights
    _mark_split(model, layout, tp)
    model._mdtrain_tp = TPInfo(size=tp, rank=rank, group=tp_group, dp_group=dp_group, layout=layout, vocab=shard,
                               dropout=model.dims.dropout)
    objective.logprob = vocab_reader(shard)
    model.register_forward_pre_hook(_sync_replicated_rng)
    if ctx.is_main:
        log.info("tensor parallel: %d ranks, vocabulary %d split as %d per rank", tp, vocab, shard.padded)
    return model


def _split_mamba(m: BiMamba, tp: int, group, kw) -> None:
    d_model = m.in_proj.in_features
    full_inner = m.d_inner
    bc = 2 * m.d_state
    m.d_inner, m.n_heads = m.d_inner // tp, m.n_heads // tp
    m.in_proj = MambaInProj(d_model, m.d_inner, bc, m.n_heads, group)
    m.out_proj = RowLinear(full_inner, d_model, bias=False, input_is_parallel=True, skip_bias_add=False, **kw)
    for direction in (m.fwd, m.rev):
        direction.conv1d = MambaConv(m.d_inner, bc, direction.conv1d.kernel_size[0], group)
        direction.d_inner, direction.n_heads = m.d_inner, m.n_heads
        for pname, n in (("dt_bias", m.n_heads), ("A_log", m.n_heads), ("D", m.n_heads),
                         ("norm_weight", m.d_inner)):
            setattr(direction, pname, nn.Parameter(torch.empty(n)))
        direction.__class__ = TPSSMDirection
        direction._tp_group, direction._d_inner_full = group, full_inner


# ----------------------------------------------------------------------------------------------------------------
# using a TP model


def tp_info(model: nn.Module) -> Optional[TPInfo]:
    """The TPInfo of a tensor-parallel model, also through DDP / DeepSpeed / autocast wrappers (None if not TP)."""
    for _ in range(4):
        info = getattr(model, "_mdtrain_tp", None)
        if info is not None:
            return info
        model = getattr(model, "module", None)
        if model is None:
            return None
    return None


def sampling_model_fn(model: nn.Module):
    """``model_fn(x, cond, attention_mask)`` returning the full-vocabulary logits of a TP model (gathered over TP
    ranks), with ``decode_step`` for causal models; what samplers need. Training and eval read the shards."""
    info = tp_info(model)
    if info is None:
        return make_model_fn(model)

    def model_fn(x, cond=None, attention_mask=None):
        return gather_vocab_logits(model(x, cond, attention_mask), info.vocab)

    base = model
    while not hasattr(base, "decode_step") and hasattr(base, "module"):
        base = base.module
    if hasattr(base, "decode_step"):
        def decode_step(tokens_new, cache=None):
            logits, cache = base.decode_step(tokens_new, cache)
            return gather_vocab_logits(logits, info.vocab), cache
        model_fn.decode_step = decode_step
    return model_fn
