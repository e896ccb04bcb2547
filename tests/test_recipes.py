"""Every shipped recipe parses, builds, and trains a few steps at debug size on CPU with its own objective,
backbone and optimiser settings (only size, data, batch and the tensor-parallel size are overridden: one process
here; tests/test_launch.py runs the TP demo recipe on 2)."""
import glob
import json
import math
import os

import pytest
import yaml

from mdtrain.config import load_config
from mdtrain.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.yaml"))
                 if "sweep" not in (yaml.safe_load(open(p)) or {}))

DEBUG = ["model.flavor=debug", "data.train=synthetic:markov", "data.valid=", "data.seq_len=32", "data.num_workers=0",
         "train.steps=2", "train.global_batch_size=4", "train.micro_batch_size=2", "train.precision=fp32",
         "optim.warmup_steps=1", "logging.wandb=false", "logging.every=1", "logging.progress_bar=false",
         "eval.batches=1", "eval.batch_size=4", "checkpoint.every=0",
         "checkpoint.load_from=",  # fine-tuning recipes train from scratch here
         "parallel.tp=1"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.basename(p))
def test_recipe_trains_at_debug_size(path, tmp_path):
    # image recipes: the synthetic tokens laid out as 4x4x2 "images" (data.seq_len = 32)
    image = ["model.image_shape=[4,4,2]"] if load_config(path, validate=False).model.image_shape else []
    cfg = load_config(path, [*DEBUG, *image, f"train.run_dir={tmp_path / 'run'}"])
    t = Trainer(cfg)
    try:
        t.fit()
    finally:
        t.close()
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    train = [r for r in rows if "split" not in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in train)
    ev = [r for r in rows if "split" in r]
    assert ev and math.isfinite(ev[-1]["nll"]) and ev[-1]["bound"] == ("exact" if cfg.objective.name == "ar" else "upper")
