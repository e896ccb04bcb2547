"""DeepSpeed engine: ZeRO stage 0-3 with torch's AdamW as the client optimizer (nothing is JIT-compiled).

EMA and export work on each rank's fp32 master fragments (ZeRO-1/2: ``param._hp_mapping``; ZeRO-3: the local
partition), so neither gathers the model per step. Checkpoints are DeepSpeed's own (tag ``state``); at a different
data-parallel size they are converted with DeepSpeed's universal-checkpoint tool and loaded with optimizer state.
"""
from __future__ import annotations

import contextlib
import copy
import glob
import json
import logging
import math
import os
import shutil
import tempfile
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

import mdtrain.parallel.tensor_parallel_state as tp_state
from mdtrain.faults import CheckpointError
from mdtrain.models.init import DeferredInit
from mdtrain.parallel.dist import DistContext, ensure_process_group
from mdtrain.parallel.engines.base import Engine, rank_file, clip_and_norm, fp32_cpu, read_meta, safe_load
from mdtrain.parallel.engines.safe_io import deepspeed_globals as allowed_globals, torch_file
from mdtrain.parallel.engines.torch_native import broadcast_module
from mdtrain.parallel.meta_init import materialize_whole, materialize_zero3

log = logging.getLogger(__name__)

TAG = "state"
# keys whose value follows mdtrain's own config; a DeepSpeed JSON may not change them (key -> where it comes from)
_TRAINER_KEYS = {"train_batch_size": "train.global_batch_size", "gradient_accumulation_steps": "the batch sizes",
                 "train_micro_batch_size_per_gpu": "train.micro_batch_size", "gradient_clipping": "optim.grad_clip",
                 "bf16": "train.precision"}


