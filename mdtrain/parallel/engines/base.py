"""The one interface every data-parallel engine implements; the trainer codes against this and nothing else.

Gradient convention: ``backward(loss)`` takes one micro-batch's share of the global-batch loss (the shares of all
micro-batches on all ranks sum to the global loss). After the last micro-batch of a step, every rank holds the
gradient of that sum: the engines undo DDP/FSDP rank averaging and DeepSpeed's 1/grad_accum and rank averaging.

Gradient accumulation: wrap the forward AND backward of every micro-batch except the last in ``engine.no_sync()``;
the last one runs outside it and triggers the gradient synchronisation::

    for i, mb in enumerate(micro_batches):
        with engine.no_sync() if i < len(micro_batches) - 1 else contextlib.nullcontext():
            engine.backward(loss_share(engine.model(*mb)))
    grad_norm = engine.step(max_norm)

Checkpoint directory written by ``save_checkpoint(path, client_state)`` (``path`` exists; every rank writes):
    engine.json                      engine, world/dp size, whether EMA is inside (rank 0)
    client/rank_XXXXX.pt             each rank's client_state (torch.save; read back with weights_only=True)

Loading never executes anything a file contains (``safe_io``): rank 0 scans every pickle of the checkpoint first
and every rank refuses what the scan refuses.
    dcp/                             ddp/fsdp: torch.distributed.checkpoint of {"model", "optim", "ema"}
    deepspeed/ + ema/rank_XXXXX.pt   deepspeed: DeepSpeed's own ZeRO checkpoint, plus the EMA fragments
"""
from __future__ import annotations

import abc
import contextlib
import json
import math
import os
from typing import Any, Dict, Iterator, Optional

import torch
from torch import nn

from mdtrain.faults import CheckpointError
from mdtrain.parallel.dist import DistContext
from mdtrain.parallel.ema import ShardedEMA
from mdtrain.parallel.engines.safe_io import file_owner, scan_checkpoint, torch_file

ENGINE_META = "engine.json"


def rank_file(path: str, sub: str, rank: int) -> str:
    return os.path.join(path, sub, f"rank_{rank:05d}.pt")


def safe_load(path: str) -> Any:
    """torch.load that never unpickles code (tensors, numbers, strings, containers only); refusals name the file."""
    return torch_file(path)


def main_then_all(ctx: DistContext, fn) -> Any:
    """``fn()`` on rank 0, its result on every rank; a user-facing error it raises (a refused checkpoint, an
    unusable run dir, a config or data error) is raised on every rank, which would otherwise wait for rank 0."""
    from mdtrain.configtools import ConfigError
    from mdtrain.data.errors import DataError
    from mdtrain.faults import RunDirError

    kinds = {c.__name__: c for c in (CheckpointError, RunDirError, ConfigError, DataError, FileNotFoundError)}
    failure, result = None, None
    if ctx.is_main:
        try:
            result = fn()
        except tuple(kinds.values()) as e:
            failure = (type(e).__name__ if type(e).__name__ in kinds else "CheckpointError", str(e))
            if not ctx.distributed:
                raise
    if ctx.distributed:
        import torch.distributed as dist
        box = [(failure, result)]
        dist.broadcast_object_list(box, src=0)  # from this job's own rank 0, not from disk
        failure, result = box[0]
    if failure:
        raise kinds[failure[0]](failure[1])
    return result


def scan_everywhere(ctx: DistContext, path: str) -> None:
    """``safe_io.scan_checkpoint`` split over the ranks (each scans the files it wrote, so no rank's cost grows with
    the number of ranks); a refusal on any rank is raised on every rank."""
    mine = lambda rel: file_owner(rel, ctx.world_size, ctx.tp_size) == ctx.rank  # noqa: E731
    try:
        scan_checkpoint(path, mine)
        message = ""
    except CheckpointError as e:
        message = str(e)
    if ctx.distributed:
        import torch.distributed as dist
        every = [None] * ctx.world_size
        dist.all_gather_object(every, message)  # strings from this job's own ranks, not from disk
        message = next((m for m in every if m), "")
    if message:
        raise CheckpointError(message)


