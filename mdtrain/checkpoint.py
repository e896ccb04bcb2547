"""Checkpoint manager: one complete checkpoint per directory, written atomically, checked on load, keep-last-k.

Layout: ``RUN_DIR/checkpoints/step_XXXXXXXX/`` holds whatever the engine writes (model, optimizer and EMA shards,
per-rank client state), plus ``config.yaml``, ``tokenizer/`` and ``manifest.json`` (every file's size and sha256).
A checkpoint is written into ``step_XXXXXXXX.tmp``, fsynced, and renamed once its manifest exists: the manifest is
the completion marker. Every rank hashes the files it wrote, so no rank reads the whole checkpoint back.

Checking a checkpoint (``checkpoint.verify``): ``size`` (the default, stat calls only) proves the manifest is
complete and lists exactly the checkpoint's own regular files with their sizes (catches unfinished, truncated and
tampered-with-the-listing checkpoints); ``sha256`` also hashes every file, split over the ranks by who wrote it.
A checkpoint that fails is skipped for the previous one, with a warning.

What a run may do with the checkpoints it finds (``CheckpointManager.select``): resume the newest valid one; with
``checkpoint.resume=false`` or when none is valid, stop with a message, unless ``checkpoint.start_over=true`` moves
them aside first (``mdtrain.rundir``). Pruning (``keep_last``) only ever removes checkpoints older than the one
just written.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import traceback
import warnings
from typing import Callable, Optional, Protocol

from mdtrain.configtools import atomic_write_text, share_tree_like_open
from mdtrain.faults import CheckpointError, RunDirError
from mdtrain.parallel.engines.base import main_then_all, scan_everywhere
from mdtrain.parallel.engines.safe_io import dcp_exception, file_owner

STEP_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
REQUIRED = ("engine.json",)  # an engine checkpoint without these is not one
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


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


def _entries_under(root: str) -> list[str]:
    """Every non-directory entry under ``root`` (regular files, symlinks, devices ...), relative, manifest aside."""
    out = []
    for d, dirs, files in os.walk(root):
        for name in list(dirs):
            if os.path.islink(os.path.join(d, name)):  # os.walk does not follow it: list it as an entry
                out.append(os.path.relpath(os.path.join(d, name), root))
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), root)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def file_sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()


def write_manifest(path: str, step: int, files: dict, extra: Optional[dict] = None) -> None:
    """``files``: rel -> {"size", "sha256"} of every file (already fsynced by their writers)."""
    for d, _, _ in os.walk(path):
        _fsync_dir(d)
    atomic_write_text(os.path.join(path, MANIFEST), json.dumps({"step": step, "files": files, **(extra or {})},
                                                                indent=1))


def read_manifest(path: str) -> tuple[Optional[dict], Optional[str]]:
    """(manifest, None) when ``path/manifest.json`` is a complete listing of ``path``'s regular files with their
    sizes (stat calls only), else (None, reason)."""
    mpath = os.path.join(path, MANIFEST)
    try:
        st = os.lstat(mpath)
    except FileNotFoundError:
        return None, "no manifest.json (the save did not finish)"
    except OSError as e:
        return None, f"manifest.json cannot be read ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return None, "manifest.json is not a regular file"
    try:
        with open(mpath) as fh:
            manifest = json.load(fh)
        files = manifest["files"]
        int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"unreadable manifest.json ({type(e).__name__}: {e})"
    if not isinstance(files, dict) or not files:
        return None, "manifest.json lists no files"
    root = os.path.realpath(path)
    for rel, meta in files.items():
        if (not isinstance(rel, str) or not rel or os.path.isabs(rel) or os.path.normpath(rel) != rel
                or rel.split(os.sep)[0] == ".." or rel == MANIFEST):
            return None, f"manifest.json lists {rel!r}, which is not a file inside the checkpoint"
        if not isinstance(meta, dict) or not isinstance(meta.get("size"), int) or meta["size"] < 0 \
                or not isinstance(meta.get("sha256"), str) or not _SHA_RE.match(meta["sha256"]):
            return None, f"manifest.json entry {rel!r} is malformed ({meta!r})"
        full = os.path.join(path, rel)
        try:
            fst = os.lstat(full)
        except OSError:
            return None, f"missing file {rel}"
        if not stat.S_ISREG(fst.st_mode):
            return None, f"{rel} is not a regular file (a symlink, device or directory)"
        if not os.path.realpath(full).startswith(root + os.sep):  # a symlinked directory on the way
            return None, f"manifest.json lists {rel!r}, which leads outside the checkpoint"
        if fst.st_size != meta["size"]:
            return None, f"file {rel} has {fst.st_size} bytes, manifest says {meta['size']} (truncated?)"
    for need in REQUIRED:
        if need not in files:
            return None, f"manifest.json does not list {need}"
    unlisted = [rel for rel in _entries_under(path) if rel not in files]
    if unlisted:
        return None, f"{unlisted[0]} is not listed in manifest.json (added after the save?)"
    return manifest, None


def verify(path: str, checksums: bool = True) -> Optional[str]:
    """None if the checkpoint at ``path`` is complete and intact (``checksums``: sha256 too), else a reason."""
    manifest, why = read_manifest(path)
    if why:
        return why
    if checksums:
        for rel, meta in manifest["files"].items():
            if file_sha256(os.path.join(path, rel)) != meta["sha256"]:
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


def survey(root: str, checksums: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """(usable checkpoint dirs newest first, [(dir, reason)] of the unusable ones)."""
    ok, bad = [], []
    for _, path in reversed(list_checkpoints(root)):
        why = verify(path, checksums)
        (bad.append((path, why)) if why else ok.append(path))
    return ok, bad


def find_latest_valid(root: str, checksums: bool = False, warn: Callable[[str], None] = None) -> Optional[str]:
    """Newest checkpoint directory under ``root`` that verifies; skipped ones are reported through ``warn``."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    for _, path in reversed(list_checkpoints(root)):
        reason = verify(path, checksums)
        if reason is None:
            return path
        warn(f"checkpoint {path} is not usable: {reason}; trying the previous one")
    return None


