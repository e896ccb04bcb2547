"""Graceful stop on preemption / time-limit signals: the loop checkpoints at the next step boundary and exits.

``install()`` makes SIGUSR2 (SLURM's ``--signal=USR2@...`` time-limit warning) and SIGTERM (preemption) set a flag
instead of killing the process; ``Trainer.fit`` checks the flag on every rank each step (one tiny all-reduce), saves a
checkpoint when any rank saw it, and returns ``"preempted"``. Launchers then requeue, and the requeued job resumes
from that checkpoint with no user action.
"""
from __future__ import annotations

import signal
import threading

_stop = threading.Event()
_received: list[str] = []


class Preempted(SystemExit):
    """Raised by ``mdtrain train`` after it saved a checkpoint because of a stop signal (exit code 143)."""

    def __init__(self, signame: str):
        super().__init__(143)
        self.signame = signame


def _handler(signum, frame):  # noqa: ARG001
    _received.append(signal.Signals(signum).name)
    _stop.set()


def install(signals=(signal.SIGUSR2, signal.SIGTERM)) -> None:
    """Route ``signals`` to the stop flag (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in signals:
        signal.signal(s, _handler)


def ignore_further(signals=(signal.SIGUSR2, signal.SIGTERM)) -> None:
    """After the stop checkpoint is saved: ignore further stop signals until the process has exited.

    A launcher that sees one rank exit (torchrun, the DeepSpeed launcher) sends SIGTERM to the others; Python
    restores the default handler of a Python-handled signal while it shuts down, so without this a rank that is
    still tearing down would die of that SIGTERM (exit -15) instead of exiting 143 like its peers. An ignored
    signal stays ignored through interpreter shutdown."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in signals:
        signal.signal(s, signal.SIG_IGN)


def stop_requested() -> bool:
    return _stop.is_set()


def received() -> str:
    return ",".join(_received) or "request"


def reset() -> None:
    _stop.clear()
    _received.clear()
