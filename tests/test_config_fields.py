"""Every config field is read by something and does what its doc says.

``test_every_config_field_is_read`` records, in one spawned process, every field of the training config tree that
product code reads while a set of small real runs goes through the main paths (prepare, train with each engine,
resume, checkpoint.load_from, eval with a zero-shot set and generative perplexity, sample, launch --dry-run);
reads by the config machinery itself (parsing, validation, dumping, copying) do not count. A field read only on a
rare path (a diverged run, a GPU) counts when the source reads it as ``<...>.<section>.<field>``. A field nobody
reads fails the test."""
import ast
import dataclasses
import glob
import os
import sys
import typing

import pytest
import torch

from mdtrain.testing import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.flavor=debug", "model.dropout=0.0", "data.seq_len=32", "train.global_batch_size=4",
        "train.micro_batch_size=2", "optim.warmup_steps=1", "logging.every=1", "eval.batches=1", "eval.batch_size=4",
        "logging.progress_bar=false"]


def _sections():
    """{dataclass type: its dotted path} for every section of the training config tree."""
    from mdtrain.config import Config
    out = {}

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            if dataclasses.is_dataclass(t):
                out[t] = prefix + f.name
                walk(t, prefix + f.name + ".")
    walk(Config, "")
    return out


def all_fields() -> set:
    return {f"{path}.{f.name}" for cls, path in _sections().items() for f in dataclasses.fields(cls)
            if not dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])}


_COPIES = {"replace", "__eq__", "__repr__", "__hash__", "deepcopy", "_deepcopy_dict", "_reconstruct"}
_MACHINERY = ("mdtrain.configtools", "copy", "copyreg")


def _counts(frame) -> bool:
    """Whether the read in ``frame`` is a use: not validation, parsing, dumping or copying of the config."""
    while frame is not None:
        mod, code = frame.f_globals.get("__name__", ""), frame.f_code.co_name
        if mod == "dataclasses" and code in ("asdict", "_asdict_inner", "astuple", "_astuple_inner"):
            frame = frame.f_back  # dataclasses.asdict(section) passed on as options: the caller reads them
            continue
        if mod == "dataclasses" or frame.f_code.co_filename == "<string>" or code in _COPIES:
            return False
        return not (mod.startswith(_MACHINERY) or code == "validate")
    return False


def _record_reads(reads: set):
    for cls, path in _sections().items():
        names = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self, name, _names=names, _path=path):
            if name in _names and _counts(sys._getframe(1)):
                reads.add(f"{_path}.{name}")
            return object.__getattribute__(self, name)
        cls.__getattribute__ = getattribute


def _flows(rank, world, tmp):
    """The real runs whose config reads are recorded (one process, a one-rank gloo group)."""
    import contextlib
    import io

    from mdtrain import cli
    reads: set = set()
    _record_reads(reads)
    text = os.path.join(tmp, "corpus.txt")
    with open(text, "w") as fh:
        fh.write("".join(f"document {i}: the quick brown fox jumps over the lazy dog {i % 7}\n" for i in range(200)))
    data, run, ar, init = (os.path.join(tmp, n) for n in ("data", "run", "ar", "init"))

    def call(*argv):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = cli.main(list(argv))
        assert rc == 0, (argv, out.getvalue()[-2000:])
        return out.getvalue()

    call("prepare", "--input", text, "--tokenizer", "bytes", "--seq-len", "32", "--val-fraction", "0.2",
         "--doc-per", "line", "--out", data)
    common = [*TINY, f"data.train={data}"]
    call("train", *common, "train.steps=2", "checkpoint.every=1", "eval.every=1", "train.ema=0.9",
         "train.activation_checkpointing=true", f"train.run_dir={run}")
    call("train", *common, "train.steps=3", f"train.run_dir={run}")  # resumes
    call("train", *common, "train.steps=2", "train.ema=0", "optim.schedule=wsd", f"checkpoint.load_from={run}",
         f"train.run_dir={init}")
    call("train", *common, "model.name=causal", "objective.name=ar", "train.steps=1", f"train.run_dir={ar}")
    call("train", *common, "parallel.engine=fsdp", "train.precision=bf16", "train.steps=1", "eval.batches=1",
         f"train.run_dir={tmp}/fsdp")  # bf16 on a toy shape: FSDP's mixed-precision policy
    call("train", *common, "parallel.engine=deepspeed", "parallel.zero_stage=1", "train.steps=1",
         f"train.run_dir={tmp}/zero")
    call("eval", run, f"eval.extra=[{data}]", f"eval.gen_ppl_model={ar}", "sample.num_samples=2", "sample.steps=4")
    call("sample", run, "sample.num_samples=2", "sample.batch_size=2", "sample.steps=4", "sample.prefix=doc",
         f"sample.out={tmp}/s.jsonl", "sample.show=1")
    call("sample", run, "sample.num_samples=1", "sample.steps=4", "sample.stride_length=4", "sample.num_strides=1")
    call("launch", "slurm", *common, f"train.run_dir={run}", "--dry-run")
    return sorted(reads)


