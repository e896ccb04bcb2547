"""The ``launch:`` config section: how ``mdtrain launch`` submits a training run (SLURM resources, requeue policy).

Every field has a flag of the same name on ``mdtrain launch`` (``gpus_per_node`` -> ``--gpus-per-node``); flags win
over the section, which wins over these defaults. ``mdtrain train`` itself never reads this section.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mdtrain.configtools import ConfigError, doc


@dataclass
class LaunchConfig:
    nodes: int = doc(1, "nodes per job (sbatch --nodes)", ge=1)
    gpus_per_node: int = doc(0, "GPUs per node (sbatch --gpus-per-node); one task per GPU. 0 = request no GPUs", ge=0)
    tasks_per_node: int = doc(0, "processes per node; 0 = one per GPU (one per node without GPUs)", ge=0)
    cpus_per_task: int = doc(0, "CPUs per task (sbatch --cpus-per-task, also OMP_NUM_THREADS); 0 = cluster default",
                             ge=0)
    mem: str = doc("", "memory per node, e.g. 480G (sbatch --mem); empty = cluster default")
    time: str = doc("4:00:00", "time limit per allocation: MINUTES, H:MM:SS, D-H, D-H:MM or D-H:MM:SS; the job "
                    "checkpoints and requeues itself before it runs out")
    partition: str = doc("", "SLURM partition (sbatch --partition); empty = cluster default")
    account: str = doc("", "SLURM account to charge (sbatch --account)")
    qos: str = doc("", "quality of service (sbatch --qos)")
    constraint: str = doc("", "node features required (sbatch --constraint), e.g. h100")
    sbatch_extra: list[str] = doc([], "more sbatch options, e.g. ['--exclusive', '--reservation=big']")
    setup: list[str] = doc([], "shell lines the sbatch script runs before srun (module load ..., source venv)")
    job_name: str = doc("", "job name; empty = mdtrain-<run dir name>")
    folder: str = doc("", "submitit folder for the job pickles and per-task logs; empty = RUN_DIR/submitit "
                      "(the runs' common parent for job arrays)")
    signal_delay_s: int = doc(120, "SLURM sends USR2 this long before the time limit (sbatch --signal); the run "
                              "must checkpoint within it", ge=0)
    max_requeues: int = doc(20, "give up after this many time-limit requeues of one job (preemptions do not count)",
                            ge=0)
    array_parallelism: int = doc(0, "job arrays: run at most this many elements at once; 0 = no limit", ge=0)

    def validate(self):
        if self.nodes < 1:
            raise ConfigError(f"launch.nodes must be >= 1, got {self.nodes}")
        for name in ("gpus_per_node", "tasks_per_node", "cpus_per_task", "signal_delay_s", "max_requeues",
                     "array_parallelism"):
            if getattr(self, name) < 0:
                raise ConfigError(f"launch.{name} must be >= 0, got {getattr(self, name)}")
        time_minutes(self.time)
        for opt in self.sbatch_extra:
            if not opt.startswith("--"):
                raise ConfigError(f"launch.sbatch_extra entries are long sbatch options such as '--exclusive' or "
                                  f"'--reservation=big', got {opt!r}")

    @property
    def tasks(self) -> int:
        """Processes per node: one per GPU unless set."""
        return self.tasks_per_node or self.gpus_per_node or 1


_TIME = re.compile(r"(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?")


def time_minutes(value: str) -> int:
    """A SLURM time limit -> whole minutes (rounded up), in SLURM's own formats.

    ``90`` -> 90; ``30:00`` (MM:SS) -> 30; ``4:00:00`` -> 240; ``1-12`` (D-H) -> 2160; ``1-0:30`` (D-H:MM) -> 1470.
    """
    m = _TIME.fullmatch(str(value).strip())
    if not m or int(m.group("a")) + sum(int(m.group(k) or 0) for k in "dbc") == 0:
        raise ConfigError(f"launch.time={value!r} is not a SLURM time limit (MINUTES, MM:SS, H:MM:SS, D-H, D-H:MM, "
                          f"D-H:MM:SS) above zero")
    d, a, b, c = (int(m.group(k)) if m.group(k) else None for k in "dabc")
    if d is not None:  # D-H[:MM[:SS]]
        seconds = ((d * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    elif c is not None:  # H:MM:SS
        seconds = (a * 60 + b) * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # MINUTES
        seconds = a * 60
    return -(-seconds // 60)
