"""Image runs end to end on real photographs (32x32 and 8x8 patches of matplotlib's Grace Hopper portrait): the CPU
CIFAR-10 recipe trains, `mdtrain eval` reports bits/dim equal to a float64 recomputation of MD4's NELBO, `mdtrain
sample` writes a PNG grid, class-conditional training and sampling, the DiT on the flattened pixels, and the unet
under DDP and FSDP on 2 real gloo ranks giving the losses of one process."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mdtrain import rng
from mdtrain.cli import main as cli_main
from mdtrain.config import load_config
from mdtrain.data.errors import DataError
from mdtrain.data.images import iter_images, prepare_images
from mdtrain.testing import run_distributed
from mdtrain.inference import load_for_inference
from mdtrain.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_RECIPE = os.path.join(REPO, "configs", "cifar10_md4_cpu.yaml")
QUIET = ["logging.progress_bar=false", "logging.wandb=false"]


def photo_dataset(root, size, step, val_fraction):
    """Patches of a real photograph, one every ``step`` pixels, in 3 class folders (top / middle / bottom band)."""
    import matplotlib.cbook as cbook
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        arr = np.asarray(im.convert("RGB"))
    src = root / f"patches{size}"
    for y in range(0, arr.shape[0] - size + 1, step):
        band = ["top", "middle", "bottom"][min(2, 3 * y // arr.shape[0])]
        (src / band).mkdir(parents=True, exist_ok=True)
        for x in range(0, arr.shape[1] - size + 1, step):
            Image.fromarray(arr[y:y + size, x:x + size]).save(src / band / f"{y:03d}_{x:03d}.png")
    out = str(root / f"data{size}")
    prepare_images([str(src)], out, val_fraction=val_fraction, samples_per_shard=64, quiet=True)
    return out


@pytest.fixture(scope="module")
def photos32(tmp_path_factory):
    return photo_dataset(tmp_path_factory.mktemp("photos"), 32, 32, 0.1)  # 288 disjoint patches


@pytest.fixture(scope="module")
def photos8(tmp_path_factory):
    return photo_dataset(tmp_path_factory.mktemp("photos"), 8, 24, 0.1)  # 525 patches


def fit(cfg):
    t = Trainer(cfg)
    try:
        t.fit()
    finally:
        t.close()
    return [json.loads(x) for x in open(os.path.join(cfg.train.run_dir, "metrics.jsonl"))]


def md4_bits_per_dim_float64(run_dir, data, eval_seed, eval_batch):
    """MD4's NELBO (md4.md §2.4; paper eq. 5 with its ε-shifted linear schedule) per image of the validation split,
    recomputed in float64 from the network's logits on the same keyed noise, / (H·W·C) / ln 2, mean over images."""
    bundle = load_for_inference(run_dir)
    model, obj = bundle.model, bundle.objective
    eps = 1e-4
    images = list(iter_images(data, "valid"))
    per_image = []
    for start in range(0, len(images), eval_batch):
        x0 = torch.as_tensor(np.stack([im.reshape(-1) for im in images[start:start + eval_batch]]), dtype=torch.long)
        length = x0.shape[1]
        idx = list(range(start, start + len(x0)))
        noise = rng.keyed_noise(obj.noise_spec(length), ("t",), eval_seed, 0, idx, eval_batch, rng.STREAM_EVAL)
        t = noise["t"].double()                            # md4: t = u (sampling_eps 0), continuous time
        alpha = (1 - 2 * eps) * (1 - t) + eps             # α_t = (1-2ε)(1-t) + ε
        masked = noise["mask"].double() < (1 - alpha)[:, None]
        xt = torch.where(masked, torch.full_like(x0, 256), x0)
        with torch.no_grad():
            logits = model(xt, t.float()).double()
        logits[..., 256] = -math.inf                      # no mask class
        logp = torch.log_softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
        weight = (1 - 2 * eps) / (1 - alpha)               # -α'/(1-α)
        nelbo = (-(logp * masked).sum(-1)) * weight + length * eps * math.log(256)  # + the recon constant L·ε·ln V
        per_image += (nelbo / length / math.log(2)).tolist()
    return float(np.mean(per_image)), len(images)


