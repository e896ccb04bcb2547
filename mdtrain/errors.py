"""The exceptions that mean a user mistake or a fault the user can act on (a bad config, bad data, a missing file, a
diverged run, a refused checkpoint, a run dir in use or full), which every entry point reports as one line and an
exit status instead of a traceback."""
from __future__ import annotations

from mdtrain.configtools import ConfigError
from mdtrain.data.errors import DataError
from mdtrain.faults import CheckpointError, RunDirError

USER_ERRORS = (ConfigError, DataError, FileNotFoundError, FloatingPointError, CheckpointError, RunDirError)


def exit_status(error: BaseException) -> int:
    """2 for a config error (nothing ran), 1 for the other user errors."""
    return 2 if isinstance(error, ConfigError) else 1


def one_line(command: str, error: BaseException) -> str:
    kind = "config error" if isinstance(error, ConfigError) else "error"
    return f"mdtrain {command}: {kind}: {error}"
