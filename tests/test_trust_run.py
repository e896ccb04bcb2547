"""A run that goes wrong stops with a clear line: non-finite gradients are skipped steps for every engine (counted,
and `train.max_nonfinite_steps` in a row stop the run), a non-finite loss on one rank skips the step on every rank,
resuming with other math fails before any work naming the keys, a token id outside the vocabulary names its shard and
sample (or is skipped and counted), an empty validation split fails before the first step, and every count or rate
of the config is range-checked before anything runs."""
import dataclasses
import json
import math
import os
import subprocess
import sys
import tarfile
import typing

import numpy as np
import pytest

from mdtrain import cli
from mdtrain.configtools import ConfigError
from mdtrain.testing import OFFLINE_ENV, run_distributed

TINY = ["model.flavor=debug", "model.dropout=0.0", "data.train=synthetic:markov", "data.seq_len=32",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.ema=0.0", "optim.lr=1e-3",
        "optim.warmup_steps=1", "logging.every=1", "eval.batches=1", "eval.batch_size=4",
        "logging.progress_bar=false", "checkpoint.every=0"]


def _env():
    return dict(os.environ, **OFFLINE_ENV, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def rows(run_dir, split=False):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [r for r in map(json.loads, open(path)) if ("split" in r) == split]


# ---------------------------------------------------------------------------------------------------------------------
# non-finite steps


@pytest.mark.parametrize("engine", [["parallel.engine=ddp"], ["parallel.engine=fsdp"],
                                    ["parallel.engine=deepspeed", "parallel.zero_stage=2"],
                                    ["parallel.engine=deepspeed", "parallel.zero_stage=3"]],
                         ids=["ddp", "fsdp", "zero2", "zero3"])
def test_nonfinite_gradients_are_skipped_steps_that_stop_the_run(engine, tmp_path):
    """optim.lr=1e6: after a step or two the loss is still finite but the gradient norm overflows; the engine drops
    those updates, and they must count (the run used to finish with exit 0 and skipped 0)."""
    run = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "mdtrain", "train", *TINY, *engine, f"train.run_dir={run}",
                        "train.steps=30", "optim.lr=1e6", "optim.warmup_steps=0", "train.max_nonfinite_steps=3"],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 1, (r.stdout[-2000:], r.stderr[-3000:])
    assert "3 non-finite losses in a row" in r.stderr.strip().splitlines()[-1]
    got = rows(run)
    bad = [x for x in got if not math.isfinite(x["grad_norm"])]
    assert len(bad) == 3 and [x["skipped"] for x in bad] == [1, 2, 3], got
    assert all(x["skipped"] == 0 for x in got if math.isfinite(x["grad_norm"]))
    assert not os.path.isdir(os.path.join(run, "checkpoints")) or not os.listdir(os.path.join(run, "checkpoints"))


def _one_rank_inf_job(rank, world, args, bad_step):
    """Every rank trains; rank 1's loss becomes loss + inf at ``bad_step`` (its gradients stay finite)."""
    import torch

    from mdtrain.config import load_config
    from mdtrain.trainer import Trainer
    t = Trainer(load_config(None, args))
    real = t.objective.loss

    def loss(*a, **k):
        value, m = real(*a, **k)
        if rank == 1 and t.progress.step == bad_step:
            value = value + float("inf")
        return value, m
    t.objective.loss = loss
    out = []
    try:
        for _ in range(3):
            r = t.train_step(read=False)
            params = torch.cat([p.detach().reshape(-1).float().cpu() for p in t.engine.module.parameters()])
            out.append({"grad_norm": r["grad_norm"], "skipped": t.progress.skipped_total, "params": params.numpy()})
    finally:
        t.close()
    return out


