"""The transformer's extended calling protocol that block diffusion needs (and SFT packing and prefix caching reuse):
general attention masks, explicit positions, per-token conditioning, the KV cache and its edits, flex attention
against SDPA, and the FLOP count of the 2L input. Every check compares with a plain forward or a direct formula."""
import pytest
import torch
import torch.nn.functional as F

from mdtrain.models import ModelConfig, build_model, flops_per_token
from mdtrain.models.attention import AttentionMask, attention, flex_attention_module
from mdtrain.objectives.bd3lm import block_causal_mask, block_diffusion_mask

V, L = 40, 24


def dit(name="dit", seed=0, attention="auto", double=False):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name=name, flavor="debug", dropout=0.0, attention=attention), V, L).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # adaLN and head start at zero: give them values so every input reaches the logits
        for n, p in model.named_parameters():
            if "adaLN" in n or n.startswith("head"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.double() if double else model


def tokens(b=2, length=L, seed=0):
    return torch.randint(0, V - 1, (b, length), generator=torch.Generator().manual_seed(seed))


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["dit", "causal"])
def test_a_full_mask_and_the_default_pattern_give_the_plain_forward(name):
    model, x = dit(name), tokens()
    default = torch.ones(L, L, dtype=torch.bool)
    if name == "causal":
        default = torch.tril(default)
    plain = model(x)
    close(model(x, None, default[None]), plain)
    close(model(x, None, default[None].expand(2, L, L)), plain)  # per-batch form
    close(model(x, None, None, positions=torch.arange(L)), plain)  # explicit positions = the default ones
    close(model(x, None, None, positions=torch.arange(L).expand(2, L)), plain)
    close(model(x, None, None, logits_for=slice(3, 9)), plain[:, 3:9])


def test_a_3d_padding_pattern_matches_the_padding_mask_at_real_tokens():
    model, x = dit(), tokens()
    pad = torch.ones(2, L, dtype=torch.bool)
    pad[1, 17:] = False
    full = (pad[:, None, :] & torch.ones(L, L, dtype=torch.bool))
    a, b = model(x, None, pad), model(x, None, full)
    close(a[pad], b[pad])


def test_packed_documents_with_reset_positions_equal_their_own_forwards():
    """The SFT use: two documents packed in one row, each attending only to itself, positions restarting at 0."""
    model = dit()
    d1, d2 = tokens(1, 10, seed=1), tokens(1, 14, seed=2)
    packed = torch.cat([d1, d2], 1)
    doc = torch.tensor([0] * 10 + [1] * 14)
    mask = (doc[:, None] == doc[None, :])[None]
    pos = torch.cat([torch.arange(10), torch.arange(14)])
    cond = torch.tensor([0.3])
    out = model(packed, cond, mask, positions=pos)
    close(out[:, :10], model(d1, cond), 2e-5)
    close(out[:, 10:], model(d2, cond), 2e-5)


def test_per_token_conditioning_reduces_to_per_sequence_and_reaches_each_token():
    model, x = dit(), tokens()
    c = torch.tensor([0.2, 1.7])
    close(model(x, c[:, None].expand(2, L).contiguous()), model(x, c))
    per_tok = c[:, None].repeat(1, L)
    per_tok[0, 5] = 3.0  # one token at another noise level
    out, ref = model(x, per_tok), model(x, c)
    assert (out[0, 5] - ref[0, 5]).abs().max() > 1e-3
    close(out[1], ref[1])


