"""``mdtrain launch``: run ``mdtrain train`` as a SLURM job through submitit (or locally with its LocalExecutor).

    mdtrain launch slurm CONFIG.yaml [key=value ...] --nodes 4 --gpus-per-node 8 --time 4:00:00 [--dry-run]
    mdtrain launch slurm A.yaml B.yaml C.yaml [key=value ...] ...     # several configs -> one job array
    mdtrain launch local CONFIG.yaml [key=value ...] --tasks 2        # same job, N processes on this machine

One task per GPU; each task runs ``mdtrain train CONFIG [key=value ...]`` in-process with torch's env:// variables
exported from SLURM's (or the LocalExecutor's) environment. A job that hits its time limit or is preempted saves a
checkpoint and requeues itself; the requeued job resumes from it (see ``TrainJob``). From Python:
``jobs = submit([(config, [key=value, ...]), ...], "slurm", nodes=4, gpus_per_node=8)``, then ``wait(jobs)``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import sys
import time
from typing import Optional, Sequence

import submitit

from mdtrain.launch.config import LaunchConfig, time_minutes
from mdtrain.configtools import ConfigError

__all__ = ["TrainJob", "JobSpec", "submit", "wait", "sbatch_script", "slurm_parameters", "main"]

JobSpec = tuple[Optional[str], Sequence[str]]  # (YAML config or None, [key=value, ...])


class TrainJob(submitit.helpers.Checkpointable):
    """One task of a training job: ``mdtrain train CONFIG [overrides]`` in this process, requeued on USR2.

    How a time limit or a preemption becomes a resumed run, with no user action:

    1. submitit starts every task with its own USR2 handler ("call ``checkpoint()``, requeue the job, exit").
       SLURM sends USR2 ``launch.signal_delay_s`` before the time limit (``sbatch --signal``); so does
       ``job._interrupt()``, after a SIGTERM, to simulate a preemption.
    2. ``__call__`` keeps that handler aside and trains (``mdtrain.trainer.run``), whose ``signals.install()`` routes
       USR2 and SIGTERM to a stop flag instead. At the next step boundary all ranks agree on the flag, save a checkpoint
       together, and ``mdtrain train`` raises ``signals.Preempted``.
    3. Only then, and only if USR2 arrived, rank 0 calls submitit's handler it kept aside: ``checkpoint()``
       (resubmit this same object: the progress lives in ``RUN_DIR/checkpoints``, not in the pickle), then
       ``scontrol requeue`` (LocalExecutor: exit with its requeue code, and the controller restarts the tasks).
       The other ranks wait for the requeue to stop them, as submitit's own handler does: an early exit could end
       the job step (``KillOnBadExit``) before rank 0 has requeued.
    4. The requeued job runs the same command on the same run directory, which resumes from the newest checkpoint:
       weights, optimizer, data position, RNG streams, step and the wandb run id.

    SIGTERM alone (SLURM preemption with ``PreemptMode=REQUEUE``, ``scontrol requeue``, ``scancel``) saves a checkpoint
    too, if the run can write it within SLURM's ``KillWait``/``GraceTime``, but the job does not requeue itself:
    SLURM requeues preempted jobs (``sbatch --requeue`` is always set) and a cancelled job must stay cancelled.
    Time-limit requeues count against ``launch.max_requeues``; preemptions do not (submitit's accounting).
    """

    def __init__(self, argv: Sequence[str], workdir: str, threads: int = 0, wait_for_requeue_s: float = 300.0):
        self.argv = list(argv)  # ["train", CONFIG, key=value, ...]
        self.workdir = workdir
        self.threads = threads
        self.wait_for_requeue_s = wait_for_requeue_s

    def __call__(self) -> dict:
        os.chdir(self.workdir)  # relative paths in the config mean what they meant at submission
        job = submitit.JobEnvironment()
        dist_env = submitit.helpers.TorchDistributedEnvironment()
        if job.num_nodes == 1:  # one machine: loopback, whatever its hostname resolves to
            dist_env.master_addr = "127.0.0.1"
        # overwrite: the submitting shell's MASTER_ADDR/RANK/... (exported by sbatch) do not describe this job
        dist_env.export(set_cuda_visible_devices=False, overwrite=True)  # the trainer picks cuda:LOCAL_RANK
        threads = self.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", 0) or 0) or 1
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        import torch
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

        requeue_handler = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue (step 1)
        from mdtrain import signals
        from mdtrain.errors import USER_ERRORS, one_line
        from mdtrain.trainer import run
        config, overrides = self.config_and_overrides()
        try:
            run(config, overrides)
        except signals.Preempted:
            if "SIGUSR2" in signals.received() and callable(requeue_handler):
                if job.global_rank == 0:
                    requeue_handler(signal.SIGUSR2, None)  # checkpoint() + requeue + sys.exit
                elif job.cluster != "local":  # the LocalExecutor's controller waits for every task to exit
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the requeue's SIGTERM ends us at once
                    time.sleep(self.wait_for_requeue_s)
            raise
        except USER_ERRORS as e:
            print(one_line("train", e), file=sys.stderr, flush=True)
            raise RuntimeError(f"`mdtrain {shlex.join(self.argv)}` failed on rank {job.global_rank}: {e}") from None
        return {"rank": job.global_rank, "world_size": job.num_tasks, "argv": self.argv}

    def config_and_overrides(self) -> tuple[Optional[str], list[str]]:
        """``argv`` = ["train", CONFIG?, key=value...] as ``mdtrain.trainer.run``'s arguments."""
        rest = self.argv[1:]
        if rest and "=" not in rest[0]:
            return rest[0], rest[1:]
        return None, rest

    def __repr__(self) -> str:
        return f"TrainJob(mdtrain {shlex.join(self.argv)})"


# ----------------------------------------------------------------------------------------------------
# options -> submitit parameters


def slurm_parameters(opts: LaunchConfig, job_name: str) -> dict:
    """Launch options -> submitit ``SlurmExecutor`` parameters (its names; the dry run renders these very values)."""
    p = {"job_name": job_name, "nodes": opts.nodes, "ntasks_per_node": opts.tasks, "time": time_minutes(opts.time),
         "signal_delay_s": opts.signal_delay_s}
    for key in ("gpus_per_node", "cpus_per_task", "mem", "partition", "account", "qos", "constraint",
                "array_parallelism"):
        if getattr(opts, key):
            p[key] = getattr(opts, key)
    if opts.setup:
        p["setup"] = list(opts.setup)
    extra = {"requeue": True}  # preempted jobs go back to the queue even where JobRequeue=0
    for opt in opts.sbatch_extra:
        key, eq, value = opt[2:].partition("=")
        extra[key] = value if eq else True
    p["additional_parameters"] = extra
    # a rank that crashes ends the job step instead of leaving the others blocked in a collective until the time
    # limit; a stop for a requeue is not a crash (the other ranks wait for rank 0's requeue, see TrainJob)
    p["srun_args"] = ["--kill-on-bad-exit=1"]
    return p


def sbatch_script(params: dict, folder: str, array_size: Optional[int] = None) -> str:
    """The sbatch script submitit writes for ``params`` (a job array of ``array_size`` elements if given)."""
    from submitit.slurm.slurm import _make_sbatch_string
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(folder)])
    return _make_sbatch_string(command=command, folder=folder, map_count=array_size, **params)


