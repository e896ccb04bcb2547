"""2-D parallelism through the real Trainer on 4 gloo ranks: FSDP2 x TP (tiny DiT, activation checkpointing on) and
ZeRO-3 x TP (tiny bidirectional Mamba, every parameter really partitioned), both with GenMD4, whose learned schedule
lives on ``model.objective`` and is used outside the model's forward.

Against a one-process run fed the same global batches (same keyed noise): per-step losses and gradient norms
(clipping active, so the norm over TP-split and TP-replicated parameters matters) and the schedule's parameters.
Each (dp=2, tp=2) run is SIGKILLed on every rank after step 4 (newest checkpoint: step 2) and resumed: steps 3-4 must
repeat bit for bit. Checkpoints re-lay out (1,2) -> (2,2) and (2,2) -> (4,1): weights, AdamW moments and EMA of the
loaded engine, consolidated from the live ranks, equal element-wise those of the engine that wrote the checkpoint.
``mdtrain export`` / ``eval`` / ``sample`` read the 2-D checkpoints in this process.

FSDP2 x TP also runs a bf16 smoke test (two steps on toy shapes). Four rank jobs in all (one 2-rank, three
4-rank), shared by every test through module fixtures.
"""
import json
import os
import shutil

import numpy as np
import pytest

from mdtrain.testing import run_distributed

STEPS, KILL_AT = 5, 4
BASE = ["model.flavor=debug", "model.dropout=0.0", "model.variant=md4", "objective.name=genmd4",
        "data.train=synthetic:markov:valid_samples=8", "data.seq_len=32", "train.global_batch_size=4",
        "optim.lr=3e-2", "optim.warmup_steps=1", "optim.grad_clip=0.5", "train.ema=0.9", "logging.every=1",
        "logging.progress_bar=false", "eval.batches=1", "eval.batch_size=2",
        "checkpoint.every=2", "checkpoint.keep_last=0", f"train.steps={STEPS}"]
# bf16 is ~100x slower than fp32 on this CPU: one layer, 16 tokens, 2 steps (dp=1 x tp=2)
BF16 = ["model.flavor=debug", "model.n_layers=1", "model.dropout=0.0", "model.variant=md4", "objective.name=genmd4",
        "data.train=synthetic:markov", "data.seq_len=16", "train.global_batch_size=2", "train.micro_batch_size=2",
        "train.steps=2", "logging.every=1", "eval.batches=1", "eval.batch_size=2", "logging.progress_bar=false"]
MODEL = {"fsdp": ["model.name=dit", "train.activation_checkpointing=true"], "zero3": ["model.name=dimamba"]}


def _engine_args(engine, tmp):
    if engine == "fsdp":
        return ["parallel.engine=fsdp"]
    return ["parallel.engine=deepspeed", "parallel.zero_stage=3", f"parallel.deepspeed_config={tmp}/ds.json"]


def _args(engine, tmp, dp, tp, run_dir, steps=STEPS):
    micro = 4 // dp if dp > 2 else 2  # global batch 4 = micro x accumulation x dp
    return BASE + MODEL[engine] + _engine_args(engine, tmp) + [
        f"parallel.tp={tp}", f"train.micro_batch_size={micro}", f"train.run_dir={run_dir}", f"train.steps={steps}"]


# ---------------------------------------------------------------------------------------------------------------
# inside the rank jobs


def _moments(engine):
    """AdamW's exp_avg / exp_avg_sq of every parameter, consolidated to single-device tensors from the live ranks
    (not from a checkpoint): FSDP2 DTensors gathered by torch, ZeRO-3 partitions by DeepSpeed, TP pieces merged."""
    import torch
    from mdtrain.parallel.tensor_parallel_state import gather_full, tp_of

    out = {}
    if engine.name == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        with engine._objective_sharded():
            osd = get_optimizer_state_dict(engine.module, engine.optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=False))
        for key in ("exp_avg", "exp_avg_sq"):
            out[key] = {n: st[key].detach().clone() for n, st in osd["state"].items()}
    else:
        from deepspeed.utils import safe_get_full_optimizer_state
        for key in ("exp_avg", "exp_avg_sq"):
            out[key] = {n: safe_get_full_optimizer_state(p, key).view(p.ds_shape).clone()
                        for n, p in engine.module.named_parameters()}
    info = tp_of(engine.module)
    if info is not None:
        out = {k: gather_full(v, info.layout, info.group) for k, v in out.items()}
    return {k: {n: t.cpu() for n, t in v.items()} for k, v in out.items()} if engine.ctx.is_main else {}


def _dump(trainer, path):
    """Consolidated live state (collective); rank 0 writes it."""
    import torch
    state = {"model": trainer.engine.full_state_dict(), "ema": trainer.engine.full_state_dict(ema=True),
             **_moments(trainer.engine)}
    if trainer.ctx.is_main:
        torch.save(state, path)


def _trainer(args):
    from mdtrain.config import load_config
    from mdtrain.trainer import Trainer
    return Trainer(load_config(None, args))


def _finish(trainer):
    trainer.close()
    trainer.ctx.destroy()  # the next Trainer of this process may use another TP size


