"""The run directory as a resource: one writer at a time, writable before any work, and a previous run moved aside
(never deleted) when a new one starts over in it.

The lock is ``RUN_DIR/.mdtrain.lock``, held by rank 0 with ``flock`` for the whole run; it records the holder's host,
pid and start time. The kernel drops a ``flock`` when its process dies (also on SIGKILL), so a lock never goes
stale on a local disk. On network filesystems ``flock`` works where the mount supports it (NFSv4 through its lock
server; Lustre with ``-o flock``; GPFS); where it fails with ENOLCK/EOPNOTSUPP/ENOSYS/EINVAL, an ``O_EXCL`` lock file
(``.mdtrain.lock.excl``) is used instead: a holder on this host that is no longer alive is detected and replaced, a
holder on another host cannot be checked, so the message says which file to delete once that job is gone.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import time
from typing import Optional

from mdtrain.faults import RunDirError

LOCK = ".mdtrain.lock"
EXCL = LOCK + ".excl"
START_OVER = ".start_over.json"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _proc_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (tells a live holder from a reused pid), if known."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _proc_start(os.getpid()),
            "since": datetime.datetime.now().isoformat(timespec="seconds")}


def _describe(info: dict) -> str:
    if not info:
        return "another process (it has not written its host and pid yet)"
    return f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('since')})"


def _alive(info: dict) -> bool:
    """Whether the holder of an O_EXCL lock on this host still runs (a reused pid is not the holder)."""
    pid = info.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return info.get("start") is None or _proc_start(pid) in (None, info.get("start"))


def _read_json(path: str) -> dict:
    try:
        with open(path) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _not_writable(run_dir: str, e: OSError) -> RunDirError:
    return RunDirError(f"train.run_dir={run_dir} is not writable ({e.strerror}): choose a writable train.run_dir "
                       f"(or fix the directory's permissions)")


class RunDirLock:
    """An exclusive lock on a run directory (module doc). ``acquire`` raises a RunDirError naming the holder."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK)
        self._fd: Optional[int] = None
        self._excl: Optional[str] = None

    def acquire(self) -> "RunDirLock":
        import fcntl

        try:
            os.makedirs(self.run_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _not_writable(self.run_dir, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise RunDirError(f"train.run_dir={self.run_dir} is in use: {_describe(_read_json(self.path))} "
                                  f"trains in it ({self.path}); two runs in one directory would mix their metrics "
                                  f"and checkpoints. Wait for it, stop it, or use another train.run_dir") from None
            if e.errno not in _NO_FLOCK:
                os.close(fd)
                raise
            os.close(fd)
            self._acquire_excl()
            return self
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder()).encode(), 0)
            os.fsync(fd)
        except OSError as e:
            self.release()
            raise _not_writable(self.run_dir, e) from None
        return self

    def _acquire_excl(self) -> None:
        path = os.path.join(self.run_dir, EXCL)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = _read_json(path)
                if info.get("host") == socket.gethostname() and not _alive(info):
                    os.unlink(path)  # its holder is gone (killed): the lock is stale
                    continue
                elsewhere = info.get("host") != socket.gethostname()
                hint = (f"; this filesystem has no flock, so a holder on another host cannot be checked: delete "
                        f"{path} once that job is gone" if elsewhere else "")
                raise RunDirError(f"train.run_dir={self.run_dir} is in use: {_describe(info)} trains in it "
                                  f"({path}). Wait for it, stop it, or use another train.run_dir{hint}") from None
            except OSError as e:
                raise _not_writable(self.run_dir, e) from None
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(_holder()))
                fh.flush()
                os.fsync(fh.fileno())
            self._excl = path
            return
        raise RunDirError(f"train.run_dir={self.run_dir}: could not take the lock {path}")

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # drops the flock
            self._fd = None
        if self._excl is not None:
            try:
                os.unlink(self._excl)
            except OSError:
                pass
            self._excl = None

    @property
    def held(self) -> bool:
        return self._fd is not None or self._excl is not None


def remove_if_empty(run_dir: str, lock: "RunDirLock") -> None:
    """Release ``lock`` (held by this process) and remove ``run_dir`` if it holds nothing but empty directories
    and the lock's own files: what a run that failed before writing anything leaves behind. A run dir holding any
    other file is left exactly as it is."""
    try:
        for root, dirs, files in os.walk(run_dir, topdown=False):
            if set(files) - ({LOCK, EXCL} if root == run_dir else set()):
                return
            for d in dirs:
                os.rmdir(os.path.join(root, d))
        if lock.held and os.path.exists(lock.path):
            os.unlink(lock.path)  # while the lock is held: no other process is using this file
        lock.release()  # removes the O_EXCL fallback's file
        os.rmdir(run_dir)
    except OSError:
        pass
    finally:
        lock.release()


def check_writable(directory: str) -> None:
    """A RunDirError now, before any work, if files cannot be created in ``directory`` (made if missing)."""
    probe = os.path.join(directory, f".write-probe-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w") as fh:
            fh.write("")
        os.unlink(probe)
    except OSError as e:
        raise RunDirError(f"{directory} is not writable ({e.strerror}): checkpoints could not be saved; choose a "
                          f"writable train.run_dir") from None


def job_id() -> Optional[str]:
    """The scheduler job this process belongs to (a requeued or restarted job keeps it), or None."""
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        return "slurm:" + env["SLURM_JOB_ID"] + (f"_{env['SLURM_ARRAY_TASK_ID']}" if env.get("SLURM_ARRAY_TASK_ID")
                                                 else "")
    for key in ("SUBMITIT_LOCAL_JOB_ID", "TORCHELASTIC_RUN_ID"):
        if env.get(key):
            return f"{key.lower()}:{env[key]}"
    return None


def move_aside(run_dir: str) -> Optional[str]:
    """``checkpoint.start_over``: move the previous run's checkpoints/, metrics.jsonl and config.yaml into
    ``RUN_DIR/superseded/<time>/``; returns that path. None when this very job already started over there (a
    requeued or restarted job runs the same command; it must resume what it wrote since, not start over again)."""
    marker = os.path.join(run_dir, START_OVER)
    me = job_id()
    previous = _read_json(marker)
    if me is not None and previous.get("job") == me:
        print(f"checkpoint.start_over=true: this job ({me}) already started over ({marker}); resuming its own "
              f"checkpoints", flush=True)
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = os.path.join(run_dir, "superseded", stamp)
    n = 1
    while os.path.exists(dest):
        dest = os.path.join(run_dir, "superseded", f"{stamp}-{n}")
        n += 1
    os.makedirs(dest)
    for name in ("checkpoints", "metrics.jsonl", "config.yaml"):
        if os.path.exists(os.path.join(run_dir, name)):
            os.replace(os.path.join(run_dir, name), os.path.join(dest, name))
    with open(marker + ".tmp", "w") as fh:
        json.dump({"job": me, "moved_to": dest, "time": stamp}, fh)
    os.replace(marker + ".tmp", marker)
    return dest
