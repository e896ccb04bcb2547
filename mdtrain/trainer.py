"""The training loop: build -> (train_step, evaluate, checkpoint)* -> close. Engine-agnostic.

One process or many (torchrun, the deepspeed launcher, srun, submitit): the process group, the engine and the data
split come from ``mdtrain.parallel``; the loop never branches on which engine it has. Randomness is keyed by position
(``mdtrain.rng``), so a resumed run repeats every step exactly.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import yaml

from mdtrain import rng, signals
from mdtrain.checkpoint import CheckpointManager, load_consolidated, resolve_checkpoint
from mdtrain.config import Config, config_from_dict, save_config
from mdtrain.configtools import ConfigError, to_dict
from mdtrain.metrics import MetricsLogger, eval_row, memory_gib, peak_flops
from mdtrain.optim import lr_at, make_adamw


def ema_decay(cap: float, num_updates: int) -> float:
    """MDLM's EMA warmup: min(cap, (1 + n) / (10 + n)) for the n-th update (n counted from 1)."""
    return min(cap, (1 + num_updates) / (10 + num_updates))


def attach_objective(model: torch.nn.Module, objective) -> torch.nn.Module:
    """Objectives with parameters (GenMD4's learnable schedule) ride along as ``model.objective``, so every engine
    shards, syncs, optimises, checkpoints and exports them with the network's weights."""
    if any(True for _ in objective.parameters()):
        model.add_module("objective", objective)
    return model


def valid_tokens(objective, attention_mask: torch.Tensor) -> torch.Tensor:
    """Tokens that carry loss: AR predicts positions 1.. from their prefix, the masked family every position."""
    m = attention_mask[:, 1:] if objective.causal else attention_mask
    return m.sum()


@dataclass
class Built:
    """Everything a run needs, built once."""
    cfg: Config
    ctx: Any
    tokenizer: Any
    objective: Any
    engine: Any
    seq_len: int
    flops_per_token: float


def build(cfg: Config, ctx, tokenizer, seq_len: int, accum: int, init_state: Optional[dict] = None) -> Built:
    """Objective -> model (initial weights, TP, AC, compile) -> engine (DDP / FSDP / ZeRO), on a ready process group."""
    from mdtrain.models import build_model
    from mdtrain.models.flops import flops_per_token
    from mdtrain.objectives import build_objective
    from mdtrain.parallel import build_engine

    objective = build_objective(cfg.objective, tokenizer.vocab_size, tokenizer.mask_id)
    torch.manual_seed(rng.key(0, cfg.train.seed))  # identical initial weights on every rank
    model = attach_objective(build_model(cfg.model, tokenizer.vocab_size, seq_len), objective)
    if init_state is not None:  # checkpoint.load_from: weights only, before any wrapping
        model.load_state_dict(init_state)
    fpt = flops_per_token(cfg.model, tokenizer.vocab_size, seq_len, causal=objective.causal)
    model = _apply_parallelisms(model, cfg, ctx)
    engine = build_engine(cfg.parallel, model, lambda m: make_adamw(m, cfg.optim), ctx,
                          precision=_precision(cfg, ctx), grad_accum=accum, micro_batch_size=cfg.train.micro_batch_size)
    if cfg.train.ema > 0:
        engine.ema_init()
    return Built(cfg, ctx, tokenizer, objective, engine, seq_len, fpt["exact"] if "exact" in fpt else fpt["rule"])


def _apply_parallelisms(model, cfg: Config, ctx):
    """torchtitan's order: tensor parallel -> activation checkpointing -> compile; the engine shards last."""
    if cfg.parallel.tp > 1:
        from mdtrain.parallel.tensor_parallel import apply_tensor_parallel
        model = apply_tensor_parallel(model, ctx)
    if cfg.train.activation_checkpointing or cfg.train.compile:
        from mdtrain.parallel.blocks import wrap_blocks
        wrap_blocks(model, checkpoint=cfg.train.activation_checkpointing, compile=cfg.train.compile)
    return model.to(ctx.device)


def _precision(cfg: Config, ctx) -> str:
    if cfg.train.precision == "auto":
        return "bf16" if ctx.device.type == "cuda" else "fp32"
    return cfg.train.precision


