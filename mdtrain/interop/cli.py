"""``mdtrain import mdlm|hf PATH --out DIR`` and ``mdtrain export RUN --format hf --out DIR``: parse -> call one
function, one JSON line on success, one error line (exit 1) for a file that cannot be imported."""
from __future__ import annotations

import json
import sys


def _fail(command: str, e: Exception) -> int:
    print(f"mdtrain {command}: error: {e}", file=sys.stderr)
    return 1


def import_main(args) -> int:
    from mdtrain.interop.hf_import import import_hf
    from mdtrain.interop.mdlm import import_mdlm

    try:
        if args.source == "mdlm":
            if not args.tokenizer:
                raise ValueError("mdtrain import mdlm needs --tokenizer SPEC (the tokenizer the model was trained "
                                 "with, e.g. hf:DIR of a local GPT-2 tokenizer for OWT models)")
            info = import_mdlm(args.path, args.out, args.tokenizer, use_ema=not args.no_ema,
                               overrides=args.overrides, recipe=args.recipe)
        else:
            info = import_hf(args.path, args.out, args.tokenizer, recipe=args.recipe, overrides=args.overrides)
    except (ValueError, FileExistsError) as e:
        return _fail("import", e)
    print(json.dumps({"export": args.out, **info}))
    return 0


def export_hf_main(args) -> int:
    from mdtrain.interop.hf_export import export_hf

    try:
        info = export_hf(args.path, args.out, use_ema=not args.no_ema)
    except ValueError as e:
        return _fail("export", e)
    print(json.dumps(info))
    return 0
