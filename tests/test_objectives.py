"""Objective losses on fixed (x0, xt, logits, t) against float64 NumPy transcriptions of the reference code
(kuleshov-group/mdlm diffusion.py, google-deepmind/md4 md4.py / genmd4.py), written here independently."""
import math

import numpy as np
import pytest
import torch

from mdtrain.configtools import ConfigError
from mdtrain.objectives import ObjectiveConfig, build_objective, draw_noise, resolve_objective


B, L, V = 3, 6, 7


def lse(x, axis=-1, keepdims=False):
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis)


def take(x, idx):
    return np.take_along_axis(x, idx[..., None], -1)[..., 0]


def inputs(mask_id, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, L, V, generator=g)
    x0 = torch.randint(0, V - 1, (B, L), generator=g)
    x0 = torch.where(x0 >= mask_id, x0 + 1, x0)  # never the mask id
    masked = torch.rand(B, L, generator=g) < 0.6
    masked[:, 0] = True
    xt = torch.where(masked, mask_id, x0)
    t = torch.tensor([0.13, 0.5, 0.91], dtype=torch.float64)
    return logits, x0, xt, t


def obj(name, **kw):
    return build_objective(ObjectiveConfig(name=name, **kw), V, V - 1)


# ----------------------------------------------------------------------------------------------------------
# reference transcriptions (float64)


def ref_mdlm_subs(logits, x0, xt, mask, sigma, dsigma):
    """_subs_parameterization + the T = 0 SUBS loss of _forward_pass_diffusion."""
    x = logits.astype(np.float64).copy()
    x[:, :, mask] += -1e6
    x = x - lse(x, keepdims=True)
    un = xt != mask
    x[un] = -1e6
    x[un, xt[un]] = 0
    return -take(x, x0) * (dsigma / np.expm1(sigma))[:, None]


def ref_mdlm_d3pm_loss(log_x, x0, xt, mask, t, T):
    """_d3pm_loss (α = 1 − t), on log x_θ after a parameterisation."""
    dt = 1 / T
    t = np.minimum(t, 1 - 1e-4)[:, None]
    a_t, a_s = 1 - t, 1 - (t - dt)
    lx0, xm = take(log_x, x0), np.exp(log_x[:, :, mask])
    nr = np.log(a_t * xm / t + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        dr2 = np.log(a_s * xm / (t - dt) + 1)
        term2 = np.where(t - dt > 0, (1 - dt / t) * (nr - dr2), 0.0)
    return T * (dt / t * (nr - lx0) + term2) * (xt == mask)


def ref_loglinear(t, eps):
    return -np.log1p(-(1 - eps) * t), (1 - eps) / (1 - (1 - eps) * t)


def test_mdlm_nelbo_matches_reference_subs():
    for mask in (V - 1, 2):  # appended mask (GPT-2) and a mask inside the vocabulary (BERT)
        logits, x0, xt, t = inputs(mask)
        o = build_objective(ObjectiveConfig(name="mdlm"), V, mask)
        got = o.nelbo(logits, x0, xt, t)
        sigma, dsigma = ref_loglinear(t.numpy(), 1e-3)
        ref = ref_mdlm_subs(logits.numpy(), x0.numpy(), xt.numpy(), mask, sigma, dsigma)
        np.testing.assert_allclose(got.detach().numpy(), ref, rtol=2e-6, atol=1e-6)
        assert (got[xt != mask] == 0).all()


def test_mdlm_discrete_time_matches_reference_d3pm_loss_with_zero_masking():
    mask, T = V - 1, 10
    logits, x0, xt, _ = inputs(mask)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)  # on the grid, t > 1/T
    o = build_objective(ObjectiveConfig(name="mdlm", T=T, schedule_eps=0.0), V, mask)
    x = logits.numpy().astype(np.float64)
    x[:, :, mask] += -1e6
    log_x = x - lse(x, keepdims=True)
    ref = ref_mdlm_d3pm_loss(log_x, x0.numpy(), xt.numpy(), mask, t.numpy(), T)
    np.testing.assert_allclose(o.nelbo(logits, x0, xt, t).numpy(), ref, rtol=2e-6, atol=1e-6)


