"""Backbones (DiT, causal transformer, bidirectional Mamba): shapes, precision, causality, KV cache, the Mamba scan
against a naive recurrence, zero-init, padding, tensor-parallel friendliness, flavors' sizes and FLOP counts,
and a few training steps each."""
import copy
import math
import os
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdtrain.configtools import ConfigError
from mdtrain.models import FLAVORS, ModelConfig, attention, build_model, count_params, flops_per_token, get_flavor
from mdtrain.models.flavors import resolve
from mdtrain.models.mamba import ssd_kernel, ssd_scan, ssd_scan_torch

BACKBONES = ["dit", "causal", "dimamba"]
VARIANTS = ["mdlm", "md4"]
V, L = 40, 24  # vocabulary (mask token = V - 1 included) and length of the small tests


def small_cfg(name, variant="mdlm", **kw):
    return ModelConfig(name=name, variant=variant, flavor="debug", dropout=kw.pop("dropout", 0.0),
                       mamba_d_state=kw.pop("mamba_d_state", 8), **kw)


def randomize(model, std=0.3, seed=0):
    """Give the zero-initialised pieces (adaLN, head) random values so every input can reach the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or name.startswith("head"):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tokens(b=2, length=L, seed=0):
    return torch.randint(0, V - 1, (b, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", BACKBONES)
def test_forward_shapes_and_fp32_logits(name, variant):
    torch.manual_seed(0)
    model = build_model(small_cfg(name, variant), V, L)
    x = tokens(3)
    for cond in (None, torch.rand(3), torch.tensor(0.5)):
        out = model(x, cond)
        assert out.shape == (3, L, V) and out.dtype == torch.float32
    # the blocks the trainer wraps from outside, and the layers tensor parallelism swaps, are where promised
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == FLAVORS["debug"].n_layers
    assert isinstance(model.embed, nn.Embedding) and isinstance(model.head, nn.Linear)
    blk = model.blocks[0]
    if name == "dimamba":
        assert isinstance(blk.mixer.in_proj, nn.Linear) and isinstance(blk.mixer.out_proj, nn.Linear)
    else:
        for layer in (blk.attn.qkv, blk.attn.out, blk.mlp.fc1, blk.mlp.fc2):
            assert type(layer) is nn.Linear
        assert (blk.mlp.gate is not None) == (variant == "md4")
    assert (getattr(blk, "adaLN_modulation", None) is None) == (name == "causal")


@pytest.mark.parametrize("name", BACKBONES)
def test_bf16_autocast_gives_fp32_logits_close_to_fp32(name):
    torch.manual_seed(0)
    model = randomize(build_model(small_cfg(name), V, 16).eval(), std=0.05)
    x = tokens(2, 16)
    ref = model(x, torch.rand(2, generator=torch.Generator().manual_seed(1)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.rand(2, generator=torch.Generator().manual_seed(1)))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


@pytest.mark.parametrize("name", BACKBONES)
def test_zero_init_gives_uniform_distribution_over_non_mask_tokens(name):
    torch.manual_seed(0)
    model = build_model(small_cfg(name), V, L)
    logits = model(tokens(2), torch.rand(2))
    probs = torch.softmax(logits[..., : V - 1], dim=-1)  # the objective removes the mask token's logit
    torch.testing.assert_close(probs, torch.full_like(probs, 1.0 / (V - 1)), rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", BACKBONES)
def test_meta_device_build_then_init_weights(name):
    with torch.device("meta"):
        model = build_model(small_cfg(name), V, L)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.head.weight.abs().sum() == 0
    assert model(tokens(2), torch.rand(2)).shape == (2, L, V)


def test_time_conditioning_reaches_the_logits():
    model = randomize(build_model(small_cfg("dit"), V, L).eval())
    x = tokens(2)
    assert not torch.allclose(model(x, torch.zeros(2)), model(x, torch.full((2,), 3.0)))
    torch.testing.assert_close(model(x, None), model(x, torch.zeros(2)))  # None means zeros


# ------------------------------------------------------------------------------------------------- causality


@pytest.mark.parametrize("name", BACKBONES)
def test_causal_model_is_causal_and_bidirectional_ones_are_not(name):
    torch.manual_seed(0)
    model = randomize(build_model(small_cfg(name), V, L).eval())
    x = tokens(2)
    cond = torch.rand(2)
    j = 11
    y = x.clone()
    y[:, j] = (y[:, j] + 1) % (V - 1)
    a, b = model(x, cond), model(y, cond)
    before = (a[:, :j] - b[:, :j]).abs().max().item()
    after = (a[:, j:] - b[:, j:]).abs().max().item()
    assert after > 1e-4  # the changed token matters at and after its own position
    if name == "causal":
        assert before == 0.0
    else:
        assert before > 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_decoding_equals_full_forward(variant):
    torch.manual_seed(0)
    model = randomize(build_model(small_cfg("causal", variant), V, 8).eval())  # cache grows past seq_len
    x = tokens(3, L)
    full = model(x)
    pieces, cache, pos = [], None, 0
    for k in (1, 4, 1, 7, 2, 9):  # single tokens and blocks of tokens
        logits, cache = model.decode_step(x[:, pos:pos + k], cache)
        assert logits.shape == (3, k, V) and logits.dtype == torch.float32
        pieces.append(logits)
        pos += k
    assert pos == L and cache.pos == L
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-5)


def test_decode_step_is_only_for_the_causal_model():
    with pytest.raises(RuntimeError, match="causal"):
        build_model(small_cfg("dit"), V, L).decode_step(tokens(1, 2))


# ------------------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", BACKBONES)
def test_padding_is_invisible_to_real_tokens(name, side):
    """A padded batch gives, at its real tokens, the logits of the unpadded sequence (RoPE is relative, the
    Mamba scan passes pads through unchanged)."""
    torch.manual_seed(0)
    model = randomize(build_model(small_cfg(name), V, L).eval())
    n_real, n_pad = 15, 9
    real = tokens(1, n_real)
    pads = torch.full((1, n_pad), 3)
    x = torch.cat([real, pads], 1) if side == "right" else torch.cat([pads, real], 1)
    mask = torch.zeros(1, n_real + n_pad, dtype=torch.bool)
    if side == "right":
        mask[:, :n_real] = True
    else:
        mask[:, n_pad:] = True
    cond = torch.tensor([0.3])
    ref = model(real, cond)
    out = model(x, cond, attention_mask=mask)
    torch.testing.assert_close(out[mask].view(1, n_real, V), ref, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(out).all()
    if not (name == "causal" and side == "right"):  # there, the pads come after every real token anyway
        assert not torch.allclose(model(x, cond)[mask].view(1, n_real, V), ref, atol=1e-4)  # the mask mattered


def test_attention_matches_a_float64_softmax_reference():
    g = torch.Generator().manual_seed(0)
    b, h, d = 2, 3, 8
    for lq, lk, causal, padded in [(7, 7, False, True), (7, 7, True, False), (7, 7, True, True), (3, 10, True, False),
                                   (1, 10, True, False)]:
        q, k, v = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64) for n in (lq, lk, lk))
        mask = torch.ones(b, lk, dtype=torch.bool)
        if padded:
            mask[0, 5:] = False
        out = attention(q, k, v, causal=causal, key_padding_mask=mask if padded else None)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        allowed = mask[:, None, None, :].expand(b, 1, lq, lk).clone()
        if causal:
            allowed &= torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
        ref = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~allowed, -math.inf).softmax(-1), v)
        rows = torch.ones(b, lq, dtype=torch.bool)
        if padded:
            rows = mask.clone()  # outputs at padded queries are unspecified
        torch.testing.assert_close(out[rows], ref[rows])


# ------------------------------------------------------------------------------------------------- Mamba scan


def naive_scan(x, dt, A, B, C):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t, one step at a time (B, C per group)."""
    b, length, h, p = x.shape
    rep = h // B.shape[2]
    state = torch.zeros(b, h, p, B.shape[-1], dtype=x.dtype)
    ys = []
    for t in range(length):
        bt, ct = B[:, t].repeat_interleave(rep, 1), C[:, t].repeat_interleave(rep, 1)  # (b, h, n)
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * bt[:, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, ct))
    return torch.stack(ys, 1)


