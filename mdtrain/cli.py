"""The ``mdtrain`` command: parse arguments, call one function. Each subcommand's work lives in its module."""
from __future__ import annotations

import argparse
import importlib
import sys

from mdtrain.errors import USER_ERRORS, exit_status, report

# subcommand -> (module, function, one-line help). The function takes the parsed argparse namespace; modules are
# imported only for the subcommand that runs (torch, deepspeed and megatron take seconds to import).
COMMANDS = {
    "prepare": ("mdtrain.data.prepare", "main", "tokenize text/JSONL/Parquet into packed webdataset shards"),
    "train": ("mdtrain.cli", "train", "train from a YAML config plus key=value overrides (resumes a run dir)"),
    "eval": ("mdtrain.eval_cli", "main", "NELBO / perplexity of a run dir or checkpoint; last stdout line is JSON"),
    "sample": ("mdtrain.sampling_cli", "main", "generate text with any sampler from a run dir or checkpoint"),
    "export": ("mdtrain.inference", "export_main", "write consolidated safetensors + config + tokenizer (or, with "
               "--format hf, a Hugging Face model directory)"),
    "import": ("mdtrain.interop.cli", "import_main", "MDLM reference checkpoints, Hugging Face causal LMs -> an "
               "mdtrain export directory"),
    "sweep": ("mdtrain.sweep", "main", "scaling-law grid: plan / run / submit / collect / fit"),
    "launch": ("mdtrain.launch.slurm", "main", "submit `mdtrain train` to SLURM through submitit (or run it locally)"),
    "compare": ("mdtrain.compare", "main", "runs side by side: a table of their results and loss-vs-tokens/time plots"),
    "lm-eval": ("mdtrain.harness", "main", "lm-evaluation-harness tasks on a run, checkpoint or export (mdtrain as "
                "lm_eval's model)"),
}


_OVERRIDE_EXAMPLES = {"train": "optim.lr=3e-4 train.steps=1000", "sweep": "sweep.executor=inprocess",
                      "eval": "eval.batches=0 (the whole split)", "sample": "sample.steps=256 sample.num_samples=16",
                      "import": "model.flavor=small"}


def _add_config_args(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"dotted config overrides, e.g. {_OVERRIDE_EXAMPLES[command]}")