def resolve_checkpoint(path: str, checksums: bool = False) -> str:
    """A run dir, its checkpoints/ dir, or one step dir -> the newest valid step dir (clear error otherwise)."""
    if os.path.exists(os.path.join(path, MANIFEST)):
        reason = verify(path, checksums)
        if reason:
            raise CheckpointError(f"checkpoint {path} is not usable: {reason}")
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        found = find_latest_valid(root, checksums)
        if found:
            return found
    raise FileNotFoundError(f"no valid checkpoint under '{path}' (expected RUN_DIR/checkpoints/step_XXXXXXXX/ "
                            f"with a manifest.json)")


def disk_full(e: BaseException) -> Optional[OSError]:
    """The ENOSPC/EDQUOT OSError behind ``e`` (DCP wraps each rank's error; chains are followed), or None."""
    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return x
        for f in (getattr(x, "failures", None) or {}).values():  # DCP's CheckpointException: rank -> (exc, trace)
            inner = f[0] if isinstance(f, tuple) and f else getattr(f, "exc", f)
            stack.append(inner if isinstance(inner, BaseException) else None)
        stack.extend([x.__cause__, x.__context__])
    return None


def _mount_of(path: str) -> str:
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


CLIENT_FORMAT = 2  # client state = {"format": 2, name: state_dict of each registered object}