def test_mdlm_importance_sampling_weight_is_constant():
    logits, x0, xt, t = inputs(V - 1)
    o = obj("mdlm", importance_sampling=True)
    sch = o.schedule
    f_T, f_0 = math.log1p(-math.exp(-sch.sigma_max)), math.log1p(-math.exp(-sch.sigma_min))
    ce = -obj("mdlm").nelbo(logits, x0, xt, t) * t[:, None].float()  # = log p at masked positions (1/t weight)
    np.testing.assert_allclose(o.nelbo(logits, x0, xt, t).numpy(), (-ce * (f_T - f_0)).numpy(), rtol=1e-6)


def ref_md4(logits, x0, xt, mask, t, eps, T=0):
    """MD4.diffusion_loss + recon_loss per sequence (network without the mask output: drop that column)."""
    lp = np.delete(logits.astype(np.float64), mask, -1)
    lp = lp - lse(lp, keepdims=True)
    x0r = np.where(x0 > mask, x0 - 1, x0)
    m = (xt == mask).astype(np.float64)
    S = (m * take(lp, x0r)).sum(1)
    alpha = lambda u: (1 - 2 * eps) * (1 - u) + eps  # noqa: E731  (linear)
    if T:
        s = t - 1 / T
        lam = lambda u: np.log(alpha(u) / (1 - alpha(u)))  # noqa: E731
        diff = T * np.expm1(lam(t) - lam(s)) * alpha(s) * S
    else:
        diff = (-(1 - 2 * eps) / (1 - alpha(t))) * S
    recon = x0.shape[1] * (1 - alpha(0.0)) * np.log(V - 1)
    return diff + recon


@pytest.mark.parametrize("T", [0, 100])
def test_md4_nelbo_matches_reference(T):
    mask = V - 1
    logits, x0, xt, t = inputs(mask)
    t = torch.tensor([0.13, 0.5, 0.91], dtype=torch.float64)
    o = build_objective(ObjectiveConfig(name="md4", T=T), V, mask)
    got = o.nelbo(logits, x0, xt, t).sum(1).numpy()
    ref = ref_md4(logits.numpy(), x0.numpy(), xt.numpy(), mask, t.numpy(), 1e-4, T)
    np.testing.assert_allclose(got, ref, rtol=3e-6)


