"""The exceptions that mean a user mistake or a fault the user can act on (a bad config, bad data, a missing file, a
diverged run, a refused checkpoint, a run dir in use or full), which every entry point reports as one line and an
exit status instead of a traceback."""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time

from mdtrain.configtools import ConfigError
from mdtrain.data.errors import DataError
from mdtrain.faults import CheckpointError, RunDirError
from mdtrain.metrics import MissingPackage

USER_ERRORS = (ConfigError, DataError, FileNotFoundError, FloatingPointError, CheckpointError, RunDirError,
               MissingPackage)


def exit_status(error: BaseException) -> int:
    """2 for a config error (nothing ran), 1 for the other user errors."""
    return 2 if isinstance(error, ConfigError) else 1


def one_line(command: str, error: BaseException) -> str:
    kind = "config error" if isinstance(error, ConfigError) else "error"
    return f"mdtrain {command}: {kind}: {error}"


def _launch_key() -> str | None:
    """What identifies this launch across its ranks on one node (None: not launched with several ranks)."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    return (env.get("TORCHELASTIC_RUN_ID") or env.get("SLURM_JOB_ID")
            or f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}")


def report(command: str, error: BaseException, stream=None) -> None:
    """Print a user error as one line, in one write (so the lines of several ranks never run together).

    Under a launcher with several ranks, an error every rank hits (a missing dataset, a bad config value) is
    printed once per node: rank 0 always prints, at once; another rank prints only if no rank of this launch on
    this node printed the same line in the last seconds (so an error only that rank hit, e.g. a corrupt sample of
    its shard, is still shown)."""
    stream = sys.stderr if stream is None else stream
    line = one_line(command, error)
    key = _launch_key()
    if key is not None:
        digest = hashlib.sha256(f"{key}\0{line}".encode()).hexdigest()[:20]
        marker = os.path.join(tempfile.gettempdir(), f"mdtrain-error-{digest}")
        if int(os.environ.get("RANK", "0") or 0) != 0:
            time.sleep(0.5)  # rank 0 first
            try:
                if time.time() - os.path.getmtime(marker) < 10:
                    return  # a rank of this launch on this node printed this very line just now
            except OSError:
                pass
        try:
            with open(marker, "w"):
                pass
        except OSError:
            pass  # no usable temp dir: print anyway
    stream.write(line + "\n")
    stream.flush()