def _grad_accum(cfg: Config, ctx) -> int:
    per_step = cfg.train.micro_batch_size * ctx.dp_size
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not a multiple of train.micro_batch_size "
            f"({cfg.train.micro_batch_size}) x data-parallel size ({ctx.dp_size}) = {per_step}; choose a global "
            f"batch of micro x accumulation x data-parallel ranks")
    return cfg.train.global_batch_size // per_step


class Trainer:
    def __init__(self, cfg: Config):
        from mdtrain.data.loader import build_loader
        from mdtrain.parallel.dist import init_distributed

        self.cfg = cfg
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.ctx = init_distributed(cfg.parallel.backend, cfg.parallel.tp)
        self.accum = _grad_accum(cfg, self.ctx)
        self.run_dir = cfg.train.run_dir
        if self.ctx.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
        self.ctx.barrier()
        self.loader = build_loader(cfg.data, "train", cfg.train.micro_batch_size, self.ctx.dp_rank, self.ctx.dp_size,
                                   seed=cfg.train.seed, infinite=True)
        self.data_iter = iter(self.loader)
        self.ckpt = CheckpointManager(os.path.join(self.run_dir, "checkpoints"), cfg.checkpoint.keep_last, self.ctx)
        self.resume_path = self.ckpt.latest() if cfg.checkpoint.resume else None
        init_state = None
        if self.resume_path is None and cfg.checkpoint.load_from:
            init_state = load_for_inference(cfg.checkpoint.load_from, use_ema=True).model.state_dict()
        self.b = build(cfg, self.ctx, self.loader.tokenizer, self.loader.seq_len, self.accum, init_state)
        self.engine, self.objective = self.b.engine, self.b.objective
        self.device = self.ctx.device
        self.step = 0
        self.tokens = 0
        self.nonfinite_in_a_row = 0
        self.skipped_total = 0
        self.wandb_id: Optional[str] = None
        self.precision = _precision(cfg, self.ctx)
        self.peak = peak_flops(self.device, self.precision)
        self._resume()
        if self.ctx.is_main:
            _warn_config_changes(self.run_dir, cfg)
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        wandb_cfg = None
        if cfg.logging.wandb:
            wandb_cfg = {"project": cfg.logging.wandb_project,
                         "name": cfg.logging.wandb_name or os.path.basename(os.path.abspath(self.run_dir)),
                         "config": to_dict(cfg), "run_id": self.wandb_id}
        self.metrics = MetricsLogger(self.run_dir, cfg.train.steps, self.ctx.is_main, cfg.logging.progress_bar,
                                     wandb_cfg)
        if self.metrics.wandb:
            self.wandb_id = self.metrics.wandb.id

    # ------------------------------------------------------------------------------------------------
    def _model_fn(self, attention_mask: Optional[torch.Tensor]):
        model = self.engine.model

        def model_fn(x, cond=None, attn=None):
            mask = attn if attn is not None else attention_mask
            if mask is not None and mask.shape[1] != x.shape[1]:
                mask = mask[:, : x.shape[1]]
            return model(x, cond, mask)
        return model_fn

    def _autocast(self):
        if self.precision == "bf16" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _noise(self, step: int, micro: int, batch_size: int, seq_len: int, seed: int, stream: int, total: int):
        base = (micro * self.ctx.dp_size + self.ctx.dp_rank) * batch_size  # the loader's order (mdtrain.rng)
        noise = rng.keyed_noise(self.objective.noise_spec(seq_len), tuple(self.objective.stratified_keys), seed, step,
                                list(range(base, base + batch_size)), total, stream)
        return {k: v.to(self.device) for k, v in noise.items()}

    def train_step(self) -> dict:
        cfg = self.cfg
        batches = [next(self.data_iter) for _ in range(self.accum)]
        local_tok = sum(float(valid_tokens(self.objective, b["attention_mask"])) for b in batches)
        # over data-parallel ranks only: the tensor-parallel ranks of a DP rank hold copies of the same batch
        global_tok = float(self.ctx.all_reduce_sum(torch.tensor([local_tok], dtype=torch.float64),
                                                   group=self.ctx.dp_group)[0])
        self.engine.set_lr(lr_at(self.step, cfg.train.steps, cfg.optim))
        self.engine.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro, batch in enumerate(batches):
            x0 = batch["input_ids"].to(self.device, non_blocking=True)
            attn = batch["attention_mask"].to(self.device, non_blocking=True)
            noise = self._noise(self.step, micro, x0.shape[0], x0.shape[1], cfg.train.seed, rng.STREAM_NOISE,
                                cfg.train.global_batch_size)
            rng.seed_dropout(cfg.train.seed, self.step, self.ctx.rank, micro)
            last = micro == self.accum - 1
            with self.engine.no_sync() if not last else contextlib.nullcontext():
                with self._autocast():
                    loss, m = self.objective.loss(self._model_fn(attn), x0, attn, noise=noise)
                share = loss.float() * (float(m["tokens"]) / global_tok)
                self.engine.backward(share)
            loss_sum += share.detach().double()
        finite = torch.isfinite(loss_sum).to(torch.float64).reshape(1).cpu()
        all_finite = float(self.ctx.all_reduce_sum(finite)[0]) == self.ctx.world_size
        grad_norm = self.engine.step(cfg.optim.grad_clip, skip=not all_finite)
        if all_finite:
            self.nonfinite_in_a_row = 0
            if cfg.train.ema > 0:
                n = self.step + 1 - self.skipped_total
                self.engine.ema_update(ema_decay(cfg.train.ema, n) if cfg.train.ema_warmup else cfg.train.ema)
        else:
            self.nonfinite_in_a_row += 1
            self.skipped_total += 1
            if self.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{self.nonfinite_in_a_row} non-finite losses in a row at step {self.step + 1}: stopping. Lower "
                    f"optim.lr, check the data, or raise train.max_nonfinite_steps")
        self.step += 1
        self.tokens += int(global_tok)
        global_loss = self.ctx.all_reduce_sum(loss_sum.reshape(1).cpu(), group=self.ctx.dp_group)[0]
        return {"loss": float(global_loss), "grad_norm": float(grad_norm), "tokens_step": global_tok,
                "finite": all_finite}

    # ------------------------------------------------------------------------------------------------
    def fit(self) -> str:
        cfg = self.cfg
        if self.step >= cfg.train.steps:
            self.metrics.print(f"run already finished at step {self.step} (train.steps={cfg.train.steps})")
        self.metrics.print(f"training {cfg.objective.name} on {cfg.model.name}/{cfg.model.flavor} with "
                           f"{self.ctx.world_size} rank(s) [{cfg.parallel.engine}], global batch "
                           f"{cfg.train.global_batch_size} = {cfg.train.micro_batch_size} x {self.accum} accum x "
                           f"{self.ctx.dp_size} dp; from step {self.step} to {cfg.train.steps}")
        t_last, tok_last = time.time(), 0
        while self.step < cfg.train.steps:
            if self._stop_agreed():
                self.save()
                self.metrics.print(f"stop signal ({signals.received()}): checkpoint saved at step {self.step}; "
                                   f"re-run the same command (or let the launcher requeue) to resume")
                return "preempted"
            out = self.train_step()
            tok_last += out["tokens_step"]
            self.metrics.advance(self.step)
            if self.step % cfg.logging.every == 0 or self.step == cfg.train.steps or not out["finite"]:
                dt = max(time.time() - t_last, 1e-9)
                tps = tok_last / dt
                mfu = (self.b.flops_per_token * tps / self.ctx.world_size / self.peak) if self.peak else None
                self.metrics.log_train({"step": self.step, "loss": out["loss"], "tokens": self.tokens,
                                        "lr": lr_at(self.step - 1, cfg.train.steps, cfg.optim),
                                        "grad_norm": out["grad_norm"], "tokens_per_s": tps, "mfu": mfu,
                                        "memory_gib": memory_gib(self.device), "skipped": self.skipped_total,
                                        "skipped_samples": getattr(self.loader, "skipped_samples", 0)})
                t_last, tok_last = time.time(), 0
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.train.steps:
                self.evaluate()
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.train.steps:
                self.save()
        if self.resume_path is None or self.step > self._resumed_step:  # a finished run re-run only re-evaluates
            self.save()
        self.evaluate()
        return "done"

    def _stop_agreed(self) -> bool:
        """True on every rank when any rank received a stop signal (so all ranks save together)."""
        flag = torch.tensor([1.0 if signals.stop_requested() else 0.0], dtype=torch.float64)
        return float(self.ctx.all_reduce_sum(flag)[0]) > 0

    # ------------------------------------------------------------------------------------------------
    def evaluate(self) -> list[dict]:
        from mdtrain.evaluate import evaluate_splits
        with self._ema_context():
            rows = evaluate_splits(self.cfg, self.b, step=self.step)
        for row in rows:
            self.metrics.log_eval(row)
        return rows

    def _ema_context(self):
        if self.cfg.train.ema > 0 and self.cfg.train.use_ema_for_eval:
            return self.engine.ema_swapped()
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------------
    def client_state(self) -> dict:
        state = {"step": self.step, "tokens": self.tokens, "data": self.loader.state_dict(),
                 "skipped_total": self.skipped_total, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                 "wandb_id": self.wandb_id or "", "world_size": self.ctx.world_size, "dp_size": self.ctx.dp_size,
                 "rng_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state()
        return state

    def save(self) -> None:
        cfg, tok = self.cfg, self.b.tokenizer

        def extra(path):
            save_config(cfg, os.path.join(path, "config.yaml"))
            tok.save(os.path.join(path, "tokenizer"))
        async_save = self.cfg.checkpoint.async_save
        path = self.ckpt.save(self.step, lambda p: self.engine.save_checkpoint(p, self.client_state(), async_save),
                              extra, wait=self.engine.wait_checkpoint if async_save else None)
        self.metrics.print(f"{'writing' if async_save else 'saved'} checkpoint {path}")

    def _resume(self) -> None:
        path = self.resume_path
        if path is None:
            return
        state = self.engine.load_checkpoint(path)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self._resumed_step = self.step
        self.skipped_total = int(state.get("skipped_total", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.wandb_id = state.get("wandb_id") or None
        if int(state.get("dp_size", self.ctx.dp_size)) == self.ctx.dp_size:
            self.loader.load_state_dict(state["data"])
        else:
            self.loader.load_state_dict(state["data"], from_dp_size=int(state["dp_size"]))
        self.data_iter = iter(self.loader)
        if "rng_cpu" in state:
            torch.set_rng_state(state["rng_cpu"])
        if self.ctx.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def close(self) -> None:
        self.ckpt.finish()
        self.metrics.close()
        self.engine.close()


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


# ----------------------------------------------------------------------------------------------------
# inference-side loading (eval, sample, export)


def load_for_inference(path: str, use_ema: bool = True, overrides: Optional[list[str]] = None):
    """A run dir, checkpoint dir or export dir -> ``mdtrain.exported.Bundle`` on one process (EMA weights if any)."""
    from mdtrain.configtools import set_dotted, parse_overrides
    from mdtrain.data.tokenizers import load_tokenizer
    from mdtrain.exported import Bundle, is_export_dir, load_exported
    from mdtrain.models import build_model
    from mdtrain.objectives import build_objective

    if is_export_dir(path):
        bundle = load_exported(path)
        for k, v in parse_overrides(overrides or []):
            set_dotted(bundle.cfg, k, v)
        return bundle
    ckpt = resolve_checkpoint(path)
    with open(os.path.join(ckpt, "config.yaml")) as fh:
        cfg = config_from_dict(yaml.safe_load(fh))
    for k, v in parse_overrides(overrides or []):
        set_dotted(cfg, k, v)
    tokenizer = load_tokenizer(os.path.join(ckpt, "tokenizer"))
    objective = build_objective(cfg.objective, tokenizer.vocab_size, tokenizer.mask_id)
    model = attach_objective(build_model(cfg.model, tokenizer.vocab_size, cfg.data.seq_len), objective)
    state = load_consolidated(ckpt, model.state_dict(), ema=use_ema)
    model.load_state_dict(state)
    model.eval()
    return Bundle(model=model, objective=objective, tokenizer=tokenizer, cfg=cfg)


def main(args) -> int:
    cfg: Config = args.cfg
    signals.install()
    trainer = Trainer(cfg)
    try:
        status = trainer.fit()
    finally:
        trainer.close()
    if status == "preempted":
        raise signals.Preempted(signals.received())
    return 0
