"""Process groups and the (dp, tp) device mesh, from whichever launcher started this process.

Launchers understood, first match wins:
  * torchrun / submitit's ``export()`` / anything that sets RANK and WORLD_SIZE (env://);
  * the deepspeed launcher: RANK etc. in the environment and ``--local_rank=N`` on argv;
  * SLURM srun (or submitit without ``export()``): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, master = first
    host of SLURM_JOB_NODELIST;
  * none of these: one plain process, no process group at all.
Variables already in the environment are never overridden.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from mdtrain.configtools import ConfigError

log = logging.getLogger(__name__)

__all__ = ["DistContext", "LaunchEnv", "init_distributed", "parse_launch_env", "first_slurm_host",
           "ensure_process_group"]


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits, as read from the launcher's environment (no side effects)."""
    rank: int
    world_size: int
    local_rank: int
    launcher: str                      # "env" (torchrun and alike), "deepspeed", "slurm"
    master_addr: Optional[str] = None  # only what the launcher did not already export
    master_port: Optional[int] = None


def _argv_local_rank(argv: Sequence[str]) -> Optional[int]:
    """The deepspeed launcher's ``--local_rank=N`` (also ``--local_rank N`` and ``--local-rank``)."""
    for i, a in enumerate(argv):
        m = re.fullmatch(r"--local[_-]rank(?:=(\d+))?", a)
        if m:
            if m.group(1) is not None:
                return int(m.group(1))
            if i + 1 < len(argv) and argv[i + 1].isdigit():
                return int(argv[i + 1])
    return None


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM hostlist: ``gpu[003-005,9],cpu1`` -> ``gpu003``; ``a-1,b`` -> ``a-1``."""
    nodelist = nodelist.strip()
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # cut at the first comma outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]
    m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", first)
    if not m:
        return first
    prefix, ranges, suffix = m.groups()
    lo = ranges.split(",")[0].split("-")[0]
    if "[" in suffix:  # multi-dimensional lists such as n[1-2]-ib[3-4]: recurse on the rest
        suffix = first_slurm_host(suffix)
    return f"{prefix}{lo}{suffix}"


def _slurm_port(job_id: Optional[str]) -> int:
    # every task of one job derives the same port; different jobs on a shared node rarely collide
    digits = re.sub(r"\D", "", job_id or "") or "0"
    return 15000 + int(digits[-6:]) % 20000


def parse_launch_env(environ: Mapping[str, str], argv: Sequence[str] = ()) -> Optional[LaunchEnv]:
    """Read rank / world size / local rank from a launcher's environment; None for a plain single process."""
    argv_local = _argv_local_rank(argv)
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        if "LOCAL_RANK" in environ:
            local = int(environ["LOCAL_RANK"])
        elif argv_local is not None:
            local = argv_local
        else:
            local = rank % int(environ.get("LOCAL_WORLD_SIZE", environ.get("LOCAL_SIZE", world)))
        launcher = "deepspeed" if argv_local is not None else "env"
        return LaunchEnv(rank, world, local, launcher)
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        rank = int(environ["SLURM_PROCID"])
        world = int(environ.get("SLURM_STEP_NUM_TASKS", environ["SLURM_NTASKS"]))
        local = int(environ.get("SLURM_LOCALID", 0))
        addr = port = None
        if "MASTER_ADDR" not in environ:
            nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") \
                or environ.get("SLURM_NODELIST")
            addr = first_slurm_host(nodes) if nodes else "127.0.0.1"
        if "MASTER_PORT" not in environ:
            port = _slurm_port(environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID"))
        return LaunchEnv(rank, world, local, "slurm", addr, port)
    if argv_local is not None:
        raise RuntimeError(f"--local_rank={argv_local} was passed but RANK/WORLD_SIZE are not set: start the run "
                           f"with the deepspeed launcher or torchrun, which export them")
    return None


@dataclass
class DistContext:
    """This process's place in the job. ``mesh`` has dims ("dp", "tp") when a process group exists, else None."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None
    launcher: str = "single"
    mesh: Optional[object] = None  # torch.distributed.device_mesh.DeviceMesh
    owns_group: bool = False       # True when init_distributed created the process group (destroy() then ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def dp_group(self):
        """The data-parallel process group (None when there is no process group)."""
        return self.mesh["dp"].get_group() if self.mesh is not None else None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor, group=None) -> torch.Tensor:
        """In-place sum over ranks (of ``group``, default all); a no-op without a process group."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    def destroy(self) -> None:
        global _CTX
        if self.distributed and self.owns_group:
            dist.destroy_process_group()
        self.mesh = None
        if _CTX is self:
            _CTX = None


_CTX: Optional[DistContext] = None


def _pick_device(local_rank: int, device: str = "auto") -> torch.device:
    """cuda:LOCAL_RANK (modulo the GPUs visible) for ``auto`` on a CUDA machine and for ``cuda``; else the CPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but torch sees no CUDA device on this machine (torch.cuda.is_available() "
                          "is False); use train.device=auto or cpu")
    if device != "cpu" and torch.cuda.is_available():
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def _backend_for(device: torch.device, backend: str) -> str:
    if backend != "auto":
        return backend
    # gloo beside nccl on GPUs: CPU-side collectives (async checkpoint staging, object broadcast) need it
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def _build_mesh(device: torch.device, world: int, tp: int):
    from torch.distributed.device_mesh import init_device_mesh
    if world % tp:
        raise RuntimeError(f"parallel.tp={tp} does not divide the world size {world}")
    return init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))


def _context_from_group(device: torch.device, tp: int, local_rank: int, launcher: str, owns: bool) -> DistContext:
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = _build_mesh(device, world, tp)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank,
                       dp_rank=mesh.get_local_rank("dp"), dp_size=world // tp,
                       tp_rank=mesh.get_local_rank("tp"), tp_size=tp, device=device,
                       backend=dist.get_backend(), launcher=launcher, mesh=mesh, owns_group=owns)


def init_distributed(backend: str = "auto", tp: int = 1, argv: Optional[Sequence[str]] = None,
                     device: str = "auto") -> DistContext:
    """Join the job this process was launched into (see the module docstring); safe to call twice.

    ``device``: auto (cuda:LOCAL_RANK when CUDA is available, else the CPU), cpu or cuda. ``argv`` defaults to
    ``sys.argv[1:]`` (read only for the deepspeed launcher's ``--local_rank``)."""
    global _CTX
    if _CTX is not None:
        if _CTX.tp_size != tp:
            raise RuntimeError(f"init_distributed was already called with tp={_CTX.tp_size}, now tp={tp}")
        if device != "auto" and _CTX.device.type != device:
            raise RuntimeError(f"init_distributed was already called for {_CTX.device}, now device={device}")
        return _CTX
    env = os.environ
    launch = parse_launch_env(env, sys.argv[1:] if argv is None else argv)
    if dist.is_available() and dist.is_initialized():  # someone (a test harness, a notebook) made the group
        local = launch.local_rank if launch else int(env.get("LOCAL_RANK", 0))
        _CTX = _context_from_group(_pick_device(local, device), tp, local, launch.launcher if launch else "external",
                                   owns=False)
        return _CTX
    if launch is None:
        if tp != 1:
            raise ConfigError(f"parallel.tp={tp} needs a multiple of {tp} processes and this is one process: "
                              f"start it with a launcher, e.g. `python -m mdtrain.launch.torchrun --standalone "
                              f"--nproc-per-node {tp} -m mdtrain train ...` (or deepspeed, or srun); parallel.tp=1 "
                              f"for one process")
        _CTX = DistContext(device=_pick_device(0, device))
        return _CTX
    for key, value in (("RANK", launch.rank), ("WORLD_SIZE", launch.world_size), ("LOCAL_RANK", launch.local_rank),
                       ("MASTER_ADDR", launch.master_addr), ("MASTER_PORT", launch.master_port)):
        if value is not None:  # env:// reads these; DeepSpeed insists on LOCAL_RANK
            os.environ.setdefault(key, str(value))
    dev = _pick_device(launch.local_rank, device)
    kwargs = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(_backend_for(dev, backend), rank=launch.rank, world_size=launch.world_size, **kwargs)
    _CTX = _context_from_group(dev, tp, launch.local_rank, launch.launcher, owns=True)
    if _CTX.is_main:
        log.info("distributed: %d ranks (%s launcher, backend %s, mesh dp=%d x tp=%d)", _CTX.world_size,
                 launch.launcher, _CTX.backend, _CTX.dp_size, _CTX.tp_size)
    return _CTX


def ensure_process_group(ctx: DistContext) -> DistContext:
    """Give a plain single process a one-rank group and mesh (FSDP and DeepSpeed cannot run without one).

    The context is updated in place, so everything holding it sees the mesh."""
    if ctx.mesh is not None:
        return ctx
    if not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group(_backend_for(ctx.device, "auto"), store=store, rank=0, world_size=1)
        ctx.owns_group = True
    ctx.mesh = _build_mesh(ctx.device, 1, 1)
    ctx.backend = dist.get_backend()
    return ctx
