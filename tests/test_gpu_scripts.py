"""The prepared GPU runs (bench/gpu_train.py, bench/gpu_sample.py) at toy sizes on CPU: every table they print is
complete (each row measured, or saying why not), their own checks pass, and the flash-attn stand-ins through which
the MDLM reference DiT runs compute flash-attn's functions (against float64 written out here)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import gpu_sample  # noqa: E402

# rows a CPU may leave without a value, and why
ALLOWED = ("skipped (no CUDA)", "skipped (--skip ", "not available")

# A stand-in for the reference's models/dit.py, written here: it calls flash-attn and omegaconf the way that file
# does (module imports, apply_rotary_emb_qkv_ on (B, S, 3, H, D), the varlen packed attention), so the loader and
# the stand-ins run in the toy run.
FAKE_REFERENCE = '''
import flash_attn
import flash_attn.layers.rotary
import omegaconf
import torch
import torch.nn as nn


class DIT(nn.Module):
    def __init__(self, config, vocab_size):
        super().__init__()
        m = config.model
        self.heads = m.n_heads
        self.embed = nn.Embedding(vocab_size, m.hidden_size)
        self.qkv = nn.Linear(m.hidden_size, 3 * m.hidden_size)
        self.head = nn.Linear(m.hidden_size, vocab_size)

    def forward(self, indices, sigma):
        x = self.embed(indices)
        b, s, d = x.shape
        hd = d // self.heads
        ang = torch.arange(s, device=x.device)[:, None] * torch.ones(hd // 2, device=x.device)[None]
        qkv = self.qkv(x).view(b, s, 3, self.heads, hd)
        qkv = flash_attn.layers.rotary.apply_rotary_emb_qkv_(qkv, ang.cos(), ang.sin())
        cu = torch.arange(0, (b + 1) * s, step=s, dtype=torch.int32, device=x.device)
        o = flash_attn.flash_attn_interface.flash_attn_varlen_qkvpacked_func(qkv.reshape(b * s, 3, self.heads, hd),
                                                                             cu, s, 0.0, causal=False)
        return self.head(o.reshape(b, s, d))
'''


def run_toy(script, out, extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(REPO, "bench", script), "--toy", "--out", str(out), "--budget", "900",
           "--section-scale", "10", "--compile-backend", "aot_eager", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """Both scripts' toy runs, side by side (one thread each). The compile-heavy sections and the nested pytest
    are skipped here to keep this fast; the full rehearsal is in bench/results (BENCHMARKS.md, GPU section)."""
    tmp = tmp_path_factory.mktemp("gpu_scripts")
    ref = tmp / "fake_dit.py"
    ref.write_text(FAKE_REFERENCE)
    procs = {"gpu_train": run_toy("gpu_train.py", tmp / "train", ["--skip", "gpu_tests,throughput_compiled,"
                                                                           "compile_check"]),
             "gpu_sample": run_toy("gpu_sample.py", tmp / "sample", ["--skip", "sampling_compile,reference_compiled",
                                                                      "--mdlm-ref", str(ref)])}
    out = {}
    for name, p in procs.items():
        text, _ = p.communicate(timeout=600)
        with open(tmp / name.split("_")[1] / f"{name}.json") as fh:
            out[name] = (p.returncode, text, json.load(fh))
    return out


@pytest.mark.parametrize("name", ["gpu_train", "gpu_sample"])
def test_toy_run_prints_complete_tables_and_its_checks_pass(toy_runs, name):
    rc, text, data = toy_runs[name]
    assert rc == 0, f"{name} failed: {data['failures']}\n{text[-3000:]}"
    summary = text[text.index(f"##### {name}: summary"):]
    for table in data["tables"].values():
        assert f"**{table['title']}**" in summary
        assert table["rows"], table["title"]
        for row in table["rows"]:
            assert f"| {row['row']} |" in summary, f"row {row['row']!r} missing from the printed table"
            if row["status"] != "done":
                assert row["status"].startswith(ALLOWED), f"{table['title']} / {row['row']}: {row['status']}"
                continue
            values = [v for k, v in row.items() if k not in ("row", "status")]
            assert any(values), f"{row['row']}: marked done but empty"
            v = row.get("verdict", "")
            assert not v.startswith("FAIL") and not v.startswith("error"), f"{row['row']}: {v}"


def test_toy_runs_measured_what_a_cpu_can(toy_runs):
    """The rows that need no GPU hold values (a CPU run that skipped them would prove nothing for the GPU run)."""
    tables = {n: {r["row"]: r for t in d[2]["tables"].values() for r in t["rows"]} for n, d in toy_runs.items()}
    train, sample = tables["gpu_train"], tables["gpu_sample"]
    for key in ("bf16 autocast loss vs fp32", "SDPA flash vs float64 softmax", "SDPA math vs float64 softmax",
                "pinned asynchronous input copies", "resume 3+3 vs 6 steps, bit for bit",
                "CUDA RNG state restored on resume", "mdlm debug eager 4x32", "ar debug eager 8x32",
                "bf16 matmul peak"):
        assert train[key]["status"] == "done", (key, train[key]["status"])
    assert train["resume 3+3 vs 6 steps, bit for bit"]["verdict"] == "ok"
    for key in ("ddpm B4 bf16 eager", "ddpm_cache B1 bf16 eager", "ddpm_cache B4 bf16 CUDA graph",
                "scan bf16: PyTorch scan vs float64", "dimamba training tokens/s: PyTorch scan",
                "mdtrain DiT fwd+bwd, eager", "MDLM reference DiT fwd+bwd (flash-attn -> SDPA)",
                "ratio mdtrain / reference, eager"):
        assert sample[key]["status"] == "done", (key, sample[key]["status"])
    assert sample["ddpm B4 bf16 eager"]["samples"] == "4 of 4"


# ------------------------------------------------------------------------------------------ the stand-ins


def test_attention_stand_in_is_softmax_attention_in_float64():
    g = torch.Generator().manual_seed(0)
    b, s, h, d = 3, 7, 2, 8
    qkv = torch.randn(b * s, 3, h, d, generator=g, dtype=torch.float64)
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32)
    for causal in (False, True):
        out = gpu_sample._varlen_qkvpacked(qkv, cu, s, 0.0, causal=causal)
        q, k, v = qkv.view(b, s, 3, h, d).unbind(2)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
        if causal:
            scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), -math.inf)
        ref = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(b * s, h, d)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(NotImplementedError):  # unequal lengths are not what the reference's call does
        gpu_sample._varlen_qkvpacked(qkv[:-1], cu, s)


def test_rotary_stand_in_rotates_each_half_pair_by_its_position_angle():
    g = torch.Generator().manual_seed(1)
    b, s, h, d, rot = 2, 5, 3, 12, 8  # rotary on the first 8 of 12 dims, as flash-attn's rotary_dim
    qkv = torch.randn(b, s, 3, h, d, generator=g)
    theta = torch.rand(s, rot // 2, generator=g) * 6
    out = gpu_sample._rotary_qkv(qkv, theta.cos(), theta.sin())
    for i in (0, 1):  # q and k: pair (x_j, x_{j + rot/2}) is the complex number x_j + i x_{j + rot/2}, times e^{i theta}
        x = qkv[:, :, i]
        z = torch.complex(x[..., :rot // 2].double(), x[..., rot // 2:rot].double()) * \
            torch.polar(torch.ones_like(theta.double()), theta.double())[None, :, None, :]
        torch.testing.assert_close(out[:, :, i, ..., :rot // 2].double(), z.real, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:, :, i, ..., rot // 2:rot].double(), z.imag, rtol=1e-5, atol=1e-5)
        assert torch.equal(out[:, :, i, ..., rot:], qkv[:, :, i, ..., rot:])
    assert torch.equal(out[:, :, 2], qkv[:, :, 2])  # v is never rotated


def test_reference_loader_leaves_no_stand_in_behind(tmp_path):
    path = tmp_path / "fake_dit.py"
    path.write_text(FAKE_REFERENCE)
    before = {k for k in sys.modules if k.split(".")[0] in ("flash_attn", "omegaconf")}
    mod = gpu_sample.load_reference(str(path))
    after = {k for k in sys.modules if k.split(".")[0] in ("flash_attn", "omegaconf")}
    assert after == before
    net = mod.DIT(gpu_sample.ref_config(gpu_sample.Sizes(True)), vocab_size=11)
    assert net(torch.randint(0, 11, (2, 6)), torch.zeros(2)).shape == (2, 6, 11)
    assert mod.flash_attn.__stand_in__ == "SDPA"
