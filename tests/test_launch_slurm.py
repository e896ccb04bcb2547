"""Launchers on a real one-node SLURM cluster (tests/slurm/setup.sh; .ci/run starts one): a 2-task job trains and
checkpoints, a preempted job requeues and resumes to the same losses and weights, a job array of 3 configs completes,
the plain sbatch example requeues itself at the time limit. Skipped, with the reason, where no cluster answers (MDTRAIN_REQUIRE_SLURM=1 makes that
a failure, as in CI).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.test_launch import (BIN, REPO, assert_same_run, last_step, launch_main, rank0_log, read, train_losses,
                               wait_until, write_config)

SLURM_DIR = os.environ.get("MDTRAIN_SLURM_DIR", "/tmp/mdtrain-slurm")
STEPS = 60  # long enough (several seconds) to be interrupted twice in the middle


def _cluster_problem() -> str:
    if shutil.which("sbatch") is None:
        return ("`sbatch` not found: apt-get install -y --no-install-recommends slurm-wlm munge, then "
                "bash tests/slurm/setup.sh")
    if "SLURM_CONF" not in os.environ and os.path.exists(os.path.join(SLURM_DIR, "slurm.conf")):
        os.environ["SLURM_CONF"] = os.path.join(SLURM_DIR, "slurm.conf")  # the test cluster of tests/slurm/
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed: {e}"
    if p.returncode or not re.search(r"^(idle|mixed|allocated)", p.stdout, re.M):
        return (f"no SLURM cluster with a usable node answers (sinfo: {(p.stdout + p.stderr).strip()[:200]!r}); "
                f"start one with bash tests/slurm/setup.sh")
    return ""


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    saved = {k: os.environ.get(k) for k in ("PATH", "SLURM_CONF")}
    problem = _cluster_problem()
    if not problem:
        probe = subprocess.run(["sacct", "--parsable2", "-o", "JobID", "-j", "1"], capture_output=True, text=True)
        if probe.returncode:  # no accounting daemon: submitit's job watcher reads the stand-in instead
            os.environ["PATH"] = os.path.join(REPO, "tests", "slurm", "bin") + os.pathsep + os.environ["PATH"]
    try:
        if problem and os.environ.get("MDTRAIN_REQUIRE_SLURM") == "1":
            pytest.fail(f"MDTRAIN_REQUIRE_SLURM=1 but {problem}")
        if problem:
            pytest.skip(problem)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free_cpus() -> None:
    """Wait until no job of ours is left on the node (the tests need all of its CPUs)."""
    wait_until(lambda: not subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.strip(),
               120, "an empty queue", poll_s=0.5)


@pytest.fixture(scope="module")
def slurm_reference(tmp_path_factory):
    """`mdtrain launch slurm CONFIG --tasks-per-node 2 --wait`: run to the end, the reference of the preemption test."""
    _free_cpus()
    tmp = tmp_path_factory.mktemp("slurm")
    run_dir = str(tmp / "ref")
    cfg = write_config(tmp / "c.yaml", run_dir, steps=STEPS)
    rc = launch_main(["slurm", cfg, "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10", "--wait"])
    return rc, cfg, run_dir


def test_dry_run_renders_what_submitit_submits(tmp_path):
    """The --dry-run text is the script submitit writes for the same options (checked against its own executor)."""
    from mdtrain.launch.config import LaunchConfig
    from mdtrain.launch.slurm import _executor, sbatch_script, slurm_parameters
    opts = LaunchConfig(nodes=2, gpus_per_node=4, cpus_per_task=3, time="1:00:00", partition="p",
                        sbatch_extra=["--exclusive"], setup=["echo hi"])
    folder = str(tmp_path / "%j")
    ex = _executor("slurm", folder, opts, "name")
    assert ex._executor.parameters == slurm_parameters(opts, "name")
    assert ex._executor._make_submission_file_text(ex._executor._submitit_command_str, "uid") == \
        sbatch_script(slurm_parameters(opts, "name"), folder)


def test_two_task_job_trains_and_checkpoints(slurm_reference):
    rc, _, run_dir = slurm_reference
    log = rank0_log(run_dir)
    assert rc == 0, log[-3000:]
    assert "with 2 rank(s)" in log
    assert sorted(train_losses(run_dir)) == list(range(1, STEPS + 1))
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", f"step_{STEPS:08d}"))


def test_preempted_job_requeues_and_resumes_to_the_same_weights(slurm_reference, tmp_path):
    """Two interruptions of one 2-task job, each saved, requeued and resumed; the run ends exactly as without them:
    submitit's preemption (SIGTERM, then USR2 to every task: the job requeues itself), then `scontrol requeue`
    (SIGTERM only: SLURM requeues it)."""
    from mdtrain.launch.slurm import submit, wait
    _, cfg, ref_dir = slurm_reference
    run_dir = str(tmp_path / "run")
    _free_cpus()
    [job] = submit([(cfg, [f"train.run_dir={run_dir}"])], "slurm", tasks_per_node=2, cpus_per_task=1, time="10")
    wait_until(lambda: last_step(run_dir) >= 2, 180, "the first training steps")
    job._interrupt()
    wait_until(lambda: "resumed from" in rank0_log(run_dir), 180, "the requeued job to resume", poll_s=0.2)
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", rank0_log(run_dir)).group(1))
    wait_until(lambda: last_step(run_dir) >= resumed_at + 2, 60, "training after the resume")
    subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    assert wait([job], echo=False) == 0, rank0_log(run_dir)[-3000:]
    log = rank0_log(run_dir)
    saved = [int(s) for s in re.findall(r"stop signal \([^)]*\): checkpoint saved at step (\d+)", log)]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert len(saved) == 2 and resumed == saved and 0 < saved[0] < saved[1] < STEPS, log[-3000:]
    assert "Restarts=2" in _scontrol(job.job_id)
    assert_same_run(run_dir, ref_dir, STEPS)


def test_job_array_of_three_configs_completes(tmp_path, capsys):
    _free_cpus()
    runs = [str(tmp_path / "runs" / f"seed{s}") for s in (1, 2, 3)]
    cfgs = [write_config(tmp_path / f"c{s}.yaml", run, steps=3, seed=s) for s, run in zip((1, 2, 3), runs)]
    assert launch_main(["slurm", *cfgs, "--time", "10", "--array-parallelism", "2", "--wait"]) == 0
    ids = re.findall(r"submitted slurm job ([0-9_]+):", capsys.readouterr().out)
    assert len(ids) == 3 and {i.rsplit("_", 1)[1] for i in ids} == {"0", "1", "2"}
    assert len({i.rsplit("_", 1)[0] for i in ids}) == 1  # one array job
    losses = [train_losses(r) for r in runs]
    for r, rows in zip(runs, losses):
        assert sorted(rows) == [1, 2, 3] and os.path.isdir(os.path.join(r, "checkpoints", "step_00000003"))
    assert losses[0] != losses[1] != losses[2]  # each element ran its own config (its own seed)


def test_plain_sbatch_example_requeues_at_the_time_limit_and_resumes(slurm_reference, tmp_path):
    """launch/sbatch_example.sh (its #SBATCH lines overridden on the command line for this CPU node): USR2 to every
    task as at the time limit -> checkpoint, exit 143, the script requeues the job -> it resumes and ends exactly as
    the uninterrupted run."""
    _, cfg, ref_dir = slurm_reference
    _free_cpus()
    run_dir = str(tmp_path / "run")
    script = tmp_path / "job.sh"  # the example without its GPU request (a CPU node has none)
    example = read(os.path.join(REPO, "launch", "sbatch_example.sh"))
    assert "#SBATCH --gpus-per-node=8\n" in example
    script.write_text(example.replace("#SBATCH --gpus-per-node=8\n", ""))
    out = tmp_path / "out.log"
    p = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                        "--time=10", f"--output={out}", str(script), cfg, f"train.run_dir={run_dir}"],
                       capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"]))
    assert p.returncode == 0, p.stderr
    job_id = p.stdout.strip().split(";")[0]
    wait_until(lambda: last_step(run_dir) >= 2, 180, "the first training steps")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what --signal=USR2@120 does
    wait_until(lambda: re.search(r"JobState=(COMPLETED|FAILED|CANCELLED|TIMEOUT)", _scontrol(job_id)), 300,
               f"job {job_id} to end", poll_s=0.5)
    log = read(out)
    assert "JobState=COMPLETED" in _scontrol(job_id) and "Restarts=1" in _scontrol(job_id), log[-3000:]
    saved = re.findall(r"stop signal \(SIGUSR2\): checkpoint saved at step (\d+)", log)
    assert "requeueing job" in log and len(saved) == 1 and f"at step {saved[0]}" in log.split("resumed from")[1]
    assert "with 2 rank(s)" in log
    assert_same_run(run_dir, ref_dir, STEPS)


def _scontrol(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
