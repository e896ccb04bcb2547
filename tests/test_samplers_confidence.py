"""LLaDA low-confidence remasking and Fast-dLLM's threshold rule (deterministic at temperature 0) against a float64
transcription of the papers' algorithms written here, on a toy joint's exact denoiser; classifier-free guidance
against its formula; the infill template syntax of `mdtrain sample`."""
import pytest
import torch

from mdtrain.configtools import ConfigError
from mdtrain.objectives import ObjectiveConfig, build_objective
from mdtrain.objectives.samplers import sample
from mdtrain.objectives.toy import ExactJoint
from mdtrain.sampling_cli import parse_infill

NT, L = 3, 6
MASK, VOCAB = NT, NT + 1
# peaked (p ∝ exp(4·N(0, 1)) over the 729 sequences), so a few tokens pin down the rest and the threshold rule
# reveals several tokens in one call
JOINT = ExactJoint(torch.softmax(4 * torch.randn(NT ** L, generator=torch.Generator().manual_seed(3),
                                                 dtype=torch.float64), 0), NT, L, vocab_size=VOCAB, mask_id=MASK)
OBJ = build_objective(ObjectiveConfig(name="mdlm"), VOCAB, MASK)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def posterior(x, given=None, w=0.0):
    """float64 p(x^l = v | unmasked x) over the real tokens at every position (L, NT); with w > 0 the guided
    softmax(u + (1 + w)(c − u)), u the same with the given positions masked."""
    c = JOINT.denoiser(x[None])[0, :, :NT].double()
    if w:
        u = JOINT.denoiser(torch.where(given, MASK, x)[None])[0, :, :NT].double()
        c = u + (1 + w) * (c - u)
    return torch.softmax(c, dim=-1)


