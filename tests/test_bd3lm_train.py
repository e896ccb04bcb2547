"""BD3-LM through the real Trainer: DDP, FSDP2, tensor parallel (dp=1 x tp=2) and ZeRO-2 on 2 gloo ranks against one
process fed the same global batches (per-step loss, gradient norm, validation NELBO); exact resume from a
checkpoint; fine-tuning from an MDLM run with ``checkpoint.load_from``; ``mdtrain eval`` and ``mdtrain sample``."""
import json
import os
import shutil

import pytest
import torch

from mdtrain.testing import run_distributed

# dropout off, fp32; the clipped schedule with resampling (the paper's training recipe) is on, so the distributed
# runs exercise the training surrogate and the evaluations the full-interval NELBO
BASE = ["model.flavor=debug", "model.dropout=0.0", "objective.name=bd3lm", "objective.block_size=4",
        "objective.clip=[0.3,0.8]", "objective.resample=true", "data.train=synthetic:markov:valid_samples=8",
        "data.seq_len=16", "train.global_batch_size=4", "train.micro_batch_size=2", "optim.lr=3e-3",
        "optim.warmup_steps=1", "optim.grad_clip=0.5", "logging.every=1", "eval.batches=0", "eval.batch_size=4",
        "logging.progress_bar=false", "train.steps=3", "checkpoint.every=2", "checkpoint.keep_last=0",
        "train.ema=0.9"]
# one process group per layout: data parallel (deepspeed last: it keeps global state), then dp=1 x tp=2
LAYOUTS = [{"ddp": [], "fsdp": ["parallel.engine=fsdp", "train.activation_checkpointing=true"],
            "zero": ["parallel.engine=deepspeed", "parallel.zero_stage=2"]},
           {"tp": ["parallel.tp=2"]}]
ENGINES = [name for layout in LAYOUTS for name in layout]


def _rows(run_dir, split=False):
    rows = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            r = json.loads(line)
            if ("split" in r) == split:
                rows[r["step"]] = r
    return rows


def _train(args):
    from mdtrain.config import load_config
    from mdtrain.trainer import Trainer
    t = Trainer(load_config(None, args))
    try:
        t.fit()
    finally:
        t.close()


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("bd3lm"))
    _train(BASE + [f"train.run_dir={tmp}/ref"])
    return tmp


def _job(rank, world, tmp, layout):
    for name, extra in layout.items():
        _train(BASE + extra + [f"train.run_dir={tmp}/{name}", "checkpoint.every=0"])


def test_every_engine_trains_bd3lm_like_one_process(ref):
    for layout in LAYOUTS:
        run_distributed(_job, 2, ref, layout, timeout=560)
    want, ev_want = _rows(os.path.join(ref, "ref")), _rows(os.path.join(ref, "ref"), split=True)[3]
    assert ev_want["tokens"] == 8 * 15  # the first token of every sequence is context
    for name in ENGINES:
        got = _rows(os.path.join(ref, name))
        assert sorted(got) == [1, 2, 3], name
        for s in got:
            for key in ("loss", "grad_norm"):
                assert got[s][key] == pytest.approx(want[s][key], rel=2e-5, abs=1e-6), (name, s, key)
        ev = _rows(os.path.join(ref, name), split=True)[3]
        assert ev["tokens"] == ev_want["tokens"] and ev["nll"] == pytest.approx(ev_want["nll"], rel=2e-5), name


def test_resume_from_a_checkpoint_repeats_the_step_exactly(ref):
    run = os.path.join(ref, "resumed")
    shutil.copytree(os.path.join(ref, "ref", "checkpoints", "step_00000002"),
                    os.path.join(run, "checkpoints", "step_00000002"))
    _train(BASE + [f"train.run_dir={run}"])
    got, want = _rows(run), _rows(os.path.join(ref, "ref"))
    assert sorted(got) == [3]
    assert got[3]["loss"] == want[3]["loss"] and got[3]["grad_norm"] == want[3]["grad_norm"]
    assert _rows(run, split=True)[3]["nll"] == _rows(os.path.join(ref, "ref"), split=True)[3]["nll"]


def test_finetune_from_mdlm_then_eval_and_sample_through_the_cli(tmp_path, capsys):
    from mdtrain.cli import main as cli
    from mdtrain.config import load_config
    from mdtrain.inference import load_for_inference
    from mdtrain.trainer import Trainer

    mdlm = str(tmp_path / "mdlm")
    mdlm_args = [a for a in BASE if not a.startswith("objective.")] + ["train.steps=2", f"train.run_dir={mdlm}"]
    _train(mdlm_args)
    run = str(tmp_path / "bd3lm")
    t = Trainer(load_config(None, BASE + ["train.steps=2", f"checkpoint.load_from={mdlm}", f"train.run_dir={run}"]))
    try:  # the paper's recipe: start from the MDLM weights (EMA), then train with blocks
        start = {k: v.clone() for k, v in t.engine.model.state_dict().items()}
        for k, v in load_for_inference(mdlm, use_ema=True).model.state_dict().items():
            assert torch.equal(start[k], v), k
        t.fit()
    finally:
        t.close()
    final = _rows(run, split=True)[2]
    capsys.readouterr()
    assert cli(["eval", run]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["nll"] == pytest.approx(final["nll"], rel=1e-6) and out["bound"] == "upper"
    samples = str(tmp_path / "samples.jsonl")
    assert cli(["sample", run, "sample.num_samples=2", "sample.batch_size=2", "sample.steps=4",
                "sample.num_strides=2", "sample.stride_length=8", "sample.stop_at_eos=true",
                f"sample.out={samples}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_samples"] == 2 and summary["nfe"] >= 8  # 8 blocks of 4 tokens
    rows = [json.loads(ln) for ln in open(samples)]
    tok = load_for_inference(run).tokenizer
    for r in rows:
        ids = r["ids"]
        assert ids[0] == tok.bos_id and 2 <= len(ids) <= 32 and tok.mask_id not in ids
        assert tok.eos_id not in ids[1:-1]  # a sample ends at its first EOS, if any
