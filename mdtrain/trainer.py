"""The training loop: build -> (train_step, evaluate, checkpoint)* -> close. Engine-agnostic.

``run(config)`` is ``mdtrain train``, in one process or many (torchrun, the deepspeed launcher, srun, submitit,
a sweep cell): the process group, the engine and the data split come from ``mdtrain.parallel``; the loop never
branches on which engine it has. Randomness is keyed by position (``mdtrain.rng``), so a resumed run repeats every
step exactly. Reading order: ``run`` -> ``Trainer.__init__`` (build) -> ``fit`` -> ``train_step`` -> the
objective's ``loss``.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from typing import Optional, Sequence

import torch
import yaml

from mdtrain import rng, signals
from mdtrain.checkpoint import STEP_RE, CheckpointManager
from mdtrain.config import Config, load_config, save_config
from mdtrain.configtools import ConfigError, to_dict
from mdtrain.faults import CheckpointError
from mdtrain.parallel.engines.base import main_then_all
from mdtrain.rundir import RunDirLock, check_writable, move_aside, remove_if_empty
from mdtrain.data.images import check_image_layout, label_kwargs
from mdtrain.metrics import MetricsLogger, memory_gib, peak_flops
from mdtrain.modeling import build_objective_and_model
from mdtrain.models.backbone import set_train_step
from mdtrain.objectives.protocol import make_model_fn
from mdtrain.optim import lr_at, make_adamw


def run(config: "str | Config | None", overrides: Sequence[str] = ()) -> int:
    """Train (resuming the run dir's newest valid checkpoint); 0 when ``train.steps`` are done.

    ``config`` is a YAML path (with ``overrides``, ``key=value``) or a loaded Config. A SIGUSR2/SIGTERM makes every
    rank checkpoint at the next step boundary, then ``signals.Preempted`` (exit status 143) is raised. The CLI, the
    submitit job and the sweep's in-process cells all train through here."""
    cfg = config if isinstance(config, Config) else load_config(config, list(overrides))
    signals.install()
    trainer = Trainer(cfg)
    try:
        status = trainer.fit()
    finally:
        trainer.close()
    if status == "preempted":
        raise signals.Preempted(signals.received())
    return 0


def _finished_step(resume_path: Optional[str], steps: int) -> Optional[int]:
    """The step of the checkpoint to resume when it is already at or past ``train.steps`` (the run is finished),
    else None. Read from the checkpoint directory's name (``step_XXXXXXXX``), so nothing is loaded."""
    if resume_path is None:
        return None
    m = STEP_RE.match(os.path.basename(os.path.normpath(resume_path)))
    step = int(m.group(1)) if m else None
    return step if step is not None and step >= steps else None


def ema_decay(cap: float, num_updates: int) -> float:
    """MDLM's EMA warmup: min(cap, (1 + n) / (10 + n)) for the n-th update (n counted from 1)."""
    return min(cap, (1 + num_updates) / (10 + num_updates))


def valid_tokens(objective, attention_mask: torch.Tensor) -> torch.Tensor:
    """Tokens that carry loss: all but the objective's context positions (AR and shifted: position 0)."""
    m = attention_mask[:, objective.first_target:]
    return m.sum()


def grad_accumulation(cfg: Config, dp_size: int) -> int:
    per_step = cfg.train.micro_batch_size * dp_size
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not a multiple of train.micro_batch_size "
            f"({cfg.train.micro_batch_size}) x data-parallel size ({dp_size}) = {per_step}; choose a global "
            f"batch of micro x accumulation x data-parallel ranks")
    return cfg.train.global_batch_size // per_step


def compute_precision(cfg: Config, device: torch.device) -> str:
    if cfg.train.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.train.precision


# ----------------------------------------------------------------------------------------------------
# what a checkpoint restores besides the engine's weights, optimizer and EMA


