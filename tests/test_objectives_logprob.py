"""The one logits reader (objectives/logprob.py): values and gradients against plain autograd, chunking, dtypes,
and that a loss never keeps a full-size float32 copy of the logits for backward."""
import pytest
import torch

from mdtrain.objectives import ObjectiveConfig, build_objective, logprob
from mdtrain.objectives.logprob import gather_lse, softmax_expectation, target_logprob


@pytest.fixture(params=[None, 3])
def suppress(request):
    return request.param


def test_gradcheck_gather_lse_and_expectation(suppress):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    index = torch.tensor([[[0, 1], [2, 4], [1, 1]], [[4, 0], [2, 2], [0, 4]]])
    values = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    torch.autograd.gradcheck(lambda x: gather_lse(x, index, None), (logits,))
    torch.autograd.gradcheck(lambda x: target_logprob(x, index[..., 0], suppress), (logits,))
    torch.autograd.gradcheck(lambda x, v: softmax_expectation(x, v, suppress), (logits, values))


def test_matches_plain_log_softmax_across_chunks(monkeypatch, suppress):
    monkeypatch.setattr(logprob, "CHUNK_ELEMENTS", 7)  # one row per chunk
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 6, generator=g, requires_grad=True)
    target = torch.randint(0, 6, (3, 4), generator=g)
    if suppress is not None:
        target = torch.where(target == suppress, 0, target)
    values = torch.randn(6, generator=g, requires_grad=True)
    r = torch.randn(3, 4, generator=g)

    out = target_logprob(logits, target, suppress) + softmax_expectation(logits, values, suppress)
    grads = torch.autograd.grad((out * r).sum(), (logits, values))
    x = logits
    if suppress is not None:
        x = x.index_fill(-1, torch.tensor([suppress]), float("-inf"))
    ref = torch.log_softmax(x, -1).gather(-1, target[..., None])[..., 0] + torch.softmax(x, -1) @ values
    ref_grads = torch.autograd.grad((ref * r).sum(), (logits, values))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grads, ref_grads)
    if suppress is not None:
        assert (grads[0][..., suppress] == 0).all()


def test_bf16_logits_give_float32_values_and_bf16_grads():
    logits = torch.randn(2, 3, 8).bfloat16().requires_grad_()
    lp = target_logprob(logits, torch.zeros(2, 3, dtype=torch.long), 7)
    assert lp.dtype == torch.float32
    lp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    ref = torch.log_softmax(logits.detach().float()[..., :7], -1)[..., 0]
    torch.testing.assert_close(lp.detach(), ref)


@pytest.mark.parametrize("name", ["mdlm", "md4", "genmd4", "d3pm", "sedd", "ar"])
def test_loss_saves_no_full_size_float32_copy_of_the_logits(name):
    """Only the network's own (here bf16) logits may be kept for backward at full B×L×V size."""
    B, L, V = 2, 8, 64
    o = build_objective(ObjectiveConfig(name=name), V, V - 1)
    table = torch.randn(V, V).bfloat16().requires_grad_()
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    x0 = torch.randint(0, V - 1, (B, L), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = o.loss(lambda x, c: table[x], x0, generator=torch.Generator().manual_seed(1))
    loss.backward()
    big = [d for d, n in saved if n >= B * (L - 1) * V and d != torch.bfloat16]
    assert not big, f"{name} saved full-size {big} tensors"
    assert torch.isfinite(table.grad.float()).all()


def test_each_objective_reads_logits_through_its_own_reader():
    """A reader given to one objective (tensor parallelism gives its model's objective one) is used by that objective
    only: another objective in the same process keeps reading whole-vocabulary logits."""
    calls = []

    class Counting(logprob.LogitsReader):
        def gather_lse(self, logits, index, suppress_id=None):
            calls.append(suppress_id)
            return super().gather_lse(logits, index, suppress_id)

    o, other = build_objective(ObjectiveConfig(name="mdlm"), 5, 4), build_objective(ObjectiveConfig(name="mdlm"), 5, 4)
    o.logprob = Counting()
    x0 = torch.zeros(1, 3, dtype=torch.long)
    a, _ = o.loss(lambda x, c: torch.zeros(1, 3, 5), x0, generator=torch.Generator().manual_seed(0))
    assert calls == [4]
    b, _ = other.loss(lambda x, c: torch.zeros(1, 3, 5), x0, generator=torch.Generator().manual_seed(0))
    assert calls == [4] and other.logprob is logprob.LOCAL
    assert torch.equal(a, b)
