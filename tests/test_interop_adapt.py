"""AR -> diffusion adaptation: the shifted parameterisation (against a float64 recomputation of its NELBO), the
Dream/DiffuLLaMA recipe (at step 0, causal mask still on, the adapted model's next-token logits are the AR
model's; the mask then opens at the scheduled rate), the LLaDA recipe (bidirectional from the start, the mask
row at the mean embedding), and both recipes trained through `mdtrain train` from an imported model."""
import json
import math
import os

import pytest
import torch

from mdtrain.exported import load_exported
from mdtrain.interop.hf_import import import_hf
from mdtrain.models.backbone import set_train_step
from mdtrain.objectives import ObjectiveConfig, build_objective
from tests.interop_util import hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, MASK = 11, 10


def test_shifted_nelbo_against_a_float64_recomputation():
    g = torch.Generator().manual_seed(0)
    B, L = 3, 9
    logits = torch.randn(B, L, V, generator=g, dtype=torch.float64)
    x0 = torch.randint(0, MASK, (B, L), generator=g)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    obj = build_objective(ObjectiveConfig(name="mdlm", shift=True), V, MASK)
    xt = obj.corrupt(x0, t, torch.rand(B, L, generator=g, dtype=torch.float64))
    assert (xt[:, 0] == x0[:, 0]).all() and (xt == MASK).any()  # position 0 is never masked
    got = obj.nelbo(logits, x0, xt, t)
    want = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        for j in range(1, L):
            if xt[b, j] == MASK:  # the row before predicts position j; the mask logit is excluded
                row = logits[b, j - 1].clone()
                row[MASK] = -math.inf
                # loglinear: -alpha'/(1 - alpha) = 1/t exactly (the (1 - eps) factors cancel)
                want[b, j] = -torch.log_softmax(row, 0)[x0[b, j]] / t[b]
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    _, m = obj.loss(lambda x, c: logits, x0, generator=torch.Generator().manual_seed(1))
    assert float(m["tokens"]) == B * (L - 1)  # position 0 is context, not a token


def test_shifted_sampling_needs_the_first_token():
    from mdtrain.objectives.samplers import sample
    obj = build_objective(ObjectiveConfig(name="mdlm", shift=True), V, MASK)
    fn = lambda x, c: torch.zeros(*x.shape, V)  # noqa: E731
    with pytest.raises(ValueError, match="give the first token"):
        sample(obj, fn, 2, 6, 4, torch.Generator().manual_seed(0), sampler="ddpm")
    tokens, _ = sample(obj, fn, 2, 6, 4, torch.Generator().manual_seed(0), sampler="ddpm", bos_id=3)
    assert (tokens[:, 0] == 3).all() and (tokens != MASK).all()


@pytest.fixture(scope="module")
def imports(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    hf_model("llama", str(root / "hf"))
    out = {"hf": str(root / "hf")}
    for name, recipe in (("ar", None), ("dream", "adapt_dream.yaml"), ("llada", "adapt_llada.yaml")):
        import_hf(str(root / "hf"), str(root / name), recipe=os.path.join(REPO, "configs", recipe) if recipe else None)
        out[name] = str(root / name)
    return out


def test_dream_recipe_at_step_zero_predicts_the_next_token_like_the_ar_model(imports):
    ar, dream = load_exported(imports["ar"]), load_exported(imports["dream"])
    assert dream.cfg.objective.shift and dream.cfg.model.llama.attention == "anneal"
    x = torch.randint(0, 90, (2, 24), generator=torch.Generator().manual_seed(3))
    model = dream.model.train()  # annealing applies to training forwards; dropout is 0 in the recipe
    set_train_step(model, 0)
    with torch.no_grad():
        ar_logits = ar.model(x)
        step0 = model(x)
    next_token = dream.objective.align_logits(step0)[:, 1:]  # what the objective scores token j with
    assert torch.equal(next_token, ar_logits[:, :-1])
    # the mask opens on schedule: half of the future keys visible at step anneal_steps / 2, all at the end
    n = dream.cfg.model.llama.anneal_steps
    set_train_step(model, n // 2)
    torch.manual_seed(0)
    plan = model.plan(64, torch.device("cpu"))
    upper = torch.ones(64, 64, dtype=torch.bool).triu(1)
    assert plan.allowed[~upper].all() and abs(plan.allowed[upper].float().mean().item() - 0.5) < 0.05
    with torch.no_grad():
        assert not torch.allclose(model(x)[:, :-1], ar_logits[:, :-1], atol=1e-4)
    set_train_step(model, n)
    done = model.plan(8, torch.device("cpu"))
    assert done.causal is False and done.allowed is None  # fully bidirectional after anneal_steps
    model.eval()
    set_train_step(model, 0)
    assert model.plan(8, torch.device("cpu")).causal is False  # inference is always bidirectional


def test_llada_recipe_is_bidirectional_with_the_mask_row_at_the_mean(imports):
    ar, llada = load_exported(imports["ar"]), load_exported(imports["llada"])
    assert llada.cfg.objective.name == "mdlm" and not llada.cfg.objective.shift
    emb = llada.model.embed.weight
    assert torch.allclose(emb[MASK_ID := llada.tokenizer.mask_id], emb[:MASK_ID].double().mean(0).float(), atol=1e-6)
    x = torch.randint(0, 90, (1, 16), generator=torch.Generator().manual_seed(4))
    y = x.clone()
    y[0, 10] = (y[0, 10] + 1) % 90
    with torch.no_grad():
        moved = (llada.model(x)[0, 0] - llada.model(y)[0, 0]).abs().max()
        causal = (ar.model(x)[0, 0] - ar.model(y)[0, 0]).abs().max()
    assert moved > 1e-4 and causal == 0  # position 0 sees position 10 only without the causal mask


@pytest.mark.parametrize("recipe", ["dream", "llada"])
def test_recipe_trains_from_the_import(imports, recipe, tmp_path):
    from mdtrain.config import load_config
    from mdtrain.data.prepare import prepare
    from mdtrain.models.llama import Llama
    from mdtrain.trainer import Trainer
    exp = imports[recipe]
    (tmp_path / "t.txt").write_text("\n".join(f"line {i}: the quick brown fox {i * 7}" for i in range(300)))
    prepare([str(tmp_path / "t.txt")], f"hf:{exp}/tokenizer", 16, str(tmp_path / "data"), val_fraction=0.1,
            doc_per="line", samples_per_shard=64, packing="md4")  # full blocks: no padding
    cfg = load_config(os.path.join(exp, "config.yaml"), [
        f"data.train={tmp_path / 'data'}", f"train.run_dir={tmp_path / 'run'}", "data.seq_len=16", "train.steps=3",
        "train.global_batch_size=4", "train.micro_batch_size=4", "model.llama.anneal_steps=2", "logging.every=1",
        "logging.progress_bar=false", "eval.batches=1", "eval.batch_size=4", "checkpoint.every=0"])
    trainer = Trainer(cfg)
    try:
        trainer.fit()
        steps = [m.train_step for m in trainer.engine.model.modules() if isinstance(m, Llama)]
    finally:
        trainer.close()
    rows = [json.loads(r) for r in open(tmp_path / "run" / "metrics.jsonl")]
    train = [r for r in rows if "split" not in r]
    assert [r["step"] for r in train] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in train)
    per_step = 4 * (16 - 1 if recipe == "dream" else 16)  # shifted: position 0 is context
    assert [r["tokens"] for r in train] == [per_step, 2 * per_step, 3 * per_step]
    assert steps == [2]  # the trainer told the model its step (the last one taken)