class Progress:
    """Where the run stands: optimizer steps taken, tokens trained on, skipped steps, the wandb run id."""

    def __init__(self):
        self.step = 0
        self.tokens = 0
        self.skipped_total = 0
        self.nonfinite_in_a_row = 0
        self.wandb_id: Optional[str] = None

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "skipped_total": self.skipped_total,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "wandb_id": self.wandb_id or ""}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.skipped_total = int(state["skipped_total"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        self.wandb_id = state["wandb_id"] or None


class DataPosition:
    """The loader's stream position, with the data-parallel size it was saved at (a resume may use another)."""

    def __init__(self, loader, dp_size: int):
        self.loader, self.dp_size = loader, dp_size

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict(), "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        saved_dp = int(state["dp_size"])
        self.loader.load_state_dict(state["loader"], from_dp_size=None if saved_dp == self.dp_size else saved_dp)


class RNGStreams:
    """torch's global generators (CPU, and this rank's CUDA device). Dropout reseeds them per micro-batch
    (``rng.seed_dropout``); restoring them keeps any other use of them exact across a resume too."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


def _client_state_v1(flat: dict) -> dict:
    """Checkpoints written before the client state had one section per registered object."""
    rng_state = {"cpu": flat["rng_cpu"]}
    if "rng_cuda" in flat:
        rng_state["cuda"] = flat["rng_cuda"]
    return {"progress": {k: flat.get(k, 0) for k in ("step", "tokens", "skipped_total", "nonfinite_in_a_row")}
            | {"wandb_id": flat.get("wandb_id", "")},
            "data": {"loader": flat["data"], "dp_size": flat["dp_size"]}, "rng": rng_state}


# ----------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: Config):
        from mdtrain.parallel.dist import init_distributed

        self.cfg = cfg
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.ctx = init_distributed(cfg.parallel.backend, cfg.parallel.tp, device=cfg.train.device)
        self.device = self.ctx.device
        self.dp_group = self.ctx.dp_group  # slicing the mesh anew on every step costs host work
        self.accum = grad_accumulation(cfg, self.ctx.dp_size)
        self.precision = compute_precision(cfg, self.device)
        self.run_dir = cfg.train.run_dir
        self.lock = RunDirLock(self.run_dir)
        self.engine = None
        fresh = not os.path.exists(self.run_dir)
        main_then_all(self.ctx, self._claim_run_dir)  # one writer per run dir, before anything is written
        try:
            self._setup()
        except BaseException:
            if fresh and self.ctx.is_main:  # a run that failed before writing anything leaves no empty run dir
                remove_if_empty(self.run_dir, self.lock)
            self.lock.release()
            raise

    def _claim_run_dir(self) -> None:
        self.lock.acquire()
        try:
            check_writable(os.path.join(self.run_dir, "checkpoints"))
        except BaseException:
            self.lock.release()
            raise

    def _setup(self) -> None:
        """Loader, eval sets, the checkpoint to resume (checked against this run's math), model and engine, restored
        state: everything that can fail does so here, before the first step."""
        from mdtrain.data.loader import build_loader

        cfg = self.cfg
        self.ctx.barrier()
        self.loader = build_loader(cfg.data, "train", cfg.train.micro_batch_size, self.ctx.dp_rank, self.ctx.dp_size,
                                   seed=cfg.train.seed, infinite=True)
        check_image_layout(cfg.model.image_shape, self.loader)
        self.tokenizer, self.seq_len = self.loader.tokenizer, self.loader.seq_len
        self._check_eval_sets()

        self.ckpt = CheckpointManager(os.path.join(self.run_dir, "checkpoints"), cfg.checkpoint.keep_last, self.ctx,
                                      verify=cfg.checkpoint.verify)
        self.resume_path = self.ckpt.select(cfg.checkpoint.resume, cfg.checkpoint.start_over,
                                            lambda: move_aside(self.run_dir))
        self.finished_at = _finished_step(self.resume_path, cfg.train.steps)
        if self.finished_at is not None:  # nothing to train: build nothing, write nothing
            return
        if self.resume_path is not None:
            main_then_all(self.ctx, lambda: check_resumable(self.resume_path, cfg, self.tokenizer))
        self._build()

        self.progress = Progress()
        self.ckpt.register("progress", self.progress)
        self.ckpt.register("data", DataPosition(self.loader, self.ctx.dp_size))
        self.ckpt.register("rng", RNGStreams(self.device))
        if self.resume_path is not None:
            self.ckpt.load(self.resume_path, self.engine, upgrade=_client_state_v1)
            if self.ctx.is_main:
                print(f"resumed from {self.resume_path} at step {self.progress.step}", flush=True)
        # tokens trained on since the last read-back, kept on the device (read on logging steps and saves)
        self._tokens = torch.zeros((), dtype=torch.int64, device=self.device)
        # this logging window's finite steps: this rank's Σ loss·tokens and the global Σ tokens (on the device),
        # and how many steps (host)
        self._window = torch.zeros(2, dtype=torch.float64, device=self.device)
        self._window_steps = 0
        self.data_iter = iter(self.loader)
        if self.ctx.is_main:
            _warn_config_changes(self.run_dir, cfg)
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        wandb_cfg = None
        if cfg.logging.wandb:
            wandb_cfg = {"project": cfg.logging.wandb_project,
                         "name": cfg.logging.wandb_name or os.path.basename(os.path.abspath(self.run_dir)),
                         "config": to_dict(cfg), "run_id": self.progress.wandb_id}
        self.metrics = MetricsLogger(self.run_dir, cfg.train.steps, self.ctx.is_main, cfg.logging.progress_bar,
                                     wandb_cfg, tensorboard=cfg.logging.tensorboard)
        if self.metrics.wandb:
            self.progress.wandb_id = self.metrics.wandb.id

    def _check_eval_sets(self) -> None:
        """The validation split and every ``eval.extra`` set exist, hold samples and share the model's tokenizer:
        found now, not after training (building a loader reads manifests only)."""
        import dataclasses

        from mdtrain.data.errors import DataError
        from mdtrain.data.loader import build_loader

        cfg = self.cfg
        sets = [cfg.data] + [dataclasses.replace(cfg.data, train=p, valid=p) for p in cfg.eval.extra]
        for dcfg in sets:
            loader = build_loader(dcfg, "valid", cfg.eval.batch_size, self.ctx.dp_rank, self.ctx.dp_size,
                                  seed=cfg.eval.seed, infinite=False)
            tok = loader.tokenizer
            if (tok.vocab_size, tok.mask_id) != (self.tokenizer.vocab_size, self.tokenizer.mask_id):
                raise DataError(f"eval set '{dcfg.valid or dcfg.train}' was tokenized with vocab_size="
                                f"{tok.vocab_size}, mask_id={tok.mask_id}; the training data has vocab_size="
                                f"{self.tokenizer.vocab_size}, mask_id={self.tokenizer.mask_id}. Prepare it with the "
                                f"training data's tokenizer")

    def _build(self) -> None:
        """Objective and model, then torchtitan's order: tensor parallel -> activation checkpointing -> compile ->
        the data-parallel engine. The backbone is built on the meta device and each engine allocates and fills only
        the pieces its rank keeps, with initial weights keyed by ``train.seed`` (the same for every engine, world
        size and TP size); ``checkpoint.load_from`` instead loads whole weights before any wrapping."""
        from mdtrain.models.flops import flops_per_token
        from mdtrain.modeling import build_deferred
        from mdtrain.parallel import build_engine

        cfg, ctx = self.cfg, self.ctx
        seed = rng.key(0, cfg.train.seed)
        torch.manual_seed(seed)
        vocab, mask_id = self.tokenizer.vocab_size, self.tokenizer.mask_id
        init = None
        if self.resume_path is None and cfg.checkpoint.load_from:  # weights only, before any wrapping
            from mdtrain.inference import load_for_inference
            model, self.objective = build_objective_and_model(cfg, vocab, mask_id, self.seq_len, init_seed=seed)
            model.load_state_dict(load_for_inference(cfg.checkpoint.load_from, use_ema=True).model.state_dict())
        else:
            model, self.objective, init = build_deferred(cfg, vocab, mask_id, self.seq_len, init_seed=seed)
        fpt = flops_per_token(cfg.model, vocab, self.seq_len, causal=self.objective.causal,
                              block_size=getattr(self.objective, "block_size", 0))
        self.flops_per_token = fpt["exact"]
        if cfg.parallel.tp > 1:
            from mdtrain.parallel.tensor_parallel import apply_tensor_parallel
            model = apply_tensor_parallel(model, ctx, self.objective)
        if cfg.train.activation_checkpointing or cfg.train.compile:
            from mdtrain.parallel.blocks import wrap_blocks
            wrap_blocks(model, checkpoint=cfg.train.activation_checkpointing, compile=cfg.train.compile)
        self.engine = build_engine(cfg.parallel, model, lambda m: make_adamw(m, cfg.optim), ctx,
                                   precision=self.precision, grad_accum=self.accum,
                                   micro_batch_size=cfg.train.micro_batch_size, init=init)
        if cfg.train.ema > 0:
            self.engine.ema_init()
        self.peak = peak_flops(self.device, self.precision)

    @property
    def step(self) -> int:
        return self.progress.step

    # ------------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "bf16" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _noise(self, step: int, micro: int, batch_size: int, seq_len: int) -> dict:
        """This micro-batch's diffusion noise, keyed by the samples' global indices in the loader's stream order."""
        base = (micro * self.ctx.dp_size + self.ctx.dp_rank) * batch_size  # see mdtrain.rng
        noise = rng.keyed_noise(self.objective.noise_spec(seq_len), tuple(self.objective.stratified_keys),
                                self.cfg.train.seed, step, list(range(base, base + batch_size)),
                                self.cfg.train.global_batch_size, rng.STREAM_NOISE)
        return {k: v.to(self.device) for k, v in noise.items()}

    def train_step(self, read: bool = True) -> dict:
        """One optimizer step over the global batch: accumulate every micro-batch's share of the global loss, step.

        Token counts and the loss stay on the device; the values are read back only when ``read`` (a logging step)
        or when the step was skipped. The step's only host read is the engine's gradient norm, which also carries
        every rank's loss finiteness (a non-finite share turns its rank's gradients into NaN before they are
        reduced), so no separate all-reduce of a finiteness flag is needed."""
        cfg, prog, ctx = self.cfg, self.progress, self.ctx
        batches = [next(self.data_iter) for _ in range(self.accum)]
        inputs = [(b["input_ids"].to(self.device, non_blocking=True),
                   b["attention_mask"].to(self.device, non_blocking=True), b) for b in batches]
        local_tok = torch.stack([valid_tokens(self.objective, attn) for _, attn, _ in inputs]).sum()
        # over data-parallel ranks only: the tensor-parallel ranks of a DP rank hold copies of the same batch
        global_tok = ctx.all_reduce_sum(local_tok.to(torch.float64).reshape(1), group=self.dp_group)[0]
        self.engine.set_lr(lr_at(prog.step, cfg.train.steps, cfg.optim))
        set_train_step(self.engine.model, prog.step)  # step-dependent forwards (attention-mask annealing)
        self.engine.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro, (x0, attn, batch) in enumerate(inputs):
            noise = self._noise(prog.step, micro, x0.shape[0], x0.shape[1])
            rng.seed_dropout(cfg.train.seed, prog.step, ctx.rank, micro)
            last = micro == self.accum - 1
            # decided on the host copy of the mask: the model skips masking when nothing is padded, and asking the
            # device copy would wait for the device
            model_mask = None if bool(batch["attention_mask"].all()) else attn
            with self.engine.no_sync() if not last else contextlib.nullcontext():
                extra = label_kwargs(cfg.model.num_classes, batch, self.device)
                with self._autocast():
                    loss, m = self.objective.loss(make_model_fn(self.engine.model, model_mask, **extra), x0, attn,
                                                  noise=noise)
                share = loss.float() * (m["tokens"].to(global_tok.device) / global_tok).float()
                # x * 1.0 keeps every bit; NaN reaches every gradient (NaN * 0 is NaN), so the reduced gradient norm
                # is non-finite on every rank when any rank's loss is
                self.engine.backward(share * torch.where(torch.isfinite(share), 1.0, math.nan))
            loss_sum += share.detach().double()
        grad_norm = self.engine.step(cfg.optim.grad_clip)
        finite = math.isfinite(grad_norm)
        if finite:
            prog.nonfinite_in_a_row = 0
            if cfg.train.ema > 0:
                n = prog.step + 1 - prog.skipped_total
                self.engine.ema_update(ema_decay(cfg.train.ema, n) if cfg.train.ema_warmup else cfg.train.ema)
        else:  # the engine dropped the update (a NaN/inf loss on some rank, or an overflowing gradient)
            prog.nonfinite_in_a_row += 1
            prog.skipped_total += 1
        prog.step += 1
        self._tokens += global_tok.to(torch.int64)
        if finite:  # the logging window's token-weighted loss (skipped steps do not count)
            self._window += torch.stack([loss_sum * global_tok, global_tok.to(torch.float64)])
            self._window_steps += 1
        out = {"loss": None, "loss_mean": None, "loss_steps": None, "grad_norm": grad_norm, "finite": finite}
        if read or not finite:
            # one all-reduce for this step's loss and the window's weighted sum (the token count is global already)
            got = ctx.all_reduce_sum(torch.stack([loss_sum, self._window[0]]), group=self.dp_group)
            steps = out["loss_steps"] = self._window_steps
            out["loss"] = float(got[0])
            out["loss_mean"] = (out["loss"] if steps == 1 and finite
                                else float(got[1]) / float(self._window[1]) if steps else math.nan)
            self._window.zero_()
            self._window_steps = 0
            self._read_tokens()
        return out

    def _read_tokens(self) -> None:
        """Fold the device-side token count into ``progress.tokens`` (a host read: logging steps and saves only)."""
        self.progress.tokens += int(self._tokens)
        self._tokens.zero_()

    # ------------------------------------------------------------------------------------------------
    def fit(self) -> str:
        """Train to ``train.steps``; "done", or "preempted" after a stop signal made every rank checkpoint.

        Throughput (tokens/s, MFU) is measured over the training steps of each logging window only; evaluation
        and checkpoint time are reported on their own lines."""
        cfg = self.cfg
        if self.finished_at is not None:
            if self.ctx.is_main:
                print(f"run already finished: {self.resume_path} is at step {self.finished_at} (train.steps="
                      f"{cfg.train.steps}); nothing trained, evaluated or written. To train on, raise train.steps "
                      f"(e.g. train.steps={max(self.finished_at, cfg.train.steps) * 2}); to evaluate again, "
                      f"`mdtrain eval {self.run_dir}`", flush=True)
            return "done"
        prog = self.progress
        self.metrics.print(f"training {cfg.objective.name} on {cfg.model.name}/{cfg.model.flavor} with "
                           f"{self.ctx.world_size} rank(s) [{cfg.parallel.engine}"
                           f"{f', tp={self.ctx.tp_size} x dp={self.ctx.dp_size}' if self.ctx.tp_size > 1 else ''}]"
                           f", global batch "
                           f"{cfg.train.global_batch_size} = {cfg.train.micro_batch_size} x {self.accum} accum x "
                           f"{self.ctx.dp_size} dp; from step {prog.step} to {cfg.train.steps}")
        window_tokens, window_s = prog.tokens, 0.0
        every, poll = cfg.logging.every, cfg.train.stop_check_every
        while prog.step < cfg.train.steps:
            stop = self._stop_agreed() if (prog.step % poll == 0 or prog.step % every == 0) else ""
            if stop:
                self.save()
                self.metrics.print(f"stop signal ({stop}): checkpoint saved at step {prog.step}; "
                                   f"re-run the same command (or let the launcher requeue) to resume")
                return "preempted"
            t0 = time.perf_counter()
            log_now = (prog.step + 1) % every == 0 or prog.step + 1 == cfg.train.steps
            out = self.train_step(read=log_now)
            window_s += time.perf_counter() - t0  # host time; the logging step's read waits for the device
            self.metrics.advance(prog.step)
            if log_now or not out["finite"]:
                tps = (prog.tokens - window_tokens) / max(window_s, 1e-9)
                mfu = (self.flops_per_token * tps / self.ctx.world_size / self.peak) if self.peak else None
                self.metrics.log_train({"step": prog.step, "loss": out["loss_mean"], "loss_step": out["loss"],
                                        "loss_steps": out["loss_steps"], "tokens": prog.tokens,
                                        "lr": lr_at(prog.step - 1, cfg.train.steps, cfg.optim),
                                        "grad_norm": out["grad_norm"], "tokens_per_s": tps, "mfu": mfu,
                                        "memory_gib": memory_gib(self.device), "skipped": prog.skipped_total,
                                        "skipped_samples": getattr(self.loader, "skipped_samples", 0)})
                window_tokens, window_s = prog.tokens, 0.0
            if prog.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:  # after its row is logged
                raise FloatingPointError(
                    f"{prog.nonfinite_in_a_row} non-finite losses in a row at step {prog.step} (a step whose loss or "
                    f"gradient norm is NaN/inf is skipped): stopping. Lower optim.lr, check the data, or raise "
                    f"train.max_nonfinite_steps")
            if cfg.eval.every and prog.step % cfg.eval.every == 0 and prog.step < cfg.train.steps:
                self.evaluate()
            if cfg.checkpoint.every and prog.step % cfg.checkpoint.every == 0 and prog.step < cfg.train.steps:
                self.save()
        self.save()
        self.evaluate()
        return "done"

    _STOP_SIGNALS = ("SIGUSR2", "SIGTERM")

    def _stop_agreed(self) -> str:
        """The stop signals any rank received ("" if none), the same on every rank, so all ranks save together. A
        CPU all-reduce (gloo beside NCCL on GPUs): it never waits for the device."""
        got = signals.received().split(",") if signals.stop_requested() else []
        flags = torch.tensor([float(name in got) for name in self._STOP_SIGNALS] + [float(bool(got))],
                             dtype=torch.float64)
        flags = self.ctx.all_reduce_sum(flags)
        if float(flags[-1]) == 0:
            return ""
        return ",".join(n for n, f in zip(self._STOP_SIGNALS, flags.tolist()) if f > 0) or "request"

    # ------------------------------------------------------------------------------------------------
    def evaluate(self) -> list[dict]:
        """The validation split and ``eval.extra`` (EMA weights when ``train.use_ema_for_eval``); one row each."""
        from mdtrain.evaluate import evaluate_splits
        self._device_sync()  # the training steps queued before it are not evaluation time
        t0 = time.perf_counter()
        use_ema = self.cfg.train.ema > 0 and self.cfg.train.use_ema_for_eval
        with self.engine.ema_swapped() if use_ema else contextlib.nullcontext():
            rows = evaluate_splits(self.cfg, self.engine.model, self.objective, self.ctx, step=self.progress.step)
        seconds = time.perf_counter() - t0
        for row in rows:
            self.metrics.log_eval({**row, "seconds": seconds})
        return rows

    def _device_sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def save(self) -> None:
        cfg, tok = self.cfg, self.tokenizer
        self._read_tokens()  # the progress a checkpoint records is exact

        def extra(path):
            save_config(cfg, os.path.join(path, "config.yaml"))
            tok.save(os.path.join(path, "tokenizer"))
        self._device_sync()
        t0 = time.perf_counter()
        path = self.ckpt.save(self.progress.step, self.engine, extra, async_save=cfg.checkpoint.async_save)
        verb = "writing" if cfg.checkpoint.async_save else "saved"
        self.metrics.print(f"{verb} checkpoint {path} ({time.perf_counter() - t0:.1f} s)")

    def close(self) -> None:
        """Finish a pending save, close the logs and the engine, and release the run dir (also after an error)."""
        try:
            if getattr(self, "ckpt", None) is not None and self.engine is not None:
                self.ckpt.finish()
            if getattr(self, "metrics", None) is not None:
                self.metrics.close()
            if self.engine is not None:
                self.engine.close()
        finally:
            self.lock.release()


# the keys a checkpoint's weights and optimizer state are only meaningful for: objective.* and the model's shape and
# variant (kernels and dropout may change); every other key may change on resume (lr, steps, batch, logging, eval,
# the world and TP size, which the engines reshard)
MODEL_KEYS_FREE_ON_RESUME = ("dropout", "attention", "mamba_backend")


def _tokenizer_files(directory: str) -> dict:
    """A saved tokenizer's content: every file's bytes; its metadata parsed, without the spec it was made from."""
    import json

    from mdtrain.data.tokenizers import META_FILE

    out = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as fh:
            data = fh.read()
        if name == META_FILE:
            data = json.loads(data)
            data.pop("spec", None)
        out[name] = data
    return out


def _same_tokenizer(a: dict, b: dict) -> bool:
    """Files both hold are equal (metadata: the keys both hold), so a checkpoint saved by an older mdtrain that wrote
    fewer fields still matches."""
    for name in set(a) & set(b):
        x, y = a[name], b[name]
        if isinstance(x, dict) and isinstance(y, dict):
            if any(x[k] != y[k] for k in set(x) & set(y)):
                return False
        elif x != y:
            return False
    return True


def check_resumable(path: str, cfg: Config, tokenizer) -> None:
    """A CheckpointError (one line, before any work) when the checkpoint at ``path`` was trained with other math
    than ``cfg`` describes: objective, model shape or variant, tokenizer, or an engine that cannot load it."""
    old = {}
    cpath = os.path.join(path, "config.yaml")
    if os.path.exists(cpath):
        with open(cpath) as fh:
            old = yaml.safe_load(fh) or {}
    new = to_dict(cfg)
    diffs = []
    for section in ("objective", "model"):
        before, now = old.get(section) or {}, new[section]
        for key, value in now.items():
            if key in before and before[key] != value and not (section == "model" and key in
                                                                   MODEL_KEYS_FREE_ON_RESUME):
                diffs.append(f"{section}.{key}={before[key]!r} (this run: {value!r})")
    from mdtrain.parallel.engines.base import read_meta
    meta = read_meta(path)
    engine = cfg.parallel.engine
    if meta["engine"] != engine:
        diffs.append(f"parallel.engine={meta['engine']} (this run: {engine}; a checkpoint resumes with the engine "
                     f"that wrote it)")
    elif engine == "deepspeed" and meta.get("zero_stage") != cfg.parallel.zero_stage:
        diffs.append(f"parallel.zero_stage={meta.get('zero_stage')} (this run: {cfg.parallel.zero_stage})")
    tok_dir = os.path.join(path, "tokenizer")
    if os.path.isdir(tok_dir):
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save(tmp)
            if not _same_tokenizer(_tokenizer_files(tmp), _tokenizer_files(tok_dir)):
                diffs.append(f"the tokenizer (the checkpoint's has vocab size "
                             f"{_vocab_size(tok_dir)}, this run's data {tokenizer.vocab_size})")
    if diffs:
        raise CheckpointError(
            f"cannot resume {path}: it was trained with {'; '.join(diffs)}. These define what the weights mean: "
            f"restore them to resume, or start a new run from these weights with checkpoint.load_from={path} in "
            f"another train.run_dir (or with checkpoint.start_over=true)")


def _vocab_size(tok_dir: str):
    from mdtrain.data.tokenizers import load_tokenizer
    try:
        return load_tokenizer(tok_dir).vocab_size
    except Exception:  # noqa: BLE001 - only for the message
        return "?"


def _warn_config_changes(run_dir: str, cfg: Config) -> None:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return
    with open(path) as fh:
        old = yaml.safe_load(fh) or {}
    new = to_dict(cfg)
    changed = [f"{s}.{k}: {old[s].get(k)!r} -> {v!r}" for s, sec in new.items() if isinstance(sec, dict)
               and isinstance(old.get(s), dict) for k, v in sec.items() if old[s].get(k) != v]
    if changed:
        print(f"note: config differs from the run's previous config.yaml: {'; '.join(changed)}", flush=True)