def _executor(cluster: str, folder: str, opts: LaunchConfig, job_name: str):
    if cluster == "slurm":
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=opts.max_requeues)
        ex.update_parameters(**{f"slurm_{k}": v for k, v in slurm_parameters(opts, job_name).items()})
        return ex
    if opts.nodes != 1:
        raise ConfigError(f"launch local runs on this machine only: launch.nodes must be 1, got {opts.nodes}")
    ex = submitit.LocalExecutor(folder=folder, max_num_timeout=opts.max_requeues)
    ex.update_parameters(tasks_per_node=opts.tasks, gpus_per_node=opts.gpus_per_node,
                         timeout_min=time_minutes(opts.time), signal_delay_s=opts.signal_delay_s)
    return ex


# ----------------------------------------------------------------------------------------------------
# submission


@dataclasses.dataclass
class _Planned:
    argv: list          # ["train", CONFIG, key=value, ...]
    where: str          # for messages
    run_dir: str
    cfg: object


def _load(specs: Sequence[JobSpec]) -> list[_Planned]:
    """Load and validate every config before anything is submitted (a typo should not wait in the queue)."""
    from mdtrain.config import load_config
    planned, seen = [], {}
    for config, overrides in specs:
        config = os.path.abspath(config) if config else None
        cfg = load_config(config, list(overrides))
        where = f"{config or 'defaults'} {' '.join(overrides)}".strip()
        run_dir = os.path.abspath(cfg.train.run_dir)
        if run_dir in seen:
            raise ConfigError(f"{where}: train.run_dir={cfg.train.run_dir} is also the run dir of {seen[run_dir]}; "
                              f"every job of an array needs its own run dir")
        seen[run_dir] = where
        planned.append(_Planned(["train", *([config] if config else []), *overrides], where, run_dir, cfg))
    return planned


