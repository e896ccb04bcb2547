"""``mdtrain compare``: the table's numbers against the run dirs' own rows and models, and the plots' contents."""
import contextlib
import io
import json
import os

import numpy as np
import pytest

from mdtrain import cli

TINY = ["model.flavor=debug", "model.dropout=0.0", "data.train=synthetic:markov", "data.seq_len=32",
        "train.global_batch_size=4", "train.micro_batch_size=2", "optim.lr=3e-3", "optim.warmup_steps=1",
        "logging.every=1", "eval.batches=1", "eval.batch_size=4", "logging.progress_bar=false", "train.steps=3",
        "train.ema=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("compare")
    out = []
    for name, extra in (("mdlm", []), ("ar", ["model.name=causal", "objective.name=ar"])):
        d = str(base / name)
        assert cli.main(["train", *TINY, *extra, f"train.run_dir={d}"]) == 0
        out.append(d)
    return out


def _rows(run):
    return [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]


def test_compare_table_matches_each_run_dir(runs, tmp_path):
    from mdtrain.compare import summarize
    from mdtrain.inference import load_for_inference
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["compare", *runs, "--out", str(tmp_path / "plots")]) == 0
    lines = buf.getvalue().splitlines()
    assert lines[0].split()[:3] == ["run", "objective", "model"]
    for run, line in zip(runs, lines[1:3]):
        rows = _rows(run)
        train = [r for r in rows if "split" not in r]
        ev = [r for r in rows if r.get("split") == "valid"][-1]
        n_params = sum(p.numel() for p in load_for_inference(run).model.parameters())
        cells = line.split()
        assert cells[0] == os.path.basename(run) and cells[1] in ("mdlm", "ar")
        assert cells[3] == f"{n_params:,}" and cells[4] == f"{train[-1]['tokens']:,}" and cells[5] == "3"
        assert float(cells[6]) == pytest.approx(train[-1]["loss"], abs=1e-4)
        assert float(cells[7]) == pytest.approx(ev["nll"], abs=1e-4)
        bound = cells[1] != "ar"
        assert (cells[8] == "≤") == bound  # diffusion perplexities are marked as upper bounds
        s = summarize(run)
        want_s = sum((b["tokens"] - a) / b["tokens_per_s"] for a, b in zip([0] + [r["tokens"] for r in train],
                                                                             train))
        assert s.curve[-1][1] == pytest.approx(want_s)  # training time: eval and checkpoints excluded


def test_compare_plots_draw_every_run(runs, tmp_path):
    from PIL import Image
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["compare", *runs, "--out", str(tmp_path)]) == 0
    for name in ("loss_vs_tokens.png", "loss_vs_time.png"):
        img = np.asarray(Image.open(tmp_path / name).convert("RGB")).astype(int)
        # matplotlib's C0 (blue) and C1 (orange) lines: one per run
        blue = ((img[..., 2] > 150) & (img[..., 0] < 80)).sum()
        orange = ((img[..., 0] > 200) & (img[..., 1] > 100) & (img[..., 1] < 160) & (img[..., 2] < 60)).sum()
        assert blue > 50 and orange > 50, (name, blue, orange)


def test_compare_names_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert cli.main(["compare", str(tmp_path)]) == 1
    assert "is not an mdtrain run dir (config.yaml is missing)" in capsys.readouterr().err