def test_cpu_recipe_trains_evaluates_in_bits_per_dim_and_samples_a_png_grid(photos32, tmp_path, capsys):
    run = str(tmp_path / "run")
    cfg = load_config(CPU_RECIPE, [f"data.train={photos32}", f"train.run_dir={run}", "train.steps=3", *QUIET])
    rows = fit(cfg)
    train = [r for r in rows if "split" not in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert abs(train[0]["loss"] - math.log(256)) < 0.2  # zero-init head: uniform over the 256 pixel values

    assert cli_main(["eval", run, "eval.batches=0", "eval.batch_size=8"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    want, n_images = md4_bits_per_dim_float64(run, photos32, eval_seed=0, eval_batch=8)
    assert n_images % 8 and result["tokens"] == n_images * 3072  # the last batch's padding rows carry no loss
    assert result["bits_per_dim"] == pytest.approx(want, rel=1e-6)
    assert result["bits_per_dim"] == pytest.approx(result["bits_per_token"], rel=1e-12)
    assert "bits/dim <= " in out

    png = str(tmp_path / "grid.png")
    assert cli_main(["sample", run, f"sample.out={png}", "sample.num_samples=5", "sample.steps=8"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["out"] == png and info["sampler"] == "ancestral" and info["num_samples"] == 5
    samples = np.load(info["array"])
    grid = np.asarray(Image.open(png))
    assert samples.shape == (5, 32, 32, 3) and grid.shape == (2 * 34 + 2, 3 * 34 + 2, 3)  # 2 rows of 3, 2 px padding
    for i in range(5):
        r, c = divmod(i, 3)
        assert np.array_equal(grid[2 + 34 * r:34 + 34 * r, 2 + 34 * c:34 + 34 * c], samples[i])


def test_class_conditional_unet_trains_evaluates_and_samples_one_row_per_class(photos8, tmp_path, capsys):
    run = str(tmp_path / "cond")
    over = [f"data.train={photos8}", "data.seq_len=192", "model.image_shape=[8,8,3]", "model.num_classes=3",
            f"train.run_dir={run}", "train.steps=2", *QUIET]
    rows = fit(load_config(CPU_RECIPE, over))
    assert "bits_per_dim" in [r for r in rows if "split" in r][-1]
    png = str(tmp_path / "cond.png")
    assert cli_main(["sample", run, f"sample.out={png}", "sample.num_samples=6", "sample.steps=4"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["classes"] == 3 and info["num_samples"] == 6
    assert np.asarray(Image.open(png)).shape == (3 * 10 + 2, 2 * 10 + 2, 3)  # a row per class, 2 per row
    with pytest.raises(DataError, match=r"holds 8x8x3 images \(H x W x C\), but model.image_shape=\[3, 8, 8\]"):
        fit(load_config(CPU_RECIPE, [*over[:2], "model.image_shape=[3,8,8]", f"train.run_dir={tmp_path / 'y'}",
                                     *QUIET]))
    with pytest.raises(DataError, match="holds class 2, but model.num_classes=2"):
        fit(load_config(CPU_RECIPE, [*over[:3], "model.num_classes=2", f"train.run_dir={tmp_path / 'x'}",
                                     "train.steps=1", *QUIET]))


def test_dit_on_the_flattened_pixels_reports_bits_per_dim(photos8, tmp_path):
    rows = fit(load_config(CPU_RECIPE, [f"data.train={photos8}", "data.seq_len=192", "model.image_shape=[8,8,3]",
                                        "model.name=dit", "model.flavor=debug", "model.n_layers=1", "model.d_model=32",
                                        "model.n_heads=2", "model.cond_dim=16", f"train.run_dir={tmp_path / 'dit'}",
                                        "train.steps=2", *QUIET]))
    ev = [r for r in rows if "split" in r][-1]
    assert ev["bits_per_dim"] == pytest.approx(ev["nll"] / math.log(2), rel=1e-12) and ev["tokens"] == 8 * 192


UNET8 = ["data.seq_len=192", "model.image_shape=[8,8,3]", "model.num_classes=3", "model.n_layers=1",
         "train.global_batch_size=8", "train.micro_batch_size=2", "train.deterministic=true", "train.steps=3",
         "eval.batches=1", "eval.batch_size=4", *QUIET]


def _engine_losses(rank, world, data, run_root, engines):
    out = {}
    for engine in engines:
        cfg = load_config(CPU_RECIPE, [f"data.train={data}", *UNET8, f"parallel.engine={engine}",
                                       f"train.run_dir={run_root}/{engine}-{world}"])
        t = Trainer(cfg)
        try:
            out[engine] = [t.train_step()["loss"] for _ in range(3)]
        finally:
            t.close()
    return out


def test_unet_under_ddp_and_fsdp_on_two_ranks_matches_one_process(photos8, tmp_path):
    # class-conditional, so each rank's labels must travel with its own rows
    ref = _engine_losses(0, 1, photos8, str(tmp_path), ["ddp"])["ddp"]
    engines = ["ddp", "fsdp"]  # deepspeed ZeRO-2 also matches (checked by hand; +30 s of DeepSpeed start-up)
    got = run_distributed(_engine_losses, 2, photos8, str(tmp_path), engines, timeout=300)
    for engine in engines:
        assert got[0][engine] == got[1][engine]
        np.testing.assert_allclose(got[0][engine], ref, rtol=1e-6, atol=1e-6, err_msg=engine)
