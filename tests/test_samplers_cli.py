"""`mdtrain sample` with every sampler: infill templates keep their text, options reach the sampler, bad templates
and options are one config-error line; every `sample.*` field is documented and read."""
import dataclasses
import inspect
import json
import os

import pytest
import torch

from mdtrain.cli import main as cli
from mdtrain.config import Config
from mdtrain.data.tokenizers import BytesTokenizer
from mdtrain.exported import save_exported
from mdtrain.models import build_model
from mdtrain.objectives import SampleConfig
from mdtrain.objectives.samplers import SAMPLERS, USES, sample
from mdtrain.sampling_cli import _CLI_FIELDS

SEQ = 24


def _export(root, objective, model_name):
    cfg = Config()
    cfg.model.name, cfg.model.flavor, cfg.model.dropout = model_name, "debug", 0.0
    cfg.objective.name, cfg.data.seq_len = objective, SEQ
    tok = BytesTokenizer()
    model = build_model(cfg.model, tok.vocab_size, SEQ)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-initialised adaLN/head would make every sampler see uniform logits
        for name, p in model.named_parameters():
            if "adaLN" in name or name.startswith("head"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    out = os.path.join(root, objective)
    save_exported(out, model.state_dict(), cfg, tok)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("exports"))
    return {"mdlm": _export(root, "mdlm", "dit"), "ar": _export(root, "ar", "causal")}


def run(capsys, path, *overrides, out=None):
    rc = cli(["sample", path, "sample.num_samples=2", "sample.batch_size=2", "sample.steps=8", "sample.show=0",
              *([f"sample.out={out}"] if out else []), *overrides])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


MASKED = [s for s in SAMPLERS if s != "ar"]


@pytest.mark.parametrize("sampler", MASKED)
def test_infill_keeps_the_text_with_every_masked_sampler(exports, capsys, tmp_path, sampler):
    out = str(tmp_path / "s.jsonl")
    rc, stdout, err = run(capsys, exports["mdlm"], f"sample.sampler={sampler}", "sample.infill=ab<mask*4>cd<mask>e",
                          out=out)
    assert rc == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["sampler"] == sampler and summary["num_samples"] == 2 and summary["nfe"] >= 1
    tok = BytesTokenizer()
    for row in map(json.loads, open(out)):
        ids = row["ids"]
        assert len(ids) == SEQ and tok.mask_id not in ids
        assert ids[0] == tok.bos_id and ids[1:3] == list(b"ab") and ids[7:9] == list(b"cd") and ids[10] == ord("e")


def test_guidance_and_sampler_options_reach_the_sampler(exports, capsys, tmp_path):
    base = ["sample.sampler=ddpm", "sample.prefix=def "]
    _, plain, _ = run(capsys, exports["mdlm"], *base)
    _, guided, _ = run(capsys, exports["mdlm"], *base, "sample.guidance=1.5")
    assert json.loads(guided.splitlines()[-1])["nfe"] == 2 * json.loads(plain.splitlines()[-1])["nfe"]
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    run(capsys, exports["mdlm"], "sample.sampler=remdm", "sample.remdm_eta=0", out=a)
    run(capsys, exports["mdlm"], "sample.sampler=ddpm", out=b)
    assert open(a).read() == open(b).read()  # remdm at strength 0 is ddpm, through the CLI too
    run(capsys, exports["mdlm"], "sample.sampler=remdm", "sample.remdm_eta=0.5", out=a)
    assert open(a).read() != open(b).read()


@pytest.mark.parametrize("overrides,message", [
    (["sample.infill=ab<mask*x>cd"], "sample.infill: malformed blank '<mask*x>cd' at character 2"),
    (["sample.infill=ab<mask*0>"], "asks for no blank"),
    (["sample.infill=<mask*40>"], "sample.infill encodes to 41 tokens with BOS; the model generates 24"),
    ([f"sample.prefix={'x' * 23}"], "sample.prefix encodes to 24 tokens"),
    (["sample.infill=a<mask>", "sample.prefix=b"], "not both"),
    (["sample.sampler=ddpm", "sample.threshold=0.5"], "does not use threshold (used by threshold: fast_dllm)"),
    (["sample.sampler=fast_dllm", "sample.prefix_cache=true", "sample.guidance=1", "sample.prefix=a"],
     "does not combine with guidance"),
    (["sample.sampler=maskgit"], "must be one of"),
])
def test_bad_templates_and_options_are_one_config_error_line(exports, capsys, overrides, message):
    rc, _, err = run(capsys, exports["mdlm"], *overrides)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("mdtrain sample: config error:"), err
    assert message in lines[0], lines[0]


def test_ar_samples_from_bos_or_a_prefix_and_refuses_infill(exports, capsys, tmp_path):
    out = str(tmp_path / "ar.jsonl")
    rc, _, err = run(capsys, exports["ar"], out=out)
    assert rc == 0, err
    assert all(json.loads(r)["ids"][0] == BytesTokenizer().bos_id for r in open(out))
    rc, _, err = run(capsys, exports["ar"], "sample.prefix=ab", out=out)
    assert rc == 0 and all(json.loads(r)["ids"][1:3] == list(b"ab") for r in open(out))
    rc, _, err = run(capsys, exports["ar"], "sample.infill=a<mask>b")
    assert rc == 2 and "generates left to right" in err


def test_every_sample_field_is_documented_and_read():
    """A field is either consumed by `mdtrain sample` itself or is a keyword of sample() with the same default
    (so the defaults the CLI passes never trip the unused-option check), and each option names its samplers."""
    params = inspect.signature(sample).parameters
    for f in dataclasses.fields(SampleConfig):
        assert f.metadata.get("doc"), f.name
        if f.name in _CLI_FIELDS:
            continue
        assert f.name in params, f"sample.{f.name} is not read by sample()"
        assert params[f.name].default == f.default, f.name
        if f.name in USES:
            d = f.metadata["doc"]
            assert any(s in d for s in USES[f.name]) or "masked samplers" in d, f"sample.{f.name}: say who reads it"
    assert set(SAMPLERS) | {"auto"} == set(dataclasses.fields(SampleConfig)[0].metadata["choices"])
