"""No checkpoint file can run code: for every pickle-bearing file of a real checkpoint of each engine (ddp, fsdp,
deepspeed ZeRO-2, a tensor-parallel ddp checkpoint), a payload that writes a marker file is planted the way an attacker
would (the manifest recomputed, so the checkpoint looks intact), and `mdtrain eval`, `mdtrain sample` and a resuming
`mdtrain train` must each fail with a message naming the file while the marker never appears. A control shows each
payload does run under the loaders torch and DeepSpeed use by default (pickle.load / weights_only=False)."""
import builtins
import copy
import dataclasses
import io
import json
import os
import pickle
import shutil

import pytest
import torch

from mdtrain import cli
from mdtrain.checkpoint import file_sha256, list_checkpoints, read_manifest, write_manifest
from mdtrain.testing import run_distributed

BASE = ["model.flavor=debug", "model.dropout=0.0", "data.train=synthetic:markov", "data.seq_len=32",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.ema=0.9", "optim.lr=1e-3",
        "optim.warmup_steps=1", "logging.every=1", "eval.batches=1", "eval.batch_size=4", "logging.progress_bar=false",
        "train.steps=2", "checkpoint.every=0"]
ENGINES = {"ddp": ["parallel.engine=ddp"], "fsdp": ["parallel.engine=fsdp"],
           "deepspeed": ["parallel.engine=deepspeed", "parallel.zero_stage=2"],
           "tp": ["parallel.engine=ddp", "parallel.tp=2"]}


class Payload:
    """Unpickling this writes ``marker``: what a crafted checkpoint would do instead (run any code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


def _train_in_process(args):
    from mdtrain.config import load_config
    from mdtrain.trainer import Trainer
    t = Trainer(load_config(None, args))
    try:
        t.fit()
    finally:
        t.close()


def _tp_job(rank, world, args):
    _train_in_process(args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One real run dir per engine (2 steps, EMA on, one checkpoint). TP: 2 gloo ranks at tp=2."""
    root = tmp_path_factory.mktemp("trust-ckpt")
    out = {}
    for name, extra in ENGINES.items():
        run_dir = str(root / name)
        args = BASE + extra + [f"train.run_dir={run_dir}"]
        if name == "tp":
            run_distributed(_tp_job, 2, args, timeout=300)
        else:
            run_distributed(_tp_job, 1, args, timeout=300)  # its own process: FSDP/DeepSpeed make a process group
        out[name] = run_dir
    return out


def _step_dir(run_dir):
    return list_checkpoints(os.path.join(run_dir, "checkpoints"))[-1][1]


def _recompute_manifest(ckpt):
    with open(os.path.join(ckpt, "manifest.json")) as fh:
        manifest = json.load(fh)
    files = {}
    for d, _, names in os.walk(ckpt):
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), ckpt)
            if rel != "manifest.json":
                files[rel] = {"size": os.path.getsize(os.path.join(d, n)), "sha256": file_sha256(os.path.join(d, n))}
    write_manifest(ckpt, manifest["step"], files, {"world_size": manifest.get("world_size", 1)})
    assert read_manifest(ckpt)[1] is None


# ---------------------------------------------------------------------------------------------------------------------
# planting a payload, file by file


def _plant_pt(path, marker):
    """A torch.save file (client state, EMA fragments, DeepSpeed's files) with the payload inside its dict."""
    obj = torch.load(path, map_location="cpu", weights_only=False)  # the test's own, trusted copy
    obj = dict(obj) if isinstance(obj, dict) else {"state": obj}
    obj["extra"] = Payload(marker)
    torch.save(obj, path)
    return lambda: torch.load(path, map_location="cpu", weights_only=False)  # how DeepSpeed reads its files


def _load_metadata(dcp_dir):
    with open(os.path.join(dcp_dir, ".metadata"), "rb") as fh:
        return pickle.load(fh)  # the test's own, trusted copy


def _save_metadata(dcp_dir, md):
    with open(os.path.join(dcp_dir, ".metadata"), "wb") as fh:
        pickle.dump(md, fh)


def _plant_metadata(path, marker):
    """dcp/.metadata, which DCP's FileSystemReader reads with plain pickle.load."""
    dcp_dir = os.path.dirname(path)
    md = _load_metadata(dcp_dir)
    md.planner_data = {"payload": Payload(marker), **(md.planner_data or {})}
    _save_metadata(dcp_dir, md)

    def control():
        with open(path, "rb") as fh:
            pickle.load(fh)
    return control


