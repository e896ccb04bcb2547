"""Files others can read: a run directory (config, metrics, TensorBoard events, DCP and DeepSpeed checkpoints with
their manifests and tokenizer copies) and both export formats get the modes a plain open()/mkdir gives under the
user's umask: 0644 / 0755 under umask 022, 0600 / 0700 under umask 077 (the umask is respected, not overridden)."""
import contextlib
import os
import stat

import pytest

from mdtrain import cli

TINY = ["model.flavor=debug", "model.dropout=0.0", "data.train=synthetic:markov", "data.seq_len=32",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.ema=0.0", "optim.lr=1e-3",
        "optim.warmup_steps=1", "logging.every=1", "eval.batches=1", "eval.batch_size=4",
        "logging.progress_bar=false", "train.steps=2", "checkpoint.every=2"]


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root):
    """{relative path: permission bits} of every file and directory under ``root`` (the lock file aside: it is the
    run's own, opened by whoever holds the run)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(d, name)
            if name != ".mdtrain.lock":
                out[os.path.relpath(full, root) + ("/" if name in dirs else "")] = stat.S_IMODE(os.lstat(full).st_mode)
    return out


def train_and_export(tmp_path, *extra, hf=False):
    run, exp = str(tmp_path / "run"), str(tmp_path / "export")
    assert cli.main(["train", *TINY, f"train.run_dir={run}", *extra]) == 0
    assert cli.main(["export", run, "--out", exp] + (["--format", "hf"] if hf else [])) == 0
    found = {**{"run/" + k: v for k, v in modes(run).items()}, **{"export/" + k: v for k, v in modes(exp).items()}}
    must = ["run/config.yaml", "run/metrics.jsonl", "export/model.safetensors"]
    ckpt = "run/checkpoints/step_00000002/"
    must += [ckpt + "manifest.json", ckpt + "config.yaml", ckpt + "tokenizer/"]
    assert set(must) <= set(found), sorted(found)
    return found


def wrong(found, file_mode, dir_mode, script_mode=None):
    def expected(rel):
        if rel.endswith("/"):
            return dir_mode
        if script_mode is not None and rel.endswith(("zero_to_fp32.py", "zero_to_torch.py")):
            return script_mode  # DeepSpeed's converter scripts, shipped executable
        return file_mode
    return {rel: oct(m) for rel, m in found.items() if m != expected(rel)}


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_umask_022_makes_every_file_0644_and_every_dir_0755(tmp_path, engine):
    with umask(0o022):
        found = train_and_export(tmp_path, f"parallel.engine={engine}", "logging.tensorboard=true",
                                 hf=engine == "deepspeed")
    assert "run/tensorboard/" in found
    if engine == "deepspeed":
        assert any("deepspeed/" in k for k in found)
        assert "export/config.json" in found  # the Hugging Face format
    assert wrong(found, 0o644, 0o755, script_mode=0o755) == {}


def test_umask_077_keeps_every_file_private(tmp_path):
    with umask(0o077):
        found = train_and_export(tmp_path)
    assert wrong(found, 0o600, 0o700) == {}
