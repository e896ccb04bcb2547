"""Launcher exit statuses after a stop signal: USR2 or TERM to ONE rank makes every rank checkpoint, and the launcher
exits with 143 (preempted, requeue me) instead of 1 (failed): `python -m mdtrain.launch.torchrun` (what
launch/torchrun.sh runs) and the DeepSpeed launcher, on 2 CPU processes; the same command then resumes."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from mdtrain.checkpoint import list_checkpoints, verify
from mdtrain.testing import OFFLINE_ENV, free_port

BIN = os.path.dirname(sys.executable)
TINY = ["model.flavor=debug", "model.dropout=0.0", "data.train=synthetic:markov", "data.seq_len=32",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.ema=0.9", "optim.lr=1e-3",
        "optim.warmup_steps=1", "logging.every=1", "eval.batches=1", "eval.batch_size=4",
        "logging.progress_bar=false", "checkpoint.every=0"]


def _env():
    env = dict(os.environ, **OFFLINE_ENV, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _launcher(name, args):
    if name == "torchrun":
        return [sys.executable, "-m", "mdtrain.launch.torchrun", "--standalone", "--nnodes", "1",
                "--nproc-per-node", "2", "-m", "mdtrain", "train", *args]
    return [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
            os.path.join(BIN, "mdtrain"), "train", *args, "parallel.engine=deepspeed"]


def _logged_steps(run_dir):
    try:
        return [json.loads(x)["step"] for x in open(os.path.join(run_dir, "metrics.jsonl")) if '"split"' not in x]
    except (OSError, ValueError):
        return []


def _worker(pid, rank):
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "train" in child.cmdline():
                return child
        except psutil.Error:
            continue
    return None


@pytest.mark.parametrize("launcher,rank,sig", [("torchrun", 1, signal.SIGUSR2), ("deepspeed", 0, signal.SIGTERM)])
def test_a_signal_to_one_rank_checkpoints_every_rank_and_the_launcher_exits_143(launcher, rank, sig, tmp_path):
    run = str(tmp_path / "run")
    args = TINY + [f"train.run_dir={run}", "train.steps=100000"]
    p = subprocess.Popen(_launcher(launcher, args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=_env())
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(_logged_steps(run)) < 3:
            assert p.poll() is None, p.stdout.read()[-4000:]
            time.sleep(0.1)
        worker = _worker(p.pid, rank)
        assert worker is not None
        worker.send_signal(sig)
        out, _ = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            for child in psutil.Process(p.pid).children(recursive=True):
                child.kill()
            p.kill()
    assert p.returncode == 143, out[-4000:]
    saved = re.findall(rf"stop signal \({sig.name}\): checkpoint saved at step (\d+)", out)
    assert saved, out[-4000:]
    step = int(saved[0])
    [(got, path)] = list_checkpoints(os.path.join(run, "checkpoints"))
    assert got == step and verify(path, checksums=True) is None
    clients = sorted(os.listdir(os.path.join(path, "client")))
    assert clients == ["rank_00000.pt", "rank_00001.pt"]  # every rank wrote its part of the checkpoint
    again = subprocess.run(_launcher(launcher, TINY + [f"train.run_dir={run}", f"train.steps={step + 2}"]),
                           capture_output=True, text=True, env=_env(), timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {path} at step {step}" in again.stdout + again.stderr
