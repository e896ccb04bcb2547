"""Variance is part of the number: every NELBO / perplexity carries the Monte Carlo standard error of its estimate.

The evaluator's per-sequence terms add up to the objective's own ``nll_sum`` for every objective, and its standard
error equals one recomputed here in float64, sequence by sequence, through ``objective.loss`` on a float64 copy of
the model with the same keyed noise."""
import math

import pytest
import torch

from mdtrain import rng
from mdtrain.config import Config
from mdtrain.data.loader import build_loader
from mdtrain.evaluate import evaluate_dataset, format_table
from mdtrain.metrics import eval_row
from mdtrain.models import build_model
from mdtrain.objectives import build_objective
from mdtrain.parallel.dist import init_distributed

OBJECTIVES = ["mdlm", "md4", "genmd4", "d3pm", "sedd", "ar", "bd3lm"]


def _setup(objective: str, mc_samples: int = 4):
    cfg = Config()
    cfg.objective.name = objective
    if objective == "bd3lm":
        cfg.objective.block_size = 4
    cfg.model.name = "causal" if objective == "ar" else "dit"
    cfg.model.variant = "md4" if objective in ("md4", "genmd4") else "mdlm"
    cfg.model.flavor, cfg.model.dropout = "debug", 0.0
    cfg.data.train, cfg.data.seq_len = "synthetic:markov", 16
    cfg.eval.batch_size, cfg.eval.batches, cfg.eval.mc_samples, cfg.eval.seed = 3, 2, mc_samples, 5
    cfg.validate()
    tok = build_loader(cfg.data, "valid", 3, 0, 1, seed=0, infinite=False).tokenizer
    obj = build_objective(cfg.objective, tok.vocab_size, tok.mask_id)
    torch.manual_seed(0)
    model = build_model(cfg.model, tok.vocab_size, cfg.data.seq_len).eval()
    with torch.no_grad():  # zero-initialised output/modulation layers would make every sequence look alike
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.3)
    return cfg, obj, model


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_per_sequence_terms_are_each_sequence_scored_alone(objective):
    """nll_per_sequence[i] is what the objective gives sequence i alone on the same noise (no mixing between rows),
    and the terms sum to nll_sum."""
    cfg, obj, model = _setup(objective)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, obj.vocab_size - 1, (4, 16), generator=g)
    x0[x0 == obj.mask_id] = 0
    attn = torch.ones_like(x0)
    attn[1, 12:] = 0
    noise = rng.keyed_noise(obj.noise_spec(16), tuple(obj.stratified_keys), 0, 0, [0, 1, 2, 3], 4, rng.STREAM_EVAL)

    def fn_for(mask):
        def model_fn(x, cond=None, attention_mask=None, **kw):
            return model(x, cond, mask[:, :x.shape[1]] if attention_mask is None else attention_mask, **kw)
        return model_fn
    with torch.no_grad():
        _, m = obj.loss(fn_for(attn), x0, attn, noise=noise)
        per = m["nll_per_sequence"]
        alone = [float(obj.loss(fn_for(attn[i:i + 1]), x0[i:i + 1], attn[i:i + 1],
                                noise={k: v[i:i + 1] for k, v in noise.items()})[1]["nll_sum"]) for i in range(4)]
    assert per.shape == (4,) and per.dtype == torch.float64
    assert float(per.sum()) == pytest.approx(float(m["nll_sum"]), rel=1e-9)
    assert per.tolist() == pytest.approx(alone, rel=1e-4)


@pytest.mark.parametrize("objective", ["mdlm", "genmd4", "ar"])
def test_standard_error_matches_a_float64_recomputation_from_per_sequence_values(objective):
    """SE = √(Σ_i s_i²/K) / tokens, s_i² the spread of sequence i's K values; recomputed sequence by sequence."""
    K = 4
    cfg, obj, model = _setup(objective, mc_samples=K)
    ctx = init_distributed("gloo", 1)
    nll_sum, tokens, var = evaluate_dataset(cfg, cfg.data, model, obj, ctx)
    row = eval_row(7, "valid", nll_sum, tokens, "exact" if obj.causal else "upper", nll_var=var, mc_samples=K)

    m64 = model.double()
    values, ntok = [], 0.0
    loader = build_loader(cfg.data, "valid", cfg.eval.batch_size, 0, 1, seed=cfg.eval.seed, infinite=False)
    for b, batch in enumerate(loader):
        if b >= cfg.eval.batches:
            break
        for j in range(batch["input_ids"].shape[0]):
            x0, attn = batch["input_ids"][j:j + 1], batch["attention_mask"][j:j + 1]
            i = b * cfg.eval.batch_size + j  # the sequence's index in the validation stream keys its noise
            per_k = []
            for k in range(1 if obj.causal else K):
                noise = rng.keyed_noise(obj.noise_spec(16), tuple(obj.stratified_keys), cfg.eval.seed, k, [i],
                                        cfg.eval.batch_size, rng.STREAM_EVAL)
                with torch.no_grad():
                    _, m = obj.loss(lambda x, c=None, _a=attn: m64(x, None if c is None else c.double(),
                                                                   _a[:, :x.shape[1]]), x0, attn, noise=noise)
                per_k.append(float(m["nll_sum"]))
            ntok += float(m["tokens"])
            values.append(per_k)
    v = torch.tensor(values, dtype=torch.float64)  # (sequences, K)
    assert tokens == ntok
    assert row["nll"] == pytest.approx(float(v.mean(1).sum()) / ntok, rel=1e-5)
    if obj.causal:
        assert row["nll_se"] == 0.0 and row["ppl_se"] == 0.0
        return
    se = math.sqrt(float((v.var(1, unbiased=True) / K).sum())) / ntok
    assert se > 0 and row["nll_se"] == pytest.approx(se, rel=1e-4)
    assert row["ppl_se"] == pytest.approx(row["ppl"] * se, rel=1e-4)


def test_one_sample_has_no_standard_error_and_the_table_says_so():
    cfg, obj, model = _setup("mdlm", mc_samples=1)
    nll_sum, tokens, var = evaluate_dataset(cfg, cfg.data, model, obj, init_distributed("gloo", 1))
    assert math.isnan(var)
    row = eval_row(0, "valid", nll_sum, tokens, "upper", nll_var=var, mc_samples=1)
    assert row["nll_se"] is None and row["ppl_se"] is None
    table = format_table([row, eval_row(0, "ptb", 10.0, 4.0, "upper", nll_var=0.25, mc_samples=8)])
    assert "± ?" in table and "eval.mc_samples >= 2" in table
    ptb = next(ln for ln in table.splitlines() if ln.startswith("ptb:"))
    assert "nll 2.5000 ± 0.1250 nats/token" in ptb
    assert f"ppl <= {math.exp(2.5):.3f} ± {math.exp(2.5) * 0.125:.3f}" in ptb
    exact = format_table([eval_row(0, "valid", 10.0, 4.0, "exact")])
    assert "±" not in exact and "ppl 12.182" in exact  # AR: exact, no bound mark, no spread
