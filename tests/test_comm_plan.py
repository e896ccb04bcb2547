"""bench/comm_plan.py's traffic model against what the engines really send, and the planning flavors' sizes.

The bytes are measured in one real engine step on 2 gloo ranks (objective loss, backward, clipped optimizer step):
every c10d collective the engines issue is recorded with its payload, and the kernel counts what gloo writes
to its sockets. The parameter counts are checked against the DiT's layer shapes written out here.
"""
import os
import sys

import pytest

from mdtrain.models import ModelConfig
from mdtrain.models.flops import count_params

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import comm_plan  # noqa: E402


def dit_params(layers, d, cond, vocab):
    """The mdlm DiT from its layers: per block two LayerNorm scales, qkv 3d², out d², MLP d·4d + 4d and 4d·d + d,
    adaLN cond·6d + 6d; plus the embedding, the time MLP (256 -> cond -> cond), the final norm and adaLN, and the
    head."""
    block = 2 * d + 4 * d * d + (4 * d * d + 4 * d) + (4 * d * d + d) + (cond * 6 * d + 6 * d)
    time = (256 * cond + cond) + (cond * cond + cond)
    return layers * block + vocab * d + time + d + (cond * 2 * d + 2 * d) + (d * vocab + vocab)


@pytest.mark.parametrize("flavor,shape", [("small", (12, 768)), ("medium", (24, 1024)), ("1.3b", (24, 2048)),
                                          ("7b", (32, 4096))])
def test_plan_flavors_have_the_parameters_their_layer_shapes_give(flavor, shape):
    total = count_params(ModelConfig(name="dit", flavor=flavor), 50258)["total"]
    assert total == dit_params(*shape, 128, 50258)
    assert {"1.3b": 1.45e9, "7b": 6.96e9}.get(flavor, total) == pytest.approx(total, rel=0.01)


def test_predicted_bytes_equal_what_ddp_fsdp_and_zero_send_on_2_ranks():
    specs = [("ddp", 0, 1), ("fsdp", 0, 1), ("deepspeed", 1, 1), ("deepspeed", 2, 1), ("deepspeed", 3, 1)]
    rows = comm_plan.run_check(worlds=(2,), specs=specs)
    assert [r["layout"] for r in rows] == ["ddp", "fsdp", "zero1", "zero2", "zero3"]
    for r in rows:
        assert r["measured"] == r["predicted"], r["layout"]  # payload per (collective, group), exact
        # what gloo wrote to its sockets: the ring bytes plus its per-message framing
        assert r["wire"] <= r["wchar"] <= 1.01 * r["wire"] + 1536 * r["calls"], r["layout"]
        assert r["scalars"] <= 16  # the rest are step scalars (grad norm)