@pytest.mark.parametrize("engine", [["parallel.engine=ddp"], ["parallel.engine=deepspeed", "parallel.zero_stage=2"]],
                         ids=["ddp", "zero2"])
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(engine, tmp_path):
    """No rank may step while another drops the update; the finiteness rides on the gradient reduction."""
    args = TINY + engine + [f"train.run_dir={tmp_path}/run", "train.steps=3", "train.global_batch_size=4"]
    a, b = run_distributed(_one_rank_inf_job, 2, args, 1, timeout=300)
    for rank in (a, b):
        assert [math.isfinite(s["grad_norm"]) for s in rank] == [True, False, True]
        assert [s["skipped"] for s in rank] == [0, 1, 1]
        assert np.array_equal(rank[1]["params"], rank[0]["params"])  # the skipped step changed nothing
        assert not np.array_equal(rank[2]["params"], rank[1]["params"])
    if engine == ["parallel.engine=ddp"]:  # replicated weights: identical on both ranks
        assert all(np.array_equal(x["params"], y["params"]) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------------------------------
# resuming with other math


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("math") / "run")
    assert cli.main(["train", *TINY, f"train.run_dir={run}", "train.steps=2"]) == 0
    return run


@pytest.mark.parametrize("change,named", [
    ("objective.name=md4", "objective.name='mdlm' (this run: 'md4')"),
    ("objective.antithetic=false", "objective.antithetic=True (this run: False)"),
    ("model.d_model=64", "model.d_model=None (this run: 64)"),
    ("model.variant=md4", "model.variant='mdlm' (this run: 'md4')"),
    ("data.train=synthetic:markov:vocab=40", "the tokenizer (the checkpoint's has vocab size"),
    ("parallel.engine=fsdp", "parallel.engine=ddp (this run: fsdp"),
])
def test_resuming_with_other_math_fails_before_any_work_naming_the_keys(trained, change, named, capsys):
    before = len(rows(trained))
    capsys.readouterr()
    assert cli.main(["train", *TINY, f"train.run_dir={trained}", "train.steps=4", change]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and "checkpoint.load_from=" in err[0], err
    assert len(rows(trained)) == before


def test_keys_that_may_change_on_resume_keep_working(trained, tmp_path, capsys):
    import shutil
    run = str(tmp_path / "run")
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns(".mdtrain.lock"))
    capsys.readouterr()
    assert cli.main(["train", *TINY, f"train.run_dir={run}", "train.steps=4", "optim.lr=5e-4", "logging.every=2",
                     "eval.batches=2", "model.dropout=0.1", "optim.schedule=cosine",
                     "checkpoint.keep_last=1"]) == 0, capsys.readouterr().err
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in rows(run)] == [1, 2, 4]


# ---------------------------------------------------------------------------------------------------------------------
# data


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    text = root / "doc.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}\n" for i in range(60)))
    out = {}
    for name, frac in (("ok", "0.1"), ("novalid", "0")):
        d = str(root / name)
        assert cli.main(["prepare", "--input", str(text), "--tokenizer", "bytes", "--seq-len", "32", "--out", d,
                         "--val-fraction", frac, "--samples-per-shard", "64", "--doc-per", "line"]) == 0
        out[name] = d
    return out


def _flip_high_byte(shard, sample, token):
    """Set the high byte of one uint16 token id: what one flipped byte on disk does (65280 + low byte)."""
    with tarfile.open(shard) as tf:
        member = [m for m in tf.getmembers() if m.name.endswith("input_ids.npy")][sample]
    with open(shard, "r+b") as fh:
        fh.seek(member.offset_data + 8)
        header = 10 + int.from_bytes(fh.read(2), "little")
        fh.seek(member.offset_data + header + 2 * token + 1)
        fh.write(b"\xff")