def reference(template, steps, block_length, rule, threshold=0.9, w=0.0):
    """LLaDA's generate() / Fast-dLLM's threshold variant for one sequence, written from the papers' algorithms."""
    x = template.clone()
    given = x != MASK
    start = int((x == MASK).nonzero()[0])
    size = block_length or L - start
    blocks = [(a, min(a + size, L)) for a in range(start, L, size)]
    states = []  # what the network sees at each call
    for b, (a, e) in enumerate(blocks):
        n_steps = steps // len(blocks) + (1 if b < steps % len(blocks) else 0)
        m = int((x[a:e] == MASK).sum())
        counts = [m // n_steps + (1 if i < m % n_steps else 0) for i in range(n_steps)] if rule == "llada" else None
        i = 0
        while (x[a:e] == MASK).any():
            if counts is not None:
                if i == n_steps:
                    break
                k = counts[i]
                i += 1
                if k == 0:
                    continue
            p = posterior(x, given, w)
            states.append(x.clone())
            cand = [(float(p[l].max()), -l, l, int(p[l].argmax())) for l in range(a, e) if x[l] == MASK]
            cand.sort(reverse=True)  # most confident first, ties: the leftmost
            if counts is not None:
                keep = cand[:k]
            else:
                keep = [c for j, c in enumerate(cand) if j == 0 or c[0] >= threshold]
            for _, _, l, v in keep:
                x[l] = v
    return x, states


TEMPLATES = [
    torch.full((L,), MASK),
    torch.tensor([1, MASK, MASK, MASK, MASK, MASK]),
    torch.tensor([MASK, 2, MASK, MASK, 0, MASK]),
]


RULES = [("llada", 6, 0, {}), ("llada", 3, 0, {}), ("llada", 4, 0, {}), ("llada", 4, 2, {}), ("llada", 2, 3, {}),
         ("llada", 5, 3, {}),
         ("fast_dllm", 0, 0, {"threshold": 0.9}), ("fast_dllm", 0, 2, {"threshold": 0.6}),
         ("llada", 4, 2, {"guidance": 1.5}), ("fast_dllm", 0, 3, {"threshold": 0.7, "guidance": 0.5})]
CASES = [(t, *r) for t in range(len(TEMPLATES)) for r in RULES
         if t > 0 or "guidance" not in r[3]]  # guidance needs a prompt: not with the all-masked template


@pytest.mark.parametrize("t,rule,steps,block,opts", CASES)
def test_confidence_decoding_equals_the_float64_transcription(t, rule, steps, block, opts):
    template = TEMPLATES[t]
    w = opts.get("guidance", 0.0)
    ref, ref_states = reference(template, steps, block, rule, opts.get("threshold", 0.9), w)
    seen = []

    def recording(x, cond):
        seen.append(x[: x.shape[0] // (2 if w else 1)].clone())
        return JOINT.denoiser(x, cond)

    x, info = sample(OBJ, recording, 3, L, steps, gen(), sampler=rule, block_length=block, prefix=template, **opts)
    assert torch.equal(x, ref.expand(3, L)), (x[0], ref)
    assert len(seen) == len(ref_states) and all(torch.equal(a, b.expand(3, L)) for a, b in zip(seen, ref_states))
    assert (info["nfe_per_sample"] == len(ref_states) * (2 if w else 1)).all()


def test_low_confidence_keeps_the_most_probable_tokens_and_threshold_takes_several_at_once():
    """Sanity of the transcription itself on the toy: a peaked joint lets fast_dllm finish in fewer calls than
    tokens, and llada with one step per token makes L calls."""
    _, fast = reference(TEMPLATES[0], 0, 0, "fast_dllm", 0.9)
    _, llada = reference(TEMPLATES[0], L, 0, "llada")
    assert len(fast) < L == len(llada)


def test_confidence_decoding_feeds_a_time_conditioned_network_the_masked_fraction():
    o = build_objective(ObjectiveConfig(name="mdlm", time_conditioning=True), VOCAB, MASK)
    seen = []

    def recording(x, cond):
        seen.append((float((x == MASK).double().mean()), float(cond[0])))
        return JOINT.denoiser(x, cond)

    sample(o, recording, 1, L, L, gen(), sampler="llada")
    assert len(seen) == L and seen[0][0] == 1.0
    for frac, cond in seen:  # loglinear: m(t) = (1 − ε)t, so t = frac / (1 − ε), at most 1
        t = torch.tensor(min(frac / (1 - 1e-3), 1.0), dtype=torch.float64)
        assert cond == pytest.approx(float(o.schedule.sigma(t)), rel=1e-6)


def test_guidance_draws_from_the_guided_conditional():
    """First-hitting with guidance w: the first token revealed next to a prompt follows softmax(u + (1+w)(c − u))
    at a uniform position (c given the prompt, u with it masked); w = 0 follows c, which is far from it."""
    o = build_objective(ObjectiveConfig(name="mdlm"), VOCAB, MASK)
    joint = ExactJoint.random(NT, 3, seed=0, vocab_size=VOCAB, mask_id=MASK)
    template = torch.tensor([1, MASK, MASK])
    n, w = 6000, 2.0

    def first_reveals(w):
        states = []
        sample(o, lambda x, c: states.append(x[: x.shape[0] // (2 if w else 1)].clone()) or joint.denoiser(x, c),
               n, 3, 0, gen(11), sampler="first_hitting", prefix=template, guidance=w)
        s = states[1]
        pos = (s[:, 1:] != MASK).double().argmax(1) + 1
        tok = s[torch.arange(n), pos]
        return torch.bincount((pos - 1) * NT + tok, minlength=2 * NT).double() / n

    def exact(w):
        c = joint.denoiser(template[None])[0, 1:, :NT].double()
        u = joint.denoiser(torch.full((1, 3), MASK))[0, 1:, :NT].double()
        return (torch.softmax(u + (1 + w) * (c - u), dim=-1) / 2).flatten()  # position uniform over the two

    target = exact(w)
    assert 0.5 * float((exact(0.0) - target).abs().sum()) > 0.1  # guidance changes the law noticeably
    assert 0.5 * float((first_reveals(w) - target).abs().sum()) < 0.03
    assert 0.5 * float((first_reveals(0.0) - exact(0.0)).abs().sum()) < 0.03


def test_guidance_masks_exactly_the_given_tokens_in_the_unconditional_pass():
    seen = []

    def recording(x, cond):
        seen.append(x.clone())
        return JOINT.denoiser(x, cond)

    template = torch.tensor([MASK, 2, MASK, MASK, 0, MASK])
    sample(OBJ, recording, 2, L, 20, gen(), sampler="ddpm", prefix=template, guidance=1.0)
    for x in seen:
        cond, uncond = x.chunk(2)  # one call on the doubled (sub-)batch
        assert (cond[:, [1, 4]] == torch.tensor([2, 0])).all() and (uncond[:, [1, 4]] == MASK).all()
        free = torch.tensor([0, 2, 3, 5])
        assert torch.equal(cond[:, free], uncond[:, free])  # the sampled tokens are the same in both passes


def test_infill_template_syntax():
    enc = lambda s: [ord(ch) for ch in s]  # noqa: E731
    m = 999
    assert parse_infill("ab<mask*3>c<mask>", enc, m) == [97, 98, m, m, m, 99, m]
    assert parse_infill("<mask*2>", enc, m) == [m, m]
    assert parse_infill("plain", enc, m) == enc("plain")
    for bad, where in [("a<mask*0>b", "asks for no blank"), ("a<mask*x>", "malformed blank"),
                       ("a<mask", "malformed blank"), ("<mask*3", "malformed blank"), ("x <mask* 2>", "malformed")]:
        with pytest.raises(ConfigError, match=where):
            parse_infill(bad, enc, m)


def test_prefix_cache_needs_the_backbone_hook():
    with pytest.raises(ValueError, match="KV-cache hook"):
        sample(OBJ, JOINT.denoiser, 1, L, 0, gen(), sampler="fast_dllm", block_length=2, prefix_cache=True)
    with pytest.raises(ValueError, match="does not combine with guidance"):
        sample(OBJ, JOINT.denoiser, 1, L, 0, gen(), sampler="fast_dllm", prefix=TEMPLATES[1], prefix_cache=True,
               guidance=1.0)
