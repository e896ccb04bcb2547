"""The trainer end to end on CPU: exact resume after SIGKILL, checkpoint integrity, keyed noise, schedules, NaN
handling, metrics rows, eval JSON, sampling and export round trips."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mdtrain.config import load_config
from mdtrain.optim import lr_at
from mdtrain.trainer import ema_decay

# A debug-size run on a synthetic source: fast on 2 cores, fp32, deterministic.
TINY = ["model.flavor=debug", "model.dropout=0.0", "data.train=synthetic:markov", "data.seq_len=32",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.ema=0.999", "optim.lr=1e-3",
        "optim.warmup_steps=2", "logging.every=1", "train.deterministic=true", "eval.batches=2", "eval.batch_size=4",
        "logging.progress_bar=false"]


def mdtrain(*args, timeout=300, check=True, env=None):
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    r = subprocess.run([sys.executable, "-m", "mdtrain", *args], capture_output=True, text=True, timeout=timeout, env=e)
    if check and r.returncode != 0:
        raise AssertionError(f"mdtrain {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def train_rows(run_dir):
    """Last logged row per step (a resumed run re-logs the steps after its checkpoint)."""
    rows = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            r = json.loads(line)
            if "split" not in r:
                rows[r["step"]] = r
    return rows


def test_exact_resume_after_sigkill_is_bit_identical(tmp_path):
    steps = 8
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    args = [*TINY, f"train.steps={steps}", "checkpoint.every=2"]
    mdtrain("train", *args, f"train.run_dir={ref}")
    # the same run, SIGKILLed once it has logged step 5 (its newest checkpoint is step 4)
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "mdtrain", "train", *args, f"train.run_dir={killed}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=e)
    metrics = os.path.join(killed, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline:
        if os.path.exists(metrics) and len(train_rows(killed)) >= 5:
            break
        if p.poll() is not None:
            raise AssertionError(f"training ended before it could be killed: {p.stderr.read().decode()[-3000:]}")
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = max(train_rows(killed))
    assert killed_at < steps, "the kill came too late to test anything"
    r = mdtrain("train", *args, f"train.run_dir={killed}")
    assert "resumed from" in r.stdout
    a, b = train_rows(ref), train_rows(killed)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert a[s]["loss"] == b[s]["loss"], f"step {s}: {a[s]['loss']!r} != {b[s]['loss']!r}"
        assert a[s]["grad_norm"] == b[s]["grad_norm"]


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path):
    run = str(tmp_path / "run")
    mdtrain("train", *TINY, "train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=0", f"train.run_dir={run}")
    ckroot = os.path.join(run, "checkpoints")
    assert sorted(os.listdir(ckroot)) == ["step_00000002", "step_00000004"]
    latest = os.path.join(ckroot, "step_00000004")
    victim = max((os.path.join(d, f) for d, _, fs in os.walk(latest) for f in fs if f != "manifest.json"),
                 key=os.path.getsize)
    with open(victim, "r+b") as fh:
        fh.truncate(os.path.getsize(victim) // 2)
    r = mdtrain("train", *TINY, "train.steps=5", "checkpoint.every=2", "checkpoint.keep_last=0", f"train.run_dir={run}")
    assert "step_00000004" in r.stderr + r.stdout and "truncated" in r.stderr + r.stdout
    assert "resumed from" in r.stdout and "step_00000002" in r.stdout


def test_keep_last_k_prunes_old_checkpoints(tmp_path):
    run = str(tmp_path / "run")
    mdtrain("train", *TINY, "train.steps=6", "checkpoint.every=1", "checkpoint.keep_last=2", f"train.run_dir={run}")
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_00000005", "step_00000006"]


def _in_process_losses(tmp_path, name, extra):
    from mdtrain.trainer import Trainer
    cfg = load_config(None, [*TINY, "train.steps=3", "checkpoint.every=0", "train.ema=0",
                             f"train.run_dir={tmp_path / name}", *extra])
    t = Trainer(cfg)
    try:
        return [t.train_step()["loss"] for _ in range(3)]
    finally:
        t.close()


def test_noise_does_not_depend_on_how_the_batch_is_split(tmp_path):
    # Same global batch of 4, split as 2 x 2 accumulation or 4 x 1 or 1 x 4: keyed noise and token-weighted
    # normalisation give the same loss; only float summation order may differ.
    a = _in_process_losses(tmp_path, "a", ["train.micro_batch_size=2"])
    b = _in_process_losses(tmp_path, "b", ["train.micro_batch_size=4"])
    c = _in_process_losses(tmp_path, "c", ["train.micro_batch_size=1"])
    for x, y, z in zip(a, b, c):
        assert x == pytest.approx(y, rel=1e-6, abs=1e-6) and x == pytest.approx(z, rel=1e-6, abs=1e-6)


def test_nonfinite_losses_are_skipped_then_stop_with_a_clear_message(tmp_path):
    r = mdtrain("train", *TINY, "train.steps=40", "optim.lr=1e36", "optim.warmup_steps=0", "optim.grad_clip=0",
                "train.max_nonfinite_steps=3", f"train.run_dir={tmp_path / 'run'}", check=False)
    assert r.returncode != 0
    assert "non-finite losses in a row" in r.stderr
    rows = train_rows(str(tmp_path / "run"))
    assert max(r["skipped"] for r in rows.values()) >= 1


def test_lr_schedules_match_closed_forms():
    cfg = load_config(None, ["optim.lr=1.0", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    o = cfg.optim
    assert [lr_at(s, 100, o) for s in (0, 5, 10, 99)] == [0.0, 0.5, 1.0, 1.0]  # MDLM constant_warmup
    o.schedule = "cosine"
    for s in (10, 40, 70, 100):
        want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 90))
        assert lr_at(s, 100, o) == pytest.approx(want)
    o.schedule, o.decay_fraction = "wsd", 0.2
    assert lr_at(50, 100, o) == 1.0 and lr_at(79, 100, o) == 1.0
    assert lr_at(99, 100, o) == pytest.approx(0.1)
    assert lr_at(89, 100, o) == pytest.approx(1.0 - 0.9 * 10 / 20)


def test_ema_decay_follows_mdlms_warmup():
    assert ema_decay(0.9999, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.9999, 80) == pytest.approx(81 / 90)
    assert ema_decay(0.9999, 10**6) == 0.9999


def test_metrics_rows_eval_json_sample_and_export_round_trip(tmp_path):
    run, exp = str(tmp_path / "run"), str(tmp_path / "export")
    mdtrain("train", *TINY, "train.steps=3", f"train.run_dir={run}")
    rows = [json.loads(ln) for ln in open(os.path.join(run, "metrics.jsonl"))]
    train = [r for r in rows if "split" not in r]
    evals = [r for r in rows if "split" in r]
    for key in ("step", "loss", "tokens", "lr", "grad_norm", "tokens_per_s"):
        assert all(key in r for r in train)
    assert evals and all(k in evals[-1] for k in ("split", "nll", "ppl", "bits_per_token"))
    e = evals[-1]
    assert e["ppl"] == pytest.approx(math.exp(e["nll"])) and e["bits_per_token"] == pytest.approx(e["nll"] / math.log(2))
    # `mdtrain eval` prints one JSON object last; same noise seed -> the same number as the in-training eval
    r = mdtrain("eval", run, "eval.batches=2", "eval.batch_size=4")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["nll"] == pytest.approx(e["nll"], rel=1e-6)
    # export, reload without the trainer, and compare logits with the checkpoint's EMA model
    mdtrain("export", run, "--out", exp)
    from mdtrain.exported import load_exported
    from mdtrain.inference import load_for_inference
    a, b = load_exported(exp), load_for_inference(run)
    x = torch.randint(0, a.tokenizer.vocab_size - 1, (2, 32))
    with torch.no_grad():
        assert torch.equal(a.model(x, torch.zeros(2)), b.model(x, torch.zeros(2)))
    r = mdtrain("sample", run, "sample.num_samples=2", "sample.batch_size=2", "sample.steps=8")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["num_samples"] == 2 and summary["nfe"] >= 1


def test_genmd4_schedule_parameters_are_trained_and_exported(tmp_path):
    run, exp = str(tmp_path / "run"), str(tmp_path / "exp")
    mdtrain("train", *TINY, "objective.name=genmd4", "model.variant=md4", "train.steps=3", "train.ema=0",
            f"train.run_dir={run}")
    mdtrain("export", run, "--out", exp)
    from mdtrain.exported import load_exported
    b = load_exported(exp)
    w_raw = dict(b.model.named_parameters())["objective.schedule.w_raw"].detach()
    init = math.log(math.expm1(1.0))  # softplus^-1(1): every power starts at 1
    assert (w_raw - init).abs().max() > 0, "the learnable schedule never moved"


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    plain = _in_process_losses(tmp_path, "plain", [])
    ac = _in_process_losses(tmp_path, "ac", ["train.activation_checkpointing=true"])
    assert plain == ac  # recomputation repeats the same fp32 ops (dropout is off)


def test_wandb_offline_run_continues_with_the_same_id_after_resume(tmp_path):
    run = str(tmp_path / "run")
    env = {"WANDB_MODE": "offline"}
    mdtrain("train", *TINY, "train.steps=2", "logging.wandb=true", f"train.run_dir={run}", env=env)
    mdtrain("train", *TINY, "train.steps=4", "logging.wandb=true", f"train.run_dir={run}", env=env)
    runs = sorted(d for d in os.listdir(os.path.join(run, "wandb")) if d.startswith("offline-run-"))
    assert len(runs) == 2, runs
    ids = {d.rsplit("-", 1)[1] for d in runs}
    assert len(ids) == 1, f"resume started a new wandb run: {runs}"
    for d in runs:
        files = [f for f in os.listdir(os.path.join(run, "wandb", d)) if f.endswith(".wandb")]
        assert files and os.path.getsize(os.path.join(run, "wandb", d, files[0])) > 0


def test_generative_perplexity_matches_a_float64_recomputation(tmp_path):
    from mdtrain.evaluate import generative_perplexity, unigram_entropy
    from mdtrain.inference import load_for_inference
    run = str(tmp_path / "ar")
    mdtrain("train", *TINY, "model.name=causal", "objective.name=ar", "train.steps=2", f"train.run_dir={run}")
    b = load_for_inference(run)
    alpha = b.tokenizer.alphabet  # the synthetic source's characters
    texts = [alpha[:6], alpha[2:5] * 3]
    got = generative_perplexity(texts, b, batch_size=1)
    tok, nll, n = b.tokenizer, 0.0, 0
    for t in texts:  # independent: full forward, float64 log-softmax without the mask class (MDLM's AR), shift
        ids = torch.tensor([[tok.bos_id] + tok.encode(t) + [tok.eos_id]])
        with torch.no_grad():
            logits = b.model(ids, None).double()
        logits[..., tok.mask_id] = -math.inf
        logp = torch.log_softmax(logits, -1)[0, :-1]
        tgt = ids[0, 1:]
        nll -= logp.gather(-1, tgt[:, None]).sum().item()
        n += len(tgt)
    assert got["gen_tokens"] == n
    assert got["gen_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert unigram_entropy([[1, 1, 2, 2]]) == pytest.approx(math.log(2))
    assert unigram_entropy([[5, 5, 5]]) == 0.0


@pytest.mark.parametrize("objective", ["mdlm", "ar"])
def test_validation_nll_approaches_but_never_beats_the_source_entropy(objective, tmp_path):
    """On a synthetic source of known entropy rate H, a NELBO (or AR NLL) below H would be a leak of the answer
    into the input; training should move it from ~ln V toward H."""
    from mdtrain.data.loader import build_loader
    extra = ["model.name=causal", "objective.name=ar"] if objective == "ar" else []
    cfg = load_config(None, [*TINY, *extra, "train.steps=40", "train.ema=0", "optim.lr=3e-3", "eval.batches=8",
                             "eval.batch_size=16", "checkpoint.every=0", f"train.run_dir={tmp_path}"])
    from mdtrain.trainer import Trainer
    t = Trainer(cfg)
    try:
        before = t.evaluate()[0]["nll"]
        t.fit()
        after = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "split" in r][-1]["nll"]
    finally:
        t.close()
    H = build_loader(cfg.data, "valid", 4, 0, 1, seed=0, infinite=False).entropy_per_token
    assert H is not None and H > 0
    assert after < before, (before, after)
    assert after > H, f"validation NLL {after:.4f} nats/token is below the source entropy {H:.4f}: a leak"


def test_async_checkpoints_are_published_complete_and_resume_exactly(tmp_path):
    from mdtrain.checkpoint import list_checkpoints, verify
    sync, asy = str(tmp_path / "sync"), str(tmp_path / "async")
    mdtrain("train", *TINY, "train.steps=6", "checkpoint.every=2", f"train.run_dir={sync}")
    mdtrain("train", *TINY, "train.steps=4", "checkpoint.every=2", "checkpoint.async_save=true",
            "checkpoint.keep_last=0", f"train.run_dir={asy}")
    ckpts = list_checkpoints(os.path.join(asy, "checkpoints"))
    assert [s for s, _ in ckpts] == [2, 4] and all(verify(p) is None for _, p in ckpts)
    assert not [d for d in os.listdir(os.path.join(asy, "checkpoints")) if d.endswith(".tmp")]
    mdtrain("train", *TINY, "train.steps=6", "checkpoint.every=2", "checkpoint.async_save=true", f"train.run_dir={asy}")
    a, b = train_rows(sync), train_rows(asy)
    assert [a[s]["loss"] for s in range(1, 7)] == [b[s]["loss"] for s in range(1, 7)]


def test_zero_shot_sets_are_scored_like_a_validation_split_and_foreign_tokenizers_fail(tmp_path):
    run = str(tmp_path / "run")
    mdtrain("train", *TINY, "train.steps=2", f"train.run_dir={run}")
    other = "synthetic:markov:seed=7"
    zs = json.loads(mdtrain("eval", run, "eval.batches=2", f"eval.extra=[{other}]").stdout.strip().splitlines()[-1])
    direct = json.loads(mdtrain("eval", run, "eval.batches=2", f"data.valid={other}").stdout.strip().splitlines()[-1])
    assert zs["zero_shot"][other]["nll"] == direct["nll"] and zs["zero_shot"][other]["tokens"] == direct["tokens"]
    # a dataset tokenized differently (bytes: 259 ids) cannot be scored by this model
    src = tmp_path / "doc.txt"
    src.write_text("some text for a byte-level dataset\n" * 50)
    mdtrain("prepare", "--input", str(src), "--tokenizer", "bytes", "--seq-len", "32", "--val-fraction", "1",
            "--out", str(tmp_path / "bytes"))
    r = mdtrain("eval", run, f"eval.extra=[{tmp_path / 'bytes'}]", check=False)
    assert r.returncode == 1 and "tokenized with vocab_size" in r.stderr


def test_throughput_counts_training_steps_only(tmp_path, monkeypatch):
    """Evaluation (made to take 2 s here) and checkpoints between logged steps do not lower tokens/s: the window
    measures the training steps alone, and each eval row reports its own time."""
    import mdtrain.evaluate
    from mdtrain.trainer import Trainer
    real = mdtrain.evaluate.evaluate_splits

    def slow(*a, **k):
        time.sleep(2.0)
        return real(*a, **k)
    monkeypatch.setattr(mdtrain.evaluate, "evaluate_splits", slow)
    cfg = load_config(None, [*TINY, "train.steps=3", "eval.every=1", "eval.batches=1", "checkpoint.every=1",
                             f"train.run_dir={tmp_path}"])
    t = Trainer(cfg)
    try:
        t.fit()
    finally:
        t.close()
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    train = [r for r in rows if "split" not in r]
    evals = [r for r in rows if "split" in r]
    tokens_per_step = 4 * 32
    assert len(train) == 3 and all(r["tokens_per_s"] > tokens_per_step / 2.0 for r in train), train
    assert len(evals) == 3 and all(r["seconds"] >= 2.0 for r in evals)