def test_block_causal_cache_equals_one_masked_forward():
    """Clean blocks appended one by one (each attending to the cache and to itself) give the logits of one forward
    under the block-causal mask; querying without store_kv leaves the cache as it was."""
    model, x, b = dit(double=True), tokens(), 4
    full = model(x, None, block_causal_mask(L, b)[None])
    cache, pieces = model.new_kv_cache(), []
    for k in range(L // b):
        blk = x[:, k * b:(k + 1) * b]
        peek = model(blk, None, kv_cache=cache)  # a denoising step's query: attends, stores nothing
        assert cache.length == k * b
        pieces.append(model(blk, None, kv_cache=cache, store_kv=True))
        close(peek, pieces[-1], 1e-12)
    assert cache.length == L and cache.pos == L
    close(torch.cat(pieces, 1), full, 1e-12)


def test_cache_edits_truncate_keep_last_index_select():
    model, x, b = dit(double=True), tokens(3), 4
    cache = model.new_kv_cache(capacity=4)  # small: the buffers grow and compact under the edits
    model(x[:, :12], None, block_causal_mask(12, b)[None], kv_cache=cache, store_kv=True)
    # roll back one block and append it again: the same keys as never having rolled back
    cache.truncate(8)
    assert cache.pos == 8
    again = model(x[:, 8:12], None, kv_cache=cache, store_kv=True)
    full = model(x[:, :12], None, block_causal_mask(12, b)[None])
    close(again, full[:, 8:12], 1e-12)
    # a sliding window: keep the last 2 blocks; the next block sees only those (positions stay absolute)
    cache.keep_last(8)
    assert cache.length == 8 and cache.pos == 12
    nxt = model(x[:, 12:16], None, kv_cache=cache)
    # a window of 3 blocks: block 3 sees blocks 1-3, blocks <= 2 still see everything before them
    ref = model(x[:, :16], None, block_causal_mask(16, b, window_blocks=3)[None])[:, 12:16]
    close(nxt, ref, 1e-12)
    # keep sequences 0 and 2 only
    sub = cache.index_select(torch.tensor([0, 2]))
    close(model(x[[0, 2], 12:16], None, kv_cache=sub), nxt[[0, 2]], 1e-12)


def test_causal_decode_step_still_matches_the_full_forward_through_the_new_cache():
    model, x = dit("causal", double=True), tokens()
    full, cache, pieces = model(x), None, []
    for a, e in ((0, 5), (5, 6), (6, 24)):
        logits, cache = model.decode_step(x[:, a:e], cache)
        pieces.append(logits)
    close(torch.cat(pieces, 1), full, 1e-12)


def test_bad_masks_positions_and_backbones_fail_with_a_clear_message():
    model, x = dit(), tokens()
    with pytest.raises(ValueError, match="attention mask must be"):
        model(x, None, torch.ones(2, L, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="padding mask must have shape"):
        model(x, None, torch.ones(2, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="positions must be"):
        model(x, None, positions=torch.arange(L + 1))
    with pytest.raises(ValueError, match="store_kv=True needs a kv_cache"):
        model(x, store_kv=True)
    mamba = build_model(ModelConfig(name="dimamba", flavor="debug", mamba_d_state=8), V, L)
    with pytest.raises(ValueError, match="general attention masks need model.name=dit"):
        mamba(x, None, torch.ones(1, L, L, dtype=torch.bool))


def _sdpa_reference(q, k, v, allowed):
    """Float64 softmax attention written out; a query with no key gives 0."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.double())


@pytest.mark.skipif(flex_attention_module() is None, reason="flex attention needs torch >= 2.5")
def test_flex_attention_agrees_with_sdpa_and_a_float64_reference_on_cpu():
    """flex attention runs on CPU in torch 2.13 (eager; compiled on GPU): every kernel computes the same function,
    including the block-diffusion mask, per-batch masks and queries that see no key."""
    g = torch.Generator().manual_seed(0)
    B, Lq, H, D = 2, 48, 4, 16
    q, k, v = (torch.randn(B, Lq, H, D, generator=g) for _ in range(3))
    masks = [block_diffusion_mask(Lq // 2, 4)[None], torch.rand(B, Lq, Lq, generator=g) < 0.3]
    masks[1][0, 7] = False  # an empty row
    for allowed in masks:
        ref = _sdpa_reference(q, k, v, allowed.expand(B, Lq, Lq)).float()
        m = AttentionMask(allowed)
        close(attention(q, k, v, mask=m, backend="sdpa"), ref, 2e-5)
        close(attention(q, k, v, mask=m, backend="flex"), ref, 2e-5)
    # the unmasked and padded paths through flex too
    pad = torch.ones(B, Lq, dtype=torch.bool)
    pad[1, 30:] = False
    for causal in (False, True):
        a = attention(q, k, v, causal=causal, key_padding_mask=pad, backend="flex")
        s = attention(q, k, v, causal=causal, key_padding_mask=pad, backend="sdpa")
        close(a[pad], s[pad], 2e-5)
    # whole model, bd3lm's 2L input: model.attention=flex against sdpa
    x = tokens(2, 2 * 12)
    mask, pos = block_diffusion_mask(12, 4)[None], torch.arange(12).repeat(2)
    with torch.no_grad():  # torch has no flex backward on CPU (training there falls back to SDPA)
        close(dit(attention="flex")(x, None, mask, positions=pos), dit(attention="sdpa")(x, None, mask, positions=pos),
              2e-5)


def test_flops_count_the_2l_input_and_the_block_sparse_attention():
    cfg = ModelConfig(name="dit", flavor="debug")
    base, bd = flops_per_token(cfg, V, 64), flops_per_token(cfg, V, 64, block_size=4)
    model = build_model(cfg, V, 64)
    d, n_layers = model.dims.d_model, model.dims.n_layers
    head = 2 * model.head.in_features * model.head.out_features
    attn_full, attn_bd = 2 * 2 * 64 * d * n_layers, 2 * 2 * (64 + 4) * d * n_layers
    # everything but the head and attention runs twice; attention sees L + b keys per (x_t, x_0) query pair
    body = base["exact"] / 3 - head - attn_full
    assert bd["exact"] == pytest.approx(3 * (2 * body + head + attn_bd), rel=1e-12)
    assert bd["n_params"] == base["n_params"]