def test_a_token_id_outside_the_vocabulary_names_its_shard_and_sample(prepared, tmp_path, capsys):
    import shutil
    data = str(tmp_path / "data")
    shutil.copytree(prepared["ok"], data)
    shard = os.path.join(data, "train", "shard-000000.tar")
    _flip_high_byte(shard, sample=3, token=5)
    base = [a for a in TINY if not a.startswith("data.train")] + [f"data.train={data}"]
    capsys.readouterr()
    assert cli.main(["train", *base, f"train.run_dir={tmp_path}/a", "train.steps=30"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{shard}: sample 3 holds token id 65" in err and "outside the tokenizer's vocabulary [0, 2" in err, err
    assert "data.on_corrupt=skip" in err
    # skipped and counted instead; the run trains on
    assert cli.main(["train", *base, f"train.run_dir={tmp_path}/b", "train.steps=30", "data.on_corrupt=skip"]) == 0
    assert max(r["skipped_samples"] for r in rows(f"{tmp_path}/b")) == 1


def test_an_empty_validation_split_fails_before_the_first_step(prepared, tmp_path, capsys):
    base = [a for a in TINY if not a.startswith("data.train")] + [f"data.train={prepared['novalid']}"]
    capsys.readouterr()
    assert cli.main(["train", *base, f"train.run_dir={tmp_path}/run", "train.steps=5"]) == 1
    err = capsys.readouterr().err
    assert "the valid split has no samples" in err
    assert rows(f"{tmp_path}/run") == []


# ---------------------------------------------------------------------------------------------------------------------
# config ranges


@pytest.mark.parametrize("override,key", [
    ("train.steps=-5", "train.steps"), ("train.steps=0", "train.steps"),
    ("train.micro_batch_size=0", "train.micro_batch_size"), ("train.global_batch_size=-4", "train.global_batch_size"),
    ("eval.batch_size=0", "eval.batch_size"), ("eval.batches=-1", "eval.batches"), ("eval.every=-2", "eval.every"),
    ("eval.mc_samples=0", "eval.mc_samples"), ("checkpoint.every=-1", "checkpoint.every"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last"), ("logging.every=0", "logging.every"),
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps"), ("train.stop_check_every=0",
                                                                    "train.stop_check_every"),
    ("train.ema=1.0", "train.ema"), ("optim.lr=0", "optim.lr"), ("optim.lr=.nan", "optim.lr"),
    ("optim.lr=.inf", "optim.lr"), ("optim.betas=[0.9,1.5]", "optim.betas"), ("optim.eps=0", "optim.eps"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"), ("optim.grad_clip=-1", "optim.grad_clip"),
    ("optim.decay_fraction=0", "optim.decay_fraction"), ("optim.min_lr_ratio=2", "optim.min_lr_ratio"),
    ("model.dropout=1.0", "model.dropout"), ("model.d_model=0", "model.d_model"), ("parallel.tp=0", "parallel.tp"),
    ("data.seq_len=0", "data.seq_len"), ("data.prefetch=0", "data.prefetch"), ("sample.steps=0", "sample.steps"),
    ("sample.top_p=0", "sample.top_p"), ("sample.num_samples=0", "sample.num_samples"),
    ("objective.T=-1", "objective.T"), ("launch.nodes=0", "launch.nodes"), ("train.seed=-1", "train.seed"),
])
def test_config_values_out_of_range_are_errors_before_any_work(override, key):
    from mdtrain.config import load_config
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')} must be"):
        load_config(None, [override])


def test_the_cli_reports_a_bad_count_as_one_line_with_status_2(tmp_path, capsys):
    for override in ("train.steps=-5", "train.micro_batch_size=0", "checkpoint.every=-1"):
        capsys.readouterr()
        assert cli.main(["train", *TINY, f"train.run_dir={tmp_path}/run", override]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"mdtrain train: config error: {override.split('=')[0]} must be")
    assert not os.path.exists(f"{tmp_path}/run")


def _numeric_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, prefix + f.name + ".")
            continue
        args = set(typing.get_args(tp)) | {tp}
        inner = {a for t in args for a in (typing.get_args(t) or (t,))}
        if inner & {int, float} and bool not in inner:
            yield prefix + f.name, f


def test_every_count_or_rate_of_the_config_declares_its_range():
    """A new numeric key without ``doc(..., ge=/gt=/le=/lt=)`` would accept any value: every one must declare it."""
    from mdtrain.sweep.config import SweepFile
    fields = dict(_numeric_fields(SweepFile))
    assert len(fields) > 60
    unbounded = sorted(k for k, f in fields.items() if not f.metadata.get("bounds") and not f.metadata.get("choices"))
    assert unbounded == [], f"numeric config keys without a declared range: {unbounded}"