@pytest.mark.parametrize("length,chunk,groups", [(1, 16, 1), (16, 16, 1), (37, 8, 1), (150, 16, 3), (64, 64, 1)])
def test_mamba_scan_fallback_equals_naive_recurrence_float64(length, chunk, groups):
    g = torch.Generator().manual_seed(length)
    b, h, p, n = 2, 3, 4, 5
    x = torch.randn(b, length, h, p, generator=g, dtype=torch.float64)
    dt = torch.rand(b, length, h, generator=g, dtype=torch.float64) * 0.5
    dt[0, length // 2:] = 0.0  # padded steps: the state must pass through unchanged
    A = -torch.rand(h, generator=g, dtype=torch.float64) * 3
    B = torch.randn(b, length, groups, n, generator=g, dtype=torch.float64)
    C = torch.randn(b, length, groups, n, generator=g, dtype=torch.float64)
    ref = naive_scan(x, dt, A, B, C)
    out = ssd_scan_torch(x, dt, A, B, C, chunk=chunk)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ssd_scan(x, dt, A, B, C, backend="auto"), ssd_scan_torch(x, dt, A, B, C))


def test_mamba_kernel_matches_fallback_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the Triton SSD kernel of mamba-ssm runs only there)")
    if ssd_kernel() is None:
        pytest.skip("mamba_ssm.ops.triton.ssd_combined does not import (install the [gpu] extra)")
    g = torch.Generator(device="cuda").manual_seed(0)
    b, length, h, p, n = 2, 1000, 8, 64, 64
    x = torch.randn(b, length, h, p, device="cuda", generator=g)
    dt = torch.rand(b, length, h, device="cuda", generator=g) * 0.1
    A = -torch.rand(h, device="cuda", generator=g) * 4
    B, C = (torch.randn(b, length, 1, n, device="cuda", generator=g) for _ in range(2))

    def rel_err(a, b):  # the kernel's matmuls may run in TF32: compare relative to the output's scale
        return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

    kernel = ssd_scan(x, dt, A, B, C, backend="triton")
    fallback = ssd_scan(x, dt, A, B, C, backend="torch")
    assert kernel.shape == fallback.shape and rel_err(kernel, fallback) < 1e-2
    # and a whole DiMamba forward (conv, gating, both directions) on either path
    cfg = small_cfg("dimamba", mamba_backend="triton", mamba_d_state=16)
    model = randomize(build_model(cfg, V, 256).cuda().eval())
    xt, cond = tokens(2, 256).cuda(), torch.rand(2, device="cuda")
    fast = model(xt, cond)
    for blk in model.blocks:
        blk.mixer.backend = "torch"
    assert rel_err(fast, model(xt, cond)) < 1e-2