class _DefaultsShown(argparse.HelpFormatter):
    """Help that states each option's default (when it has one)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not (action.default is None or action.default is False or action.default == argparse.SUPPRESS) \
                and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mdtrain", description="Train masked-diffusion language models (MDLM, MD4/GenMD4, SEDD, D3PM, AR) "
        "on DiT and bidirectional-Mamba backbones, from one CPU to a SLURM cluster.")
    parser.add_argument("--version", action="version", version=_version())
    # the deepspeed launcher puts --local_rank=N right after the script, i.e. before the subcommand
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("prepare", help=COMMANDS["prepare"][2], description=COMMANDS["prepare"][2],
                       formatter_class=_DefaultsShown)
    p.add_argument("--input", nargs="+", required=True, help="text files/dirs, .jsonl, .parquet")
    p.add_argument("--tokenizer", help="sentencepiece:train:VOCAB | sentencepiece:PATH.model | hf:DIR | bytes | "
                   "from:RUN_CHECKPOINT_EXPORT_OR_DATASET (reuse a model's tokenizer, e.g. for zero-shot sets)")
    p.add_argument("--seq-len", type=int, help="tokens per sample (text: required)")
    p.add_argument("--out", required=True, help="output directory for shards + manifest.json")
    p.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents for validation")
    p.add_argument("--packing", default="mdlm", choices=["mdlm", "md4", "pad"],
                   help="mdlm: EOS between docs + BOS/EOS per chunk; md4: docs+EOS, plain blocks; pad: one doc per sample")
    p.add_argument("--doc-per", default="file", choices=["file", "line"], help="text inputs: a document per file or per line")
    p.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text")
    p.add_argument("--samples-per-shard", type=int, default=1024, help="samples per tar shard")
    p.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--glob", default="*", help="file pattern when an input is a directory")
    p.add_argument("--detokenize", default="none", metavar="NAME",
                   help="undo a pre-tokenised corpus's tokenisation first, as the zero-shot papers do: ptb, wikitext, "
                   "lm1b, lambada, scientific_papers (PubMed/ArXiv), none (AG News, OpenWebText)")
    p.add_argument("--images", action="store_true", help="inputs are images (PNG/JPEG folders, CIFAR python batches, "
                   ".npy): pixels as tokens, mask = 256 (no --tokenizer)")
    p.add_argument("--image-size", default="", help="--images: HxW or HxWxC every image must have (default: the "
                   "first image's)")
    p.add_argument("--on-corrupt", default="error", choices=["error", "skip"], help="--images: a bad image stops "
                   "the run naming the file (error) or is skipped and counted (skip)")

    for name in ("train", "sweep"):
        p = sub.add_parser(name, help=COMMANDS[name][2], description=COMMANDS[name][2])
        p.add_argument("config", nargs="?", help="YAML file")
        _add_config_args(p, name)
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("--help-config", action="store_true", help="list every config key with its doc and exit")
        p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        if name == "sweep":
            p.add_argument("action", nargs="?", default=None, help=argparse.SUPPRESS)

    for name in ("eval", "sample"):
        p = sub.add_parser(name, help=COMMANDS[name][2], description=COMMANDS[name][2])
        p.add_argument("path", help="run directory or checkpoint directory")
        _add_config_args(p, name)
        p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("export", help=COMMANDS["export"][2], description=COMMANDS["export"][2])
    p.add_argument("path", help="run directory or checkpoint directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--format", choices=["mdtrain", "hf"], default="mdtrain",
                   help="mdtrain (load_exported) or hf (transformers loads it; see README)")

    p = sub.add_parser("import", help=COMMANDS["import"][2], description=COMMANDS["import"][2])
    p.add_argument("source", choices=["mdlm", "hf"], help="mdlm: a checkpoint of the MDLM reference code; hf: a "
                   "local Hugging Face causal-LM directory (Llama, Qwen2, GPT-2)")
    p.add_argument("path", help="checkpoint file or directory")
    p.add_argument("--out", required=True, help="the mdtrain export directory to write")
    p.add_argument("--tokenizer", default=None, help="tokenizer SPEC (hf:DIR | bytes | sentencepiece:PATH); hf "
                   "default: hf:PATH")
    p.add_argument("--recipe", default=None, help="YAML applied over the imported config (e.g. "
                   "configs/adapt_llada.yaml: AR -> diffusion)")
    p.add_argument("--no-ema", action="store_true", help="mdlm: the raw weights, not the EMA of a Lightning checkpoint")
    _add_config_args(p, "import")

    p = sub.add_parser("compare", help=COMMANDS["compare"][2], description=COMMANDS["compare"][2])
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (config.yaml + metrics.jsonl)")
    p.add_argument("--out", default="compare", help="where the plots go (default: %(default)s)")

    p = sub.add_parser("lm-eval", help=COMMANDS["lm-eval"][2], description=COMMANDS["lm-eval"][2])
    p.add_argument("path", help="run directory, checkpoint directory or export directory")
    p.add_argument("--tasks", nargs="+", required=True, help="lm_eval task names (comma- or space-separated)")
    p.add_argument("--model-args", default="", help="k=v,... for the mdtrain model: mc_samples (128), estimator "
                   "(llada|elbo), seed (1234), sampler, steps, max_gen_toks, add_bos, batch_size, mc_batch_size")
    p.add_argument("--include-path", default=None, help="directory of your own task YAMLs")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt")
    p.add_argument("--limit", type=float, default=None, help="only the first N documents per task (testing)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--output", default=None, help="write the full results JSON here")
    p.add_argument("--log-samples", action="store_true", help="with --output: every request and response too")

    p = sub.add_parser("launch", help=COMMANDS["launch"][2], description=COMMANDS["launch"][2], add_help=False)
    p.add_argument("launch_args", nargs=argparse.REMAINDER, help="see `mdtrain launch --help`")
    return parser


def _version() -> str:
    from mdtrain import __version__
    return f"mdtrain {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:  # its own parser (argparse's REMAINDER cannot pass a leading --help through)
        from mdtrain.launch.slurm import main as launch_main
        return _run("launch", launch_main, argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "help_config", False):
        from mdtrain.config import Config
        from mdtrain.configtools import describe
        if args.command == "sweep":
            from mdtrain.sweep.config import SweepFile as Config  # the training tree plus the sweep: section
        print(describe(Config))
        return 0
    if getattr(args, "config", None) and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.config)  # `mdtrain train key=value ...` with no YAML file
        args.config = None
    module, func, _ = COMMANDS[args.command]
    if args.command == "export" and args.format == "hf":
        module, func = "mdtrain.interop.cli", "export_hf_main"
    return _run(args.command, getattr(importlib.import_module(module), func), args)


def train(args) -> int:
    """``mdtrain train``: the whole config is loaded and checked before anything heavy is imported or any work done."""
    from mdtrain.config import load_config
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        import dataclasses

        from mdtrain.configtools import dump_yaml
        from mdtrain.objectives.config import with_conventions
        print("# the resolved config: the objective's conventions filled in (what `mdtrain train` runs)")
        print(dump_yaml(dataclasses.replace(cfg, objective=with_conventions(cfg.objective))), end="")
        return 0
    from mdtrain import signals
    from mdtrain.trainer import run
    try:
        return run(cfg)
    except signals.Preempted:
        signals.ignore_further()  # this process is about to exit 143: a launcher's SIGTERM must not turn it into -15
        raise


def _run(command: str, fn, args) -> int:
    """Call a subcommand; user mistakes become one clear line and an exit code, not a traceback."""
    try:
        rc = fn(args)
    except USER_ERRORS as e:
        report(command, e)
        return exit_status(e)
    except KeyboardInterrupt:
        hint = (" since the last saved one; to stop a run with a checkpoint, send it SIGUSR2 or SIGTERM "
                "(`kill -USR2 PID`, SLURM's `scancel --signal=USR2`), then re-run the same command to resume"
                if command == "train" else "")
        sys.stderr.write(f"\nmdtrain {command}: interrupted (Ctrl-C): stopped; no checkpoint was written{hint}\n")
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
