"""torchrun whose exit status tells a requeue script that the run was preempted: ``python -m mdtrain.launch.torchrun``
takes torchrun's arguments and runs torchrun's own launcher (``torch.distributed.run``).

Plain torchrun exits with 1 whenever a worker exits non-zero, so a run that checkpointed on SIGUSR2/SIGTERM and
exited with 143 (``mdtrain.signals.Preempted``) looks like a crash. Here: every failed worker exited with 143 -> 143;
torchrun itself was sent SIGTERM/SIGINT -> 128 + the signal; any other failure -> 1, as torchrun.
"""
from __future__ import annotations

import sys

PREEMPTED = 143


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in e.failures.items()}
        if codes and all(c == PREEMPTED for c in codes.values()):
            print(f"mdtrain.launch.torchrun: every failed worker exited with {PREEMPTED} after its checkpoint "
                  f"(ranks {sorted(codes)}): preempted; re-run the same command to resume", file=sys.stderr)
            return PREEMPTED
        print(f"mdtrain.launch.torchrun: workers failed with exit codes {codes}", file=sys.stderr)
        return 1
    except SignalException as e:
        print(f"mdtrain.launch.torchrun: received {e.sigval.name}; the workers were stopped", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