def _resolve_options(planned: list[_Planned], changes: dict) -> LaunchConfig:
    """The config's launch: section (one for all jobs of an array) with ``changes`` (the flags) on top."""
    sections = [getattr(p.cfg, "launch", None) or LaunchConfig() for p in planned]
    if any(s != sections[0] for s in sections[1:]):
        raise ConfigError("the configs of one job array need the same launch: section (they share one sbatch "
                          "script); set the differing options with flags instead")
    opts = dataclasses.replace(sections[0], **changes)
    opts.validate()
    world = opts.nodes * opts.tasks
    for p in planned:  # the trainer's own checks, made before queueing
        tp, micro, batch = p.cfg.parallel.tp, p.cfg.train.micro_batch_size, p.cfg.train.global_batch_size
        if world % tp:
            raise ConfigError(f"{p.where}: parallel.tp={tp} does not divide the job's {world} tasks")
        if batch % (micro * (world // tp)):
            raise ConfigError(f"{p.where}: train.global_batch_size={batch} is not a multiple of "
                              f"train.micro_batch_size x data-parallel ranks = {micro} x {world // tp} (the job "
                              f"has {world} tasks)")
    return opts


def submit(specs: Sequence[JobSpec], cluster: str = "slurm", dry_run: bool = False, **changes):
    """Submit one training job per ``(config, overrides)`` (several: one SLURM job array); return the submitit jobs.

    ``changes`` are LaunchConfig fields (``nodes=4, gpus_per_node=8``) over the config's ``launch:`` section. With
    ``dry_run`` nothing is submitted; the sbatch script (``cluster="slurm"``) or the local plan is returned instead.
    """
    planned = _load(specs)
    opts = _resolve_options(planned, changes)
    if opts.folder:
        base = os.path.abspath(opts.folder)
    elif len(planned) == 1:
        base = os.path.join(planned[0].run_dir, "submitit")
    else:
        base = os.path.join(os.path.commonpath([p.run_dir for p in planned]), "submitit")
    folder = os.path.join(base, "%j")
    name = opts.job_name or ("mdtrain-" + os.path.basename(planned[0].run_dir) if len(planned) == 1 else "mdtrain")
    jobs = [TrainJob(p.argv, os.getcwd(), opts.cpus_per_task) for p in planned]
    if dry_run:
        requeues = f"# time-limit requeues allowed per job: {opts.max_requeues} (launch.max_requeues)\n"
        if cluster == "slurm":
            return sbatch_script(slurm_parameters(opts, name), folder, len(jobs) if len(jobs) > 1 else None) + requeues
        return "".join(f"LocalExecutor: {opts.tasks} task(s), each running `mdtrain {shlex.join(j.argv)}`; logs in "
                       f"{folder}\n" for j in jobs) + requeues
    os.makedirs(base, exist_ok=True)
    ex = _executor(cluster, folder, opts, name)
    if len(jobs) == 1:
        return [ex.submit(jobs[0])]
    with ex.batch():
        handles = [ex.submit(j) for j in jobs]
    return handles


# ----------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mdtrain launch", description="Run `mdtrain train` as a SLURM job through submitit (slurm), or the same "
        "job as local processes (local). Several configs become one job array. Options not given here come from "
        "the config's launch: section.",
        epilog="example: mdtrain launch slurm configs/owt_mdlm.yaml --nodes 4 --gpus-per-node 8 --cpus-per-task 8 "
               "--time 4:00:00 --partition gpu --dry-run")
    p.add_argument("where", choices=("slurm", "local"), help="slurm: sbatch through submitit; local: this machine")
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value",
                   help="one or more YAML configs (several -> a job array) and dotted overrides for all of them")
    g = p.add_argument_group("resources (default: the launch: section of the config)")
    g.add_argument("--nodes", type=int)
    g.add_argument("--gpus-per-node", type=int, help="one task per GPU")
    g.add_argument("--tasks-per-node", "--tasks", type=int, help="processes per node (default: one per GPU, or 1)")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--mem", help="memory per node, e.g. 480G")
    g.add_argument("--time", help="time limit: MINUTES, H:MM:SS, D-H:MM ...")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--sbatch-extra", action="append", metavar="'--OPT[=V] ...'",
                   help="more sbatch options, repeatable: --sbatch-extra=--exclusive --sbatch-extra='--mail-type=END'")
    g.add_argument("--setup", action="append", metavar="LINE", help="shell line run before srun (repeatable)")
    g.add_argument("--job-name")
    g.add_argument("--folder", help="submitit folder for pickles and logs (default RUN_DIR/submitit)")
    g.add_argument("--signal-delay-s", type=int, help="USR2 this many seconds before the time limit")
    g.add_argument("--max-requeues", type=int, help="time-limit requeues before giving up")
    g.add_argument("--array-parallelism", type=int, help="job arrays: at most N elements at once")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script (local: the plan); submit nothing")
    p.add_argument("--wait", action="store_true", help="slurm: wait for the jobs, echo rank 0's log (local always "
                   "waits)")
    return p