def test_d3pm_nelbo_matches_reference_with_reconstruction():
    mask, T = V - 1, 20
    logits, x0, xt, _ = inputs(mask)
    recon_logits = 2 * torch.randn(B, L, V, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    o = build_objective(ObjectiveConfig(name="d3pm", T=T, schedule_eps=0.0), V, mask)
    x = logits.numpy().astype(np.float64)
    log_x = x - lse(x, keepdims=True)  # _d3pm_parameterization without subs_masking: mass on the mask allowed
    r = recon_logits.numpy().astype(np.float64)
    recon = -take(r - lse(r, keepdims=True), x0.numpy())
    ref = ref_mdlm_d3pm_loss(log_x, x0.numpy(), xt.numpy(), mask, t.numpy(), T) + recon
    got = o.nelbo(logits, x0, xt, t, recon_logits=recon_logits)
    np.testing.assert_allclose(got.numpy(), ref, rtol=3e-6, atol=1e-6)
    # at s = 0 (t = 1/T) the b-term has zero weight and must not produce NaN
    t1 = torch.full((B,), 1 / T, dtype=torch.float64)
    assert torch.isfinite(o.nelbo(logits, x0, xt, t1)).all()


def test_sedd_nelbo_matches_reference_score_entropy():
    mask = 2
    logits, x0, xt, t = inputs(mask)
    o = build_objective(ObjectiveConfig(name="sedd"), V, mask)
    sigma, dsigma = ref_loglinear(t.numpy(), 1e-3)
    x = logits.numpy().astype(np.float64)
    x = x - np.log(np.expm1(sigma))[:, None, None] - np.log(V - 1)  # _sedd_parameterization
    np.put_along_axis(x, xt.numpy()[..., None], 0.0, -1)
    m = xt.numpy() == mask
    r = np.broadcast_to(1 / np.expm1(sigma)[:, None], m.shape)
    score = np.exp(x)
    pos = score.sum(-1) - score[:, :, mask]
    neg = r * take(x, x0.numpy())
    entropy = np.where(m, pos - neg + r * (np.log(r) - 1), 0.0)
    ref = dsigma[:, None] * entropy
    np.testing.assert_allclose(o.nelbo(logits, x0, xt, t).numpy(), ref, rtol=2e-5, atol=2e-5)


def ref_genmd4(logits, x0, xt, mask, t, power, eps, t1):
    lp = np.delete(logits.astype(np.float64), mask, -1)
    lp = lp - lse(lp, keepdims=True)
    w = np.delete(power.astype(np.float64), mask)
    x0r = np.where(x0 > mask, x0 - 1, x0)
    one_hot = np.eye(V - 1)[x0r]
    nce = (one_hot * lp).sum(-1, keepdims=True)
    integrand = (nce + 1) * one_hot - np.exp(lp)
    m = (xt == mask).astype(np.float64)
    G = (m[..., None] * integrand).sum(1)  # (B, V)
    diff = ((-w / t[:, None]) * G).sum(-1)
    w_x = w[x0r]
    recon = (-(1 - eps) * np.exp(w_x * np.log(t1)) * (w_x * np.log(t1) - lse(w * np.log(t1)))).sum(1)
    log_q = np.where(xt == mask, np.log(1 - eps) + w_x * np.log(t[:, None]),
                     np.log(1 - (1 - eps) * t[:, None] ** w_x)).sum(1)
    return diff, recon, log_q


def test_genmd4_terms_match_reference():
    mask = V - 1
    logits, x0, xt, t = inputs(mask)
    o = obj("genmd4")
    with torch.no_grad():
        o.schedule.w_raw.copy_(torch.randn(V, generator=torch.Generator().manual_seed(3)))
    power = o.schedule.power.detach().numpy()
    diff, recon, log_q = ref_genmd4(logits.numpy(), x0.numpy(), xt.numpy(), mask, t.numpy(), power, 1e-4, 1e-3)
    valid = torch.ones_like(x0, dtype=torch.bool)
    got = o.nelbo(logits, x0, xt, t).sum(1).detach().numpy()
    np.testing.assert_allclose(got, diff + recon, rtol=2e-5)
    np.testing.assert_allclose(o.recon(x0, valid).sum(1).detach().numpy(), recon, rtol=1e-5)
    np.testing.assert_allclose(o.log_q(x0, xt, t, valid).detach().numpy(), log_q, rtol=1e-5)


def test_ar_loss_matches_shifted_cross_entropy():
    mask = V - 1
    logits_all = torch.randn(B, L - 1, V, generator=torch.Generator().manual_seed(1))
    x0 = torch.randint(0, V - 1, (B, L), generator=torch.Generator().manual_seed(2))
    attn = torch.ones(B, L, dtype=torch.long)
    attn[0, -2:] = 0
    o = obj("ar")
    seen = {}

    def model_fn(x, cond):
        seen["x"], seen["cond"] = x, cond
        return logits_all

    loss, m = o.loss(model_fn, x0, attn)
    x = logits_all.numpy().astype(np.float64)
    x[:, :, mask] = -1000.0
    nll = -take(x - lse(x, keepdims=True), x0[:, 1:].numpy()) * attn[:, 1:].numpy()
    assert torch.equal(seen["x"], x0[:, :-1]) and (seen["cond"] == 0).all()
    assert float(m["tokens"]) == attn[:, 1:].sum()
    np.testing.assert_allclose(float(m["nll_sum"]), nll.sum(), rtol=1e-6)
    np.testing.assert_allclose(float(loss), nll.sum() / attn[:, 1:].sum(), rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# loss(): noise handling, conditioning, normalisation


@pytest.mark.parametrize("name,tc,expect", [("mdlm", False, "zeros"), ("mdlm", True, "sigma"), ("md4", None, "t"),
                                            ("sedd", None, "sigma"), ("d3pm", None, "sigma")])
def test_loss_with_given_noise_reproduces_its_recipe(name, tc, expect):
    mask = V - 1
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(4))
    calls = []

    def model_fn(x, cond):
        calls.append((x.clone(), cond.clone()))
        return table[x] + 0.1 * cond[:, None, None]

    x0 = torch.randint(0, V - 1, (B, L), generator=torch.Generator().manual_seed(6))
    attn = torch.ones(B, L, dtype=torch.long)
    attn[1, 3:] = 0
    o = obj(name, time_conditioning=tc)
    noise = draw_noise(o.noise_spec(L), B, torch.Generator().manual_seed(7), o.stratified_keys)
    loss, m = o.loss(model_fn, x0, attn, noise=noise)
    # the recipe, recomputed: t from u, xt from the mask uniforms, cond per convention
    eps_s = {"md4": 0.0}.get(name, 1e-3)
    t = eps_s + (1 - eps_s) * noise["t"]
    if name == "d3pm":
        t = (torch.floor(t * 1000) + 1) / 1000
    mp_ = o.schedule.mask_prob(t)
    xt = torch.where(noise["mask"] < mp_[:, None], mask, x0)
    assert torch.equal(calls[0][0], xt)
    want = {"zeros": torch.zeros(B), "sigma": o.schedule.sigma(t).float(), "t": t.float()}[expect]
    torch.testing.assert_close(calls[0][1], want)
    valid = attn.bool()
    kw = {"recon_logits": table[x0] + 0.1 * o.cond(torch.zeros(B, dtype=torch.float64))[:, None, None]} \
        if name == "d3pm" else {}
    per_tok = o.nelbo(table[xt] + 0.1 * want[:, None, None], x0, xt, t, attn, **kw)
    assert (per_tok[~valid] == 0).all()
    torch.testing.assert_close(float(m["nll_sum"]), float(per_tok.double().sum()), rtol=1e-6, atol=0)
    assert float(m["tokens"]) == valid.sum()
    torch.testing.assert_close(float(loss), float(per_tok.sum()) / float(valid.sum()), rtol=1e-6, atol=0)
    per_seq = m.pop("nll_per_sequence")
    assert per_seq.shape == (B,) and per_seq.dtype == torch.float64 and not per_seq.requires_grad
    torch.testing.assert_close(per_seq, per_tok.double().sum(1), rtol=1e-6, atol=0)
    assert all(v.dtype == torch.float64 and v.dim() == 0 and not v.requires_grad for v in m.values())


def test_noise_spec_shapes_and_bad_noise_is_refused():
    o = obj("mdlm")
    assert o.noise_spec(5) == {"t": (), "mask": (5,)} and o.stratified_keys == ("t",)
    assert obj("genmd4").noise_spec(5) == {"t": (), "mask": (5,), "mask2": (5,)}
    assert obj("ar").noise_spec(5) == {} and obj("mdlm", antithetic=False).stratified_keys == ()
    x0 = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="shape"):
        o.loss(lambda x, c: torch.zeros(2, 5, V), x0, noise={"t": torch.rand(3), "mask": torch.rand(2, 5)})
    with pytest.raises(ValueError, match="lacks"):
        o.loss(lambda x, c: torch.zeros(2, 5, V), x0, noise={"t": torch.rand(2)})


