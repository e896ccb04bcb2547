"""DP x TP through the real Trainer (4 gloo ranks: dp=2 x tp=2) against single-process training on the same
global batches: per-step losses and gradient norms from metrics.jsonl and the validation NELBO, with DDP and with
DeepSpeed ZeRO-2; the batches each rank received; checkpoints resumed at the same layout (ZeRO), from TP=1 into
TP=2 and from TP=2 into TP=1 (DDP), all through the checkpoint manager; the engines' consolidated weights against
what ``mdtrain export`` / eval read back from the TP checkpoints in one process."""
import json
import os
import shutil

import pytest

from mdtrain.testing import run_distributed

# dropout off, fp32: a TP run computes the same function; global batch 4 = 2 per DP rank (no accumulation) and
# 2 x 2 accumulation in one process, which pairs every sample with the same keyed noise
# the validation split is 8 sequences, evaluated in blocks of eval.batch_size=4 per rank (2 steps on 1 rank, 1 step on
# 2 DP ranks): eval noise is keyed by stream position and stratified per block, so the NELBO does not depend on dp
BASE = ["model.flavor=debug", "model.dropout=0.0", "data.train=synthetic:markov:valid_samples=8", "data.seq_len=32",
        "train.global_batch_size=4", "train.micro_batch_size=2", "optim.lr=3e-3", "optim.warmup_steps=1",
        "optim.grad_clip=0.5", "logging.every=1", "eval.batches=0", "eval.batch_size=4", "logging.progress_bar=false",
        "train.steps=3", "checkpoint.every=2", "checkpoint.keep_last=0", "train.ema=0.9"]


def _rows(run_dir, split=False):
    rows = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            r = json.loads(line)
            if ("split" in r) == split:
                rows[r["step"]] = r
    return rows


def _train(args, full=False):
    from mdtrain.config import load_config
    from mdtrain.trainer import Trainer
    t = Trainer(load_config(None, args))
    seen = []
    stream = t.data_iter

    def recorded():
        for batch in stream:
            seen.append(batch["input_ids"].clone())
            yield batch
    t.data_iter = recorded()
    try:
        t.fit()
        weights = t.engine.full_state_dict(ema=True) if full else None  # collective; rank 0 gets the dict
    finally:
        t.close()
    return seen, weights


