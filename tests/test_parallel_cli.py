"""The real CLI under torchrun with 2 CPU ranks (gloo on 127.0.0.1): every engine gives the same per-step losses as
one process fed the same global batch, a sharded checkpoint survives SIGKILL bit-exactly, and a 2-rank checkpoint
resumes on 1 rank (DCP resharding) with the same losses as the uninterrupted 2-rank run."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from mdtrain.testing import OFFLINE_ENV, free_port

ENGINES = {
    "ddp": ["parallel.engine=ddp"],
    "fsdp": ["parallel.engine=fsdp"],
    "zero1": ["parallel.engine=deepspeed", "parallel.zero_stage=1"],
    "zero2": ["parallel.engine=deepspeed", "parallel.zero_stage=2"],
    "zero3": ["parallel.engine=deepspeed", "parallel.zero_stage=3"],
}
BASE = ["model.flavor=debug", "model.dropout=0.0", "data.train=synthetic:markov", "data.seq_len=32",
        "train.global_batch_size=8", "train.micro_batch_size=2", "train.ema=0.99", "optim.lr=1e-3",
        "optim.warmup_steps=2", "logging.every=1", "train.deterministic=true", "eval.batches=1", "eval.batch_size=4",
        "logging.progress_bar=false", "checkpoint.every=2", "checkpoint.keep_last=0"]
STEPS = 10


def _env():
    return dict(os.environ, **OFFLINE_ENV, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _cmd(nproc, args):
    if nproc == 1:
        return [sys.executable, "-m", "mdtrain", "train", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "-m", "mdtrain", "train", *args]


def train(nproc, run_dir, extra, steps=STEPS, timeout=300):
    r = subprocess.run(_cmd(nproc, [*BASE, *extra, f"train.steps={steps}", f"train.run_dir={run_dir}"]),
                       capture_output=True, text=True, timeout=timeout, env=_env())
    if r.returncode != 0:
        raise AssertionError(f"training failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-6000:]}")
    return r


def kill_tree(pid):
    """SIGKILL torchrun and every worker: torchrun starts its workers in new sessions, so killing its process group
    would leave them running to completion (and the 'resume' would race the survivors)."""
    root = psutil.Process(pid)
    procs = root.children(recursive=True) + [root]
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"processes survived SIGKILL: {alive}"


def losses(run_dir):
    rows = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        r = json.loads(line)
        if "split" not in r:
            rows[r["step"]] = r["loss"]
    return rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the same global batch of 8 as 4 micro-batches of 2 (noise keyed by global sample index)."""
    d = str(tmp_path_factory.mktemp("single") / "run")
    train(1, d, ENGINES["ddp"])
    return losses(d)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_ranks_match_one_process_and_survive_sigkill(engine, reference, tmp_path):
    full = str(tmp_path / "full")
    train(2, full, ENGINES[engine])
    got = losses(full)
    tol = 1e-5 if engine == "zero3" else 1e-6
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in got:
        assert got[s] == pytest.approx(reference[s], rel=tol, abs=tol), (engine, s, got[s], reference[s])

    # SIGKILL the whole torchrun job once step 5 is logged (newest checkpoint: step 4), then run it again
    killed = str(tmp_path / "killed")
    p = subprocess.Popen(_cmd(2, [*BASE, *ENGINES[engine], f"train.steps={STEPS}", f"train.run_dir={killed}"]),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 240
    metrics = os.path.join(killed, "metrics.jsonl")
    while time.time() < deadline and p.poll() is None:
        if os.path.exists(metrics) and len(losses(killed)) >= 5:
            break
        time.sleep(0.05)
    kill_tree(p.pid)
    p.wait()
    assert len(losses(killed)) < STEPS, "the kill came too late to test anything"
    train(2, killed, ENGINES[engine])
    again = losses(killed)
    for s in range(1, STEPS + 1):
        assert again[s] == got[s], f"{engine} step {s}: resumed {again[s]!r} != uninterrupted {got[s]!r}"


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_rank_checkpoint_resumes_on_one_rank(engine, tmp_path):
    """2 -> 1 ranks: DCP reshards model, optimizer and EMA; the loader continues the epoch; the global batch and its
    noise are unchanged, so steps 5-6 on one rank equal steps 5-6 of the uninterrupted 2-rank run."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train(2, full, ENGINES[engine])
    train(2, part, ENGINES[engine], steps=4)
    train(1, part, ENGINES[engine])
    a, b = losses(full), losses(part)
    for s in (5, 6, 7):
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-6), (s, a[s], b[s])
