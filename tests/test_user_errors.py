"""What a new user hits (issue 24, parts 1, 3, 4): one-line errors and no empty run dir, Ctrl-C, a finished run left
as it was, the logged loss as the logging window's token-weighted mean, a resolved --print-config, and notes where
mdtrain did less than asked (a partial eval split, a smaller SentencePiece vocabulary)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from mdtrain import cli
from mdtrain.testing import OFFLINE_ENV

TINY = ["model.flavor=debug", "model.dropout=0.0", "data.train=synthetic:markov", "data.seq_len=32",
        "train.global_batch_size=4", "train.micro_batch_size=2", "optim.lr=3e-3", "optim.warmup_steps=1",
        "logging.every=1", "eval.batches=1", "eval.batch_size=4", "logging.progress_bar=false", "train.ema=0"]


def _env():
    return dict(os.environ, **OFFLINE_ENV, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def mdtrain(*args, timeout=240):
    r = subprocess.run([sys.executable, "-m", "mdtrain", *args], capture_output=True, text=True, timeout=timeout,
                       env=_env())
    return r.returncode, r.stdout, r.stderr


def _rows(run, kind=None):
    rows = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    return [r for r in rows if kind is None or ("split" in r) == (kind == "eval")]


def _tree(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("user") / "run")
    assert cli.main(["train", *TINY, "train.steps=3", f"train.run_dir={run}"]) == 0
    return run


def test_tp_without_a_launcher_is_one_line_naming_the_launcher_and_leaves_no_run_dir(tmp_path):
    run = str(tmp_path / "run")
    rc, _, err = mdtrain("train", *TINY, "train.steps=2", "parallel.tp=2", f"train.run_dir={run}")
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "parallel.tp=2" in err and "mdtrain.launch.torchrun" in err
    assert not os.path.exists(run)


def test_a_missing_dataset_says_how_to_make_one_and_leaves_no_empty_run_dir(tmp_path):
    run, data = str(tmp_path / "run"), str(tmp_path / "owt")
    rc, _, err = mdtrain("train", *TINY, f"data.train={data}", "train.steps=2", f"train.run_dir={run}")
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"'{data}' does not exist" in err and "mdtrain prepare" in err and f"--out {data}" in err
    assert not os.path.exists(run), os.listdir(run)
    # a run dir that held something before is left as it was (nothing of it is removed)
    os.makedirs(run)
    open(os.path.join(run, "notes.txt"), "w").write("mine")
    rc, _, err = mdtrain("train", *TINY, f"data.train={data}", "train.steps=2", f"train.run_dir={run}")
    assert rc == 1 and open(os.path.join(run, "notes.txt")).read() == "mine"


def test_a_data_error_under_torchrun_is_printed_once_on_its_own_line(tmp_path):
    run, data = str(tmp_path / "run"), str(tmp_path / "owt")
    r = subprocess.run([sys.executable, "-m", "mdtrain.launch.torchrun", "--standalone", "--nproc-per-node", "2",
                        "-m", "mdtrain", "train", *TINY, f"data.train={data}", "train.steps=2",
                        f"train.run_dir={run}"], capture_output=True, text=True, timeout=240, env=_env())
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    lines = [x for x in out.splitlines() if "is not a prepared dataset" in x]
    assert len(lines) == 1 and lines[0].startswith("mdtrain train: error: "), out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def test_ctrl_c_is_no_traceback_and_says_how_to_stop_with_a_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, "-m", "mdtrain", "train", *TINY, "train.steps=100000",
                          "checkpoint.every=0", f"train.run_dir={run}"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (os.path.exists(os.path.join(run, "metrics.jsonl"))
                                              and _rows(run, "train")):
            assert p.poll() is None, p.stderr.read()[-3000:]
            time.sleep(0.1)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "no checkpoint was written" in err and "SIGUSR2" in err and "SIGTERM" in err


def test_rerunning_a_finished_run_changes_nothing_and_says_what_to_do(finished):
    before = _tree(finished)
    rc, out, err = mdtrain("train", *TINY, "train.steps=2", "optim.lr=1e-1", f"train.run_dir={finished}")
    assert rc == 0, err
    assert "run already finished" in out and "step 3" in out and "raise train.steps" in out and "mdtrain eval" in out
    assert "training mdlm" not in out and "eval valid" not in out  # nothing trained or evaluated
    after = _tree(finished)
    after.pop(".mdtrain.lock", None), before.pop(".mdtrain.lock", None)  # the lock's holder record
    assert after == before  # config.yaml, metrics.jsonl and the checkpoints byte for byte


def test_the_logged_loss_is_the_token_weighted_mean_of_its_window(tmp_path):
    """With logging.every=3 each row's loss equals the token-weighted mean of the per-step losses of an identical
    run logged every step (logging does not change training), and loss_step is the window's last step's loss."""
    every1, every3 = str(tmp_path / "e1"), str(tmp_path / "e3")
    common = [*TINY, "train.steps=6"]
    assert cli.main(["train", *common, f"train.run_dir={every1}"]) == 0
    assert cli.main(["train", *common, "logging.every=3", f"train.run_dir={every3}"]) == 0
    steps = {r["step"]: r for r in _rows(every1, "train")}
    rows3 = _rows(every3, "train")
    assert [r["step"] for r in rows3] == [3, 6]
    prev_tokens = 0
    for r in rows3:
        window = [steps[s] for s in range(r["step"] - 2, r["step"] + 1)]
        toks, last = [], prev_tokens
        for w in window:
            toks.append(w["tokens"] - last)
            last = w["tokens"]
        mean = sum(w["loss"] * t for w, t in zip(window, toks)) / sum(toks)
        assert r["loss"] == pytest.approx(mean, rel=1e-12, abs=1e-12)
        assert r["loss_step"] == steps[r["step"]]["loss"] and r["loss_steps"] == 3
        assert r["tokens"] == steps[r["step"]]["tokens"]
        prev_tokens = r["tokens"]
    means = [r["loss"] for r in rows3]
    assert any(m != steps[s]["loss"] for m, s in zip(means, (3, 6)))  # the mean is not the last step's value


def test_print_config_shows_what_runs_and_loads_back_the_same(tmp_path):
    from mdtrain.config import load_config
    from mdtrain.objectives.config import resolve_objective
    for name in ("mdlm", "md4", "ar", "d3pm"):
        extra = ["model.name=causal"] if name == "ar" else []
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert cli.main(["train", *TINY, f"objective.name={name}", *extra, "--print-config"]) == 0
        text = buf.getvalue()
        obj = yaml.safe_load(text)["objective"]
        for key in ("schedule", "sampling_eps", "T", "time_conditioning"):
            assert obj[key] is not None, (name, key, obj)
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        assert resolve_objective(load_config(str(path), []).objective) == \
            resolve_objective(load_config(None, [*TINY, f"objective.name={name}", *extra]).objective)


def test_help_examples_fit_the_command_and_prepare_shows_defaults():
    _, out, _ = mdtrain("sample", "--help")
    assert "optim.lr" not in out and "sample.steps" in out
    _, out, _ = mdtrain("prepare", "--help")
    assert "(default: 0.01)" in out and "(default: mdlm)" in out and "(default: 1024)" in out


def test_sample_prefix_the_tokenizer_cannot_encode_is_a_config_error(finished):
    rc, _, err = mdtrain("sample", finished, "sample.prefix=hello world", "sample.num_samples=1", "sample.steps=2")
    assert rc == 2 and "Traceback" not in err and "sample.prefix" in err, err


def test_eval_says_when_eval_batches_scored_part_of_the_split(finished):
    rc, out, err = mdtrain("eval", finished)
    assert rc == 0, err
    assert "note: valid evaluated on its first 1 batches" in out and "eval.batches=0" in out
    row = json.loads(out.strip().splitlines()[-1])
    assert row["partial_split"].startswith("first 1 batches")
    rc, out, err = mdtrain("eval", finished, "eval.batches=0")
    assert rc == 0 and "note:" not in out and "partial_split" not in json.loads(out.strip().splitlines()[-1])


def test_prepare_says_when_sentencepiece_gives_a_smaller_vocabulary(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus about cats and dogs" for i in range(200)))
    rc, _, err = mdtrain("prepare", "--input", str(corpus), "--tokenizer", "sentencepiece:train:32000",
                         "--seq-len", "32", "--out", str(tmp_path / "data"), "--doc-per", "line")
    assert rc == 0, err
    vocab = json.load(open(tmp_path / "data" / "manifest.json"))["vocab_size"]
    assert vocab < 32000
    assert "asked for 32000 pieces" in err and f"vocab_size={vocab}" in err, err
