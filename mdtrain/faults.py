"""Faults of files and of the environment that a user can act on: a checkpoint that must not be loaded, a run dir
that cannot be written or is in use. Layer 0, so the engines, the checkpoint manager and the trainer raise them
alike; ``mdtrain.errors`` reports them as one line (exit status 1)."""
from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that is refused: a file that would run code when loaded, a manifest that lists something other
    than the checkpoint's own regular files, no usable checkpoint, or one whose math differs from this run's.

    The message names the checkpoint (and the file) and what to do."""


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked: another process trains in it, it is not writable, the disk is
    full, or it holds checkpoints of a run this one would overwrite. The message names the directory."""
