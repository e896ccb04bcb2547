"""DDP and FSDP2 engines; both checkpoint through torch.distributed.checkpoint (DCP), which reshards on load."""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Dict

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

import mdtrain.parallel.tensor_parallel_state as tp_state
from mdtrain.parallel.dist import DistContext, ensure_process_group
from mdtrain.parallel.engines.base import Engine, clip_and_norm, fp32_cpu
from mdtrain.parallel.meta_init import materialize_fsdp, materialize_whole


class Autocast(nn.Module):
    """Runs the wrapped module under bf16 autocast and hands back float32 outputs (the loss stays in fp32)."""

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.module(*args, **kwargs)
        return _to_fp32(out)


def _to_fp32(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_to_fp32(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_fp32(v) for k, v in out.items()}
    return out


def broadcast_module(module: nn.Module, ctx: DistContext) -> None:
    """Make every data-parallel rank start from dp-rank 0's weights and buffers (FSDP/ZeRO-3 shard what each rank
    holds, so ranks seeded differently would otherwise train a patchwork)."""
    if ctx.dp_size == 1:
        return
    group = ctx.dp_group
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src, group=group)


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every single-process save/load that it assumes a single process; that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _sum_allreduce_hook(group, bucket):
    """DDP comm hook: SUM the bucket over ranks (the default hook averages)."""
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class DCPEngine(Engine):
    """Shared by DDP and FSDP: torch optimizer stepping, DCP checkpoints (optionally asynchronous)."""

    def __init__(self, ctx, model, module, optimizer, precision):
        super().__init__(ctx, model, module, optimizer, precision)
        # checkpoint collectives get their own gloo group: an async save's background thread must not interleave
        # with the training collectives on the default group
        self._ckpt_group = dist.new_group(backend="gloo") if ctx.distributed else None
        self._pending = None

    def step(self, max_norm: float, skip: bool = False) -> float:
        norm = float("nan") if skip else tp_state.engine_clip(self.module, max_norm, clip_and_norm)
        if not skip and math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _ema_state(self) -> Dict[str, torch.Tensor]:
        return dict(self._ema.shadow)

    def _dcp_state(self, with_optim: bool, with_ema: bool) -> dict:
        if with_optim:
            msd, osd = get_state_dict(self.module, self.optimizer)
            state = {"model": msd, "optim": osd}
        else:
            state = {"model": get_model_state_dict(self.module)}
        if with_ema:
            state["ema"] = self._ema_state()
        return state

    def _meta(self) -> dict:
        return {"optim": self._optimizer_started()}

    def _optimizer_started(self) -> bool:
        # a never-stepped AdamW has no state; get_state_dict would fake a first step, so skip it (resume equals a
        # fresh optimizer then, as it should)
        return len(self.optimizer.state) > 0

    def _dcp_kwargs(self) -> dict:
        return {"process_group": self._ckpt_group, "no_dist": not self.ctx.distributed}

    def _save_state(self, path: str, async_save: bool) -> None:
        # a TP model stores its split tensors under per-TP-rank keys (identity without TP)
        state = tp_state.engine_checkpoint_state(self.module,
                                                 self._dcp_state(self._optimizer_started(), self.has_ema))
        ckpt = os.path.join(path, "dcp")
        with _quiet_single_process():
            if async_save:
                self._pending = dcp.async_save(state, checkpoint_id=ckpt, **self._dcp_kwargs())
            else:
                dcp.save(state, checkpoint_id=ckpt, **self._dcp_kwargs())

    def wait_checkpoint(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None
            self.ctx.barrier()

    def _load_state(self, path: str, meta: dict) -> None:
        with_optim = meta.get("optim", True)
        state = self._dcp_state(with_optim, meta["ema"])
        with _quiet_single_process():  # also re-splits a checkpoint written at another TP size
            state = tp_state.engine_load(self.module, state, os.path.join(path, "dcp"), meta.get("tp_size", 1),
                                         **self._dcp_kwargs())
        if with_optim:
            set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
        else:
            set_model_state_dict(self.module, state["model"])

    def _full_state_dict(self) -> Dict[str, torch.Tensor]:
        if tp_state.tp_of(self.module) is not None:  # FSDP2 x TP: gathered over dp, then merged over TP
            sd = tp_state.engine_full_state_dict(self.module, keep=self.ctx.is_main)
        else:
            sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return fp32_cpu(sd) if self.ctx.is_main else {}


class DDPEngine(DCPEngine):
    """Replicated weights, summed gradients. Without a process group it is plain single-device training."""

    name = "ddp"

    def __init__(self, pcfg, model: nn.Module, make_optimizer, ctx: DistContext, precision: str, init=None):
        from torch.nn.parallel import DistributedDataParallel as DDP
        if init is not None:  # built on the meta device: every rank keeps its (TP-local) parameters whole
            materialize_whole(model, init, ctx.device)
        model.to(ctx.device)
        fwd = Autocast(model, ctx.device.type) if precision == "bf16" else model
        if ctx.mesh is not None:
            wrapped = DDP(fwd, device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
                          process_group=ctx.dp_group, forward_sync_buffers=False)
            wrapped.register_comm_hook(ctx.dp_group, _sum_allreduce_hook)
        else:
            wrapped = fwd
        super().__init__(ctx, wrapped, model, make_optimizer(model), precision)

    def no_sync(self):
        return self.model.no_sync() if hasattr(self.model, "no_sync") else contextlib.nullcontext()

    def _ema_live(self) -> Dict[str, torch.Tensor]:
        return {n: p.data for n, p in self.module.named_parameters() if p.requires_grad}


class FSDPEngine(DCPEngine):
    """FSDP2: ``fully_shard`` on every block of ``model.blocks`` and on the root, over the data-parallel mesh
    dimension; under tensor parallelism each TP rank's (Megatron-local) parameters are sharded over the
    data-parallel group of that TP rank, so gradients are reduced over dp only.

    Gradients are reduced (as sums) after every micro-batch (no_sync is a no-op): that keeps them sharded, at the
    cost of one reduce-scatter per micro-batch, as torchtitan does.

    Parameters an objective uses outside the model's forward (``model.objective``, GenMD4's schedule) are a
    group of their own in fp32, kept gathered between engine calls (re-gathered after every backward, step,
    weight swap and state-dict use); their gradients are reduce-scattered with the rest when the backward ends."""

    name = "fsdp"

    def __init__(self, pcfg, model: nn.Module, make_optimizer, ctx: DistContext, precision: str, init=None):
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise TypeError(f"parallel.engine=fsdp shards per block and needs model.blocks (an nn.ModuleList); "
                            f"{type(model).__name__} has none")
        ensure_process_group(ctx)
        if init is None:
            model.to(ctx.device)
            broadcast_module(model, ctx)
        kw = {"mesh": ctx.mesh["dp"], "reshard_after_forward": pcfg.reshard_after_forward}
        root_kw = dict(kw)
        if precision == "bf16" and pcfg.mixed_precision:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            # blocks hand bf16 to each other; only the model's output (the logits) comes back in fp32
            root_kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                        output_dtype=torch.float32)
        if pcfg.offload_optimizer:
            kw["offload_policy"] = root_kw["offload_policy"] = CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda")
        objective = getattr(model, "objective", None)
        if isinstance(objective, nn.Module) and any(True for _ in objective.parameters()):
            obj_kw = {k: v for k, v in kw.items() if k != "mp_policy"}  # the schedule stays fp32
            fully_shard(objective, **obj_kw)
        else:
            objective = None
        for block in blocks:
            fully_shard(block, **kw)
        fully_shard(model, **root_kw)
        if init is not None:  # built on the meta device: allocate and fill this rank's shards only
            materialize_fsdp(model, init, ctx.device)
        self._fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in self._fsdp_modules:  # sum over ranks, not mean; plain SUM (gloo has no PREMUL_SUM), no division
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
        self._objective = objective
        fwd = Autocast(model, ctx.device.type) if precision == "bf16" and not pcfg.mixed_precision else model
        super().__init__(ctx, fwd, model, make_optimizer(model), precision)
        self._gather_objective()

    # ---- the objective's parameters, used outside the forward ---------------------------------------------------
    def _gather_objective(self) -> None:
        """Re-gather the objective's parameters from their (current) shards."""
        if self._objective is not None:
            self._objective.reshard()
            self._objective.unshard()

    @contextlib.contextmanager
    def _objective_sharded(self):
        """The objective's sharded parameters registered (what the optimizer, norms, EMA and state dicts see),
        gathered again afterwards."""
        if self._objective is not None:
            self._objective.reshard()
        try:
            yield
        finally:
            self._gather_objective()

    def backward(self, loss: torch.Tensor) -> None:
        super().backward(loss)
        self._gather_objective()  # the backward's end resharded them (and reduce-scattered their gradients)

    def step(self, max_norm: float, skip: bool = False) -> float:
        with self._objective_sharded():
            return super().step(max_norm, skip)

    def ema_init(self) -> None:
        with self._objective_sharded():
            super().ema_init()

    def save_checkpoint(self, path: str, client_state: dict, async_save: bool = False) -> None:
        with self._objective_sharded():
            super().save_checkpoint(path, client_state, async_save)

    def load_checkpoint(self, path: str) -> dict:
        with self._objective_sharded():
            return super().load_checkpoint(path)

    def full_state_dict(self, ema: bool = False) -> Dict[str, torch.Tensor]:
        with self._objective_sharded():
            return super().full_state_dict(ema)

    def _ema_live(self) -> Dict[str, torch.Tensor]:
        return {n: p.to_local() for n, p in self.module.named_parameters() if p.requires_grad}

    def _weights_changed(self) -> None:
        for m in self._fsdp_modules:  # drop any gathered copy so the next forward sees the new shards
            m.reshard()
        self._gather_objective()

    def _ema_state(self) -> Dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor
        params = dict(self.module.named_parameters())
        return {n: DTensor.from_local(s, params[n].device_mesh, params[n].placements, run_check=False,
                                      shape=params[n].shape, stride=params[n].stride())
                for n, s in self._ema.shadow.items()}