class Engine(abc.ABC):
    """Base: what is common to all engines (EMA plumbing, client state, metadata, lr)."""

    name = "base"

    def __init__(self, ctx: DistContext, model: nn.Module, module: nn.Module, optimizer, precision: str):
        self.ctx = ctx
        self.model = model          # call this for forward (wrapped)
        self.module = module        # the single-device module (same parameter names as the unwrapped model)
        self.optimizer = optimizer
        self.precision = precision
        self._ema: Optional[ShardedEMA] = None

    # ---- training ---------------------------------------------------------------------------------------------
    def no_sync(self) -> contextlib.AbstractContextManager:
        """Context for the forward+backward of every micro-batch but the last: no gradient synchronisation."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @abc.abstractmethod
    def step(self, max_norm: float, skip: bool = False) -> float:
        """Clip to ``max_norm`` (0: no clipping), step, zero the grads; return the global grad norm before clipping.

        ``skip=True`` drops the gradients without stepping and returns NaN. A non-finite grad norm also drops the
        step (the non-finite norm is returned), as DeepSpeed's ZeRO optimizers do on overflow."""

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ---- EMA ----------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _ema_live(self) -> Dict[str, torch.Tensor]:
        """name -> this rank's fp32 piece of each parameter, as a view the optimizer writes to."""

    def _weights_changed(self) -> None:
        """Called after the fp32 pieces were overwritten in place (EMA swap): refresh derived copies."""

    @property
    def has_ema(self) -> bool:
        return self._ema is not None

    def ema_init(self) -> None:
        """Start the EMA from the current weights."""
        self._ema = ShardedEMA(self._ema_live())

    def ema_update(self, decay: float) -> None:
        if self._ema is None:
            raise RuntimeError("ema_update() before ema_init()")
        self._ema.update(decay)

    @contextlib.contextmanager
    def ema_swapped(self) -> Iterator[None]:
        """Inside the block the model's weights are the EMA weights (for eval / sampling); restored on exit.

        Without an EMA the block runs with the live weights."""
        if self._ema is None:
            yield
            return
        self._ema.swap()
        self._weights_changed()
        try:
            yield
        finally:
            self._ema.swap()
            self._weights_changed()

    # ---- checkpoints ----------------------------------------------------------------------------------------------
    def save_checkpoint(self, path: str, client_state: dict, async_save: bool = False) -> None:
        """Write model, optimizer, EMA and this rank's ``client_state`` into the existing directory ``path``.

        Every rank calls it. With ``async_save`` (ddp/fsdp) the DCP write continues in the background: call
        ``wait_checkpoint()`` before treating ``path`` as complete (the next save and close() wait too)."""
        self.wait_checkpoint()
        # the collective write first: a rank whose own file fails afterwards (full disk) cannot leave the others
        # waiting inside it
        self._save_state(path, async_save)
        os.makedirs(os.path.join(path, "client"), exist_ok=True)
        torch.save(client_state, rank_file(path, "client", self.ctx.rank))
        if self.ctx.is_main:
            meta = {"engine": self.name, "world_size": self.ctx.world_size, "dp_size": self.ctx.dp_size,
                    "tp_size": self.ctx.tp_size, "ema": self.has_ema, **self._meta()}
            with open(os.path.join(path, ENGINE_META), "w") as fh:
                json.dump(meta, fh, indent=1)
        self.ctx.barrier()

    def wait_checkpoint(self) -> None:
        """Block until a pending asynchronous save has finished writing (no-op otherwise)."""

    def load_checkpoint(self, path: str) -> dict:
        """Restore model, optimizer and EMA from ``path``; return this rank's client_state.

        Call ``ema_init()`` first to restore the EMA (an engine without one ignores a saved EMA). At a different
        world size the state is resharded and rank 0's client_state is returned to every rank."""
        self.wait_checkpoint()
        scan_everywhere(self.ctx, path)  # nothing below meets a pickle that runs code
        meta = read_meta(path)
        if meta["engine"] != self.name:
            raise CheckpointError(f"checkpoint {path} was written by the '{meta['engine']}' engine; this run uses "
                               f"'{self.name}' (export it and load the weights with checkpoint.load_from instead)")
        meta["ema"] = meta["ema"] and self._ema is not None  # an EMA is only loaded into an engine that keeps one
        self._load_state(path, meta)
        if self._ema is not None and not meta["ema"]:
            self._ema.reset()  # the checkpoint had none: start it from the loaded weights
        same = meta["world_size"] == self.ctx.world_size
        client = safe_load(rank_file(path, "client", self.ctx.rank if same else 0))
        self.ctx.barrier()
        return client

    def _meta(self) -> dict:
        return {}

    @abc.abstractmethod
    def _save_state(self, path: str, async_save: bool) -> None:
        """Write the engine's model / optimizer / EMA state under ``path``."""

    @abc.abstractmethod
    def _load_state(self, path: str, meta: dict) -> None:
        """Read it back (``meta["ema"]``: whether to restore the EMA too), resharding if the world size changed."""

    # ---- export -------------------------------------------------------------------------------------------------
    def full_state_dict(self, ema: bool = False) -> Dict[str, torch.Tensor]:
        """Consolidated fp32 CPU weights with the single-device names, on rank 0 ({} elsewhere). Collective."""
        if ema and self._ema is None:
            raise RuntimeError("full_state_dict(ema=True) but the EMA was never initialised")
        with self.ema_swapped() if ema else contextlib.nullcontext():
            return self._full_state_dict()

    @abc.abstractmethod
    def _full_state_dict(self) -> Dict[str, torch.Tensor]:
        """Gather the live weights (see full_state_dict)."""

    def close(self) -> None:
        self.wait_checkpoint()


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, ENGINE_META)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{path} is not an engine checkpoint: {ENGINE_META} is missing")
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
        str(meta["engine"]), int(meta["world_size"]), bool(meta["ema"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_path}: not an engine description ({type(e).__name__}: {e})") from None
    return meta


def fp32_cpu(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Detached CPU copies, floating point tensors in float32 (never the live tensors)."""
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone() for k, v in sd.items()}


def clip_and_norm(params, max_norm: float) -> float:
    """Global L2 grad norm of ``params`` (DTensor-aware), then clip in place as torch's clip_grad_norm_ does."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if hasattr(norm, "full_tensor"):  # DTensor (FSDP / TP): reduce the partial norms
        norm = norm.full_tensor()
    value = float(norm)  # the step's one host read: whether to step at all is decided on the host
    if max_norm > 0 and math.isfinite(value):
        # multiplied on the device, unconditionally: a coefficient clamped to 1.0 leaves every bit as it was
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
    return value

