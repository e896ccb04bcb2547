"""Inference-side loading checked against independent references: an export's weights against torch's own
consolidation of the DCP checkpoint, ``mdtrain eval``'s NELBO against a float64 transcription of the MDLM loss, and
``train.use_ema_for_eval`` honoured by eval and sample."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

TINY = ["model.flavor=debug", "model.dropout=0.0", "data.train=synthetic:markov", "data.seq_len=32",
        "train.global_batch_size=4", "train.micro_batch_size=2", "optim.lr=3e-3", "optim.warmup_steps=1",
        "logging.every=1", "train.deterministic=true", "eval.batches=2", "eval.batch_size=4",
        "logging.progress_bar=false", "train.steps=3", "train.ema=0.5"]


def mdtrain(*args):
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "mdtrain", *args], capture_output=True, text=True, timeout=300, env=e)
    assert r.returncode == 0, f"mdtrain {' '.join(args)}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step MDLM run whose EMA (decay 0.5, no warmup effect after step 1) differs clearly from its weights."""
    d = str(tmp_path_factory.mktemp("inference") / "run")
    mdtrain("train", *TINY, f"train.run_dir={d}")
    return d


def _torch_consolidated(run_dir):
    """torch's own single-file conversion of the newest checkpoint's DCP directory (no mdtrain code involved)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    ckpt = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))[-1]
    out = os.path.join(run_dir, "torch_consolidated.pt")
    dcp_to_torch_save(os.path.join(run_dir, "checkpoints", ckpt, "dcp"), out)
    return torch.load(out, weights_only=True)


def _flat(state: dict, prefix: str) -> dict:
    out = {}
    for k, v in state.get(prefix, {}).items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _flat({k: v}, k).items()})
        else:
            out[k] = v
    if not out:  # flattened keys ("model.embed.weight")
        out = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    return out


@pytest.mark.parametrize("ema", [True, False])
def test_export_holds_what_torch_reads_from_the_checkpoint(run, tmp_path, ema):
    exp = str(tmp_path / "exp")
    mdtrain("export", run, "--out", exp, *([] if ema else ["--no-ema"]))
    got = load_file(os.path.join(exp, "model.safetensors"))
    state = _torch_consolidated(run)
    model, shadow = _flat(state, "model"), _flat(state, "ema")
    assert model and shadow and set(shadow) <= set(model)
    assert set(got) == set(model)
    for name, value in got.items():
        want = shadow[name] if ema and name in shadow else model[name]
        assert torch.equal(value, want.float()), name
    # the EMA really differs from the live weights, so the two exports are told apart
    assert any(not torch.equal(model[n].float(), shadow[n].float()) for n in shadow)


def _mdlm_nelbo_float64(bundle, eval_seed: int, batches: int, batch_size: int) -> tuple[float, int]:
    """The MDLM NELBO under the loglinear schedule, written out from the paper (Sahoo et al. 2024, eq. 10):
    t = ε_s + (1 − ε_s)u, a token is masked w.p. (1 − ε)t, each masked token costs −log p_θ(x0) / t, with the mask
    logit excluded from the softmax; the noise u is the evaluation's keyed draw."""
    from mdtrain import rng
    from mdtrain.data.loader import build_loader
    cfg, obj = bundle.cfg, bundle.objective
    eps, eps_s = obj.schedule.eps, obj.sampling_eps
    model = bundle.model.double()
    loader = build_loader(cfg.data, "valid", batch_size, 0, 1, seed=eval_seed, infinite=False)
    total, tokens = 0.0, 0
    for b, batch in enumerate(loader):
        if b >= batches:
            break
        x0 = batch["input_ids"]
        idx = list(range(b * batch_size, b * batch_size + x0.shape[0]))
        noise = rng.keyed_noise({"t": (), "mask": (x0.shape[1],)}, ("t",), eval_seed, 0, idx, batch_size,
                                rng.STREAM_EVAL)
        t = eps_s + (1 - eps_s) * noise["t"]
        masked = noise["mask"] < ((1 - eps) * t)[:, None]
        xt = torch.where(masked, torch.full_like(x0, obj.mask_id), x0)
        with torch.no_grad():
            logits = model(xt, torch.zeros(x0.shape[0], dtype=torch.float64)).double()
        logits[..., obj.mask_id] = -math.inf
        logp = torch.log_softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
        total += float((-logp / t[:, None])[masked].sum())
        tokens += int(batch["attention_mask"].sum())
    return total, tokens


def test_eval_nelbo_equals_a_float64_transcription_of_the_mdlm_loss(run):
    from mdtrain.inference import load_for_inference
    out = json.loads(mdtrain("eval", run).stdout.strip().splitlines()[-1])
    bundle = load_for_inference(run)
    assert bundle.objective.name == "mdlm" and not bundle.objective.time_conditioning
    total, tokens = _mdlm_nelbo_float64(bundle, bundle.cfg.eval.seed, bundle.cfg.eval.batches,
                                        bundle.cfg.eval.batch_size)
    assert out["tokens"] == tokens == 2 * 4 * 32
    assert out["nll"] == pytest.approx(total / tokens, rel=1e-5)


def test_use_ema_for_eval_is_honoured_by_eval_and_sample(run):
    from mdtrain.inference import load_for_inference
    state = _torch_consolidated(run)
    model, shadow = _flat(state, "model"), _flat(state, "ema")
    default = load_for_inference(run).model.state_dict()
    raw = load_for_inference(run, overrides=["train.use_ema_for_eval=false"]).model.state_dict()
    for n in shadow:
        assert torch.equal(default[n], shadow[n].float()) and torch.equal(raw[n], model[n].float()), n
    a = json.loads(mdtrain("eval", run).stdout.strip().splitlines()[-1])
    b = json.loads(mdtrain("eval", run, "train.use_ema_for_eval=false").stdout.strip().splitlines()[-1])
    assert a["tokens"] == b["tokens"] and a["nll"] != b["nll"]
    s = [json.loads(mdtrain("sample", run, "sample.num_samples=2", "sample.steps=8", "sample.show=0",
                            f"sample.out={run}/s{i}.jsonl", *extra).stdout.strip().splitlines()[-1])
         for i, extra in enumerate([[], ["train.use_ema_for_eval=false"]])]
    ids = [[json.loads(x)["ids"] for x in open(r["out"])] for r in s]
    assert ids[0] != ids[1]  # same seed, different weights