def _job(rank, world, engine, tmp):
    """Phase A: train 3 steps at dp=2 x tp=2 from scratch. Phase B: resume a copy of a step-2 checkpoint
    (deepspeed: phase A's own; ddp: the single-process reference's, written at tp=1) for step 3."""
    import torch.distributed as dist

    extra = [f"parallel.engine={engine}", "parallel.tp=2"]
    if engine == "deepspeed":
        extra.append("parallel.zero_stage=2")
    run_a, run_b = os.path.join(tmp, f"{engine}-a"), os.path.join(tmp, f"{engine}-b")
    seen, weights = _train(BASE + extra + [f"train.run_dir={run_a}"], full=True)
    src = os.path.join(run_a if engine == "deepspeed" else os.path.join(tmp, "ref"), "checkpoints", "step_00000002")
    if rank == 0:
        shutil.copytree(src, os.path.join(run_b, "checkpoints", "step_00000002"))
    dist.barrier()
    _train(BASE + extra + [f"train.run_dir={run_b}"])
    return [b.numpy() for b in seen], weights


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The single-process run (tp=1, ddp) every layout must reproduce."""
    tmp = str(tmp_path_factory.mktemp("tptrain"))
    _train(BASE + [f"train.run_dir={tmp}/ref"])
    return tmp


@pytest.fixture(scope="module")
def tp_runs(ref):
    """``tp_runs(engine)``: the dp=2 x tp=2 runs of ``_job`` (each made once, by whichever test needs it first)."""
    done = {}

    def get(engine):
        if engine not in done:
            done[engine] = run_distributed(_job, 4, engine, ref, timeout=560)
        return done[engine]
    return get


def _close(a, b, what):
    for s in sorted(b):
        for key in ("loss", "grad_norm"):
            assert a[s][key] == pytest.approx(b[s][key], rel=2e-5, abs=1e-6), (what, s, key, a[s][key], b[s][key])


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_dp2_tp2_trains_like_one_process_and_resumes(ref, tp_runs, engine):
    results = tp_runs(engine)
    seen = [r[0] for r in results]
    want = _rows(os.path.join(ref, "ref"))
    got = _rows(os.path.join(ref, f"{engine}-a"))
    assert sorted(got) == [1, 2, 3]
    _close(got, want, f"{engine} dp2 x tp2")
    ev, ev_want = _rows(os.path.join(ref, f"{engine}-a"), split=True)[3], _rows(os.path.join(ref, "ref"), split=True)[3]
    assert ev["tokens"] == ev_want["tokens"] == 8 * 32
    assert ev["nll"] == pytest.approx(ev_want["nll"], rel=2e-5)
    # export: the engine's consolidated EMA weights (single-device names, full shapes) are what one process reads
    # back from the TP checkpoint
    from mdtrain.inference import load_for_inference
    exported = load_for_inference(os.path.join(ref, f"{engine}-a"), use_ema=True).model.state_dict()
    weights = results[0][1]
    assert sorted(weights) == sorted(exported)
    for n, v in exported.items():
        assert tuple(weights[n].shape) == tuple(v.shape) and (weights[n] == v.numpy()).all(), n
    resumed = _rows(os.path.join(ref, f"{engine}-b"))
    assert sorted(resumed) == [3]
    # deepspeed: same layout, phase A's own checkpoint -> the same step 3 bit for bit;
    # ddp: the tp=1 reference's checkpoint re-split over tp=2 (and dp 1 -> 2)
    if engine == "deepspeed":
        assert resumed[3]["loss"] == got[3]["loss"] and resumed[3]["grad_norm"] == got[3]["grad_norm"]
    else:
        _close(resumed, {3: want[3]}, "tp1 -> tp2 resume")
    # the two TP ranks of a DP rank get the same batches, the two DP ranks different ones
    for step in range(3):
        assert (seen[0][step] == seen[1][step]).all() and (seen[2][step] == seen[3][step]).all()
        assert not (seen[0][step] == seen[2][step]).all()


def test_tp2_checkpoint_resumes_in_one_process(ref, tp_runs):
    """The dp2 x tp2 DDP run's step-2 checkpoint, resumed by one plain process, gives the reference's step 3."""
    tp_runs("ddp")
    run = os.path.join(ref, "from-tp2")
    src = os.path.join(ref, "ddp-a", "checkpoints", "step_00000002")
    shutil.copytree(src, os.path.join(run, "checkpoints", "step_00000002"))
    _train(BASE + [f"train.run_dir={run}"])
    _close(_rows(run), {3: _rows(os.path.join(ref, "ref"))[3]}, "tp2 -> tp1 resume")
    assert _rows(run, split=True)[3]["nll"] == pytest.approx(_rows(os.path.join(ref, "ref"), split=True)[3]["nll"],
                                                          rel=2e-5)


def _resume_one_rank(rank, world, args):
    _train(args)


def test_zero_tp2_checkpoint_resumes_at_tp1(ref, tp_runs):
    """The dp2 x tp2 ZeRO-2 run's step-2 checkpoint (weights, AdamW moments and EMA re-laid-out through DeepSpeed's
    universal format) resumed by one ZeRO-2 rank without TP gives the reference's step 3 and final eval."""
    tp_runs("deepspeed")
    run = os.path.join(ref, "zero-from-tp2")
    src = os.path.join(ref, "deepspeed-a", "checkpoints", "step_00000002")
    shutil.copytree(src, os.path.join(run, "checkpoints", "step_00000002"))
    args = BASE + ["parallel.engine=deepspeed", "parallel.zero_stage=2", f"train.run_dir={run}"]
    run_distributed(_resume_one_rank, 1, args, timeout=300)  # its own process: DeepSpeed keeps global state
    _close(_rows(run), {3: _rows(os.path.join(ref, "ref"))[3]}, "zero tp2 -> tp1 resume")
    assert _rows(run, split=True)[3]["nll"] == pytest.approx(_rows(os.path.join(ref, "ref"), split=True)[3]["nll"],
                                                          rel=2e-5)