class CheckpointManager:
    """Saves through the engine into a temporary directory, then publishes it atomically (rank 0 renames).

    The engine writes the model, optimizer and EMA; everything else a run must resume (its progress, the data
    position, the random streams) is a :class:`Stateful` object registered by name, saved in each rank's client
    state and restored by :meth:`load`."""

    def __init__(self, root: str, keep_last: int, ctx, verify: str = "size"):
        self.root = root
        self.keep_last = keep_last
        self.ctx = ctx
        self.checksums = verify == "sha256"
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
        if not isinstance(client, dict):
            raise CheckpointError(f"checkpoint {path}: the client state is a {type(client).__name__}, not a dict")
        if client.get("format") != CLIENT_FORMAT:
            if upgrade is None:
                raise CheckpointError(f"checkpoint {path}: client state format {client.get('format')} is not "
                                      f"{CLIENT_FORMAT}, and no upgrade was given")
            client = upgrade(client)
        missing = [name for name in self._stateful if name not in client]
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks the state of {missing} (written by another program?)")
        for name, obj in self._stateful.items():
            obj.load_state_dict(client[name])

    # -- finding the checkpoint to resume --------------------------------------------------------------------------
    def select(self, resume: bool, start_over: bool, moved_aside: Callable[[], str]) -> Optional[str]:
        """The checkpoint this run resumes (None: it starts at step 0), the same on every rank.

        * ``start_over``: ``moved_aside()`` (rank 0) moves the run's checkpoints out of the way first; None. (When
          it returns None, this job already started over: its own checkpoints are resumed.)
        * ``resume=False`` with checkpoints present: a RunDirError (training would overwrite and prune them).
        * no checkpoint usable: a CheckpointError listing each one and why.
        * else the newest usable one (with ``checksums``: hashed over the ranks; a mismatch falls back)."""
        def plan():
            ckpts = list_checkpoints(self.root)
            again = False  # this job started over before (it was requeued): it resumes what it wrote since
            if start_over and ckpts:
                where = moved_aside()
                if where is not None:
                    print(f"checkpoint.start_over=true: moved {len(ckpts)} checkpoint(s) of the previous run to "
                          f"{where}; training from step 0", flush=True)
                    return []
                again = True
            if not ckpts:
                return []
            if not resume and not again:
                raise RunDirError(
                    f"{self.root} holds checkpoints ({', '.join(os.path.basename(p) for _, p in ckpts)}) and "
                    f"checkpoint.resume=false would train a new run over them (and prune them): resume with "
                    f"checkpoint.resume=true, set checkpoint.start_over=true to move them aside first, or use "
                    f"another train.run_dir")
            ok, bad = survey(self.root, checksums=False)
            for path, why in bad:
                if not ok or int(os.path.basename(path)[5:]) > int(os.path.basename(ok[0])[5:]):
                    print(f"warning: checkpoint {path} is not usable: {why}; trying the previous one", flush=True)
            if not ok:
                raise CheckpointError(_none_usable(self.root, bad))
            return ok

        candidates = main_then_all(self.ctx, plan)
        rejected = []
        for path in candidates:
            why = self._hash_check(path) if self.checksums else None
            if why is None:
                # a file that would run code stops the run (not a fall-back: someone crafted it), before any work
                scan_everywhere(self.ctx, path)
                return path
            rejected.append((path, why))
            if self.ctx.is_main:
                print(f"warning: checkpoint {path} is not usable: {why}; trying the previous one", flush=True)
        if rejected:
            raise CheckpointError(_none_usable(self.root, rejected))
        return None

    def _hash_check(self, path: str) -> Optional[str]:
        """sha256 of every file of ``path`` against its manifest, each rank hashing the files it wrote."""
        manifest, why = read_manifest(path) if self.ctx.is_main else (None, None)
        manifest, why = _share(self.ctx, (manifest, why))
        if why:
            return why
        ws, tp = self.ctx.world_size, self.ctx.tp_size
        bad = [rel for rel, meta in sorted(manifest["files"].items()) if file_owner(rel, ws, tp) == self.ctx.rank
               and file_sha256(os.path.join(path, rel)) != meta["sha256"]]
        bad = sorted(sum(_gather(self.ctx, bad), []))
        return f"file {bad[0]} does not match its sha256 (corrupt)" if bad else None

    # -- saving ------------------------------------------------------------------------------------------------------
    def save(self, step: int, engine, extra_files: Callable[[str], None] = None, async_save: bool = False) -> str:
        """Write checkpoint ``step`` (the engine's state and every registered object's) on every rank and publish it.

        With ``async_save`` (an engine that writes in the background), publishing is deferred to the next ``save``
        or ``finish``: the engine's write is waited for, then the manifest is written and the directory renamed.
        A run killed before that leaves only ``step_X.tmp``, which is never loaded. A full disk stops the run with
        a RunDirError; the checkpoints already published stay."""
        self.finish()
        final = os.path.join(self.root, step_dir_name(step))
        tmp = final + ".tmp"

        def make_tmp():
            os.makedirs(self.root, exist_ok=True)
            if os.path.exists(tmp):  # left by a run killed mid-save
                shutil.rmtree(tmp)
            os.makedirs(tmp)

        self._guard(tmp, final, make_tmp, main_only=True)
        self._guard(tmp, final, lambda: engine.save_checkpoint(tmp, self.client_state(), async_save))
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
            self._guard(tmp, final, wait)
        self.ctx.barrier()
        if extra_files:
            self._guard(tmp, final, lambda: extra_files(tmp), main_only=True)
        listing = _share(self.ctx, _entries_under(tmp) if self.ctx.is_main else None)
        ws, tp = self.ctx.world_size, self.ctx.tp_size

        def hash_mine():
            mine = {}
            for rel in listing:
                if file_owner(rel, ws, tp) == self.ctx.rank:
                    full = os.path.join(tmp, rel)
                    with open(full, "rb") as fh:  # data must be on disk before the manifest vouches for it
                        os.fsync(fh.fileno())
                    mine[rel] = {"size": os.path.getsize(full), "sha256": file_sha256(full)}
            return mine

        hashed = self._guard(tmp, final, hash_mine)
        files = {k: v for part in _gather(self.ctx, hashed) for k, v in part.items()}

        def publish():
            share_tree_like_open(tmp)  # what DeepSpeed / safetensors wrote 0600 becomes readable as the umask says
            write_manifest(tmp, step, dict(sorted(files.items())), {"world_size": self.ctx.world_size})
            if os.path.exists(final):  # re-saving the same step (e.g. final save right after a periodic one)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune(step)

        self._guard(tmp, final, publish, main_only=True)
        self.ctx.barrier()

    def _guard(self, tmp: str, final: str, fn: Callable, main_only: bool = False):
        """Run ``fn`` (on rank 0 only with ``main_only``); if it fails on any rank, every rank raises (none is left
        waiting in the next collective) and the partial ``tmp`` is removed. A full disk or an unwritable directory
        is one RunDirError naming the place; anything else is re-raised as a RuntimeError after its traceback."""
        result, failure = None, None
        if self.ctx.is_main or not main_only:
            try:
                result = fn()
            except (Exception, dcp_exception()) as e:  # noqa: BLE001 - DCP wraps every rank's write error
                if isinstance(e, OSError) or disk_full(e) is not None:
                    failure = ("disk", _save_failure(e, tmp, final, self.root))
                else:
                    traceback.print_exc()
                    failure = ("bug", f"writing checkpoint {final} failed on rank {self.ctx.rank}: "
                                      f"{type(e).__name__}: {e}")
        failures = [f for f in _gather(self.ctx, failure) if f]
        if failures:
            if self.ctx.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            text = " | ".join(dict.fromkeys(m for _, m in failures))
            raise (RunDirError if all(k == "disk" for k, _ in failures) else RuntimeError)(text)
        return result

    def _prune(self, saved: int) -> None:
        """Keep ``keep_last`` checkpoints counting the one just saved; never touch a newer step (a run resumed from
        an older checkpoint than the newest, unusable one must not lose what it writes)."""
        if self.keep_last <= 0:
            return
        older = [path for step, path in list_checkpoints(self.root) if step < saved]
        for path in older[:max(0, len(older) - (self.keep_last - 1))]:
            shutil.rmtree(path, ignore_errors=True)