def _load_and_dump(args, path):
    """A Trainer that resumes the checkpoint in its run dir (at its own layout) and reports the loaded state."""
    t = _trainer(args)
    _dump(t, path)
    _finish(t)


def _fit(args, dump_at=None, dump_path=None, kill_at=None):
    import signal
    t = _trainer(args)
    save = t.save

    def hooked():
        if kill_at is not None and t.progress.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # every rank, before the step's checkpoint: newest stays older
        save()
        if dump_at is not None and t.progress.step == dump_at:
            _dump(t, dump_path)
    t.save = hooked
    try:
        t.fit()
    finally:
        _finish(t)


def _job_12(rank, world, tmp):
    """(dp=1, tp=2): 2 steps per engine, dumping the state it checkpoints at step 2; and FSDP2 x TP in bf16."""
    for engine in ("fsdp", "zero3"):
        _fit(_args(engine, tmp, 1, 2, f"{tmp}/{engine}-12", steps=2), 2, f"{tmp}/{engine}-12.pt")
    _fit(BF16 + ["parallel.engine=fsdp", "parallel.tp=2", "train.precision=bf16", f"train.run_dir={tmp}/bf16"])


def _job_kill(rank, world, tmp, engine):
    """(dp=2, tp=2): load the (1,2) checkpoint and report it; then a fresh run, state dumped at its step-2
    checkpoint, SIGKILLed on every rank after step 4."""
    _load_and_dump(_args(engine, tmp, 2, 2, f"{tmp}/{engine}-12to22"), f"{tmp}/{engine}-12to22.pt")
    _fit(_args(engine, tmp, 2, 2, f"{tmp}/{engine}-22"), 2, f"{tmp}/{engine}-22.pt", kill_at=KILL_AT)


def _job_resume(rank, world, tmp):
    """(4,1) loads of the (2,2) step-2 checkpoints (tp=1 first: DeepSpeed keeps a TP run's mpu in its globals);
    then the killed (2,2) runs resume at their own layout and finish."""
    for engine in ("fsdp", "zero3"):
        _load_and_dump(_args(engine, tmp, 4, 1, f"{tmp}/{engine}-22to41"), f"{tmp}/{engine}-22to41.pt")
    for engine in ("fsdp", "zero3"):
        t = _trainer(_args(engine, tmp, 2, 2, f"{tmp}/{engine}-22"))
        try:
            t.fit()
        finally:
            _finish(t)


# ---------------------------------------------------------------------------------------------------------------
# fixtures


def _rows(run_dir):
    """Training rows of metrics.jsonl in the order written (a resumed run appends its steps again)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if "split" not in r]


def _copy_ckpt(src_run, dst_run, step=2):
    name = f"step_{step:08d}"
    shutil.copytree(os.path.join(src_run, "checkpoints", name), os.path.join(dst_run, "checkpoints", name))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every multi-rank run, in dependency order; the one-process references run here."""
    from mdtrain.config import load_config
    from mdtrain.trainer import Trainer

    tmp = str(tmp_path_factory.mktemp("p2d"))
    with open(f"{tmp}/ds.json", "w") as fh:  # partition every parameter, the objective's too
        json.dump({"zero_optimization": {"stage3_param_persistence_threshold": 0}}, fh)
    refs = {}
    for engine, args in (("fsdp", BASE + MODEL["fsdp"]), ("zero3", BASE + MODEL["zero3"]), ("bf16", BF16)):
        d = f"{tmp}/{engine}-ref"
        t = Trainer(load_config(None, args + ["train.micro_batch_size=2", f"train.run_dir={d}"]))
        try:
            t.fit()
        finally:
            t.close()
            t.ctx.destroy()
        refs[engine] = d
    run_distributed(_job_12, 2, tmp, timeout=600)
    for engine in ("fsdp", "zero3"):
        _copy_ckpt(f"{tmp}/{engine}-12", f"{tmp}/{engine}-12to22")
        with pytest.raises(RuntimeError, match="exited with code -9"):
            run_distributed(_job_kill, 4, tmp, engine, timeout=600)
        _copy_ckpt(f"{tmp}/{engine}-22", f"{tmp}/{engine}-22to41")
    killed = {e: _rows(f"{tmp}/{e}-22") for e in ("fsdp", "zero3")}
    run_distributed(_job_resume, 4, tmp, timeout=600)
    return {"tmp": tmp, "refs": refs, "killed": killed}


def _state(runs, name):
    import torch
    return torch.load(os.path.join(runs["tmp"], f"{name}.pt"), weights_only=True)


def _by_step(rows):
    return {r["step"]: r for r in rows}


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_dp2_tp2_trains_like_one_process_and_resumes_bit_exactly_after_sigkill(runs, engine):
    ref = _by_step(_rows(runs["refs"][engine]))
    killed = runs["killed"][engine]
    assert [r["step"] for r in killed] == [1, 2, 3, 4]  # killed before the step-4 checkpoint
    after = _rows(os.path.join(runs["tmp"], f"{engine}-22"))[len(killed):]
    assert [r["step"] for r in after] == [3, 4, 5]      # resumed from step 2
    for r in killed + after[2:]:
        for key in ("loss", "grad_norm"):
            assert r[key] == pytest.approx(ref[r["step"]][key], rel=2e-5, abs=1e-6), (engine, r["step"], key)
    for was, again in zip(killed[2:], after[:2]):  # steps 3, 4: the same numbers bit for bit
        assert (again["loss"], again["grad_norm"]) == (was["loss"], was["grad_norm"]), (engine, was["step"])


