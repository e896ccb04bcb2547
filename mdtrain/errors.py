"""The exceptions that mean a user mistake (a bad config, bad data, a missing file, a diverged run), which every
entry point reports as one line and an exit status instead of a traceback."""
from __future__ import annotations

from mdtrain.configtools import ConfigError
from mdtrain.data.errors import DataError

USER_ERRORS = (ConfigError, DataError, FileNotFoundError, FloatingPointError)


def exit_status(error: BaseException) -> int:
    """2 for a config error (nothing ran), 1 for the other user errors."""
    return 2 if isinstance(error, ConfigError) else 1


def one_line(command: str, error: BaseException) -> str:
    kind = "config error" if isinstance(error, ConfigError) else "error"
    return f"mdtrain {command}: {kind}: {error}"
