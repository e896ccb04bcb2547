"""The Llama backbone under tensor parallelism (Megatron-core layers, 2 real gloo ranks) against the unsplit model:
grouped-query attention with whole key/value groups per rank, qkv biases, a tied embedding and head sharing one
vocabulary shard (bidirectional, MDLM objective), and GPT-2's layout (learned positions, LayerNorm, GELU, every
bias; causal, AR objective, KV-cache decoding)."""
import copy

import numpy as np
import pytest
import torch

from mdtrain.models import ModelConfig, build_model
from mdtrain.models.llama_config import LlamaConfig

V, L, B, MASK = 37, 16, 2, 36  # odd vocabulary: the last rank's vocab shard is zero-padded
MODELS = {
    "gqa-tied": (dict(attention="bidirectional", n_kv_heads=2, qkv_bias=True, tie_embeddings=True), "mdlm"),
    "gpt2-causal": (dict(attention="causal", positions="learned", max_positions=32, norm="layernorm",
                         mlp="gelu_tanh", qkv_bias=True, out_bias=True, mlp_bias=True), "ar"),
}


def _model(spec):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="llama", flavor="debug", dropout=0.0, llama=LlamaConfig(**spec)), V, L)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + i)) * 0.05)
    return model


def _objective(name):
    from mdtrain.objectives import ObjectiveConfig, build_objective
    return build_objective(ObjectiveConfig(name=name), V, MASK)


def _loss(model, objective):
    x0 = torch.randint(0, MASK, (B, L), generator=torch.Generator().manual_seed(7))
    noise = {k: torch.rand((B, *s), generator=torch.Generator().manual_seed(11), dtype=torch.float64)
             for k, s in objective.noise_spec(L).items()}
    return objective.loss(lambda x, c: model(x, c), x0, None, noise=noise)[0]


def _job(rank, world):
    from mdtrain.parallel.dist import init_distributed
    from mdtrain.parallel.tensor_parallel import apply_tensor_parallel, sampling_model_fn, tp_info
    from mdtrain.parallel.tensor_parallel_state import gather_full

    ctx = init_distributed("gloo", tp=world)
    out = {}
    for key, (spec, objective) in MODELS.items():
        model = _model(spec)
        ref = copy.deepcopy(model)
        ref_loss = _loss(ref, _objective(objective))
        ref_loss.backward()
        tp_objective = _objective(objective)
        apply_tensor_parallel(model, ctx, tp_objective)  # its reader reads this rank's vocabulary columns
        loss = _loss(model, tp_objective)
        loss.backward()
        info = tp_info(model)
        grads = gather_full({n: p.grad for n, p in model.named_parameters()}, info.layout, info.group)
        x = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(3))
        fn = sampling_model_fn(model)
        with torch.no_grad():
            logits, want = fn(x, None), ref(x)
        res = {"loss": (float(loss), float(ref_loss)), "logits": (logits, want),
               "grads": {n: (grads[n], p.grad) for n, p in ref.named_parameters()},
               "tied": model.head.weight is model.embed.weight, "local_width": model(x).shape[-1],
               "local_qkv": model.blocks[0].attn.qkv.weight.shape[0]}
        if spec["attention"] == "causal":
            with torch.no_grad():
                a, cache = fn.decode_step(x[:, :5], None)
                b, _ = fn.decode_step(x[:, 5:9], cache)
            res["decode"] = (torch.cat([a, b], 1), want[:, :9])
        out[key] = res
    return out


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


@pytest.fixture(scope="module")
def tp2():
    from mdtrain.testing import run_distributed
    return run_distributed(_job, 2, timeout=400)


@pytest.mark.parametrize("key", list(MODELS))
def test_tp2_llama_equals_the_single_process_model(tp2, key):
    for res in (r[key] for r in tp2):
        loss, ref = res["loss"]
        assert loss == pytest.approx(ref, rel=1e-5, abs=1e-6)
        assert _rel(*res["logits"]) < 1e-5
        for name, (got, want) in res["grads"].items():
            assert got.shape == want.shape and _rel(got, want) < 1e-5, name
        assert res["local_width"] == (19 if res is tp2[0][key] else 18)  # 37 = 19 + 18 vocab columns
        if "decode" in res:
            assert _rel(*res["decode"]) < 1e-5
    tied = MODELS[key][0].get("tie_embeddings", False)
    assert all(r[key]["tied"] == tied for r in tp2)
    if key == "gqa-tied":  # 2 kv groups of (2 queries + k + v) x head dim 16: one group per rank
        assert all(r[key]["local_qkv"] == 64 for r in tp2)
