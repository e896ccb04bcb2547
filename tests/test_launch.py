"""Launchers without SLURM: the sbatch script of a dry run, submitit's LocalExecutor (2 tasks, a time-limit requeue
that resumes to the same losses and weights), and the torchrun / deepspeed-launcher scripts on 2 CPU processes.

The real-SLURM tests are in test_launch_slurm.py; the helpers here are shared with it.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from mdtrain.launch.config import time_minutes
from mdtrain.configtools import ConfigError
from mdtrain.testing import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the venv's mdtrain, torchrun, deepspeed

# A run of a few seconds: debug flavor, synthetic data, seq 32, global batch 4.
TINY = """\
model: {{flavor: debug}}
data: {{train: "synthetic:markov", seq_len: 32}}
train: {{run_dir: {run_dir}, steps: {steps}, global_batch_size: 4, micro_batch_size: 2, ema: 0.0, seed: {seed}}}
optim: {{lr: 1.0e-3, warmup_steps: 2}}
checkpoint: {{every: 0}}
logging: {{every: 1, progress_bar: false}}
eval: {{batches: 1, batch_size: 4}}
"""


def write_config(path, run_dir, steps=6, seed=1) -> str:
    with open(path, "w") as fh:
        fh.write(TINY.format(run_dir=run_dir, steps=steps, seed=seed))
    return str(path)


def train_losses(run_dir) -> dict[int, float]:
    """step -> training loss from metrics.jsonl (the last row per step wins)."""
    rows = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            row = json.loads(line)
            if "split" not in row and "loss" in row:
                rows[int(row["step"])] = float(row["loss"])
    return rows


def last_step(run_dir) -> int:
    try:
        return max(train_losses(run_dir), default=0)
    except (OSError, ValueError):  # not written yet, or a line being written
        return 0


def final_weights(run_dir):
    from mdtrain.inference import load_for_inference
    return load_for_inference(run_dir, use_ema=False).model.state_dict()


def assert_same_run(run_dir, ref_dir, steps):
    """Bit for bit the per-step losses and final weights of an uninterrupted run of the same config (the trainer
    keys every random draw by position, so a resumed run repeats each step exactly)."""
    import torch
    got, ref = train_losses(run_dir), train_losses(ref_dir)
    assert sorted(got) == sorted(ref) == list(range(1, steps + 1))
    assert [s for s in ref if got[s] != ref[s]] == [], {s: (got[s], ref[s]) for s in ref if got[s] != ref[s]}
    a, b = final_weights(run_dir), final_weights(ref_dir)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def read(path) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def wait_until(predicate, timeout_s, what, poll_s=0.05):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    raise TimeoutError(f"waited {timeout_s:.0f}s for {what}")


def launch_main(argv) -> int:
    """`mdtrain launch ARGV...` in this process."""
    from mdtrain import cli
    return cli.main(["launch", *argv])


# ----------------------------------------------------------------------------------------------------
# options and the dry run (no job runs)


def test_slurm_time_limits_in_minutes():
    assert [time_minutes(t) for t in ("90", "30:00", "30:30", "4:00:00", "1-12", "1-0:30", "2-00:00:01")] == \
        [90, 30, 31, 240, 2160, 1470, 2881]
    for bad in ("", "0", "4h", "1:2:3:4", "-5"):
        with pytest.raises(ConfigError, match="launch.time"):
            time_minutes(bad)


def _sbatch_lines(script: str) -> dict:
    out = {}
    for line in script.splitlines():
        m = re.fullmatch(r"#SBATCH --([\w-]+)(?:=(.*))?", line)
        if m:
            out[m.group(1)] = m.group(2) if m.group(2) is not None else True
    return out


def test_dry_run_prints_the_sbatch_script_for_4_nodes_x_8_gpus(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run")
    rc = launch_main(["slurm", cfg, "train.global_batch_size=256", "--nodes", "4", "--gpus-per-node", "8",
                      "--cpus-per-task", "8",
                      "--partition", "gpu", "--account", "proj", "--qos", "high", "--time", "4:00:00",
                      "--constraint", "h100", "--mem", "480G", "--sbatch-extra=--exclusive --mail-type=END",
                      "--setup", "module load cuda", "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0
    folder = str(tmp_path / "run" / "submitit" / "%j")
    assert _sbatch_lines(out) == {
        "nodes": "4", "ntasks-per-node": "8", "gpus-per-node": "8", "cpus-per-task": "8", "mem": "480G",
        "partition": "gpu", "account": "proj", "qos": "high", "constraint": "h100", "time": "240",
        "signal": "USR2@120", "requeue": True, "exclusive": True, "mail-type": "END", "job-name": "mdtrain-run",
        "output": f"{folder}/%j_0_log.out", "error": f"{folder}/%j_0_log.err", "open-mode": "append",
        "wckey": "submitit"}
    assert out.startswith("#!/bin/bash\n")
    assert "module load cuda\n" in out
    srun = [ln for ln in out.splitlines() if ln.startswith("srun ")]
    assert len(srun) == 1  # one srun, one task per GPU: 32 processes running submitit's job runner
    assert shlex.split(srun[0]) == ["srun", "--unbuffered", "--output", f"{folder}/%j_%t_log.out",
                                    "--error", f"{folder}/%j_%t_log.err", "--kill-on-bad-exit=1",
                                    sys.executable, "-u", "-m", "submitit.core._submit", folder]
    assert f"mdtrain train {cfg} train.global_batch_size=256" in err  # what every task runs, in-process


def test_dry_run_of_three_configs_is_one_job_array(tmp_path, capsys):
    cfgs = [write_config(tmp_path / f"c{i}.yaml", tmp_path / "runs" / f"r{i}") for i in range(3)]
    assert launch_main(["slurm", *cfgs, "--tasks-per-node", "2", "--time", "30", "--array-parallelism", "2",
                        "--dry-run"]) == 0
    lines = _sbatch_lines(capsys.readouterr().out)
    assert lines["array"] == "0-2%2" and lines["ntasks-per-node"] == "2" and lines["nodes"] == "1"
    assert lines["output"] == str(tmp_path / "runs" / "submitit" / "%A_%a" / "%A_%a_0_log.out")
    assert "gpus-per-node" not in lines


def test_config_mistakes_fail_before_anything_is_queued(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run")
    # global batch 4 = micro 2 x 3 ranks is impossible
    assert launch_main(["slurm", cfg, "--tasks-per-node", "3", "--dry-run"]) == 2
    assert "train.global_batch_size=4 is not a multiple" in capsys.readouterr().err
    # two array elements writing into one run dir
    assert launch_main(["slurm", cfg, cfg, "--dry-run"]) == 2
    assert "every job of an array needs its own run dir" in capsys.readouterr().err
    assert launch_main(["local", cfg, "optim.lrr=1", "--dry-run"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
    assert launch_main(["slurm", cfg, "--time", "4h", "--dry-run"]) == 2
    assert "launch.time='4h'" in capsys.readouterr().err


def test_launch_section_of_the_config_sets_the_defaults(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run")
    with open(cfg, "a") as fh:
        fh.write("launch: {nodes: 2, gpus_per_node: 4, partition: big}\n")
    assert launch_main(["slurm", cfg, "launch.partition=small", "train.global_batch_size=24", "--nodes", "3",
                        "--dry-run"]) == 0
    lines = _sbatch_lines(capsys.readouterr().out)
    assert (lines["nodes"], lines["ntasks-per-node"], lines["partition"]) == ("3", "4", "small")


# ----------------------------------------------------------------------------------------------------
# submitit's LocalExecutor: the same job as 2 processes on this machine


LOCAL_STEPS = 24


def rank0_log(run_dir) -> str:
    """Rank 0's output over every attempt of the job that trained ``run_dir`` (submitit appends on requeue)."""
    return "".join(read(p) for p in sorted(glob.glob(os.path.join(run_dir, "submitit", "*", "*_0_log.out"))))


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (the LocalExecutor controller's tasks)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read(f"/proc/{entry}/stat")
            if stat and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """`mdtrain launch local CONFIG --tasks 2`, run to the end: also the reference for the requeued run."""
    tmp = tmp_path_factory.mktemp("local")
    run_dir = str(tmp / "ref")
    cfg = write_config(tmp / "c.yaml", run_dir, steps=LOCAL_STEPS)
    rc = launch_main(["local", cfg, "--tasks", "2", "--time", "10"])
    return rc, cfg, run_dir


def test_local_executor_trains_on_two_ranks(local_reference):
    rc, _, run_dir = local_reference
    assert rc == 0, rank0_log(run_dir)[-3000:]
    assert "with 2 rank(s)" in rank0_log(run_dir)
    assert sorted(train_losses(run_dir)) == list(range(1, LOCAL_STEPS + 1))
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", f"step_{LOCAL_STEPS:08d}"))


def test_local_time_limit_signal_checkpoints_requeues_and_resumes_exactly(local_reference, tmp_path):
    from mdtrain.launch.slurm import submit, wait
    _, cfg, ref_dir = local_reference
    run_dir = str(tmp_path / "run")
    [job] = submit([(cfg, [f"train.run_dir={run_dir}"])], "local", tasks_per_node=2, time="10")
    wait_until(lambda: last_step(run_dir) >= 3, 120, "the first training steps")
    for pid in children(job._process.pid):  # what the controller does at the time limit: USR2 to every task
        os.kill(pid, signal.SIGUSR2)
    assert wait([job], echo=False) == 0, rank0_log(run_dir)[-3000:]
    log = rank0_log(run_dir)
    saved = re.search(r"stop signal \(SIGUSR2\): checkpoint saved at step (\d+)", log)
    assert saved and 3 <= int(saved.group(1)) < LOCAL_STEPS, log[-3000:]
    assert re.search(rf"resumed from \S+ at step {saved.group(1)}\b", log), log[-3000:]
    assert_same_run(run_dir, ref_dir, LOCAL_STEPS)


# ----------------------------------------------------------------------------------------------------
# the README's one-node commands: torchrun and the deepspeed launcher, 2 CPU processes each

README_COMMANDS = {  # verbatim in README.md ("Deepspeed on one node, torchrun"); run here as written
    "torchrun": "NPROC=2 bash launch/torchrun.sh configs/quickstart.yaml data.train=synthetic:markov "
                "train.micro_batch_size=8 train.steps=10 eval.batches=2 train.run_dir=runs/torchrun-cpu",
    "deepspeed": "DS_ACCELERATOR=cpu NUM_GPUS=2 bash launch/deepspeed_one_node.sh configs/quickstart.yaml "
                 "data.train=synthetic:markov train.micro_batch_size=8 train.steps=10 eval.batches=2 "
                 "train.run_dir=runs/deepspeed-cpu",
}


def test_readme_shows_the_tested_one_node_commands():
    readme = read(os.path.join(REPO, "README.md"))
    for name, cmd in README_COMMANDS.items():
        assert cmd in readme, f"README.md no longer shows the {name} command that tests/test_launch.py runs: {cmd}"


def run_readme_command(name, run_dir) -> subprocess.CompletedProcess:
    """The README's command, with only the run dir moved into the test's temporary directory (a later override)."""
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""), MASTER_PORT=str(free_port()))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    cmd = f"{README_COMMANDS[name]} train.run_dir={shlex.quote(run_dir)}"
    return subprocess.run(["bash", "-c", cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_readme_torchrun_command_trains_on_two_cpu_processes(tmp_path):
    run_dir = str(tmp_path / "run")
    p = run_readme_command("torchrun", run_dir)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert ("+ python -m mdtrain.launch.torchrun --standalone --nnodes 1 --nproc-per-node 2 -m mdtrain train "
            "configs/quickstart.yaml") in p.stderr
    assert "with 2 rank(s) [ddp]" in p.stdout
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "step_00000010"))


