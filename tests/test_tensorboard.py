"""logging.tensorboard=true: rank 0 writes every metrics.jsonl scalar as a TensorBoard event (train/<key>,
<split>/<key>) into <run_dir>/tensorboard/, read back here with TensorBoard's own reader; a resumed run appends."""
import json
import os

import numpy as np
import pytest

from mdtrain import cli, metrics

TINY = ["model.flavor=debug", "model.dropout=0.0", "data.train=synthetic:markov", "data.seq_len=32",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.ema=0.0", "optim.lr=1e-3",
        "optim.warmup_steps=1", "logging.every=1", "eval.batches=1", "eval.batch_size=4", "eval.every=2",
        "logging.progress_bar=false", "checkpoint.every=2", "logging.tensorboard=true"]


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_tensorboard_scalars_equal_the_metrics_rows_across_a_resume(tmp_path):
    run = str(tmp_path / "run")
    assert cli.main(["train", *TINY, f"train.run_dir={run}", "train.steps=2"]) == 0
    assert cli.main(["train", *TINY, f"train.run_dir={run}", "train.steps=4"]) == 0  # resumes at step 2
    events = [f for f in os.listdir(os.path.join(run, "tensorboard")) if f.startswith("events.out.tfevents")]
    assert len(events) == 2, events  # one file per process, in the same directory
    got, want = scalars(run), rows(run)
    train = [r for r in want if "split" not in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    steps, values = zip(*got["train/loss"])
    assert list(steps) == [r["step"] for r in train]
    np.testing.assert_array_equal(np.float32(values), np.float32([r["loss"] for r in train]))
    for key in ("grad_norm", "lr", "tokens", "tokens_per_s"):
        assert [s for s, _ in got[f"train/{key}"]] == [1, 2, 3, 4], key
        np.testing.assert_array_equal(np.float32([v for _, v in got[f"train/{key}"]]),
                                      np.float32([r[key] for r in train]), err_msg=key)
    evals = [r for r in want if r.get("split") == "valid"]
    assert [r["step"] for r in evals] == [2, 4] and [s for s, _ in got["valid/nll"]] == [2, 4]
    np.testing.assert_array_equal(np.float32([v for _, v in got["valid/nll"]]), np.float32([r["nll"] for r in evals]))
    assert "valid/split" not in got and "valid/bound" not in got  # strings are not scalars


def test_off_by_default_writes_no_event_files(tmp_path):
    run = str(tmp_path / "run")
    assert cli.main(["train", *TINY[:-1], f"train.run_dir={run}", "train.steps=1"]) == 0
    assert not os.path.exists(os.path.join(run, "tensorboard"))


def test_a_missing_tensorboard_package_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    import builtins
    real = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ModuleNotFoundError(f"No module named '{name}'")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    run = str(tmp_path / "run")
    capsys.readouterr()
    assert cli.main(["train", *TINY, f"train.run_dir={run}", "train.steps=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mdtrain train: error: logging.tensorboard=true needs the tensorboard package"), err
    with pytest.raises(metrics.MissingPackage):
        metrics.tensorboard_writer_class()
