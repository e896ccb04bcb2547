"""Helpers for tests and debugging: run a function on N real ranks (gloo on 127.0.0.1), offline environment.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes that form a gloo process group on
loopback with one thread each, calls ``fn(rank, world_size, *args)`` in every rank and returns the list of
results (tensors converted to numpy so they survive the rank's exit). Any rank's traceback becomes the
error of the call; a hang becomes a TimeoutError naming the ranks still running.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

OFFLINE_ENV = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "DS_ACCELERATOR": "cpu",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "GLOO_SOCKET_IFNAME": "lo",
    "MASTER_ADDR": "127.0.0.1",
    "TOKENIZERS_PARALLELISM": "false",
    "OPENBLAS_NUM_THREADS": "1",  # BLAS threads on tiny SciPy problems only add contention on 2 cores
}


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def to_portable(x: Any) -> Any:
    """Tensors -> numpy (recursively), so results can cross a process boundary after the rank exits."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy().copy()
    if isinstance(x, dict):
        return {k: to_portable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_portable(v) for v in x)
    return x


def _rank_main(fn, rank, world_size, port, args, env, q, init_group):
    try:
        os.environ.update(OFFLINE_ENV)
        os.environ.update(env)
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                           "LOCAL_WORLD_SIZE": str(world_size), "MASTER_PORT": str(port),
                           "OMP_NUM_THREADS": "1"})
        import torch
        torch.set_num_threads(1)
        if init_group:
            import torch.distributed as dist
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        q.put(("ok", rank, to_portable(result)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        q.put(("err", rank, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # pragma: no cover
            pass


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 180.0, env: dict | None = None,
                    init_group: bool = True) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results ordered by rank."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, args, dict(env or {}), q, init_group),
                         daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results) - set(errors))
                detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f}s{detail}")
            try:
                status, rank, payload = q.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and i not in results and i not in errors]
                for i in dead:  # a rank that died without reporting (segfault, os._exit, OOM)
                    errors[i] = f"rank {i} exited with code {procs[i].exitcode} without reporting"
                continue
            (results if status == "ok" else errors)[rank] = payload
            if errors:  # a failed rank usually leaves the others blocked in a collective
                time.sleep(1.0)
                while True:
                    try:
                        status, rank, payload = q.get_nowait()
                        (results if status == "ok" else errors)[rank] = payload
                    except queue.Empty:
                        break
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise RuntimeError(f"{len(errors)} of {world_size} ranks failed:{detail}")
    return [results[r] for r in range(world_size)]