def test_readme_deepspeed_launcher_command_trains_on_two_cpu_processes(tmp_path):
    run_dir = str(tmp_path / "run")
    p = run_readme_command("deepspeed", run_dir)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "'--local_rank=1', 'train'" in p.stdout + p.stderr  # the launcher's argument, accepted by mdtrain
    assert "with 2 rank(s) [deepspeed]" in p.stdout
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "step_00000010"))


# ----------------------------------------------------------------------------------------------------
# the README's CPU tensor-parallel demo: data made offline from Python's own sources, 2 processes, parallel.tp=2

TP_DEMO_COMMANDS = [  # verbatim in README.md ("Tensor parallelism"), run here as written in an empty directory
    "STDLIB=$(python -c 'import sysconfig; print(sysconfig.get_paths()[\"stdlib\"])')",
    "mdtrain prepare --input \"$STDLIB/json\" \"$STDLIB/email\" --glob '*.py' --tokenizer bytes --seq-len 128 "
    "--val-fraction 0.1 --out data/tp-demo",
    "torchrun --standalone --nproc_per_node 2 -m mdtrain train configs/tp_cpu_demo.yaml",
]


def test_readme_tp_cpu_demo_prepares_offline_and_trains_with_tp2_on_two_processes(tmp_path):
    readme = read(os.path.join(REPO, "README.md"))
    for cmd in TP_DEMO_COMMANDS:
        assert cmd in readme, f"README.md no longer shows the TP demo command that tests/test_launch.py runs: {cmd}"
    os.symlink(os.path.join(REPO, "configs"), tmp_path / "configs")  # data/ and runs/ land in tmp_path
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    script = "set -e\n" + "\n".join(TP_DEMO_COMMANDS) + " train.steps=20\n"  # fewer steps: the only change
    p = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "with 2 rank(s) [ddp, tp=2 x dp=1], global batch 8 = 8 x 1 accum x 1 dp" in p.stdout, p.stdout[-2000:]
    run = tmp_path / "runs" / "tp_cpu_demo"
    meta = json.loads((run / "checkpoints" / "step_00000020" / "engine.json").read_text())
    assert (meta["world_size"], meta["dp_size"], meta["tp_size"]) == (2, 1, 2)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "split" not in r]
    assert [r["step"] for r in train] == [10, 20]
    (ev,) = [r for r in rows if r.get("split") == "valid"]
    assert ev["nll"] < math.log(256) - 1.0, ev  # learnt the bytes: a nat below the uniform distribution over bytes