def test_fsdp_tp_mixed_precision_trains_like_fp32(runs):
    """bf16 parameters (FSDP2's MixedPrecisionPolicy, fp32 reductions) through Megatron's layers and gloo: the
    losses of the fp32 one-process run within bf16 rounding."""
    ref = _by_step(_rows(runs["refs"]["bf16"]))
    got = _rows(os.path.join(runs["tmp"], "bf16"))
    assert [r["step"] for r in got] == [1, 2]
    for r in got:
        assert r["loss"] == pytest.approx(ref[r["step"]]["loss"], rel=1e-2, abs=1e-2), r["step"]
        assert r["grad_norm"] == pytest.approx(ref[r["step"]]["grad_norm"], rel=5e-2), r["step"]


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_genmd4_schedule_is_gathered_reduced_and_stepped_like_one_process(runs, engine):
    """The schedule's w_raw at the (2,2) run's step-2 checkpoint and at its end equals the one-process run's, and
    it did move: its gradient was reduced over dp and stepped, not dropped or counted twice."""
    import torch
    from mdtrain.inference import load_for_inference
    ref2 = load_for_inference(os.path.join(runs["refs"][engine], "checkpoints", "step_00000002"), use_ema=False)
    ref_end = load_for_inference(runs["refs"][engine], use_ema=False).model.state_dict()
    got2 = _state(runs, f"{engine}-22")["model"]["objective.schedule.w_raw"]
    got_end = load_for_inference(os.path.join(runs["tmp"], f"{engine}-22"), use_ema=False).model.state_dict()
    want2 = ref2.model.state_dict()["objective.schedule.w_raw"]
    init = ref2.model.objective.schedule.w_raw.new_full(want2.shape, float(np.log(np.expm1(1.0))))
    assert (want2 - init).abs().max() > 1e-3  # the schedule trains
    torch.testing.assert_close(got2, want2, rtol=1e-5, atol=1e-6)
    # 5 AdamW steps at lr 3e-2 let ulp-level differences in the reductions grow (the losses agree to 2e-5)
    torch.testing.assert_close(got_end["objective.schedule.w_raw"], ref_end["objective.schedule.w_raw"],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
@pytest.mark.parametrize("layouts", [("12", "12to22"), ("22", "22to41")])
def test_relayout_keeps_weights_moments_and_ema_elementwise(runs, engine, layouts):
    import torch
    wrote, loaded = (_state(runs, f"{engine}-{x}") for x in layouts)
    for family in ("model", "ema", "exp_avg", "exp_avg_sq"):
        assert sorted(loaded[family]) == sorted(wrote[family]), (engine, layouts, family)
        for k, v in wrote[family].items():
            assert torch.equal(loaded[family][k].to(v.dtype), v), (engine, layouts, family, k)
    assert any(v.abs().max() > 0 for v in wrote["exp_avg"].values())


def test_eval_sample_and_export_read_2d_checkpoints_in_one_process(runs, tmp_path, capsys):
    """``mdtrain export`` of the FSDP2 x TP step-2 checkpoint holds the weights the live engine had; ``mdtrain eval``
    of the ZeRO-3 x TP one gives the one-process checkpoint's NELBO; ``mdtrain sample`` draws from both."""
    import torch
    from safetensors.torch import load_file
    from mdtrain.cli import main

    ckpt = {e: os.path.join(runs["tmp"], f"{e}-22", "checkpoints", "step_00000002") for e in ("fsdp", "zero3")}
    assert main(["export", ckpt["fsdp"], "--out", str(tmp_path / "exp"), "--no-ema"]) == 0
    exported = load_file(str(tmp_path / "exp" / "model.safetensors"))
    live = _state(runs, "fsdp-22")["model"]
    assert sorted(exported) == sorted(live)
    for k, v in live.items():
        assert torch.equal(exported[k].to(v.dtype), v), k
    nelbo = {}
    for name, path in (("zero3", ckpt["zero3"]),
                       ("ref", os.path.join(runs["refs"]["zero3"], "checkpoints", "step_00000002"))):
        capsys.readouterr()
        assert main(["eval", path, "eval.batches=2"]) == 0
        nelbo[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert nelbo["zero3"]["nll"] == pytest.approx(nelbo["ref"]["nll"], rel=1e-5)
    for e in ("fsdp", "zero3"):
        capsys.readouterr()
        out = tmp_path / f"{e}.jsonl"
        assert main(["sample", ckpt[e], "sample.num_samples=2", "sample.steps=4", f"sample.out={out}"]) == 0
        samples = [json.loads(line) for line in open(out)]
        assert len(samples) == 2 and all(len(s["ids"]) == 32 for s in samples)
