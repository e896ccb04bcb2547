"""BD3-LM's objective and sampler against independent references, in float64: the training mask against the
paper's three-part rule written out pair by pair; block size L against the MDLM objective and block size 1 against
the AR likelihood of the same network computed prefix by prefix; the clipped schedule and its exact resampling
against the truncated binomial; block-by-block sampling with the KV cache against a cache-free reference written
here."""
import math

import pytest
import torch

from mdtrain.configtools import ConfigError
from mdtrain.models import ModelConfig, build_model
from mdtrain.objectives import ObjectiveConfig, build_objective
from mdtrain.objectives.bd3lm import block_diffusion_mask, truncated_binomial
from mdtrain.objectives.samplers import sample

V = 30
MASK = V - 1


def dit(length, seed=0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="dit", flavor="debug", dropout=0.0), V, length).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adaLN" in n or n.startswith("head"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def model_fn_of(model, default_mask=None, cache=True):
    """The trainer's model_fn protocol: a padding mask bound to the batch unless the call passes its own."""
    def fn(x, cond=None, attention_mask=None, **kw):
        m = attention_mask if attention_mask is not None else default_mask
        return model(x, cond, m, **kw)
    if cache:
        fn.new_kv_cache = model.new_kv_cache
    return fn


def bd3lm(**kw):
    return build_objective(ObjectiveConfig(name="bd3lm", **kw), V, MASK)