def test_draw_noise_stratifies_over_the_global_batch():
    spec = {"t": (), "mask": (4,)}
    u = draw_noise(spec, 8, torch.Generator().manual_seed(0), ("t",))
    assert torch.equal(torch.floor(u["t"] * 8).long(), torch.arange(8))
    assert u["mask"].shape == (8, 4) and 0 <= u["mask"].min() and u["mask"].max() < 1
    # sample by sample, keyed by global index, gives one draw per stratum of the whole batch
    parts = [draw_noise(spec, 1, torch.Generator().manual_seed(i), ("t",), index_offset=i, total=8)["t"]
             for i in range(8)]
    assert torch.equal(torch.floor(torch.cat(parts) * 8).long(), torch.arange(8))
    with pytest.raises(ValueError, match="do not fit"):
        draw_noise(spec, 2, None, ("t",), index_offset=7, total=8)


def test_mdlm_initial_loss_is_log_vocab():
    """Zero logits -> every masked token costs log(V−1); weighted by 1/t the mean is ~log(V−1)."""
    o = obj("mdlm")
    x0 = torch.randint(0, V - 1, (256, 64), generator=torch.Generator().manual_seed(0))
    loss, _ = o.loss(lambda x, c: torch.zeros(*x.shape, V), x0, generator=torch.Generator().manual_seed(1))
    assert float(loss) == pytest.approx(math.log(V - 1), rel=0.03)


