"""`mdtrain import mdlm` against the MDLM reference code's own output (tests/fixtures/mdlm_dit: a checkpoint written
by its DIT class with the logits that class computes), in every file layout its trainer writes, and the refusals:
code in a pickle, a wrong shape, an unknown layout, a tokenizer of another size."""
import collections
import os

import pytest
import torch
from safetensors.torch import load_file

from mdtrain.configtools import ConfigError
from mdtrain.exported import load_exported
from mdtrain.interop.mdlm import import_mdlm
from mdtrain.interop.safeload import UnsafeCheckpointError
from tests.interop_util import FIXTURE, mdlm_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return "hf:" + mdlm_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def reference():
    return tuple(load_file(os.path.join(FIXTURE, f"{n}.safetensors")) for n in ("model", "expected"))


def _logits(out_dir, expected):
    """The imported model's logits over MDLM's 97 classes (mdtrain's tokenizer adds a pad id, column 97)."""
    bundle = load_exported(out_dir)
    with torch.no_grad():
        logits = bundle.model(expected["input_ids"], expected["sigma"])
    assert torch.equal(logits.log_softmax(-1)[..., :97], logits[..., :97].log_softmax(-1))  # pad: probability 0
    return logits[..., :97], bundle


def test_imported_fixture_reproduces_the_reference_logits(tmp_path, tok, reference):
    _, expected = reference
    info = import_mdlm(FIXTURE, str(tmp_path / "out"), tok)
    logits, bundle = _logits(str(tmp_path / "out"), expected)
    assert (logits - expected["logits"]).abs().max() <= 1e-5
    assert info["weights"] == "raw" and bundle.cfg.model.name == "dit" and bundle.cfg.data.seq_len == 32
    assert (bundle.tokenizer.vocab_size, bundle.tokenizer.mask_id, bundle.tokenizer.pad_id) == (98, 96, 97)
    assert info["added_rows"] == ["pad"]
    # and the head count really came from the rotary table: regrouping with 2 heads would not reproduce them
    assert bundle.cfg.model.n_heads == 4


# MDLM's Hydra config as OmegaConf pickles it: containers keep their children under _content, value nodes their
# value under _val (omegaconf's BaseContainer.__getstate__ / ValueNode state). Classes of this test module stand
# in for omegaconf's, which is not installed: the importer never imports either.
class FakeNode:
    def __init__(self, val):
        self._val, self._metadata, self._parent = val, None, None


class FakeDictConfig:
    def __init__(self, content):
        self._content = {k: FakeDictConfig(v) if isinstance(v, dict) else FakeNode(v) for k, v in content.items()}
        self._metadata, self._parent = None, None


class FakeTokenizer:
    def __init__(self):
        self.vocab, self.name_or_path = {"a": 0}, "gpt2"


def _lightning(state: dict, ema_params=None, hydra=None) -> dict:
    sd = collections.OrderedDict((f"backbone.{k}", v) for k, v in state.items())
    ck = {"state_dict": sd, "epoch": 0, "global_step": 10, "pytorch-lightning_version": "2.2.1",
          "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 0}}}},
          "optimizer_states": [{"state": {}, "param_groups": [{"lr": 3e-4}]}],
          "hyper_parameters": {"config": FakeDictConfig(hydra or {}), "tokenizer": FakeTokenizer()}}
    if ema_params is not None:
        ck["ema"] = {"decay": 0.9999, "num_updates": 10, "shadow_params": ema_params}
    return ck


