"""`mdtrain export --format hf` read back by transformers itself: the same logits as mdtrain on the same input for
the MDLM DiT (and MDLM's own reference logits), the md4-variant DiT, the Llama family as native transformers
models (AR) and as remote code (bidirectional), and the causal transformer; the tokenizer through AutoTokenizer;
no file in the directory needs unpickling."""
import os

import pytest
import torch
from safetensors.torch import load_file

from mdtrain.exported import load_exported, save_exported
from mdtrain.interop.hf_export import export_hf
from mdtrain.interop.hf_import import import_hf
from mdtrain.interop.mdlm import import_mdlm
from tests.interop_util import FIXTURE, TEXT, hf_model, mdlm_tokenizer, perturb_, read_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _modules_cache(tmp_path, monkeypatch):
    # transformers copies remote code into HF_MODULES_CACHE; keep it out of the user's home
    import transformers.dynamic_module_utils as dmu
    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


def _no_pickles(directory):
    for name in os.listdir(directory):
        assert name.endswith((".json", ".safetensors", ".py")), name
        with open(os.path.join(directory, name), "rb") as fh:
            head = fh.read(4)
        assert not head.startswith(b"\x80") and not head.startswith(b"PK"), name  # no pickle, no torch zip


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_mdlm_dit_loads_with_automodel_and_gives_the_reference_logits(tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    tok = "hf:" + mdlm_tokenizer(str(tmp_path / "tok"))
    import_mdlm(FIXTURE, str(tmp_path / "exp"), tok)
    info = export_hf(str(tmp_path / "exp"), str(tmp_path / "hf"))
    assert info["remote_code"] and info["architecture"] == "MdtrainForMaskedLM"
    _no_pickles(tmp_path / "hf")
    model = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    ref = load_file(os.path.join(FIXTURE, "expected.safetensors"))
    mine = load_exported(str(tmp_path / "exp")).model
    with torch.no_grad():
        theirs = model(ref["input_ids"], timesteps=ref["sigma"]).logits
        ours = mine(ref["input_ids"], ref["sigma"])
    assert (theirs - ours).abs().max() <= 1e-5 and (theirs[..., :97] - ref["logits"]).abs().max() <= 1e-5
    config = read_json(tmp_path / "hf" / "config.json")
    assert config["mask_token_id"] == 96 and config["mdtrain"]["objective"]["name"] == "mdlm"
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=False)
    mdt = load_exported(str(tmp_path / "exp")).tokenizer
    text = "abc def 123"
    assert hf_tok(text, add_special_tokens=False).input_ids == mdt.encode(text)
    assert hf_tok.mask_token_id == mdt.mask_id == 96


@pytest.fixture(scope="module")
def llama_imports(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    out = {}
    for kind in ("llama", "qwen2", "gpt2"):
        hf_model(kind, str(root / kind))
        import_hf(str(root / kind), str(root / f"{kind}-ar"))
        out[kind] = str(root / f"{kind}-ar")
    import_hf(str(root / "llama"), str(root / "llada"), recipe=os.path.join(REPO, "configs", "adapt_llada.yaml"))
    out["llada"] = str(root / "llada")
    return out


@pytest.mark.parametrize("kind,arch", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
                                       ("gpt2", "GPT2LMHeadModel")])
def test_ar_llama_family_exports_as_native_transformers(llama_imports, kind, arch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    info = export_hf(llama_imports[kind], str(tmp_path / "hf"))
    # the mask row (id 90) is dropped, the pad (91) becomes 90
    assert info["architecture"] == arch and not info["remote_code"] and info["vocab_size"] == 91
    _no_pickles(tmp_path / "hf")
    assert not any(n.endswith(".py") for n in os.listdir(tmp_path / "hf"))
    assert "auto_map" not in read_json(tmp_path / "hf" / "config.json")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(model).__name__ == arch
    bundle = load_exported(llama_imports[kind])
    x = torch.randint(0, 80, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs, ours = model(x).logits, bundle.model(x)
    keep = [i for i in range(92) if i != 90]
    assert _rel(theirs, ours[..., keep]) <= 1e-4
    assert read_json(tmp_path / "hf" / "config.json")["pad_token_id"] == 90
    if kind != "qwen2":  # transformers gives qwen2 configs its own (regex + byte-level) tokenizer class
        ids = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(TEXT, add_special_tokens=False).input_ids
        assert ids == bundle.tokenizer.encode(TEXT)


def test_bidirectional_llama_exports_with_remote_code(llama_imports, tmp_path):
    from transformers import AutoModelForMaskedLM
    info = export_hf(llama_imports["llada"], str(tmp_path / "hf"))
    assert info["remote_code"] and info["vocab_size"] == 92 and info["mask_token_id"] == 90
    _no_pickles(tmp_path / "hf")
    model = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    bundle = load_exported(llama_imports["llada"])
    x = torch.randint(0, 92, (2, 32), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 20:] = False
    with torch.no_grad():
        theirs = model(x, attention_mask=mask).logits
        ours = bundle.model(x, None, mask)
    assert _rel(theirs[0], ours[0]) <= 1e-4 and _rel(theirs[1, :20], ours[1, :20]) <= 1e-4


def _mdtrain_export(tmp_path, model_overrides, objective):
    """An mdtrain export of a randomly initialised, perturbed debug model (bytes tokenizer)."""
    from mdtrain.config import load_config
    from mdtrain.data.tokenizers import BytesTokenizer
    from mdtrain.models import build_model
    cfg = load_config(None, [*model_overrides, f"objective.name={objective}", "data.seq_len=32"])
    tok = BytesTokenizer()
    torch.manual_seed(0)
    model = perturb_(build_model(cfg.model, tok.vocab_size, 32), scale=0.1)
    save_exported(str(tmp_path / "exp"), model.state_dict(), cfg, tok)
    return str(tmp_path / "exp")


@pytest.mark.parametrize("overrides,objective,auto", [
    (["model.name=causal"], "ar", "AutoModelForCausalLM"),
    (["model.name=dit", "model.variant=md4"], "md4", "AutoModelForMaskedLM")])
def test_causal_transformer_and_md4_dit_export_with_remote_code(tmp_path, overrides, objective, auto):
    import transformers
    from transformers import AutoTokenizer
    exp = _mdtrain_export(tmp_path, overrides, objective)
    export_hf(exp, str(tmp_path / "hf"))
    _no_pickles(tmp_path / "hf")
    model = getattr(transformers, auto).from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    bundle = load_exported(exp)
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(7))
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        theirs = model(x, timesteps=t).logits if objective != "ar" else model(x).logits
        ours = bundle.model(x, t if objective != "ar" else None)
    assert _rel(theirs, ours) <= 1e-5
    text = "héllo, wörld"  # bytes: UTF-8 round trip through the exported tokenizer
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=False)
    assert hf_tok(text, add_special_tokens=False).input_ids == list(text.encode()) and hf_tok.decode(
        list(text.encode())) == text


def test_dimamba_has_no_hf_export(tmp_path):
    exp = _mdtrain_export(tmp_path, ["model.name=dimamba"], "mdlm")
    with pytest.raises(ValueError, match="dimamba has no Hugging Face export"):
        export_hf(exp, str(tmp_path / "hf"))
