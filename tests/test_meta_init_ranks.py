"""Initial weights do not depend on the engine, the world size or the TP size (issue 16, part 2).

One 2-rank gloo job builds the same config on the meta device and lets each engine materialise only its own
pieces: FSDP2 over 2 data-parallel ranks, DeepSpeed ZeRO-3 over 2 ranks, TP=2 with DDP, FSDP2 and ZeRO-3 (dp=1).
Each engine's consolidated initial weights (``full_state_dict``) must equal, bit for bit, the single-process model
built eagerly by ``build_objective_and_model`` with the same seed; and what a rank keeps of the largest tensor is
smaller than that tensor (peak memory while building is measured in ``bench/init_memory.py``)."""
import pytest
import torch

from mdtrain.testing import run_distributed

V, L, SEED = 37, 16, 1234
CASES = [("dimamba", "mdlm", "mdlm"), ("dit", "md4", "genmd4")]  # mixed split/replicated tensors; trunc normal


def _cfg(name, variant, objective, engine):
    from mdtrain.config import load_config
    return load_config(None, [f"model.name={name}", f"model.variant={variant}", "model.flavor=debug",
                              "model.mamba_d_state=8", f"objective.name={objective}", *engine])


ENGINES = {"fsdp": ["parallel.engine=fsdp"],
           "zero3": ["parallel.engine=deepspeed", "parallel.zero_stage=3"],
           "ddp": ["parallel.engine=ddp"]}


def _consolidated(cfg, ctx, tp):
    from mdtrain.modeling import build_deferred
    from mdtrain.optim import make_adamw
    from mdtrain.parallel import build_engine

    model, objective, init = build_deferred(cfg, V, V - 1, L, init_seed=SEED)
    if tp > 1:
        from mdtrain.parallel.tensor_parallel import apply_tensor_parallel
        model = apply_tensor_parallel(model, ctx, objective)
    engine = build_engine(cfg.parallel, model, lambda m: make_adamw(m, cfg.optim), ctx, init=init)
    local = max(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else
                p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                for p in engine.module.parameters())
    full = engine.full_state_dict()
    engine.close()
    return full, local


def _job(rank, world):
    from mdtrain.parallel.dist import _context_from_group

    out = {}
    dp_ctx = _context_from_group(torch.device("cpu"), 1, rank, "env", owns=False)   # dp=2 x tp=1
    tp_ctx = _context_from_group(torch.device("cpu"), 2, rank, "env", owns=False)   # dp=1 x tp=2
    # every tp=1 build before the first TP one: DeepSpeed keeps a TP run's mpu in its module globals
    for name, variant, objective in CASES:
        for engine in ("fsdp", "zero3"):
            out[f"{name}-{engine}-dp2"] = _consolidated(_cfg(name, variant, objective, ENGINES[engine]), dp_ctx, 1)
    for name, variant, objective in CASES:
        for engine in ("ddp", "fsdp", "zero3"):
            out[f"{name}-{engine}-tp2"] = _consolidated(_cfg(name, variant, objective, ENGINES[engine]), tp_ctx, 2)
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(_job, 2, timeout=500)


@pytest.mark.parametrize("name,variant,objective", CASES)
def test_initial_weights_are_the_same_for_every_engine_world_and_tp_size(ranks, name, variant, objective):
    from mdtrain.modeling import build_objective_and_model
    want, _ = build_objective_and_model(_cfg(name, variant, objective, []), V, V - 1, L, init_seed=SEED)
    want = want.state_dict()
    biggest = max(v.numel() for v in want.values())
    for layout in ("fsdp-dp2", "zero3-dp2", "ddp-tp2", "fsdp-tp2", "zero3-tp2"):
        got, local_max = ranks[0][f"{name}-{layout}"]
        assert sorted(got) == sorted(want), layout
        for k, v in want.items():
            assert tuple(got[k].shape) == tuple(v.shape) and (got[k] == v.numpy()).all(), (layout, k)
        assert local_max < biggest, (layout, local_max, biggest)  # no rank holds the largest tensor whole