def _plant_distcp(path, marker, entry):
    """A DCP data file: the payload appended as a torch.save blob and the metadata's pointer for one entry moved to
    it. ``entry`` "bytes": a non-tensor entry (DCP's planner loads those with weights_only=False); "tensor": a model
    weight (read by eval, sample and resume alike)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    dcp_dir, rel = os.path.dirname(path), os.path.basename(path)
    md = _load_metadata(dcp_dir)
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    blob = buf.getvalue()
    offset = os.path.getsize(path)
    with open(path, "ab") as fh:
        fh.write(blob)
    kinds = {fqn: isinstance(m, BytesStorageMetadata) for fqn, m in md.state_dict_metadata.items()}
    target = next(k for k, info in md.storage_data.items() if info.relative_path == rel
                  and (kinds[k.fqn] if entry == "bytes" else k.fqn.startswith("model.")))
    md.storage_data = dict(md.storage_data)
    md.storage_data[target] = dataclasses.replace(md.storage_data[target], offset=offset, length=len(blob))
    _save_metadata(dcp_dir, md)
    return lambda: torch.load(io.BytesIO(blob), weights_only=False)  # what DCP's default planner does


def _targets(ckpt):
    """(relative file, planter) for every pickle-bearing file of the checkpoint."""
    out = []
    for d, _, names in sorted(os.walk(ckpt)):
        for n in sorted(names):
            rel = os.path.relpath(os.path.join(d, n), ckpt)
            if n == ".metadata":
                out.append((rel, _plant_metadata))
            elif n.endswith(".distcp"):
                md = _load_metadata(d)
                from torch.distributed.checkpoint.metadata import BytesStorageMetadata
                has_bytes = any(isinstance(md.state_dict_metadata[k.fqn], BytesStorageMetadata)
                                for k, info in md.storage_data.items() if info.relative_path == n)
                kind = "bytes" if has_bytes else "tensor"
                out.append((rel, lambda p, m, kind=kind: _plant_distcp(p, m, kind)))
            elif n.endswith(".pt"):
                out.append((rel, _plant_pt))
    return out


def _cases():
    """The files of each engine's checkpoint (listed from a dry layout: the fixture's checkpoint decides)."""
    return [(engine, rel) for engine, rels in EXPECTED.items() for rel in rels]


EXPECTED = {  # every pickle-bearing file each engine writes (test_every_pickle_bearing_file_is_covered checks this)
    "ddp": ["client/rank_00000.pt", "dcp/.metadata", "dcp/__0_0.distcp"],
    "fsdp": ["client/rank_00000.pt", "dcp/.metadata", "dcp/__0_0.distcp"],
    "deepspeed": ["client/rank_00000.pt", "deepspeed/state/mp_rank_00_model_states.pt",
                  "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt", "ema/rank_00000.pt"],
    "tp": ["client/rank_00000.pt", "client/rank_00001.pt", "dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"],
}


def test_every_pickle_bearing_file_is_covered(runs):
    for engine, run_dir in runs.items():
        assert sorted(rel for rel, _ in _targets(_step_dir(run_dir))) == EXPECTED[engine], engine


@pytest.mark.parametrize("engine,rel", _cases())
def test_a_crafted_checkpoint_file_never_runs_code(engine, rel, runs, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    shutil.copytree(runs[engine], run_dir, ignore=shutil.ignore_patterns(".mdtrain.lock"))
    ckpt = _step_dir(run_dir)
    marker = tmp_path / "PWNED"
    planter = dict(_targets(ckpt))[rel]
    control = planter(os.path.join(ckpt, rel), marker)
    control()  # the payload is live: the default loaders run it
    assert marker.exists()
    marker.unlink()
    _recompute_manifest(ckpt)  # what an attacker does, so the checkpoint passes every integrity check

    resume = BASE + ENGINES[engine] + [f"train.run_dir={run_dir}", "train.steps=3"]
    if engine == "tp":
        resume = [a for a in resume if a != "parallel.tp=2"]  # resharded into one process (tp=1)
    commands = {"eval": ["eval", ckpt, "eval.batches=1"],
                "sample": ["sample", ckpt, "sample.num_samples=1", "sample.steps=2", f"sample.out={tmp_path}/s.jsonl"],
                "train": ["train", *resume]}
    for name, argv in commands.items():
        capsys.readouterr()
        rc = cli.main(argv)
        err = capsys.readouterr().err
        assert not marker.exists(), f"mdtrain {name} ran the payload planted in {rel}"
        assert rc == 1, (name, rc, err[-2000:])
        assert os.path.join(ckpt, rel) in err and "refusing" in err, (name, err[-2000:])
        assert len(err.strip().splitlines()) == 1, err  # one line, not a traceback
    assert [s for s, _ in list_checkpoints(os.path.join(run_dir, "checkpoints"))] == [2]  # nothing was overwritten


def test_the_untouched_checkpoints_load(runs, capsys):
    """The same commands succeed on the checkpoints as written (the refusals above are about the payloads)."""
    for engine in ("ddp", "deepspeed", "tp"):
        assert cli.main(["eval", _step_dir(runs[engine]), "eval.batches=1"]) == 0, capsys.readouterr().err


def test_dcp_metadata_admits_only_its_own_classes(runs, tmp_path):
    """The restricted unpickler reads real DCP metadata, and refuses a global outside its list even when nothing
    would be called (a bare reference to os.system)."""
    import os as os_module

    from mdtrain.faults import CheckpointError
    from mdtrain.parallel.engines.safe_io import dcp_metadata
    src = os.path.join(_step_dir(runs["fsdp"]), "dcp")
    md = dcp_metadata(src)
    assert md.state_dict_metadata.keys() == _load_metadata(src).state_dict_metadata.keys()
    dst = tmp_path / "dcp"
    shutil.copytree(src, dst)
    evil = copy.copy(_load_metadata(str(dst)))
    evil.planner_data = {"f": os_module.system}
    _save_metadata(str(dst), evil)
    with pytest.raises(CheckpointError, match=r"\.metadata: it references posix\.system"):
        dcp_metadata(str(dst))