def import_deepspeed(device: torch.device):
    """Import DeepSpeed for ``device`` without run-time compilation (CPU accelerator, no shm comm op build)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops
    # the shared-memory all-reduce is only used for inference and costs a ~45 s g++ build on first use
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(pcfg, precision: str, grad_accum: int, micro_batch_size: int, dp_size: int,
                     device: torch.device) -> dict:
    """The DeepSpeed JSON this engine runs with: generated from ParallelConfig, overridden by ``deepspeed_config``."""
    if pcfg.zero_stage == 0 and precision == "bf16":
        raise ValueError("parallel.engine=deepspeed with zero_stage=0 trains in fp32 only (DeepSpeed's stage-0 bf16 "
                         "optimizer keeps fp32 masters the engine cannot shard an EMA over); use zero_stage >= 1 or "
                         "parallel.engine=ddp for bf16")
    zero = {"stage": pcfg.zero_stage}
    if pcfg.offload_optimizer:
        if pcfg.zero_stage == 0:
            raise ValueError("parallel.offload_optimizer needs parallel.zero_stage >= 1 with the deepspeed engine")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * dp_size,
        "gradient_clipping": 0.0,             # step(max_norm) clips, per call
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # the client optimizer is torch's AdamW
        "zero_force_ds_cpu_optimizer": False,   # ... also with optimizer offload (no DeepSpeedCPUAdam build)
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
    }
    if pcfg.deepspeed_config:
        with open(pcfg.deepspeed_config) as fh:
            user = json.load(fh)
        for key, why in (("optimizer", "mdtrain passes torch's AdamW (optim.*)"),
                         ("scheduler", "mdtrain sets the learning rate itself (optim.schedule)"),
                         ("fp16", "mdtrain trains in fp32 or bf16 (train.precision)")):
            if key in user:
                raise ValueError(f"{pcfg.deepspeed_config}: remove '{key}': {why}")
        for key, source in _TRAINER_KEYS.items():
            if key in user and user.pop(key) != cfg[key]:
                log.warning("%s: ignoring '%s'; it follows %s (%s)", pcfg.deepspeed_config, key, source, cfg[key])
        cfg = _merge(cfg, user)
    return cfg


@contextlib.contextmanager
def _forced_overflow(opt):
    """Make the next ``opt.step()`` take DeepSpeed's overflow path (gradients dropped, weights and moments kept) by
    handing it a NaN gradient norm: instance attributes shadow the methods for the duration."""
    nan = torch.tensor(float("nan"))
    if hasattr(opt, "_get_norm_groups"):            # ZeRO-3
        patched = {"_get_norm_groups": lambda *a, **k: [nan]}
    elif hasattr(opt, "scaled_global_norm"):        # ZeRO-1/2
        patched = {"scaled_global_norm": lambda *a, **k: nan, "check_grad_overflow": True}
    else:
        raise TypeError(f"cannot skip a step of {type(opt).__name__}")
    saved = {k: opt.__dict__[k] for k in patched if k in opt.__dict__}
    opt.__dict__.update(patched)
    try:
        yield
    finally:
        for k in patched:
            del opt.__dict__[k]
        opt.__dict__.update(saved)


def verify_pickles(folder: str) -> None:
    """DeepSpeed loads its files with ``weights_only=False``; first prove each one references only known-safe
    globals (a weights-only load under an allowlist, pickles only: ``mmap``), so no arbitrary code can run."""
    allowed = allowed_globals()
    for f in sorted(glob.glob(os.path.join(folder, "**", "*.pt"), recursive=True)):
        torch_file(f, allowed, mmap=True)


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, pcfg, model: nn.Module, make_optimizer, ctx: DistContext, precision: str, grad_accum: int,
                 micro_batch_size: int, init: Optional[DeferredInit] = None):
        ensure_process_group(ctx)
        os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))  # DeepSpeed reads it
        deepspeed = import_deepspeed(ctx.device)
        # wraps the process group that exists already
        deepspeed.init_distributed(dist_backend="nccl" if ctx.device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False)
        self._deepspeed = deepspeed
        self.config = deepspeed_config(pcfg, precision, grad_accum, micro_batch_size, ctx.dp_size, ctx.device)
        self.stage = int(self.config["zero_optimization"]["stage"])
        mpu = None
        if ctx.tp_size > 1:  # ZeRO partitions over the data-parallel group; norms and file names know the TP ranks
            from mdtrain.parallel.tensor_parallel import MegatronMPU
            mpu = MegatronMPU()
        if init is None:
            model.to(ctx.device)
            broadcast_module(model, ctx)
        elif self.stage == 3:  # this rank's flat partition of each (TP-local) parameter, nothing more
            materialize_zero3(model, init, ctx.device, torch.bfloat16 if precision == "bf16" else torch.float32,
                              self.config, mpu.get_data_parallel_group() if mpu else None, mpu)
        else:  # ZeRO-0/1/2 keep the (TP-local) parameters whole
            materialize_whole(model, init, ctx.device)
        ds, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model), config=self.config,
                                                mpu=mpu, dist_init_required=False)
        self.ds = ds
        # stage 0 in fp32 keeps the torch optimizer as is: full replicated weights, we clip and step ourselves
        self._replicated = not hasattr(ds_opt, "clip_grad")
        super().__init__(ctx, ds, ds.module, ds_opt, precision)
        self.ds.set_gradient_accumulation_boundary(True)
        if self.stage == 3:
            self._persist_objective()

    def _persist_objective(self) -> None:
        """ZeRO-3 gathers a parameter only inside the forward of the module that owns it; an objective's parameters
        (``model.objective``, GenMD4's schedule) are used outside any forward, so they are made persistent: kept
        gathered on every rank like DeepSpeed's small parameters (re-gathered after each step and checkpoint event),
        their gradients reduce-scattered and their fp32 masters partitioned and stepped like every other's."""
        objective = getattr(self.module, "objective", None)
        if not isinstance(objective, nn.Module):
            return
        params = [p for p in objective.parameters() if hasattr(p, "ds_id") and not p.ds_persist]
        for p in params:
            p.ds_persist = True
            self.optimizer.persistent_parameters.append(p)
        if params:
            params[0].all_gather(params)

    # ---- training ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self):
        self.ds.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.ds.set_gradient_accumulation_boundary(True)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages over data-parallel ranks; scale_wrt_gas=False stops its 1/grad_accum
        self.ds.backward(loss * self.ctx.dp_size, scale_wrt_gas=False)

    def step(self, max_norm: float, skip: bool = False) -> float:
        if self._replicated:
            norm = float("nan") if skip else tp_state.engine_clip(self.module, max_norm, clip_and_norm)
            if math.isfinite(norm):
                self.ds.step()
            else:
                self.ds.zero_grad()
            return norm
        self.optimizer.clip_grad = max_norm
        with _forced_overflow(self.optimizer) if skip else contextlib.nullcontext():
            self.ds.step()
        if skip:
            return float("nan")
        if getattr(self.optimizer, "overflow", False):  # non-finite gradients: DeepSpeed dropped the step
            return float("inf")
        return float(self.ds.get_global_grad_norm())

    def close(self) -> None:
        super().close()
        self.ds.destroy()  # removes DeepSpeed's module hooks (ZeRO-3 keeps some on the module otherwise)

    # ---- fp32 fragments: EMA and export -----------------------------------------------------------------------
    def _fragments(self) -> Dict[str, Tuple[torch.Tensor, int]]:
        """name -> (this rank's fp32 master piece as a flat view, its offset in the flattened parameter)."""
        out = {}
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            if hasattr(p, "ds_id"):  # ZeRO-3: rank r owns [r * part, (r + 1) * part) of the padded flat param
                part = p.ds_tensor.ds_numel
                start = dist.get_rank(group=p.ds_process_group) * part
                n = max(0, min(part, p.ds_numel - start))
                hp, _ = self.optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=True)
                out[name] = (hp.narrow(0, 0, n), start)
            elif getattr(p, "_hp_mapping", None) is not None:  # ZeRO-1/2
                out[name] = (p._hp_mapping.hp_fragment, p._hp_mapping.lp_fragment_address.start)
            elif self._replicated:
                out[name] = (p.data.view(-1), 0)
        return out

    def _ema_live(self) -> Dict[str, torch.Tensor]:
        return {k: v for k, (v, _) in self._fragments().items()}

    def _weights_changed(self) -> None:
        opt = self.optimizer
        if self._replicated:
            return
        if hasattr(opt, "_reassign_or_swap_out_partitioned_parameters"):  # ZeRO-3: fp32 partition -> lp partition
            opt._partition_all_parameters()  # as ZeRO-3's step does: release gathered copies, then re-gather below
            for i in range(len(opt.fp16_groups)):
                opt._reassign_or_swap_out_partitioned_parameters(i)
            if opt.persistent_parameters:  # small params ZeRO-3 keeps gathered between steps
                opt.persistent_parameters[0].all_gather(opt.persistent_parameters)
            opt.invalidate_secondary_tensor()
        else:                                                             # ZeRO-1/2: copy + all-gather
            opt.update_lp_params()

    def _full_state_dict(self) -> Dict[str, torch.Tensor]:
        frags = self._fragments()
        params = {id(p): n for n, p in self.module.named_parameters()}
        out = {}
        for key, t in self.module.state_dict(keep_vars=True).items():
            name = params.get(id(t))
            if hasattr(t, "ds_id") and not t.requires_grad:  # a frozen ZeRO-3 parameter: no fp32 master to read
                with self._deepspeed.zero.GatheredParameters([t]):
                    full = t.detach().clone()
            elif name is None or self._replicated or not t.requires_grad:
                full = t.detach()
            else:
                numel = t.ds_numel if hasattr(t, "ds_id") else t.numel()
                shape = t.ds_shape if hasattr(t, "ds_id") else t.shape
                full = torch.zeros(numel, dtype=torch.float32, device=self.ctx.device)
                if name in frags:
                    piece, start = frags[name]
                    full[start:start + piece.numel()].copy_(piece)
                # fragments are disjoint within the data-parallel group: the sum assembles
                dist.reduce(full, dst=dist.get_global_rank(self.ctx.dp_group, 0), op=dist.ReduceOp.SUM,
                            group=self.ctx.dp_group)
                full = full.view(shape)
            if self.ctx.dp_rank == 0:
                out[key] = full
        if self.ctx.tp_size > 1 and self.ctx.dp_rank == 0:  # TP pieces -> single-device tensors
            info = tp_state.tp_of(self.module)
            out = tp_state.gather_full(out, info.layout, info.group)
        return fp32_cpu(out) if self.ctx.is_main else {}

    # ---- checkpoints ----------------------------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {"zero_stage": self.stage}

    def _save_state(self, path: str, async_save: bool) -> None:
        if async_save and self.ctx.is_main:
            log.info("deepspeed checkpoints are written synchronously (async_save applies to ddp/fsdp)")
        self.ds.save_checkpoint(os.path.join(path, "deepspeed"), tag=TAG, client_state={}, save_latest=False)
        if self._ema is not None:
            frags = self._fragments()
            ema = {n: {"start": frags[n][1], "data": s} for n, s in self._ema.shadow.items()}
            os.makedirs(os.path.join(path, "ema"), exist_ok=True)
            torch.save(ema, rank_file(path, "ema", self.ctx.rank))

    def _load_state(self, path: str, meta: dict) -> None:
        if meta.get("zero_stage") != self.stage:
            raise CheckpointError(f"checkpoint {path} holds ZeRO stage {meta.get('zero_stage')}; this run uses stage "
                               f"{self.stage} (parallel.zero_stage)")
        folder = os.path.join(path, "deepspeed")  # its pickles were scanned by load_checkpoint (safe_io)
        if meta["world_size"] == self.ctx.world_size and meta.get("tp_size", 1) == self.ctx.tp_size:
            self.ds.load_checkpoint(folder, tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
        else:
            self._load_resharded(path, folder, meta)
        if self._ema is not None and meta["ema"]:
            self._load_ema(path, meta)

    def _load_resharded(self, path: str, folder: str, meta: dict) -> None:
        """Another data-parallel or tensor-parallel size: convert to DeepSpeed's universal format (model +
        optimizer; TP pieces re-cut for this run's TP size), then load."""
        old_tp = meta.get("tp_size", 1)
        if old_tp != self.ctx.tp_size and self._replicated:
            raise RuntimeError(f"checkpoint {path} was written with parallel.tp={old_tp}; a ZeRO stage 0 checkpoint "
                               f"loads only at the same tensor-parallel size (this run: {self.ctx.tp_size})")
        if self._replicated:  # stage 0: nothing is partitioned, the saved state loads as is
            self.ds.load_checkpoint(folder, tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
            return
        tmp = None
        if self.ctx.is_main:
            tmp = tempfile.mkdtemp(prefix=".universal-", dir=os.path.dirname(os.path.abspath(path)))
            _to_universal(os.path.join(folder, TAG), os.path.join(tmp, TAG))
            zero3_tp = self.stage == 3 and self.ctx.tp_size > 1
            if old_tp != self.ctx.tp_size or zero3_tp:  # merge the old TP pieces, cut them for this run's TP size
                from mdtrain.parallel.tensor_parallel_zero import relayout_universal, split_universal_by_tp
                layout = tp_state.layout_of(self.module)
                relayout_universal(os.path.join(tmp, TAG, "zero"), layout, old_tp, self.ctx.tp_size)
                if zero3_tp:
                    split_universal_by_tp(os.path.join(tmp, TAG, "zero"), layout, self.ctx.tp_size)
            log.info("converted the ZeRO-%d checkpoint from %d to %d ranks through DeepSpeed's universal format",
                     self.stage, meta["world_size"], self.ctx.world_size)
        holder = [tmp]
        dist.broadcast_object_list(holder, src=0)
        tmp = holder[0]
        try:
            self.ds._config.load_universal_checkpoint = True
            if self.stage == 3 and self.ctx.tp_size > 1:  # this TP rank's own tensors, partitioned over its dp group
                from mdtrain.parallel.tensor_parallel_zero import load_zero3_universal
                load_zero3_universal(self.optimizer, os.path.join(tmp, TAG, f"tp{self.ctx.tp_rank}"))
            else:
                self.ds.load_checkpoint(tmp, tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
            if self.stage == 3:
                self._repair_zero3_universal_load(os.path.join(tmp, TAG, "zero", "optimizer_state.pt"))
        finally:
            self.ds._config.load_universal_checkpoint = False
            self.ctx.barrier()
            if self.ctx.is_main:
                shutil.rmtree(tmp, ignore_errors=True)

    def _repair_zero3_universal_load(self, optimizer_state_file: str) -> None:
        """Undo two slips of DeepSpeed 0.19.8's ZeRO-3 universal load: every param group gets the first group's
        hyperparameters (no-decay groups would decay), and all groups share ONE AdamW ``step`` tensor (each
        group's step then bumps it, so later groups use a wrong bias correction)."""
        saved = torch_file(optimizer_state_file, allowed_globals())
        saved_groups = saved["optimizer_state_dict"]["param_groups"]
        if len(saved_groups) != len(self.optimizer.param_groups):
            raise RuntimeError(f"{optimizer_state_file}: {len(saved_groups)} param groups saved, the optimizer has "
                               f"{len(self.optimizer.param_groups)}")
        for group, want in zip(self.optimizer.param_groups, saved_groups):
            group.update({k: v for k, v in want.items() if k != "params"})
        for state in self.optimizer.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def _load_ema(self, path: str, meta: dict) -> None:
        frags = self._fragments()
        targets = {n: (s, frags[n][1]) for n, s in self._ema.shadow.items()}
        old_tp = meta.get("tp_size", 1)
        if old_tp != self.ctx.tp_size:  # merge the old TP pieces, cut this rank's, keep this rank's fragments
            from mdtrain.parallel.tensor_parallel_zero import ema_local
            local = ema_local(path, tp_state.layout_of(self.module), old_tp, meta["world_size"], self.ctx.tp_rank,
                              self.ctx.tp_size)
            with torch.no_grad():
                for n, (dst, start) in targets.items():
                    dst.copy_(local[n].reshape(-1)[start:start + dst.numel()])
            return
        files = [rank_file(path, "ema", r) for r in range(meta["world_size"])]
        # fragments are offsets into one TP rank's pieces: only that TP rank's files overlap this rank's
        mine = [f for g, f in enumerate(files) if g % old_tp == self.ctx.tp_rank]
        place_fragments(mine if meta["world_size"] != self.ctx.world_size else [files[self.ctx.rank]], targets)


@torch.no_grad()
def place_fragments(files, targets: Dict[str, Tuple[torch.Tensor, int]]) -> set:
    """Copy every saved EMA fragment (``{"start", "data"}`` per name) into the overlapping part of each target
    (a flat tensor and its offset in the flattened parameter): re-cuts fragments for any world size. Returns the
    names found in the files."""
    found = set()
    for f in files:
        for name, rec in safe_load(f).items():
            found.add(name)
            if name not in targets:
                continue
            dst, dst_start = targets[name]
            src, src_start = rec["data"], rec["start"]
            lo, hi = max(dst_start, src_start), min(dst_start + dst.numel(), src_start + src.numel())
            if lo < hi:
                dst[lo - dst_start:hi - dst_start].copy_(src[lo - src_start:hi - src_start])
    return found


def consolidated_state_dict(path: str, model_state: Dict[str, torch.Tensor], ema: bool = False) -> dict:
    """Full weights (the EMA's if ``ema``) of an engine's DeepSpeed checkpoint, in one process without a process
    group (export, eval). ``model_state`` is the single-device model's state dict: names, shapes, dtypes, and the
    buffers. Weights come from DeepSpeed's zero_to_fp32 (fp32 masters), the EMA from its saved fragments."""
    meta = read_meta(path)
    folder = os.path.join(path, "deepspeed")
    verify_pickles(folder)
    import_deepspeed(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if meta.get("tp_size", 1) > 1:  # zero_to_fp32 does not know TP ranks
        from mdtrain.parallel.tensor_parallel_zero import consolidated
        return consolidated(path, model_state, ema, meta, _to_universal)
    if meta["zero_stage"] == 0:  # zero_to_fp32 does not read stage 0: the module is saved whole
        saved = torch_file(os.path.join(folder, TAG, "mp_rank_00_model_states.pt"), allowed_globals())["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with contextlib.redirect_stdout(_LogWriter()):
            saved = get_fp32_state_dict_from_zero_checkpoint(folder, tag=TAG)
    missing = sorted(set(model_state) - set(saved))
    if missing:
        raise RuntimeError(f"{path}: the checkpoint has no {missing[:5]} (another model than the config's?)")
    out = {k: saved[k].detach().to(v.dtype).clone() for k, v in model_state.items()}
    if ema:
        flat = {k: torch.zeros(v.numel(), dtype=torch.float32) for k, v in out.items() if v.is_floating_point()}
        files = [rank_file(path, "ema", r) for r in range(meta["world_size"])]
        for k in place_fragments(files, {k: (v, 0) for k, v in flat.items()}) & set(flat):
            out[k] = flat[k].view(out[k].shape).to(out[k].dtype)
    return out


def _to_universal(input_folder: str, output_folder: str) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    with contextlib.redirect_stdout(_LogWriter()), contextlib.redirect_stderr(_LogWriter()):
        ds_to_universal(_UniversalArgs(input_folder=input_folder, output_folder=output_folder))


class _UniversalArgs:
    """The argparse namespace DeepSpeed's ds_to_universal.main expects."""

    def __init__(self, input_folder: str, output_folder: str):
        self.input_folder, self.output_folder = input_folder, output_folder
        self.num_extract_workers, self.num_merge_workers = 1, 1
        self.keep_temp_folder, self.strict, self.inject_missing_state = False, True, True


class _LogWriter:
    """ds_to_universal prints progress; send it to the debug log instead of stdout."""

    def write(self, s):
        if s.strip():
            log.debug(s.rstrip())

    def flush(self):
        pass