def test_flash_attention_matches_sdpa_on_gpu():
    from mdtrain.models.attention import flash_attn_module
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (flash-attn runs only there)")
    if flash_attn_module() is None:
        pytest.skip("flash-attn does not import (install the [gpu] extra)")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 128, 4, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.ones(2, 128, dtype=torch.bool, device="cuda")
    mask[1, 100:] = False
    for causal in (False, True):
        fa = attention(q, k, v, causal=causal, key_padding_mask=mask, backend="flash")
        sd = attention(q, k, v, causal=causal, key_padding_mask=mask, backend="sdpa")
        torch.testing.assert_close(fa[mask], sd[mask], rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------------- tensor parallel


def test_attention_works_with_a_column_split_qkv_and_row_split_out():
    """What Megatron's Column/RowParallelLinear do to ``attn.qkv`` / ``attn.out``: each rank keeps whole heads
    and the partial outputs sum to the full one."""
    torch.manual_seed(0)
    model = randomize(build_model(small_cfg("dit"), V, L).eval())
    attn = model.blocks[0].attn
    d = attn.out.out_features
    rope = model.block_context(L, torch.device("cpu"))
    h = torch.randn(2, L, d)
    full = attn(h, rope)
    total = torch.zeros_like(full)
    for rank in range(2):
        part = copy.deepcopy(attn)
        rows = slice(rank * 3 * d // 2, (rank + 1) * 3 * d // 2)
        part.qkv = nn.Linear(d, 3 * d // 2, bias=False)
        part.qkv.weight.data = attn.qkv.weight.data[rows].clone()
        part.out = nn.Linear(d // 2, d, bias=False)
        part.out.weight.data = attn.out.weight.data[:, rank * d // 2:(rank + 1) * d // 2].clone()
        total += part(h, rope)
    torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-5)


def test_models_import_no_distributed_code():
    root = os.path.join(os.path.dirname(__file__), "..", "mdtrain", "models")
    pattern = re.compile(r"^\s*(import|from)\s+(torch\.distributed|deepspeed|megatron)", re.M)
    for fname in os.listdir(root):
        if fname.endswith(".py"):
            with open(os.path.join(root, fname)) as fh:
                assert not pattern.search(fh.read()), fname


# ------------------------------------------------------------------------------------------------- sizes


def expected_params(name, variant, vocab, n_layers, d, heads, cond, d_state=64):
    """Parameter count from the layer shapes of MDLM's DiT / AR model, MD4's transformer (and our DiMamba)."""
    md4 = variant == "md4"
    hidden = 32 * math.ceil(8 * d / 3 / 32) if md4 else 4 * d
    conditioned = name != "causal"
    norm = 0 if md4 else d
    if name == "dimamba":
        di, nh = 2 * d, 2 * d // (d // heads)
        conv = (di + 2 * d_state) * 4 + (di + 2 * d_state)
        direction = conv + 3 * nh + di
        block = norm + d * (2 * di + 2 * d_state + nh) + 2 * direction + di * d + (cond * 3 * d + 3 * d)
    else:
        attn = 3 * d * d + d * d
        mlp = 3 * d * hidden if md4 else (d * hidden + hidden) + (hidden * d + d)
        block = 2 * norm + attn + mlp + ((cond * 6 * d + 6 * d) if conditioned else 0)
    if not conditioned:
        temb = 0
    elif md4:
        temb = (cond * 4 * cond + 4 * cond) + (4 * cond * cond + cond)
    else:
        temb = (256 * cond + cond) + (cond * cond + cond)
    final = norm + ((cond * 2 * d + 2 * d) if conditioned else 0) + d * vocab + (0 if md4 else vocab)
    return vocab * d + temb + n_layers * block + final


@pytest.mark.parametrize("name,variant,flavor,vocab,paper_millions", [
    ("dit", "mdlm", "small", 50258, 169.6),    # MDLM small, counted from its shapes
    ("dit", "mdlm", "small", 30522, 139.3),
    ("dit", "mdlm", "tiny", 50258, 80.1),
    ("dit", "mdlm", "medium", 50258, 424.5),
    ("causal", "mdlm", "small", 50258, 162.2),
    ("causal", "mdlm", "small", 30522, 131.9),
    ("dit", "md4", "small", 50258, 165.9),     # MD4-S (V = 50257 + mask), counted from its shapes
    ("dit", "md4", "medium", 50258, 416.2),    # MD4-M
    ("dimamba", "mdlm", "tiny", 50258, None),
    ("dit", "mdlm", "large", 50258, None),
])
def test_flavor_parameter_counts(name, variant, flavor, vocab, paper_millions):
    f = get_flavor(flavor)
    cond = f.d_model // f.n_heads if variant == "md4" else f.cond_dim
    want = expected_params(name, variant, vocab, f.n_layers, f.d_model, f.n_heads, cond)
    got = count_params(ModelConfig(name=name, variant=variant, flavor=flavor), vocab)
    assert got["total"] == want
    assert got["non_embedding"] == want - vocab * f.d_model - f.d_model * vocab - (0 if variant == "md4" else vocab)
    if paper_millions is not None:
        assert round(got["total"] / 1e6, 1) == paper_millions


def test_small_block_and_embedding_split_matches_mdlm():
    c = count_params(ModelConfig(name="dit", flavor="small"), 50258)
    blocks = c["non_embedding"] - c["conditioning"] + 12 * (128 * 6 * 768 + 6 * 768) - 768  # adaLN in, final norm out
    assert round(blocks / 1e6, 1) == 92.1 and round(c["embedding"] / 1e6, 1) == 38.6  # MDLM small, counted from its shapes
    # the reference's "38.8M output head" is the rest: head, final norm + adaLN and the time MLP (38.90M)
    assert abs((c["total"] - blocks - c["embedding"]) / 1e6 - 38.85) < 0.06


def test_every_flavor_resolves_and_ladder_names_are_their_sizes():
    for name in FLAVORS:
        dims = resolve(ModelConfig(flavor=name))
        assert dims.d_model % dims.n_heads == 0
    ladder = [n for n in FLAVORS if n.startswith("ladder-")]
    assert len(ladder) >= 12
    sizes = []
    for name in ladder:
        n = count_params(ModelConfig(name="dit", flavor=name), 32000)["non_embedding"]
        assert f"ladder-{round(n / 1e6)}M" == name
        sizes.append(n)
    assert sizes == sorted(sizes)


def test_overrides_apply_on_top_of_the_flavor_and_errors_name_the_key():
    dims = resolve(ModelConfig(flavor="small", n_layers=3, d_model=256, n_heads=4, cond_dim=32))
    assert (dims.n_layers, dims.d_model, dims.n_heads, dims.cond_dim) == (3, 256, 4, 32)
    assert resolve(ModelConfig(flavor="small", variant="md4")).cond_dim == 64  # MD4: cond = head dim
    assert resolve(ModelConfig(flavor="small", variant="md4", cond_dim=128)).cond_dim == 128
    with pytest.raises(ConfigError, match="did you mean 'small'"):
        resolve(ModelConfig(flavor="smal"))
    with pytest.raises(ConfigError, match="n_heads"):
        resolve(ModelConfig(flavor="small", n_heads=7))
    from mdtrain.config import load_config
    with pytest.raises(ConfigError, match="flavor"):
        load_config(None, ["model.flavor=huge"])


def test_flops_per_token_rule_and_exact_count():
    cfg = ModelConfig(name="dit", flavor="small")
    vocab, t, d, n_layers = 50258, 1024, 768, 12
    f = flops_per_token(cfg, vocab, t)
    c = count_params(cfg, vocab)
    n = c["total"] - c["embedding"] - c["conditioning"]
    assert f["n_params"] == n
    assert f["rule"] == 6 * n + 12 * n_layers * d * t
    assert abs(f["rule"] / 0.855e9 - 1) < 0.01  # 6N + 12·L·d·T for DiT-small at T=1024: ~0.85 GFLOP/token
    # exact: 3 x forward matmuls = per block qkv/out/MLP (24 d^2) + q.k and p.v (4 T d), head, per-sequence cond
    cond = 2 * (256 * 128 + 128 * 128) + 2 * 128 * 6 * d * n_layers + 2 * 128 * 2 * d
    forward = n_layers * (24 * d * d + 4 * t * d) + 2 * d * vocab + cond / t
    assert f["exact"] == pytest.approx(3 * forward, rel=1e-9)
    causal = flops_per_token(ModelConfig(name="causal", flavor="small"), vocab, t)
    assert causal["rule"] == f["rule"]  # the rule keeps the full attention term
    attn_saved = 3 * n_layers * 4 * d * (t - (t + 1) / 2)
    assert causal["exact"] == pytest.approx(f["exact"] - attn_saved - 3 * cond / t, rel=1e-9)
    mamba = flops_per_token(ModelConfig(name="dimamba", flavor="tiny"), vocab, t)
    assert mamba["rule"] == 6 * mamba["n_params"] and mamba["exact"] > 0


# ------------------------------------------------------------------------------------------------- training


def masked_ce(model, x, gen):
    """A plain masked-LM loss (mask half the tokens, predict them) or next-token loss for the causal model."""
    if getattr(model, "causal", False):
        logits = model(x[:, :-1])
        return F.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))
    t = torch.rand(x.shape[0], generator=gen)
    masked = torch.rand(x.shape, generator=gen) < 0.5
    logits = model(torch.where(masked, torch.full_like(x, V - 1), x), t)
    return F.cross_entropy(logits[masked], x[masked])


def periodic_batch(b=8, length=L):
    starts = torch.arange(b)[:, None] * 3
    return (starts + torch.arange(length)[None]) % (V - 1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_trains_a_few_cpu_steps(name, variant):
    torch.manual_seed(0)
    model = build_model(small_cfg(name, variant, dropout=0.1), V, L)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    x = periodic_batch()
    losses = []
    for _ in range(40):
        loss = masked_ce(model, x, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(V), rel=1e-3)  # zero head: uniform over all V
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses


OBJECTIVE_PAIRS = [(b, o) for b in ("dit", "dimamba") for o in ("mdlm", "md4", "genmd4", "d3pm", "sedd")]
OBJECTIVE_PAIRS.append(("causal", "ar"))


@pytest.mark.parametrize("name,objective", OBJECTIVE_PAIRS)
def test_every_backbone_trains_with_every_compatible_objective(name, objective):
    """The objectives' own losses (mdtrain.objectives) through the model: the loss on a fixed noise draw falls."""
    from mdtrain.objectives import ObjectiveConfig, build_objective
    torch.manual_seed(0)
    obj = build_objective(ObjectiveConfig(name=objective), V, V - 1)
    variant = "md4" if objective in ("md4", "genmd4") else "mdlm"  # each paper's own block style
    model = build_model(small_cfg(name, variant), V, L)
    assert obj.causal == (name == "causal")
    params = list(model.parameters()) + list(obj.parameters())
    opt = torch.optim.AdamW(params, lr=5e-3)
    x = periodic_batch()

    def fixed_loss():
        with torch.no_grad():
            return obj.loss(model, x, generator=torch.Generator().manual_seed(123))[0].item()

    before = fixed_loss()
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        loss, _metrics = obj.loss(model, x, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss()
    assert math.isfinite(before) and after < 0.85 * before, (before, after)
