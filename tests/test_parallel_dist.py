"""Process groups from each launcher's environment: parsing without processes, then real gloo groups."""
from __future__ import annotations

import os

import pytest
import torch

from mdtrain.configtools import ConfigError
from mdtrain.parallel.dist import first_slurm_host, parse_launch_env
from mdtrain.testing import run_distributed


def test_torchrun_environment():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "n1",
           "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}
    got = parse_launch_env(env, [])
    assert (got.rank, got.world_size, got.local_rank, got.launcher) == (3, 8, 1, "env")
    assert got.master_addr is None and got.master_port is None, "torchrun's MASTER_* are left as they are"


def test_deepspeed_launcher_passes_local_rank_on_argv():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for argv in (["--local_rank=1", "cfg.yaml"], ["--local_rank", "1"], ["--local-rank=1"]):
        got = parse_launch_env(env, argv)
        assert (got.rank, got.world_size, got.local_rank, got.launcher) == (1, 2, 1, "deepspeed"), argv
    # LOCAL_RANK in the environment wins over argv; without either, rank modulo the local size
    assert parse_launch_env({**env, "LOCAL_RANK": "0"}, ["--local_rank=1"]).local_rank == 0
    assert parse_launch_env({**env, "RANK": "3", "WORLD_SIZE": "4"}, []).local_rank == 1
    with pytest.raises(RuntimeError, match="RANK/WORLD_SIZE are not set"):
        parse_launch_env({}, ["--local_rank=0"])


def test_slurm_environment():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu[007-010,012],login1"}
    got = parse_launch_env(env, [])
    assert (got.rank, got.world_size, got.local_rank, got.launcher) == (5, 8, 1, "slurm")
    assert got.master_addr == "gpu007"
    assert got.master_port == parse_launch_env({**env, "SLURM_PROCID": "0"}, []).master_port, "same port on all"
    # variables already set are not overridden; a step's own task count wins over the job's
    mine = parse_launch_env({**env, "MASTER_ADDR": "head", "MASTER_PORT": "1234", "SLURM_STEP_NUM_TASKS": "4"}, [])
    assert (mine.master_addr, mine.master_port, mine.world_size) == (None, None, 4)
    # torchrun inside an sbatch allocation: RANK/WORLD_SIZE describe the job, SLURM_* are ignored
    assert parse_launch_env({**env, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, []).world_size == 2


def test_plain_process_has_no_launcher():
    assert parse_launch_env({"PATH": "/bin"}, ["train", "cfg.yaml"]) is None


@pytest.mark.parametrize("nodelist,first", [
    ("node1", "node1"), ("a-1,b", "a-1"), ("gpu[003-005,9]", "gpu003"), ("x[1,3]y", "x1y"),
    ("rack[1-2]-n[3-4]", "rack1-n3"), ("c[0012]", "c0012"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_single_process_context_and_helpers():
    from mdtrain.parallel import init_distributed
    ctx = init_distributed()
    try:
        assert (ctx.rank, ctx.world_size, ctx.dp_size, ctx.tp_size, ctx.is_main) == (0, 1, 1, 1, True)
        assert init_distributed() is ctx, "a second call returns the same context"
        t = torch.tensor([2.0])
        assert ctx.all_reduce_sum(t) is t and t.item() == 2.0
        ctx.barrier()
    finally:
        ctx.destroy()
    with pytest.raises(ConfigError, match="needs a multiple of 2 processes"):
        init_distributed(tp=2)


def _launcher_worker(rank, world, style):
    """Rebuild the environment a launcher would give, drop what run_distributed set, and join the group."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(key)
    argv = []
    if style == "slurm":
        os.environ.pop("MASTER_ADDR")
        os.environ.update({"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world), "SLURM_LOCALID": str(rank),
                           "SLURM_JOB_NODELIST": "127.0.0.1"})
    else:  # deepspeed: RANK/WORLD_SIZE exported, the local rank only on argv
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_SIZE": str(world)})
        argv = [f"--local_rank={rank}", "config.yaml"]
    from mdtrain.parallel import init_distributed
    ctx = init_distributed(argv=argv)
    assert init_distributed() is ctx
    total = ctx.all_reduce_sum(torch.tensor([float(rank + 1)]))
    mesh = ctx.mesh
    out = dict(rank=ctx.rank, world=ctx.world_size, local=ctx.local_rank, dp=(ctx.dp_rank, ctx.dp_size),
               tp=(ctx.tp_rank, ctx.tp_size), names=mesh.mesh_dim_names, shape=tuple(mesh.shape),
               total=float(total), launcher=ctx.launcher, env_local=os.environ["LOCAL_RANK"])
    ctx.barrier()
    ctx.destroy()
    return out


@pytest.mark.parametrize("style", ["slurm", "deepspeed"])
def test_launcher_environment_forms_a_group(style):
    out = run_distributed(_launcher_worker, 2, style, init_group=False, timeout=120)
    for r, o in enumerate(out):
        assert (o["rank"], o["world"], o["local"], o["dp"], o["tp"]) == (r, 2, r, (r, 2), (0, 1))
        assert o["names"] == ("dp", "tp") and o["shape"] == (2, 1)
        assert o["total"] == 3.0 and o["launcher"] == style and o["env_local"] == str(r)