def data(b, length, seed=0):
    return torch.randint(0, V - 1, (b, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------ the mask


@pytest.mark.parametrize("length,block", [(8, 2), (12, 4), (6, 1), (8, 8)])
def test_training_mask_is_the_papers_three_part_mask(length, block):
    got = block_diffusion_mask(length, block)
    for q in range(2 * length):
        for k in range(2 * length):
            qx0, kx0 = q >= length, k >= length
            bq, bk = (q - length * qx0) // block, (k - length * kx0) // block
            diagonal = bq == bk and qx0 == kx0                # a block sees itself, in its own half
            offset_causal = (not qx0) and kx0 and bk < bq    # noisy block k sees the clean blocks before it
            block_causal = qx0 and kx0 and bk <= bq          # clean blocks see clean blocks up to their own
            assert bool(got[q, k]) == (diagonal or offset_causal or block_causal), (q, k)


# ------------------------------------------------------------------------------------------------ the identities


def test_block_size_L_is_the_mdlm_objective_on_the_same_network_and_noise():
    B, L = 3, 16
    model, x0 = dit(L), data(B, L)
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[2, 11:] = False  # a padded row: the 2L mask hides its pads in both halves
    g = torch.Generator().manual_seed(1)
    u_t, u_mask = torch.rand(B, dtype=torch.float64, generator=g), torch.rand(B, L, dtype=torch.float64, generator=g)
    mdlm = build_objective(ObjectiveConfig(name="mdlm"), V, MASK)
    ours = bd3lm(block_size=L, ignore_bos=False)
    with torch.no_grad():
        _, m_ref = mdlm.loss(model_fn_of(model, pad), x0, pad, noise={"t": u_t, "mask": u_mask})
        _, m_bd = ours.loss(model_fn_of(model, pad), x0, pad, noise={"t": u_t[:, None], "mask": u_mask})
        # and per token through nelbo(): the logits of the 2L pass at the noisy half, MDLM's at z_t
        t = mdlm.sample_time(u_t)
        xt = mdlm.corrupt(x0, t, u_mask)
        ref_tok = mdlm.nelbo(model(xt, None, pad), x0, xt, t, pad)
        x_in, cond, mask, pos = ours.model_inputs(xt, x0, pad, t[:, None])
        bd_tok = ours.nelbo(model(x_in, cond, mask, positions=pos)[:, :L], x0, xt, t[:, None], pad)
    assert m_bd["tokens"] == m_ref["tokens"] == pad.sum()
    assert m_bd["masked_tokens"] == m_ref["masked_tokens"] > 0
    torch.testing.assert_close(m_bd["nll_sum"], m_ref["nll_sum"], rtol=1e-12, atol=0)
    torch.testing.assert_close(bd_tok, ref_tok, rtol=1e-12, atol=1e-12)


def test_block_size_1_is_the_ar_likelihood_of_the_same_network():
    """Block size 1, first token as context: the NELBO (evaluation: t = 1, everything masked, weight 1) is
    Σ_i −log p_θ(x_i | x_<i), each token predicted at its own masked position after the clean prefix (the shift
    the paper uses). Reference: one forward per prefix [x_0 .. x_{i-1}, MASK] under a causal mask."""
    B, L = 2, 12
    model, x0 = dit(L), data(B, L, seed=3)
    ours = bd3lm(block_size=1)
    with torch.no_grad():
        _, m = ours.loss(model_fn_of(model), x0, generator=torch.Generator().manual_seed(0))
        ref = torch.zeros((), dtype=torch.float64)
        for i in range(1, L):
            inp = torch.cat([x0[:, :i], torch.full((B, 1), MASK)], 1)
            causal = torch.tril(torch.ones(i + 1, i + 1, dtype=torch.bool))[None]
            logits = model(inp, torch.zeros(B), causal)[:, -1, :MASK]  # the mask class has no mass
            ref -= torch.log_softmax(logits, -1).gather(1, x0[:, i:i + 1]).sum()
    assert m["tokens"] == B * (L - 1) == m["masked_tokens"]  # the first token is context, as for AR
    torch.testing.assert_close(m["nll_sum"], ref, rtol=1e-12, atol=0)


def test_training_noise_is_per_block_and_stratified_over_the_batch():
    obj = bd3lm(block_size=4)
    B, L = 8, 16
    g = torch.Generator().manual_seed(0)
    u = (torch.rand(B, 4, dtype=torch.float64, generator=g) + torch.arange(B, dtype=torch.float64)[:, None]) / B
    t = obj.block_times(u)  # training mode, gradients on: t = eps + (1 - eps) u', u' rotated per block
    assert t.shape == (B, 4) and bool((t >= 1e-3).all() and (t < 1).all())
    for j in range(4):  # each block position is stratified over the batch: one sample per stratum
        strata = torch.floor(torch.remainder((t[:, j] - 1e-3) / (1 - 1e-3) - j / 4, 1.0) * B)
        assert sorted(strata.tolist()) == list(range(B))
    xt = obj.corrupt_blocks(data(B, L), t, {"mask": torch.rand(B, L, dtype=torch.float64, generator=g)})
    frac = (xt == MASK).view(B, 4, 4).float().mean(-1)
    assert (frac[t < 0.05] <= 0.25).all() and (frac[t > 0.95] >= 0.75).all()  # each block at its own level


def test_clipped_schedule_trains_inside_the_clip_and_evaluates_on_the_full_interval():
    obj = bd3lm(block_size=4, clip=[0.45, 0.95])
    u = torch.linspace(0, 0.999, 40, dtype=torch.float64).view(10, 4)
    t = obj.block_times(u)
    assert t.min() >= 0.45 and t.max() <= 0.95
    with torch.no_grad():  # evaluation draws a NELBO, never the clipped surrogate
        t_eval = obj.block_times(u)
    assert t_eval.min() < 0.1 and t_eval.max() > 0.95
    obj.eval()
    assert obj.block_times(u).min() < 0.1


def test_resampling_draws_the_truncated_binomial_and_keeps_counts_inside_the_clip():
    g = torch.Generator().manual_seed(0)
    n, p, lo, hi = 8, 0.6, 3, 6
    draws = truncated_binomial(n, torch.full((200000,), p, dtype=torch.float64), lo, hi,
                               torch.rand(200000, dtype=torch.float64, generator=g))
    pmf = torch.tensor([math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)], dtype=torch.float64)
    pmf[:lo], pmf[hi + 1:] = 0, 0
    pmf /= pmf.sum()  # what rejection sampling until lo <= k <= hi gives
    freq = torch.bincount(draws, minlength=n + 1).double() / draws.numel()
    torch.testing.assert_close(freq, pmf, rtol=0, atol=4e-3)
    # through the objective: every block's masked count inside [ceil(beta b), floor(omega b)]
    obj = bd3lm(block_size=4, clip=[0.45, 0.95], resample=True, ignore_bos=False)
    B, L = 64, 16
    noise = {k: torch.rand(B, *s, dtype=torch.float64, generator=g) for k, s in obj.noise_spec(L).items()}
    xt = obj.corrupt_blocks(data(B, L), obj.block_times(noise["t"]), noise)
    counts = (xt == MASK).view(B, 4, 4).sum(-1)
    assert counts.min() >= 2 and counts.max() <= 3


def test_time_conditioning_gives_each_noisy_block_its_level_and_clean_tokens_zero():
    obj = bd3lm(block_size=4, time_conditioning=True)
    seen = {}

    def fn(x, cond=None, attention_mask=None, **kw):
        seen["cond"] = cond
        return torch.zeros(x.shape[0], kw["logits_for"].stop, V, dtype=torch.float64)
    t = torch.tensor([[0.2, 0.5, 0.9]], dtype=torch.float64)
    x_in, cond, mask, pos = obj.model_inputs(data(1, 12), data(1, 12), None, t)
    sigma = obj.schedule.sigma(t).float().repeat_interleave(4, 1)
    torch.testing.assert_close(cond, torch.cat([sigma, torch.zeros(1, 12)], 1))
    assert pos.tolist() == list(range(12)) * 2 and mask.shape == (1, 24, 24)
    obj.loss(fn, data(2, 12), generator=torch.Generator().manual_seed(0))
    assert seen["cond"].shape == (2, 24)


def test_config_errors_name_the_key():
    for kw, msg in [({"name": "bd3lm"}, "block_size >= 1"),
                    ({"name": "mdlm", "block_size": 4}, "belong to objective.name=bd3lm"),
                    ({"name": "bd3lm", "block_size": 4, "clip": [0.9, 0.2]}, "0 < beta <= omega <= 1"),
                    ({"name": "bd3lm", "block_size": 4, "resample": True}, "set clip"),
                    ({"name": "bd3lm", "block_size": 4, "clip": [0.3, 0.45], "resample": True}, "admits no masked"),
                    ({"name": "bd3lm", "block_size": 4, "clip": [0.3, 0.8], "T": 1000}, "objective.T=0")]:
        with pytest.raises(ConfigError, match=msg):
            ObjectiveConfig(**kw).validate()
    with pytest.raises(ValueError, match="must divide the sequence length 10"):
        bd3lm(block_size=4).noise_spec(10)


# ------------------------------------------------------------------------------------------------------ sampling


def _reference_sample(obj, model, template, seq_len, steps, gen, top_p, eos):
    """The same procedure without a KV cache, written from scratch: every network call sees the whole history
    under the banded block-causal mask (a block attends to the seq_len/b - 1 blocks before it and to itself)."""
    b, W = obj.block_size, seq_len // obj.block_size
    B, N = template.shape
    x = torch.full((B, -(-N // b) * b), MASK)  # whole blocks, cut to N at the end
    x[:, :N] = template
    free = x == MASK
    active = list(range(B))
    lengths = [N] * B
    times = torch.linspace(1.0, 1e-5, steps + 1, dtype=torch.float64)
    mp = obj.schedule.mask_prob

    def net(rows, k, blk):
        inp = torch.cat([x[rows, :k * b], blk], 1)
        n = inp.shape[1]
        allowed = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            for j in range(n):
                allowed[i, j] = 0 <= i // b - j // b < W
        return model(inp, torch.zeros(len(rows)), allowed[None], positions=torch.arange(n))[:, k * b:]

    def draw(w):  # Gumbel-max in float64 from the shared generator, after nucleus filtering
        if top_p < 1:
            p = torch.softmax(w, -1)
            sp, order = torch.sort(p, -1, descending=True)
            drop = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, order, torch.cumsum(sp, -1) - sp >= top_p)
            w = w.masked_fill(drop, -math.inf)
        u = torch.rand(w.shape, generator=gen, dtype=torch.float64)
        return (w - torch.log(-torch.log(u))).argmax(-1)

    for k in range(-(-N // b)):
        rows = torch.tensor(active)
        blk = x[rows, k * b:(k + 1) * b].clone()
        logits = None
        for i in range(steps):
            t, s = float(times[i]), float(times[i + 1])
            if not (blk == MASK).any():
                break
            if logits is None:
                logits = net(rows, k, blk)
            bi, li = (blk == MASK).nonzero(as_tuple=True)
            go = torch.rand(bi.numel(), generator=gen, dtype=torch.float64) < (mp(t) - mp(s)) / mp(t)
            if go.any():
                w = logits[bi[go], li[go]].clone()
                w[:, MASK] = -math.inf
                blk[bi[go], li[go]] = draw(torch.log_softmax(w, -1))
                logits = None
        if (blk == MASK).any():
            logits = net(rows, k, blk) if logits is None else logits
            bi, li = (blk == MASK).nonzero(as_tuple=True)
            w = logits[bi, li].clone()
            w[:, MASK] = -math.inf
            blk[bi, li] = w.argmax(-1)
        x[rows, k * b:(k + 1) * b] = blk
        for r in list(active):
            gen_eos = [c for c in range(k * b, (k + 1) * b) if free[r, c] and x[r, c] == eos]
            if gen_eos:
                lengths[r] = min(gen_eos[0] + 1, N)
                x[r, lengths[r]:] = eos
                active.remove(r)
        if not active:
            break
    return x[:, :N], lengths


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_kv_cache_sampling_equals_a_cache_free_reference_past_the_model_length(top_p):
    L, b, B = 8, 2, 3
    obj = bd3lm(block_size=b)
    template = torch.full((B, 21), MASK)  # 21 > L: the context slides; 21 is not a multiple of b
    template[:, 0] = 0
    template[0, 1:4] = torch.tensor([5, 6, 7])  # one row with a prefix that ends inside a block

    def cases():  # random models and EOS ids, in a fixed order
        for seed in range(4, 40):
            model = dit(L, seed=seed)
            for eos in range(1, V - 1):
                yield model, eos

    # the first (model, EOS id) with which some rows end early (leaving the batch and the cache) and one runs to
    # the end, found with the reference itself (which ids qualify depends on the random model's weights)
    for model, eos in cases():
        ref, ref_len = _reference_sample(obj, model, template, L, 5, torch.Generator().manual_seed(11), top_p, eos)
        if min(ref_len) < 21 == max(ref_len):
            break
    assert min(ref_len) < 21 == max(ref_len)
    runs = {}
    for cache in (True, False):
        gen = torch.Generator().manual_seed(11)
        fn = model_fn_of(model, cache=cache)
        tok, info = sample(obj, fn, B, L, 5, gen, sampler="ddpm_cache", top_p=top_p, prefix=template,
                           num_strides=13, stride_length=1, eos_id=eos)
        assert info["kv_cache"] is cache
        runs[cache] = (tok, info)
        assert torch.equal(tok, ref) and info["lengths"].tolist() == ref_len
    assert runs[True][1]["nfe"] == runs[False][1]["nfe"]
    tok = runs[True][0]
    assert tok[0, 1:4].tolist() == [5, 6, 7] and (tok != MASK).all()


def test_sampling_stops_at_eos_and_needs_a_first_token():
    L, b = 8, 4
    model, obj = dit(L, seed=5), bd3lm(block_size=b)
    with pytest.raises(ValueError, match="first token as context"):
        sample(obj, model_fn_of(model), 2, L, 4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="ddpm or ddpm_cache"):
        sample(obj, model_fn_of(model), 2, L, 4, torch.Generator().manual_seed(0), sampler="analytic", bos_id=0)
    # an EOS-loving network: make the EOS logit dominant, every sequence ends in its first block
    with torch.no_grad():
        model.head.bias[7] += 50.0
    tok, info = sample(obj, model_fn_of(model), 2, L, 4, torch.Generator().manual_seed(0), bos_id=0, eos_id=7,
                       num_strides=4, stride_length=4)
    assert tok.shape == (2, 24) and (info["lengths"] <= 4).all()
    for row, n in zip(tok, info["lengths"].tolist()):
        assert row[n - 1] == 7 and (row[n:] == 7).all() and (row[1:n - 1] != 7).all()