# ----------------------------------------------------------------------------------------------------------
# agreements between objectives


def test_mdlm_and_md4_agree_as_eps_goes_to_zero():
    logits, x0, xt, t = inputs(V - 1)
    gaps = []
    for eps in (1e-2, 1e-4, 1e-6, 1e-8):
        a = obj("mdlm", schedule_eps=eps).nelbo(logits, x0, xt, t).double()
        b = obj("md4", schedule_eps=eps).nelbo(logits, x0, xt, t).double()
        gaps.append(float((a - b).abs().max()))
    assert gaps[0] > 1e-2 and gaps[-1] < 1e-5
    assert all(g2 < g1 for g1, g2 in zip(gaps, gaps[1:]))


@pytest.mark.parametrize("K", [1.0, 3.0])
def test_genmd4_with_equal_powers_is_md4_poly(K):
    logits, x0, xt, t = inputs(V - 1)
    g = obj("genmd4", genmd4_power_init=K)
    m = obj("md4", schedule=f"md4_poly{K:g}", schedule_eps=0.0)
    valid = torch.ones_like(x0, dtype=torch.bool)
    got = g.nelbo(logits, x0, xt, t) - g.recon(x0, valid)
    torch.testing.assert_close(got.detach(), m.nelbo(logits, x0, xt, t), rtol=1e-5, atol=1e-5)


def test_objectives_have_the_promised_attributes():
    for name in ("mdlm", "md4", "genmd4", "d3pm", "sedd", "ar"):
        o = obj(name)
        assert o.name == name and o.mask_id == V - 1 and o.vocab_size == V
        assert o.causal == (name == "ar") and (o.schedule is None) == (name == "ar")
    assert [n for n, _ in obj("genmd4").named_parameters()] == ["schedule.w_raw"]


# ----------------------------------------------------------------------------------------------------------
# config resolution


def test_config_defaults_follow_each_papers_convention():
    r = {n: resolve_objective(ObjectiveConfig(name=n)) for n in ("mdlm", "md4", "genmd4", "d3pm", "sedd", "ar")}
    assert (r["mdlm"]["schedule"], r["mdlm"]["sampling_eps"], r["mdlm"]["T"], r["mdlm"]["time_conditioning"]) == \
        ("loglinear", 1e-3, 0, False)
    assert (r["md4"]["schedule"], r["md4"]["sampling_eps"], r["md4"]["time_conditioning"]) == ("md4_linear", 0.0, True)
    assert r["d3pm"]["T"] == 1000 and r["sedd"]["time_conditioning"] is True
    assert obj("md4").schedule.eps == 1e-4 and obj("mdlm").schedule.eps == 1e-3


@pytest.mark.parametrize("kw,msg", [
    (dict(name="sedd", time_conditioning=False), "time_conditioning"),
    (dict(name="d3pm", T=0), "discrete-time"),
    (dict(name="genmd4", T=10), "continuous-time"),
    (dict(name="genmd4", schedule="loglinear"), "genmd4_poly"),
    (dict(name="mdlm", importance_sampling=True, schedule="cosine"), "importance_sampling"),
    (dict(name="mdlm", subs_masking=True), "d3pm only"),
    (dict(name="md4", schedule="linear"), "did you mean"),
    (dict(name="ar", schedule="loglinear"), "no schedule"),
])
def test_config_rejects_bad_combinations_with_a_reason(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        ObjectiveConfig(**kw).validate()
