"""`mdtrain import hf` against transformers itself: random tiny Llama (grouped-query attention, Llama 3 rotary
scaling, untied), Qwen2 (one kv head, qkv biases, YaRN, tied, a padded embedding) and GPT-2 (LayerNorm, GELU,
learned positions, Conv1D weights) models saved by ``save_pretrained``, imported, and compared on the same ids."""
import os

import pytest
import torch

from mdtrain.data.tokenizers import build_tokenizer, load_tokenizer
from mdtrain.exported import load_exported
from mdtrain.interop.hf_import import import_hf
from tests.interop_util import TEXT, hf_model, read_json

FAMILIES = ("llama", "qwen2", "gpt2")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = {}
    for kind in FAMILIES:
        root = tmp_path_factory.mktemp(kind)
        model = hf_model(kind, str(root / "hf"))
        info = import_hf(str(root / "hf"), str(root / "export"))
        out[kind] = (model, str(root / "hf"), str(root / "export"), info)
    return out


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kind", FAMILIES)
def test_imported_logits_equal_transformers(imported, kind):
    model, _, export, info = imported[kind]
    bundle = load_exported(export)
    x = torch.randint(0, 80, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x).logits
        got = bundle.model(x)
    n = min(want.shape[-1], 90)  # the tokenizer's ids (qwen2's embedding is padded past them)
    assert _rel(got[..., :n], want[..., :n]) <= 1e-4
    assert bundle.cfg.objective.name == "ar" and bundle.cfg.model.llama.attention == "causal"
    tok = bundle.tokenizer
    assert (tok.vocab_size, tok.mask_id, tok.pad_id) == (92, 90, 91) and info["vocab_size"] == 92
    # new rows: the mask at the mean of the existing embedding rows, the pad at zero
    emb = bundle.model.embed.weight
    assert torch.allclose(emb[90], emb[:90].double().mean(0).float(), atol=1e-6) and not emb[91].any()
    # padding: real tokens' logits do not depend on padded positions (left part of a right-padded batch)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, 30:] = False
    with torch.no_grad():
        padded = bundle.model(x, None, mask)
        short = bundle.model(x[:1, :30])
    assert _rel(padded[0, :30], short[0]) <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_kv_cache_decoding_equals_the_full_forward(imported, kind):
    bundle = load_exported(imported[kind][2])
    x = torch.randint(0, 80, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = bundle.model(x)
        a, cache = bundle.model.decode_step(x[:, :7])
        b, cache = bundle.model.decode_step(x[:, 7:12], cache)
        c, _ = bundle.model.decode_step(x[:, 12:], cache)
    assert _rel(torch.cat([a, b, c], 1), full) <= 1e-5


def test_hf_tokenizer_through_hf_spec(imported):
    from transformers import AutoTokenizer
    _, hf_dir, export, _ = imported["gpt2"]
    saved = load_tokenizer(os.path.join(export, "tokenizer"))
    again = build_tokenizer(f"hf:{export}/tokenizer")  # what `mdtrain prepare --tokenizer hf:...` builds
    theirs = AutoTokenizer.from_pretrained(hf_dir)
    ids = saved.encode(TEXT)
    assert ids == again.encode(TEXT) == theirs(TEXT, add_special_tokens=False).input_ids
    assert saved.special_ids == again.special_ids and saved.vocab_size == again.vocab_size == 92
    # GPT-2 style: eos doubles as bos; mask and pad are appended (a pad text never produces)
    assert saved.bos_id == saved.eos_id == theirs.eos_token_id and (saved.mask_id, saved.pad_id) == (90, 91)
    assert saved.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_unsupported_configs_and_missing_weights_are_clear_errors(imported, tmp_path):
    import json
    import shutil
    _, hf_dir, _, _ = imported["llama"]
    d = tmp_path / "m"
    shutil.copytree(hf_dir, d)
    cfg = read_json(d / "config.json")
    for change, match in (({"model_type": "mamba"}, "model_type 'mamba' is not supported"),
                          ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
                          ({"num_key_value_heads": 3}, "multiple of")):
        (d / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=match):
            import_hf(str(d), str(tmp_path / "out"))
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"no model\.layers\.2\."):
        import_hf(str(d), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
