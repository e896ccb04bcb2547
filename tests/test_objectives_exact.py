"""With a network that returns the exact posterior of a known joint over V^L (V = 3 tokens, L = 3), the masked
NELBO is tight in continuous time (Monte Carlo estimate = true NLL within its standard error), looser in discrete
time (computed exactly by enumerating steps and mask patterns), and the AR loss is the exact NLL."""
import itertools
import math

import pytest
import torch

from mdtrain.objectives import ObjectiveConfig, build_objective, draw_noise
from mdtrain.objectives.toy import ExactJoint


NT, L = 3, 3
MASK, VOCAB = NT, NT + 1
JOINT = ExactJoint.random(NT, L, seed=0, vocab_size=VOCAB, mask_id=MASK)


def exact_net(name):
    offset = math.log(VOCAB - 1) if name == "sedd" else 0.0  # SEDD reads logits as log-scores shifted by log(V−1)
    return lambda x, cond: JOINT.denoiser(x, cond, offset=offset)


def test_joint_is_far_from_independent():
    """Sanity: the test distribution is correlated, so a wrong conditional would show."""
    marg = torch.stack([torch.einsum("n,nv->v", JOINT.p, JOINT._onehot[:, l]) for l in range(L)])
    h_indep = float(-(marg * torch.log(marg)).sum())
    assert h_indep - JOINT.entropy() > 0.2


@pytest.mark.parametrize("name,kw", [("mdlm", {}), ("md4", {}), ("sedd", {}), ("genmd4", {}),
                                     ("mdlm", {"schedule": "cosine"}), ("md4", {"schedule": "md4_poly2"}),
                                     ("mdlm", {"importance_sampling": True})])
def test_continuous_nelbo_of_exact_posterior_is_the_nll(name, kw):
    o = build_objective(ObjectiveConfig(name=name, antithetic=False, **kw), VOCAB, MASK)
    M = 1000
    x0 = JOINT.seqs.repeat(M, 1)  # every sequence, M independent (t, mask) draws each
    noise = draw_noise(o.noise_spec(L), x0.shape[0], torch.Generator().manual_seed(1), ())
    t = o.sample_time(noise["t"])
    xt = o.corrupt(x0, t, noise["mask"])
    with torch.no_grad():
        per_seq = o.nelbo(exact_net(name)(xt, o.cond(t)), x0, xt, t).sum(1).view(M, -1)
    est, se = per_seq.mean(0), per_seq.std(0) / math.sqrt(M)
    nll = JOINT.nll(JOINT.seqs)
    assert ((est - nll).abs() / se).max() < 4.5, (est - nll) / se
    e_p, se_p = float((JOINT.p * est).sum()), float(((JOINT.p * se) ** 2).sum().sqrt())
    assert abs(e_p - JOINT.entropy()) < 4 * se_p and se_p < 0.03 * JOINT.entropy()


def test_training_loss_estimates_the_entropy():
    """The loss() path (antithetic t, own noise) on data drawn from p: nll_sum / #sequences ≈ H(p)."""
    o = build_objective(ObjectiveConfig(name="mdlm"), VOCAB, MASK)
    x0 = JOINT.draw(20000, torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss, m = o.loss(exact_net("mdlm"), x0, generator=torch.Generator().manual_seed(3))
    est = float(m["nll_sum"]) / x0.shape[0]
    assert float(m["tokens"]) == x0.numel() and float(loss) == pytest.approx(est / L, rel=1e-9)
    assert est == pytest.approx(JOINT.entropy(), rel=0.03)


def discrete_nelbo(o, T, recon=False):
    """E_{x~p} of the T-step NELBO, exactly: uniform step i, every mask pattern with its probability."""
    rows, weights, times = [], [], []
    pats = torch.tensor(list(itertools.product([0, 1], repeat=L)), dtype=torch.bool)
    for i in range(1, T + 1):
        t = torch.tensor(i / T, dtype=torch.float64)
        mp_ = o.schedule.mask_prob(t)
        w_pat = torch.where(pats, mp_, 1 - mp_).prod(1)
        for k in range(len(pats)):
            rows.append(JOINT.seqs)
            weights.append(JOINT.p * w_pat[k] / T)
            times.append(torch.full((len(JOINT.seqs),), i / T, dtype=torch.float64))
    x0, w, t = torch.cat(rows), torch.cat(weights), torch.cat(times)
    pat = pats.repeat_interleave(len(JOINT.seqs), 0).repeat(T, 1)
    xt = torch.where(pat, MASK, x0)
    net = exact_net(o.name)
    kw = {"recon_logits": net(x0, None)} if recon else {}
    return float((w * o.nelbo(net(xt, None), x0, xt, t, **kw).sum(1)).sum())


def test_discrete_nelbo_lies_above_the_nll_and_tightens_with_T():
    H = JOINT.entropy()
    gaps = [discrete_nelbo(build_objective(ObjectiveConfig(name="mdlm", T=T, schedule_eps=0.0), VOCAB, MASK), T) - H
            for T in (2, 8, 64)]
    assert gaps[0] > 0.05 and gaps[0] > gaps[1] > gaps[2] > -1e-9 and gaps[2] < 0.02, gaps
    md4 = build_objective(ObjectiveConfig(name="md4", T=4), VOCAB, MASK)
    assert discrete_nelbo(md4, 4) > H + 0.01
    d3pm = build_objective(ObjectiveConfig(name="d3pm", T=4, schedule_eps=0.0), VOCAB, MASK)
    assert discrete_nelbo(d3pm, 4, recon=True) == pytest.approx(gaps_at(4) + H, rel=1e-6)


def gaps_at(T):
    """The SUBS discrete gap; D3PM with an exact posterior (x_θ(mask) = 0, exact reconstruction) equals it."""
    return discrete_nelbo(build_objective(ObjectiveConfig(name="mdlm", T=T, schedule_eps=0.0), VOCAB, MASK), T) \
        - JOINT.entropy()


def test_ar_loss_is_the_exact_nll():
    bos = NT
    joint = ExactJoint(JOINT.p, NT, L, vocab_size=NT + 2, mask_id=NT + 1, bos_id=bos)
    o = build_objective(ObjectiveConfig(name="ar"), NT + 2, NT + 1)
    x0 = torch.cat([torch.full((len(joint.seqs), 1), bos), joint.seqs], 1)
    with torch.no_grad():
        loss, m = o.loss(joint.ar_logits, x0)
    nll = joint.nll(joint.seqs)
    assert float(m["nll_sum"]) == pytest.approx(float(nll.sum()), rel=1e-9)
    assert float(m["tokens"]) == len(joint.seqs) * L
    logits = joint.ar_logits(x0[:, :-1])
    per_seq, _ = o.token_nll(logits, x0)
    torch.testing.assert_close(per_seq.sum(1).double(), nll, rtol=1e-9, atol=1e-9)