def _echo(path, pos: int, final: bool = False) -> int:
    """Print what ``path`` gained after byte ``pos`` (whole lines unless ``final``); return the new position."""
    try:
        with open(path, "rb") as fh:
            fh.seek(pos)
            chunk = fh.read()
    except OSError:
        return pos
    if not final:
        chunk = chunk[: chunk.rfind(b"\n") + 1]
    if chunk:
        sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()
    return pos + len(chunk)


def wait(jobs, echo: bool = True, poll_s: float = 1.0) -> int:
    """Block until every job ends (echoing rank 0's log of a single job); 0 when all succeeded."""
    log = jobs[0].paths.stdout if echo and len(jobs) == 1 else None
    pos = 0
    while not all(j.done() for j in jobs):
        if log is not None:
            pos = _echo(log, pos)
        time.sleep(poll_s)
    if log is not None:
        _echo(log, pos, final=True)
    failed = 0
    for j in jobs:
        try:
            j.results()
        except Exception as e:  # noqa: BLE001 - report every failed job, then fail
            failed += 1
            print(f"mdtrain launch: job {j.job_id} failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
                  f"\n  logs: {j.paths.stdout} / {j.paths.stderr}", file=sys.stderr)
    return 1 if failed else 0


def main(args) -> int:
    ns = build_parser().parse_args(list(getattr(args, "launch_args", args) or []))
    configs = [a for a in ns.args if "=" not in a]
    overrides = [a for a in ns.args if "=" in a]
    specs = [(c, overrides) for c in configs] or [(None, overrides)]
    changes = {f.name: getattr(ns, f.name) for f in dataclasses.fields(LaunchConfig)
               if getattr(ns, f.name, None) is not None}
    if "sbatch_extra" in changes:  # each flag value may hold several options: --sbatch-extra='--a --b=c'
        changes["sbatch_extra"] = [opt for item in changes["sbatch_extra"] for opt in shlex.split(item)]
    result = submit(specs, ns.where, dry_run=ns.dry_run, **changes)
    if ns.dry_run:
        sys.stdout.write(result)
        if ns.where == "slurm":  # the pickled callable is not visible in the script itself
            for i, (c, _) in enumerate(specs):
                label = f"array element {i}" if len(specs) > 1 else "the job"
                print(f"# each task of {label} runs, in-process: mdtrain "
                      f"{shlex.join(['train', *([c] if c else []), *overrides])}", file=sys.stderr)
        return 0
    for j in result:
        print(f"submitted {ns.where} job {j.job_id}: rank 0 log {j.paths.stdout}", flush=True)
    if ns.where == "local" or ns.wait:
        try:
            return wait(result)
        except KeyboardInterrupt:
            if ns.where == "local":  # the tasks belong to this terminal session
                for j in result:
                    j.cancel()
                print("mdtrain launch: interrupted; local tasks stopped", file=sys.stderr)
            else:
                print("mdtrain launch: stopped waiting; the SLURM jobs go on (scancel to stop them)", file=sys.stderr)
            return 130
    return 0