def _none_usable(root: str, rejected: list) -> str:
    listing = "; ".join(f"{os.path.basename(p)}: {why}" for p, why in rejected)
    return (f"no usable checkpoint in {root} ({listing}). Restore one of them, or set checkpoint.start_over=true to "
            f"move them aside and train from step 0")


def _save_failure(e: BaseException, tmp: str, final: str, root: str) -> str:
    full = disk_full(e)
    err = full if full is not None else e
    where = _mount_of(root)
    if full is not None:
        free = shutil.disk_usage(where).free / 2 ** 30
        return (f"disk full while writing checkpoint {final} ({os.strerror(full.errno)}, {where} has {free:.2f} GiB "
                f"free): it was not saved; the checkpoints already in {root} are untouched. Free space on {where} "
                f"or move train.run_dir to a larger disk, then re-run the same command to resume")
    strerror = getattr(err, "strerror", None) or str(err)
    return (f"cannot write checkpoint {final} ({strerror}: {getattr(err, 'filename', None) or tmp}): it was not "
            f"saved; the checkpoints already in {root} are untouched. Make {root} writable, or move train.run_dir")


def _share(ctx, obj):
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(ctx, obj) -> list:
    """Every rank's ``obj``, on every rank."""
    if not ctx.distributed:
        return [obj]
    import torch.distributed as dist
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
