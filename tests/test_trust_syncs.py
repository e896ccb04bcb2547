"""No blocking host sync on a non-logging step, checked structurally with real engines (on CPU a sync costs nothing,
so timing would prove nothing): every read of a tensor's value into Python (``item``, ``float``, ``int``, ``bool``,
``tolist``, ``numpy``, ``cpu``) and every torch.distributed collective issued during one ``train_step`` that is
neither a logging step nor a stop-signal poll is recorded with the code that made it, and must be exactly the
expected set: the engine's gradient norm (the reduction that also carries every rank's loss finiteness), the token
count's one all-reduce over data-parallel ranks, and reads of tensors that live on the host by design (the loader's
attention mask, torch AdamW's CPU step counters). The stop signal is polled every ``train.stop_check_every`` steps."""
import collections
import linecache
import os
import traceback

import pytest

from mdtrain.testing import run_distributed

TINY = ["model.flavor=debug", "model.dropout=0.0", "data.train=synthetic:markov", "data.seq_len=32",
        "train.global_batch_size=8", "train.micro_batch_size=2", "train.ema=0.999", "optim.lr=1e-3",
        "optim.warmup_steps=1", "logging.every=10", "train.stop_check_every=5", "eval.batches=1",
        "eval.batch_size=4", "logging.progress_bar=false", "checkpoint.every=0", "train.steps=10"]
READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy", "cpu")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter",
               "broadcast", "reduce", "barrier", "all_gather_object", "broadcast_object_list", "all_to_all")


def _site(stack):
    """(innermost frame 'file:function', the trainer's line that led there, or the innermost mdtrain line)."""
    inner = stack[-1]
    mine = [f for f in stack if f"{os.sep}mdtrain{os.sep}" in f.filename]
    ours = [f for f in mine if f.filename.endswith(f"mdtrain{os.sep}trainer.py")] or mine
    line = linecache.getline(ours[-1].filename, ours[-1].lineno).strip() if ours else ""
    return f"{os.path.basename(inner.filename)}:{inner.name}", line


def _count_step(trainer):
    """Reads and collectives of one non-logging train_step."""
    import torch
    import torch.distributed as dist
    from torch.overrides import TorchFunctionMode

    reads, comms = collections.Counter(), collections.Counter()

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in READS:
                reads[(func.__name__, *_site(traceback.extract_stack()[:-1]))] += 1
            return func(*args, **(kwargs or {}))

    real = {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(name):
        def call(*a, **k):
            comms[(name, *_site(traceback.extract_stack()[:-1]))] += 1
            return real[name](*a, **k)
        return call
    for name in COLLECTIVES:
        setattr(dist, name, wrap(name))
    try:
        with Reads():
            trainer.train_step(read=False)
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
    return reads, comms


def _job(rank, world, args):
    from mdtrain.config import load_config
    from mdtrain.trainer import Trainer
    t = Trainer(load_config(None, args))
    polls = []
    real_poll = t._stop_agreed
    t._stop_agreed = lambda: polls.append(t.progress.step) or real_poll()
    try:
        t.train_step(read=False)  # the first step creates the optimizer state
        reads, comms = _count_step(t)
        cpu_steps = all(st["step"].device.type == "cpu" for st in t.engine.optimizer.state.values())
        t.fit()  # steps 3..10 with stop_check_every=5 and logging every 10: one poll, at step 5
    finally:
        t.close()
    return {"reads": dict(reads), "comms": dict(comms), "polls": polls, "accum": t.accum, "cpu_steps": cpu_steps}


@pytest.mark.parametrize("world,engine", [(1, "ddp"), (2, "ddp"), (2, "fsdp")])
def test_a_non_logging_step_reads_only_the_gradient_norm(world, engine, tmp_path):
    out = run_distributed(_job, world, TINY + [f"parallel.engine={engine}", f"train.run_dir={tmp_path}/run"],
                          timeout=300)
    for r in out:
        reads = dict(r["reads"])
        # the engine's gradient norm: the step's one read of a device value (it decides whether to step)
        assert reads.pop(("__float__", "base.py:clip_and_norm",
                          "grad_norm = self.engine.step(cfg.optim.grad_clip)")) == 1, r["reads"]
        # the loader's CPU mask, asked on the host once per micro-batch (instead of the model asking the device)
        assert reads.pop(("__bool__", "trainer.py:train_step",
                          'model_mask = None if bool(batch["attention_mask"].all()) else attn')) == r["accum"]
        # torch AdamW (capturable=False) keeps each parameter's step counter on the CPU and reads it there
        assert r["cpu_steps"] and {k[:2] for k in reads} == {("item", "optimizer.py:_get_value")}, reads
        comms = dict(r["comms"])
        # the trainer's own collectives: the token count's all-reduce, nothing else (no finiteness, loss or stop
        # all-reduce on a non-logging step)
        ours = {k: v for k, v in comms.items() if k[0:2] == ("all_reduce", "dist.py:all_reduce_sum")}
        assert ours == {("all_reduce", "dist.py:all_reduce_sum",
                         "global_tok = ctx.all_reduce_sum(local_tok.to(torch.float64).reshape(1), "
                         "group=self.dp_group)[0]"): 1}, comms
        # the rest is the engine's gradient reduction (DDP's comm hook; FSDP's reduce-scatters run in C++)
        assert {k[1] for k in comms if k not in ours} <= {"torch_native.py:_sum_allreduce_hook"}, comms
        assert r["polls"] == [5]
