#!/usr/bin/env bash
# The README's first command: install, then train a small MDLM on CPU on text every Python installation has
# (the standard library's own sources), report validation perplexity, and print a few samples. ~5 min on 2 cores.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
OUT=${QUICKSTART_DIR:-runs}
STDLIB=$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
if [ ! -f "$OUT/quickstart-data/manifest.json" ]; then
  echo "== preparing data: SentencePiece (BPE, 2048) trained on Python's standard library, packed MDLM-style"
  mdtrain prepare --input "$STDLIB/json" "$STDLIB/email" "$STDLIB/asyncio" "$STDLIB/logging" "$STDLIB/unittest" \
      "$STDLIB/http" "$STDLIB/xml" "$STDLIB/importlib" "$STDLIB/concurrent" "$STDLIB/collections" \
      --glob '*.py' --tokenizer sentencepiece:train:2048 --seq-len 128 --val-fraction 0.1 \
      --out "$OUT/quickstart-data"
fi
echo "== training (configs/quickstart.yaml)"
mdtrain train configs/quickstart.yaml data.train="$OUT/quickstart-data" train.run_dir="$OUT/quickstart" "$@"
echo "== evaluating (validation NELBO; diffusion perplexity is an upper bound)"
mdtrain eval "$OUT/quickstart"
echo "== sampling"
mdtrain sample "$OUT/quickstart" sample.num_samples=3 sample.batch_size=3 sample.steps=128
echo "== done. The run lives in $OUT/quickstart (config.yaml, metrics.jsonl, checkpoints/)."
