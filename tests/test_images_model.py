"""The unet backbone (MD4's CIFAR-10 U-Net): parameter count from the layer shapes and MD4's reported size, FLOPs
against torch's own FLOP counter, the pixel-token layout at its input and output, zero init, class conditioning,
per-block activation checkpointing, and the config checks."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mdtrain.config import load_config
from mdtrain.configtools import ConfigError
from mdtrain.models import ModelConfig, build_model, count_params, flops_per_token
from mdtrain.parallel.blocks import wrap_blocks


def unet_params_closed_form(n: int, f: int, c: int, v: int, cond: int, classes: int = 0) -> int:
    """Parameters of MD4's unet from its layer shapes (networks/unet.py, models/backward.py), counted by hand."""
    conv3 = lambda i, o: i * o * 9 + o  # noqa: E731 (3x3 kernel + bias)
    gn = lambda ch: 2 * ch  # noqa: E731 (scale + bias)

    def res(i, o):
        return gn(i) + conv3(i, o) + cond * o + gn(o) + conv3(o, o) + (i * o + o if i != o else 0)

    embed = v * f
    time = (cond * (2 if classes else 1)) * 4 * cond + 4 * cond + 4 * cond * cond + cond + classes * cond
    attn = gn(f) + 4 * (f * f + f)
    return (embed + time + conv3(c * f, f) + n * res(f, f) + 2 * res(f, f) + attn + (n + 1) * res(2 * f, f)
            + gn(f) + conv3(f, c * v))


def test_md4_cifar10_unet_has_md4s_parameter_count():
    cfg = ModelConfig(name="unet", flavor="md4-cifar10", image_shape=[32, 32, 3])
    with torch.device("meta"):
        model = build_model(cfg, 257, 3072)
    counts = count_params(model)
    assert counts["total"] == unet_params_closed_form(32, 128, 3, 257, 128)
    assert round(counts["total"] / 1e6, 1) == 28.4  # MD4 (jax.eval_shape of its CIFAR-10 config): 28.4M
    assert len(model.blocks) == 32 + 3 + 33
    cond = count_params(ModelConfig(name="unet", flavor="debug", image_shape=[4, 4, 3], num_classes=10), 257)
    assert cond["total"] == unet_params_closed_form(2, 64, 3, 257, 32, classes=10)


@pytest.mark.parametrize("classes", [0, 5])
def test_unet_flops_match_torchs_flop_counter(classes):
    cfg = ModelConfig(name="unet", flavor="debug", n_layers=1, d_model=32, n_heads=2, image_shape=[6, 4, 3],
                      num_classes=classes)
    model = build_model(cfg, 257, 72)
    x = torch.randint(0, 257, (3, 72))
    labels = torch.tensor([0, 1, 4]) if classes else None
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # MATH: attention as counted bmm
        model(x, torch.rand(3), labels=labels)
    measured = 3 * counter.get_total_flops() / x.numel()
    got = flops_per_token(cfg, 257, 72)
    assert got["exact"] == pytest.approx(measured, rel=1e-12)
    assert got["rule"] == pytest.approx(measured, rel=0.05)  # 6N/C + attention: the same work, biases included


def test_pixel_tokens_are_raster_order_with_channels_interleaved_at_input_and_output():
    h, w, c, v = 3, 5, 3, 257
    cfg = ModelConfig(name="unet", flavor="debug", n_layers=1, d_model=32, n_heads=1, image_shape=[h, w, c])
    model = build_model(cfg, v, h * w * c)
    torch.nn.init.normal_(model.head.weight)
    x = torch.randint(0, 256, (2, h * w * c))
    seen = {}
    model.conv_in.register_forward_hook(lambda m, args, out: seen.update(conv_in=args[0]))
    model.head.register_forward_hook(lambda m, args, out: seen.update(head=out))
    logits = model(x, torch.rand(2))
    emb = model.embed.weight
    f = cfg.d_model or 32
    for y in range(h):
        for xx in range(w):
            for ch in range(c):
                token = (y * w + xx) * c + ch
                # input: pixel (y, x) carries its C sub-pixel embeddings side by side
                assert torch.equal(seen["conv_in"][:, ch * f:(ch + 1) * f, y, xx], emb[x[:, token]])
                # output: channel ch's V logits of pixel (y, x) are the head's channels ch·V ... ch·V + V - 1
                assert torch.equal(logits[:, token], seen["head"][:, ch * v:(ch + 1) * v, y, xx])


def test_zero_init_gives_uniform_logits_and_labels_condition_the_output():
    cfg = ModelConfig(name="unet", flavor="debug", n_layers=1, d_model=32, n_heads=1, image_shape=[4, 4, 3],
                      num_classes=3)
    model = build_model(cfg, 257, 48).eval()  # no dropout
    x = torch.randint(0, 257, (2, 48))
    t = torch.rand(2)
    assert torch.count_nonzero(model(x, t, labels=torch.tensor([0, 1]))) == 0
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    a = model(x, t, labels=torch.tensor([0, 0]))
    b = model(x, t, labels=torch.tensor([0, 2]))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="class-conditional: pass labels"):
        model(x, t)
    with pytest.raises(ValueError, match="models 4x4x3 images = 48 tokens"):
        model(x[:, :40], t, labels=torch.tensor([0, 0]))


def test_activation_checkpointing_per_block_gives_identical_gradients():
    cfg = ModelConfig(name="unet", flavor="debug", n_layers=2, d_model=32, n_heads=1, image_shape=[4, 4, 3],
                      dropout=0.0, num_classes=2)
    x = torch.randint(0, 257, (2, 48))
    t, labels = torch.rand(2), torch.tensor([1, 0])
    grads = []
    for checkpoint in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, 257, 48)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
        if checkpoint:
            wrap_blocks(model, checkpoint=True)
        model(x, t, labels=labels).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-7, msg=n)


def test_image_config_errors_say_what_to_set():
    base = ["model.name=unet", "objective.name=md4", "data.seq_len=48"]
    with pytest.raises(ConfigError, match=r"needs model.image_shape=\[H,W,C\]"):
        load_config(None, base)
    with pytest.raises(ConfigError, match="48 pixel tokens per image, but data.seq_len=32"):
        load_config(None, ["model.name=unet", "model.image_shape=[4,4,3]", "data.seq_len=32"])
    with pytest.raises(ConfigError, match="needs model.name=unet"):
        load_config(None, ["model.num_classes=10"])
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_config(None, [*base, "model.image_shape=[4,4,3]", "model.d_model=48", "model.n_heads=1"])
    with pytest.raises(ConfigError, match="no tensor-parallel layout"):
        load_config(None, [*base, "model.image_shape=[4,4,3]", "parallel.tp=2"])
    cfg = load_config(None, [*base, "model.image_shape=[4,4,3]", "model.num_classes=10"])
    assert cfg.model.num_classes == 10