def test_prefix_plain_file_and_lightning_checkpoint_with_ema(tmp_path, tok, reference):
    weights, expected = reference
    # a plain torch.save state dict under the backbone. prefix
    torch.save({f"backbone.{k}": v for k, v in weights.items()}, tmp_path / "dit.pt")
    import_mdlm(str(tmp_path / "dit.pt"), str(tmp_path / "a"), tok, overrides=["data.seq_len=32"])
    assert (_logits(str(tmp_path / "a"), expected)[0] - expected["logits"]).abs().max() <= 1e-5
    # a Lightning checkpoint whose raw weights are off and whose EMA holds the reference weights, in
    # backbone.parameters() order (the state dict's order without the rotary buffer)
    raw = {k: v + 0.05 if k != "rotary_emb.inv_freq" else v for k, v in weights.items()}
    order = [k for k in weights if k != "rotary_emb.inv_freq"]
    hydra = {"parameterization": "subs", "time_conditioning": True, "T": 0, "noise": {"type": "loglinear"},
             "model": {"length": 32, "dropout": 0.1}, "training": {"sampling_eps": 1e-3, "antithetic_sampling": True}}
    torch.save(_lightning(raw, [weights[k].clone() for k in order], hydra), tmp_path / "last.ckpt")
    info = import_mdlm(str(tmp_path / "last.ckpt"), str(tmp_path / "b"), tok)
    logits, bundle = _logits(str(tmp_path / "b"), expected)
    assert info["weights"] == "ema" and (logits - expected["logits"]).abs().max() <= 1e-5
    assert bundle.cfg.objective.time_conditioning is True and bundle.cfg.data.seq_len == 32  # from its config
    # --no-ema: the raw weights, which compute something else
    info = import_mdlm(str(tmp_path / "last.ckpt"), str(tmp_path / "c"), tok, use_ema=False)
    assert info["weights"] == "raw"
    assert (_logits(str(tmp_path / "c"), expected)[0] - expected["logits"]).abs().max() > 1e-2


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_a_checkpoint_that_would_run_code_is_refused_naming_the_file(tmp_path, tok, reference):
    weights, _ = reference
    marker = tmp_path / "pwned"
    ck = _lightning(weights)
    ck["callbacks"] = {"x": Payload(marker)}
    torch.save(ck, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt.*system"):
        import_mdlm(str(tmp_path / "evil.ckpt"), str(tmp_path / "out"), tok)
    import pickle
    with open(tmp_path / "evil.bin", "wb") as fh:  # a legacy (non-zip) pickle
        pickle.dump({"x": Payload(marker)}, fh)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.bin.*system"):
        import_mdlm(str(tmp_path / "evil.bin"), str(tmp_path / "out"), tok)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_wrong_shape_unknown_layout_and_wrong_tokenizer_are_clear_errors(tmp_path, tok, reference):
    from safetensors.torch import save_file
    weights, _ = reference
    bad = dict(weights)
    bad["blocks.1.attn_qkv.weight"] = bad["blocks.1.attn_qkv.weight"][:96]
    save_file(bad, tmp_path / "short.safetensors")
    with pytest.raises(ValueError, match=r"short\.safetensors: blocks\.1\.attn_qkv\.weight has shape \(96, 64\)"):
        import_mdlm(str(tmp_path / "short.safetensors"), str(tmp_path / "o1"), tok)
    bad = dict(weights)
    bad["blocks.0.mlp.0.weight"] = bad["blocks.0.mlp.0.weight"][:128]
    save_file(bad, tmp_path / "mlp.safetensors")
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.0\.weight has shape \(128, 64\), expected \(256, 64\)"):
        import_mdlm(str(tmp_path / "mlp.safetensors"), str(tmp_path / "o2"), tok)
    save_file({"embed.weight": weights["vocab_embed.embedding"]}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"other\.safetensors: not an MDLM DIT/AR state dict \(embed\.weight"):
        import_mdlm(str(tmp_path / "other.safetensors"), str(tmp_path / "o3"), tok)
    with pytest.raises(ValueError, match=r"97 token rows .* the tokenizer 'bytes' has 256 ids"):
        import_mdlm(FIXTURE, str(tmp_path / "o4"), "bytes")
    with pytest.raises(ConfigError, match="model.n_layers"):  # a recipe may not change the architecture
        (tmp_path / "r.yaml").write_text("model: {n_layers: 3}\n")
        import_mdlm(FIXTURE, str(tmp_path / "o5"), tok, recipe=str(tmp_path / "r.yaml"))
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_cli_import_then_eval_sample_and_train_from_it(tmp_path, tok, reference, capsys):
    """One journey: import -> prepare data with the export's tokenizer -> eval, sample, and train with
    checkpoint.load_from= starting exactly at the imported weights."""
    import json

    from mdtrain.cli import main
    weights, expected = reference
    out = str(tmp_path / "exp")
    assert main(["import", "mdlm", FIXTURE, "--out", out, "--tokenizer", tok]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["vocab_size"] == 98
    (tmp_path / "text.txt").write_text(open(os.path.join(os.path.dirname(__file__), "interop_util.py")).read())
    data = str(tmp_path / "data")
    assert main(["prepare", "--input", str(tmp_path / "text.txt"), "--tokenizer", f"hf:{out}/tokenizer",
                 "--seq-len", "32", "--out", data, "--doc-per", "line", "--val-fraction", "0.2",
                 "--samples-per-shard", "64"]) == 0
    capsys.readouterr()
    assert main(["eval", out, f"data.train={data}", "eval.batch_size=4", "eval.batches=2"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["nll"] > 0 and row["tokens"] > 0
    assert main(["sample", out, "sample.steps=4", "sample.num_samples=2", "sample.batch_size=2",
                 f"sample.out={tmp_path / 's.jsonl'}"]) == 0
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 2
    run = str(tmp_path / "run")
    assert main(["train", os.path.join(out, "config.yaml"), f"data.train={data}", f"train.run_dir={run}",
                 "train.steps=1", "train.global_batch_size=4", "train.micro_batch_size=4", "train.ema=0",
                 "optim.warmup_steps=1000000", "logging.every=1", "eval.batches=1", "eval.batch_size=4",
                 f"checkpoint.load_from={out}"]) == 0
    from mdtrain.inference import load_for_inference
    state = load_for_inference(run).model.state_dict()
    ref = load_exported(out).model.state_dict()
    assert max(float((state[k] - ref[k]).abs().max()) for k in ref) < 1e-6  # lr ~ 0 at step 1 of the warmup