def _explicit_reads() -> set:
    """``section.field`` pairs the product's source reads as an attribute chain ``<...>.section.field``."""
    paths = {p.split(".")[-2] + "." + p.split(".")[-1]: p for p in all_fields()}
    found = set()
    for path in glob.glob(os.path.join(REPO, "mdtrain", "**", "*.py"), recursive=True):
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                    and isinstance(node.ctx, ast.Load):
                key = f"{node.value.attr}.{node.attr}"
                if key in paths:
                    found.add(paths[key])
    return found


def unread_fields(dynamic: set) -> list:
    return sorted(all_fields() - dynamic - _explicit_reads())


@pytest.fixture(scope="module")
def dynamic_reads(tmp_path_factory):
    return set(run_distributed(_flows, 1, str(tmp_path_factory.mktemp("fields")), timeout=600)[0])


def test_every_config_field_is_read(dynamic_reads):
    assert not unread_fields(dynamic_reads), (f"config fields nothing reads: {unread_fields(dynamic_reads)}; "
                                              f"make each one work (with a test) or remove it")


def test_the_unread_field_check_can_fail(dynamic_reads):
    """Drop what the runs read of one section that has no explicit chain reads: the check reports it."""
    explicit = _explicit_reads()
    victim = next(f for f in sorted(dynamic_reads) if f not in explicit)
    assert unread_fields(dynamic_reads - {victim}) == [victim]


def test_no_decay_matches_whole_name_components():
    from mdtrain.models import ModelConfig, build_model
    from mdtrain.optim import param_groups
    model = build_model(ModelConfig(name="dit", flavor="debug"), 50, 16)
    groups = param_groups(model, 0.1, ["1d", "embed"])
    exempt = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    names = {n: p for n, p in model.named_parameters()}
    want = {n for n, p in names.items() if p.ndim < 2 or "embed" in n.split(".")}
    assert {n for n, p in names.items() if id(p) in exempt} == want
    assert "embed.weight" in want and names["time_embed.fc1.weight"].ndim == 2
    assert id(names["time_embed.fc1.weight"]) not in exempt  # 'embed' is not a component of 'time_embed'


def test_train_device_is_honoured(monkeypatch):
    from mdtrain.configtools import ConfigError
    from mdtrain.parallel import dist
    monkeypatch.setattr(dist, "_CTX", None)
    ctx = dist.init_distributed("auto", 1, argv=[], device="cpu")
    assert ctx.device.type == "cpu"
    monkeypatch.setattr(dist, "_CTX", None)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.device=cuda"):
            dist.init_distributed("auto", 1, argv=[], device="cuda")
    monkeypatch.setattr(dist, "_CTX", None)
