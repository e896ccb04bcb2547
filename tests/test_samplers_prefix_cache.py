"""Fast-dLLM's approximate prefix KV cache on a real (small, random) DiT: the cached call computes what the full
forward computes while nothing has changed, is really used afterwards (the network then runs on the block and what
follows only, and its logits drift from the full forward's: the approximation), and keeps each sequence's cache
rows straight when sequences of a batch finish their blocks at different steps."""
import torch

from mdtrain.models import ModelConfig, build_model
from mdtrain.objectives import ObjectiveConfig, build_objective
from mdtrain.objectives.protocol import make_model_fn
from mdtrain.objectives.samplers import sample

V, L = 40, 24
MASK = V - 1
OBJ = build_objective(ObjectiveConfig(name="mdlm"), V, MASK)


def dit():
    model = build_model(ModelConfig(name="dit", flavor="debug", dropout=0.0), V, L).double().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random everywhere (adaLN/head start at zero), large enough that context matters
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 2.0 / p.shape[1] ** 0.5)
    return model


MODEL = dit()


def test_the_cached_tail_equals_the_full_forward_while_nothing_changed():
    x = torch.randint(0, V - 1, (3, L), generator=torch.Generator().manual_seed(1))
    x[:, 10:] = MASK
    cond = torch.zeros(3)
    with torch.no_grad():
        cache = MODEL.new_kv_cache()
        full = MODEL(x, cond, kv_cache=cache, store_kv=True)
        assert torch.allclose(full, MODEL(x, cond), atol=1e-6)
        tail = MODEL(x[:, 8:], cond, kv_cache=cache.truncate(8))
        assert torch.allclose(tail, full[:, 8:], atol=1e-6)
        # after the block changes, the cached prefix is stale: the logits move (the approximation)
        y = x.clone()
        y[:, 10:14] = 5
        drift = (MODEL(y[:, 8:], cond, kv_cache=cache) - MODEL(y, cond)[:, 8:]).abs().max()
        assert drift > 1e-4


def shapes_of(model_fn, seen):
    def fn(x, cond=None, **kw):
        seen.append((x.shape[1], "kv_cache" in kw))
        return model_fn(x, cond, **kw)
    fn.new_kv_cache, fn.device = model_fn.new_kv_cache, model_fn.device
    return fn


def test_prefix_cache_runs_the_tail_only_after_each_blocks_first_step():
    prompt = torch.tensor([3, 7, 1, 2] + [MASK] * (L - 4))
    seen = []
    x, info = sample(OBJ, shapes_of(make_model_fn(MODEL), seen), 1, L, 0, torch.Generator(), sampler="fast_dllm",
                     block_length=5, threshold=0.99, prefix=prompt, prefix_cache=True)
    assert (x != MASK).all() and torch.equal(x[0, :4], prompt[:4])
    starts = list(range(4, L, 5))
    full = [i for i, (n, _) in enumerate(seen) if n == L]
    assert len(full) == len(starts)  # one full-window call per block, the rest on the tail
    assert all(n == L - a for (n, _), a in zip(seen, _tail_starts(seen, starts)) if n != L)
    # one step per block never uses the stale cache: the same tokens as without it
    a, ia = sample(OBJ, make_model_fn(MODEL), 2, L, 4, torch.Generator(), sampler="llada", block_length=5,
                   prefix=prompt, prefix_cache=True)
    b, ib = sample(OBJ, make_model_fn(MODEL), 2, L, 4, torch.Generator(), sampler="llada", block_length=5,
                   prefix=prompt)
    assert torch.equal(a, b) and ia["nfe"] == ib["nfe"]


def _tail_starts(seen, starts):
    """The block start each call belongs to (calls after the k-th full call belong to block k)."""
    out, k = [], -1
    for n, _ in seen:
        if n == L:
            k += 1
        out.append(starts[k])
    return out


def test_prefix_cache_keeps_sequences_apart_in_a_batch():
    """Rows finish their blocks at different steps, so later calls run on a subset of the rows: the batch must
    give each row what it gives alone."""
    g = torch.Generator().manual_seed(2)
    given = torch.randint(0, V - 1, (4, L), generator=g)
    prompts = torch.full((4, L), MASK)
    prompts[:, :3] = given[:, :3]
    prompts[1, 10:17] = given[1, 10:17]  # row 1 has the whole second block [10, 17) given: no calls there
    batch, info = sample(OBJ, make_model_fn(MODEL), 4, L, 0, torch.Generator(), sampler="fast_dllm", block_length=7,
                         threshold=0.5, prefix=prompts, prefix_cache=True)
    per_row = info["nfe_per_sample"]
    assert per_row.unique().numel() > 1  # the rows did take different numbers of calls
    for i in range(4):
        alone, _ = sample(OBJ, make_model_fn(MODEL), 1, L, 0, torch.Generator(), sampler="fast_dllm", block_length=7,
                          threshold=0.5, prefix=prompts[i:i + 1], prefix_cache=True)
        assert torch.equal(alone[0], batch[i])


def test_prefix_cache_rows_follow_the_batch_rows():
    """At a block's first step only some rows need the network (rows [0, 2, 3]); a later call on row 2 alone must
    attend to row 2's cached prefix: the same logits as a cache built from row 2 by itself."""
    from mdtrain.objectives.samplers.common import Net, Stats
    from mdtrain.objectives.samplers.confidence import _PrefixCache

    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, V - 1, (4, L), generator=g)
    x[:, 12:] = MASK
    fn = make_model_fn(MODEL)
    cache = _PrefixCache(Net(OBJ, fn, Stats(4, torch.device("cpu"))), 8)
    rows = torch.tensor([0, 2, 3])
    cache(x[rows], 1.0, rows)  # the block's first step: full window, prefix kept
    later = x[2:3].clone()
    later[0, 12] = 7  # the block moved on
    got = cache(later, 1.0, torch.tensor([2]))
    with torch.no_grad():
        own = MODEL.new_kv_cache()
        MODEL(x[2:3], torch.zeros(1), kv_cache=own, store_kv=True)
        want = MODEL(later[:, 8:], torch.zeros(1), kv_cache=own.truncate(8))
    assert got.shape == (1, L - 8, V) and torch.allclose(got, want, atol=1e-12, rtol=0)
