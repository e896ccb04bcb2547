"""Checkpoint manager: one complete checkpoint per directory, written atomically, verified on load, keep-last-k.

Layout: ``RUN_DIR/checkpoints/step_XXXXXXXX/`` holds whatever the engine writes (model, optimizer and EMA shards,
per-rank client state), plus ``config.yaml``, ``tokenizer/`` and ``manifest.json`` (every file's size and sha256).
A checkpoint is written into ``step_XXXXXXXX.tmp``, fsynced, and renamed; a directory without a manifest, or whose
files do not match it, is never loaded: the previous valid one is used with a warning.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from typing import Callable, Optional, Protocol

from mdtrain.configtools import atomic_write_text
from mdtrain.data.shards import file_sha256

STEP_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _files_under(root: str) -> list[str]:
    out = []
    for d, _, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), root)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(path: str, step: int, extra: Optional[dict] = None) -> None:
    files = {}
    for rel in _files_under(path):
        full = os.path.join(path, rel)
        with open(full, "rb") as fh:  # data must be on disk before the manifest vouches for it
            os.fsync(fh.fileno())
        files[rel] = {"size": os.path.getsize(full), "sha256": file_sha256(full)}
    for d, _, _ in os.walk(path):
        _fsync_dir(d)
    atomic_write_text(os.path.join(path, MANIFEST), json.dumps({"step": step, "files": files, **(extra or {})},
                                                                indent=1))


def verify(path: str, checksums: bool = True) -> Optional[str]:
    """None if the checkpoint at ``path`` is complete and intact, else a reason."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        return "no manifest.json (the save did not finish)"
    try:
        with open(mpath) as fh:
            manifest = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable manifest.json ({e})"
    for rel, meta in manifest.get("files", {}).items():
        full = os.path.join(path, rel)
        if not os.path.exists(full):
            return f"missing file {rel}"
        if os.path.getsize(full) != meta["size"]:
            return f"file {rel} has {os.path.getsize(full)} bytes, manifest says {meta['size']} (truncated?)"
        if checksums and file_sha256(full) != meta["sha256"]:
            return f"file {rel} does not match its sha256 (corrupt)"
    return None


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = STEP_RE.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def find_latest_valid(root: str, checksums: bool = True, warn: Callable[[str], None] = None) -> Optional[str]:
    """Newest checkpoint directory under ``root`` that verifies; skipped ones are reported through ``warn``."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    for _, path in reversed(list_checkpoints(root)):
        reason = verify(path, checksums)
        if reason is None:
            return path
        warn(f"checkpoint {path} is not usable: {reason}; trying the previous one")
    return None


def resolve_checkpoint(path: str) -> str:
    """A run dir, its checkpoints/ dir, or one step dir -> the newest valid step dir (clear error otherwise)."""
    if os.path.exists(os.path.join(path, MANIFEST)):
        reason = verify(path)
        if reason:
            raise FileNotFoundError(f"checkpoint {path} is not usable: {reason}")
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        found = find_latest_valid(root)
        if found:
            return found
    raise FileNotFoundError(f"no valid checkpoint under '{path}' (expected RUN_DIR/checkpoints/step_XXXXXXXX/ "
                            f"with a manifest.json)")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


CLIENT_FORMAT = 2  # client state = {"format": 2, name: state_dict of each registered object}


class CheckpointManager:
    """Saves through the engine into a temporary directory, then publishes it atomically (rank 0 renames).

    The engine writes the model, optimizer and EMA; everything else a run must resume (its progress, the data
    position, the random streams) is a :class:`Stateful` object registered by name, saved in each rank's client
    state and restored by :meth:`load`."""

    def __init__(self, root: str, keep_last: int, ctx):
        self.root = root
        self.keep_last = keep_last
        self.ctx = ctx
        self._stateful: dict[str, Stateful] = {}
        self._pending: Optional[tuple] = None  # (tmp, final, step, extra_files, wait) of an asynchronous save

    def register(self, name: str, obj: Stateful) -> None:
        """Save ``obj.state_dict()`` with every checkpoint and restore it with ``obj.load_state_dict`` on load."""
        if name in self._stateful or name == "format":
            raise ValueError(f"checkpoint state '{name}' is already registered")
        self._stateful[name] = obj

    def client_state(self) -> dict:
        return {"format": CLIENT_FORMAT, **{name: obj.state_dict() for name, obj in self._stateful.items()}}

    def load(self, path: str, engine, upgrade: Optional[Callable[[dict], dict]] = None) -> None:
        """Restore the engine's state and every registered object from the checkpoint ``path``.

        ``upgrade`` turns a client state written before format 2 (one flat dict) into the current layout."""
        client = engine.load_checkpoint(path)
        if client.get("format") != CLIENT_FORMAT:
            if upgrade is None:
                raise ValueError(f"checkpoint {path}: client state format {client.get('format')} is not "
                                 f"{CLIENT_FORMAT}, and no upgrade was given")
            client = upgrade(client)
        missing = [name for name in self._stateful if name not in client]
        if missing:
            raise ValueError(f"checkpoint {path} lacks the state of {missing} (it was written by another program?)")
        for name, obj in self._stateful.items():
            obj.load_state_dict(client[name])

    def save(self, step: int, engine, extra_files: Callable[[str], None] = None, async_save: bool = False) -> str:
        """Write checkpoint ``step`` (the engine's state and every registered object's) on every rank and publish it.

        With ``async_save`` (an engine that writes in the background), publishing is deferred to the next ``save``
        or ``finish``: the engine's write is waited for, then the manifest is written and the directory renamed.
        A run killed before that leaves only ``step_X.tmp``, which is never loaded."""
        self.finish()
        final = os.path.join(self.root, step_dir_name(step))
        tmp = final + ".tmp"
        if self.ctx.is_main:
            os.makedirs(self.root, exist_ok=True)
            if os.path.exists(tmp):  # left by a run killed mid-save
                shutil.rmtree(tmp)
            os.makedirs(tmp)
        self.ctx.barrier()
        engine.save_checkpoint(tmp, self.client_state(), async_save)  # every rank writes its shards
        self._pending = (tmp, final, step, extra_files, engine.wait_checkpoint if async_save else None)
        if not async_save:
            self.finish()
        return final

    def finish(self) -> None:
        """Publish a pending checkpoint (after its background write completed). Collective."""
        if self._pending is None:
            return
        tmp, final, step, extra_files, wait = self._pending
        self._pending = None
        if wait is not None:
            wait()
        self.ctx.barrier()
        if self.ctx.is_main:
            if extra_files:
                extra_files(tmp)
            write_manifest(tmp, step, {"world_size": self.ctx.world_size})
            if os.path.exists(final):  # re-saving the same step (e.g. final save right after a periodic one)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        self.ctx.barrier()

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        ckpts = list_checkpoints(self.root)
        for _, path in ckpts[:-self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    def latest(self) -> Optional[str]:
        """Newest valid checkpoint, verified (sha256 of every file) by rank 0 only and agreed by every rank."""
        import torch

        path = find_latest_valid(self.root) if self.ctx.is_main else None
        code = torch.tensor([int(os.path.basename(path)[5:]) + 1 if path else 0], dtype=torch.float64)
        step = int(self.ctx.all_reduce_sum(code)[0]) - 1  # 0 from the other ranks; -1 means none
        return os.path.join(self.root, step_dir_name(step)) if step >= 0 else None
