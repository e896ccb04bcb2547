"""The one config tree: typed, documented sections; YAML file + dotted overrides; validated; dumped to the run dir.

Precedence: command-line overrides > YAML file > dataclass defaults. A YAML file may name a ``base:`` file
(relative to itself) whose values it extends.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import yaml

from mdtrain.configtools import (ConfigError, atomic_write_text, doc, dump_yaml, from_dict, parse_overrides,
                                 section, set_dotted, validate_tree)
from mdtrain.data.config import DataConfig
from mdtrain.models.config import ModelConfig
from mdtrain.objectives.config import ObjectiveConfig, SampleConfig
from mdtrain.launch.config import LaunchConfig

__all__ = ["Config", "ConfigError", "load_config", "save_config"]


@dataclass
class OptimConfig:
    lr: float = doc(3e-4, "peak learning rate (MDLM: 3e-4)", gt=0)
    betas: list[float] = doc([0.9, 0.999], "AdamW betas (MDLM: 0.9, 0.999; MD4: 0.9, 0.999)", ge=0, lt=1)
    eps: float = doc(1e-8, "AdamW epsilon", gt=0)
    weight_decay: float = doc(0.0, "AdamW weight decay (MDLM: 0; MD4: 0.03)", ge=0)
    no_decay: list[str] = doc(["1d", "embed"],
                              "exempt from weight decay: '1d' for every 1-D parameter (biases, norm scales), and "
                              "parameter-name components ('embed' = embed.weight, not time_embed.*); [] decays "
                              "everything (MD4)")
    grad_clip: float = doc(1.0, "max global grad norm; 0 disables clipping", ge=0)
    schedule: str = doc("constant_warmup", "LR schedule: constant_warmup (MDLM), cosine (MD4, to zero), wsd",
                        choices=("constant_warmup", "cosine", "wsd"))
    warmup_steps: int = doc(2500, "linear warmup steps (MDLM: 2500)", ge=0)
    decay_fraction: float = doc(0.2, "wsd: fraction of the run spent decaying to min_lr_ratio at the end", gt=0, le=1)
    min_lr_ratio: float = doc(0.0, "cosine/wsd: final LR as a fraction of the peak", ge=0, le=1)

    def validate(self):
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas needs two values, got {self.betas}")


@dataclass
class TrainConfig:
    run_dir: str = doc("runs/default", "run directory: config.yaml, metrics.jsonl, checkpoints/")
    steps: int = doc(1000, "optimizer steps to train for", ge=1)
    global_batch_size: int = doc(512, "sequences per optimizer step, summed over ranks and accumulation (MDLM: 512)",
                                 ge=1)
    micro_batch_size: int = doc(16, "sequences per forward/backward on one rank", ge=1)
    seed: int = doc(1, "seed of every random stream (MDLM: 1)", ge=0)
    precision: str = doc("auto", "auto (bf16 autocast on GPU, fp32 on CPU), fp32, bf16",
                         choices=("auto", "fp32", "bf16"))
    ema: float = doc(0.9999, "EMA decay; 0 disables EMA (MDLM, MD4: 0.9999)", ge=0, lt=1)
    ema_warmup: bool = doc(True, "MDLM's EMA warmup min(ema, (1+n)/(10+n)); false = the constant decay from step 1 "
                                 "(MD4)")
    use_ema_for_eval: bool = doc(True, "evaluate and sample with the EMA weights when EMA is on")
    compile: bool = doc(False, "torch.compile each block")
    activation_checkpointing: bool = doc(False, "recompute each block's activations in backward")
    deterministic: bool = doc(False, "deterministic algorithms, for bit-exact comparisons")
    max_nonfinite_steps: int = doc(10, "stop after this many steps in a row whose loss or gradient norm is NaN/inf "
                                       "(each such step is skipped and counted)", ge=1)
    stop_check_every: int = doc(10, "poll the stop signal (SIGUSR2/SIGTERM on any rank) every N steps and on every "
                                    "logging step: one tiny all-reduce; a stop takes effect within N steps", ge=1)
    device: str = doc("auto", "auto (cuda:LOCAL_RANK if CUDA is available, else the CPU), cpu (also on a GPU "
                              "machine), cuda", choices=("auto", "cpu", "cuda"))


@dataclass
class ParallelConfig:
    engine: str = doc("ddp", "data-parallel engine (ddp is plain single-process training at world size 1)",
                      choices=("ddp", "fsdp", "deepspeed"))
    tp: int = doc(1, "tensor-parallel size (Megatron-core layers)", ge=1)
    zero_stage: int = doc(2, "deepspeed: ZeRO stage 0-3", choices=(0, 1, 2, 3))
    deepspeed_config: str = doc("", "deepspeed: path to a DeepSpeed JSON whose values override the generated one")
    offload_optimizer: bool = doc(False, "fsdp/deepspeed: keep optimizer state on CPU")
    reshard_after_forward: bool = doc(True, "fsdp: free gathered params after forward (ZeRO-3 like)")
    mixed_precision: bool = doc(True, "fsdp: bf16 params with fp32 reduction when training in bf16")
    backend: str = doc("auto", "process-group backend: auto (nccl on CUDA, else gloo), gloo, nccl")


@dataclass
class CheckpointConfig:
    every: int = doc(1000, "save every N steps (and at the end); 0 saves only at the end", ge=0)
    keep_last: int = doc(3, "keep the newest K checkpoints of this run (older ones are pruned after each save, never "
                            "a newer one); 0 keeps all", ge=0)
    resume: bool = doc(True, "resume from the newest valid checkpoint in the run dir; false in a run dir that holds "
                             "checkpoints is an error (unless checkpoint.start_over)")
    start_over: bool = doc(False, "train from step 0 in a run dir that holds checkpoints (also when none of them is "
                                  "usable): the previous run's checkpoints/, metrics.jsonl and config.yaml are moved "
                                  "into RUN_DIR/superseded/<time>/ first, never deleted; a requeued job resumes "
                                  "instead of starting over again")
    verify: str = doc("size", "check of a checkpoint before it is resumed or loaded: size (manifest complete, every "
                              "file regular and of its size; stat calls only) or sha256 (also hash every file, "
                              "each rank the files it wrote)", choices=("size", "sha256"))
    async_save: bool = doc(False, "ddp/fsdp: write DCP checkpoints in the background")
    load_from: str = doc("", "initialise weights from this checkpoint or export dir (not a resume)")


@dataclass
class LoggingConfig:
    every: int = doc(10, "log a console line and a metrics.jsonl row every N steps", ge=1)
    wandb: bool = doc(False, "log to Weights & Biases (offline unless WANDB_API_KEY is set)")
    wandb_project: str = doc("mdtrain", "wandb project")
    wandb_name: str = doc("", "wandb run name; empty = the run dir's name")
    tensorboard: bool = doc(False, "also write the metrics.jsonl scalars as TensorBoard event files in "
                                   "<run_dir>/tensorboard/ (needs the tensorboard package)")
    progress_bar: bool = doc(True, "show a progress bar with ETA on interactive terminals")


@dataclass
class EvalConfig:
    every: int = doc(0, "evaluate every N steps during training; 0 = only at the end", ge=0)
    batches: int = doc(0, "validation batches per evaluation; 0 = the whole validation split", ge=0)
    batch_size: int = doc(16, "sequences per eval forward on one rank", ge=1)
    mc_samples: int = doc(1, "Monte Carlo time samples per sequence for the NELBO", ge=1)
    seed: int = doc(0, "seed of the eval Monte Carlo noise (fixed, so evals are comparable)", ge=0)
    extra: list[str] = doc([], "more prepared datasets to evaluate zero-shot (paths)")
    gen_ppl_model: str = doc("", "AR checkpoint/export dir that scores samples for generative perplexity")


@dataclass
class Config:
    model: ModelConfig = section(ModelConfig, "backbone and size")
    objective: ObjectiveConfig = section(ObjectiveConfig, "training objective and noise schedule")
    data: DataConfig = section(DataConfig, "prepared shards or synthetic source")
    optim: OptimConfig = section(OptimConfig, "AdamW, LR schedule, clipping")
    train: TrainConfig = section(TrainConfig, "loop, batch, precision, EMA")
    parallel: ParallelConfig = section(ParallelConfig, "engines and tensor parallelism")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "saving and resuming")
    logging: LoggingConfig = section(LoggingConfig, "console, metrics.jsonl, wandb, TensorBoard")
    eval: EvalConfig = section(EvalConfig, "validation NELBO / perplexity")
    sample: SampleConfig = section(SampleConfig, "sampling")
    launch: LaunchConfig = section(LaunchConfig, "mdtrain launch: SLURM resources and requeue policy")

    def validate(self):
        causal = self.model.name == "causal" or (self.model.name == "llama" and self.model.llama.attention == "causal")
        if self.objective.name == "ar" and not causal:
            raise ConfigError(f"objective.name=ar needs a causal backbone (model.name=causal, or model.name=llama with "
                              f"model.llama.attention=causal), got model.name={self.model.name}")
        if self.objective.name != "ar" and causal:
            raise ConfigError(f"a causal backbone only fits objective.name=ar, got objective.name={self.objective.name}"
                              + (" (set model.llama.attention=bidirectional or anneal)" if self.model.name == "llama"
                                 else ""))
        if self.model.image_shape and math.prod(self.model.image_shape) != self.data.seq_len:
            raise ConfigError(f"model.image_shape={self.model.image_shape} has {math.prod(self.model.image_shape)} "
                              f"pixel tokens per image, but data.seq_len={self.data.seq_len}")
        if self.model.name == "unet" and self.parallel.tp != 1:
            raise ConfigError("model.name=unet has no tensor-parallel layout: set parallel.tp=1")
        if self.parallel.tp != 1:
            from mdtrain.parallel.tensor_parallel_layout import check_config
            check_config(self)
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size={self.train.micro_batch_size}")


def read_yaml(path: str, seen: tuple = ()) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"config file '{path}' does not exist")
    if os.path.abspath(path) in seen:
        raise ConfigError(f"config file '{path}' includes itself through 'base:'")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base:
        base_path = os.path.join(os.path.dirname(os.path.abspath(path)), base)
        data = _merge(read_yaml(base_path, seen + (os.path.abspath(path),)), data)
    return data


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None, validate: bool = True) -> Config:
    """Defaults <- YAML file (with its bases) <- ``key=value`` overrides; every key checked before any work."""
    data = read_yaml(path) if path else {}
    try:
        cfg = from_dict(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") if path else e
    for key, value in parse_overrides(list(overrides or [])):
        set_dotted(cfg, key, value)
    if validate:
        validate_tree(cfg)
    return cfg


def save_config(cfg: Config, path: str) -> None:
    atomic_write_text(path, dump_yaml(cfg))


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from a checkpoint's stored dict (same validation as a YAML file)."""
    return from_dict(Config, data)
