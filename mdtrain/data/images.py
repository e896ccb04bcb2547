"""Images as pixel tokens (MD4's image setting): ``mdtrain prepare --images`` and PNG grids of sampled images.

``prepare_images`` reads a folder of PNG/JPEG files, CIFAR-10/100's python batches or ``.npy`` arrays and writes the
shard format of ``mdtrain/data/shards.py``: one sample per image, its H·W·C sub-pixel values (0..255) as tokens in
raster order with the channels interleaved (MD4's ``(H, W, C)`` reshaped to ``H·W·C``). The tokenizer is the byte
tokenizer with the mask as class 256 and no other class (vocabulary 257, MD4's ``vocab_size + 1``); BOS/EOS/PAD
share id 256, which image data never holds, so the loader's padding rows (ids == 256) carry no loss.

Extra manifest keys: ``image`` = {shape [H, W, C], num_classes, class_names, source}, and per split an optional
``labels`` entry: ``<split>/labels.npy`` (int32, one class per sample, in sample order) with its size and sha256.
Labels come from CIFAR's batches, from class sub-folders (``root/<class>/*.png``, classes sorted by name) and from a
``<name>.labels.npy`` beside ``<name>.npy``.

Splits: CIFAR's ``test_batch`` (CIFAR-100: ``test``) is the validation split, as in MD4; other inputs go to
"valid" when a keyed hash of the image's pixels falls below ``val_fraction`` (deterministic; duplicates always land
together). Images are written in a seeded random order, so class-sorted inputs do not give class-sorted shards.
A truncated file, an unreadable one, or an image of another size or mode is an error naming the file, or with
``on_corrupt="skip"`` is skipped and counted (``skipped_images`` in the manifest). Pickles are read with
:mod:`mdtrain.data.safe_pickle`, which runs nothing they contain; ``.npy`` files with ``allow_pickle=False``.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from mdtrain.data.errors import DataError
from mdtrain.data.shards import (FORMAT, FORMAT_VERSION, MANIFEST, SPLITS, ShardWriter, file_sha256, write_manifest)

PIXEL_VALUES = 256
MASK_ID = 256
IMAGE_EXT = (".png", ".jpg", ".jpeg")
MODES = {"L": 1, "RGB": 3}  # Pillow modes of 8-bit images, by channel count
_CIFAR_TRAIN = re.compile(r"^(data_batch_\d+|train)$")
_CIFAR_VALID = re.compile(r"^(test_batch|test)$")
_CIFAR_META = ("batches.meta", "meta")
_SKIP_HINT = "fix or remove it, or pass --on-corrupt skip to skip bad images (they are counted in the manifest)"


def pixel_tokenizer():
    """The byte tokenizer of pixel values: ids 0..255, mask 256 (also BOS/EOS/PAD, which images never use)."""
    from mdtrain.data.tokenizers import BytesTokenizer
    return BytesTokenizer({"mask": MASK_ID, "bos": MASK_ID, "eos": MASK_ID, "pad": MASK_ID}, spec="pixels")


def parse_image_size(text: str) -> tuple[Optional[int], Optional[int], Optional[int]]:
    """``""`` -> unknown; ``32`` -> 32x32; ``32x32``; ``32x32x3`` (H x W x C)."""
    if not text:
        return None, None, None
    parts = text.lower().split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if not 1 <= len(nums) <= 3 or any(n < 1 for n in nums) or (len(nums) == 3 and nums[2] not in MODES.values()):
        raise DataError(f"--image-size {text!r}: expected N, HxW or HxWxC with C = 1 or 3, e.g. 32x32x3")
    if len(nums) == 1:
        nums = nums * 2
    return nums[0], nums[1], (nums[2] if len(nums) == 3 else None)


# ----------------------------------------------------------------------------------------------------
# sources: each lists lightweight entries first (so the write order can be shuffled), then loads one at a time


@dataclass
class _Source:
    kind: str                               # folder | cifar | npy
    names: list = field(default_factory=list)    # per entry: what an error message calls it
    labels: list = field(default_factory=list)   # per entry: class index, or -1
    splits: list = field(default_factory=list)   # per entry: "train" / "valid" (official) or None (hash split)
    class_names: list = field(default_factory=list)
    shape: Optional[tuple] = None           # (H, W, C) when the format fixes it
    load: object = None                     # entry index -> (H, W, C) uint8 array; raises _Bad


class _Bad(Exception):
    """One image cannot be used (the message says why)."""


def _walk_images(root: str) -> list[str]:
    found = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        found += [os.path.join(d, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXT) and not n.startswith(".")]
    return found


def _folder_source(inputs: list[str]) -> _Source:
    files = []  # (path, class folder or None)
    for p in inputs:
        if os.path.isdir(p):
            imgs = _walk_images(p)
            if not imgs:
                raise DataError(f"{p}: no PNG or JPEG files ({', '.join(IMAGE_EXT)}) in this directory")
            for f in imgs:
                rel = os.path.relpath(f, p).split(os.sep)
                files.append((f, rel[0] if len(rel) > 1 else None))
        else:
            files.append((p, None))
    classed = all(c is not None for _, c in files)  # every image in a class sub-folder: keep those labels
    src = _Source("folder")
    src.class_names = sorted({c for _, c in files}) if classed else []
    index = {c: i for i, c in enumerate(src.class_names)}
    src.names = [f for f, _ in files]
    src.labels = [index[c] if classed else -1 for _, c in files]
    src.splits = [None] * len(files)

    def load(i: int) -> np.ndarray:
        from PIL import Image
        path = src.names[i]
        try:
            with Image.open(path) as im:
                im.load()  # decodes everything: truncated or corrupt data raises here
                mode = im.mode
                if mode not in MODES:
                    raise _Bad(f"image mode {mode}; mdtrain reads 8-bit RGB or L (grayscale) images (convert it, "
                               "e.g. Image.convert('RGB'))")
                arr = np.asarray(im, dtype=np.uint8)
        except _Bad:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise _Bad(f"cannot decode the image ({type(e).__name__}: {e})") from None
        return arr[:, :, None] if arr.ndim == 2 else arr

    src.load = load
    return src


def _read_cifar_pickle(path: str) -> dict:
    from mdtrain.data.safe_pickle import UnsafePickleError, load_plain_pickle
    try:
        with open(path, "rb") as fh:
            obj = load_plain_pickle(fh.read())
    except UnsafePickleError as e:
        raise DataError(f"{path}: refused to unpickle: {e}. Use the original CIFAR python batches from "
                        "https://www.cs.toronto.edu/~kriz/cifar.html") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, OSError) as e:
        raise DataError(f"{path}: not a readable CIFAR python batch ({type(e).__name__}: {e}); the file is "
                        "truncated or not a pickle") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a CIFAR batch (a dict), found a {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_source(paths: list[str]) -> _Source:
    batches, meta = [], None
    for p in paths:
        if os.path.isdir(p):
            names = sorted(os.listdir(p))
            batches += [(os.path.join(p, n), "train") for n in names if _CIFAR_TRAIN.match(n)]
            batches += [(os.path.join(p, n), "valid") for n in names if _CIFAR_VALID.match(n)]
            meta = next((os.path.join(p, n) for n in _CIFAR_META if n in names), meta)
        else:
            batches.append((p, "valid" if _CIFAR_VALID.match(os.path.basename(p)) else "train"))
            sib = [os.path.join(os.path.dirname(p), n) for n in _CIFAR_META]
            meta = next((s for s in sib if os.path.isfile(s)), meta)
    src = _Source("cifar", shape=(32, 32, 3))
    arrays = []
    for path, split in batches:
        d = _read_cifar_pickle(path)
        data = d.get("data")
        labels = d.get("labels", d.get("fine_labels"))
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataError(f"{path}: its 'data' should be a uint8 array of shape (N, 3072), got {got}")
        if not isinstance(labels, list) or len(labels) != len(data) or not all(isinstance(v, int) and v >= 0
                                                                               for v in labels):
            raise DataError(f"{path}: its 'labels' should be {len(data)} non-negative integers")
        # CIFAR stores each row as 1024 R, 1024 G, 1024 B values (planes); tokens interleave the channels
        arrays.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        for j, v in enumerate(labels):
            src.names.append(f"{path}[{j}]")
            src.labels.append(int(v))
            src.splits.append(split)
    n_classes = max(src.labels) + 1 if src.labels else 0
    if meta is not None:
        m = _read_cifar_pickle(meta)
        names = m.get("label_names", m.get("fine_label_names"))
        if isinstance(names, list) and len(names) >= n_classes:
            src.class_names = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in names]
    if not src.class_names:
        src.class_names = [str(i) for i in range(n_classes)]
    offsets = np.cumsum([0] + [len(a) for a in arrays])

    def load(i: int) -> np.ndarray:
        b = int(np.searchsorted(offsets, i, side="right") - 1)
        return np.ascontiguousarray(arrays[b][i - offsets[b]])

    src.load = load
    return src


def _npy_source(paths: list[str]) -> _Source:
    src = _Source("npy")
    arrays, with_labels = [], []
    for p in paths:
        try:
            a = np.load(p, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{p}: not a readable .npy array ({e}); arrays of Python objects are refused") from None
        if a.dtype != np.uint8 or a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[3] not in MODES.values()):
            raise DataError(f"{p}: expected uint8 images of shape (N, H, W, C) with C = 1 or 3, or (N, H, W); got "
                            f"{a.dtype} {a.shape} (convert with arr.astype(np.uint8))")
        a = a[..., None] if a.ndim == 3 else a
        if src.shape is None:
            src.shape = tuple(int(s) for s in a.shape[1:])
        elif tuple(a.shape[1:]) != src.shape:
            raise DataError(f"{p}: images of shape {a.shape[1:]}, but {paths[0]} holds {src.shape}")
        lab_path = p[:-len(".npy")] + ".labels.npy"
        lab = None
        if os.path.exists(lab_path):
            try:
                lab = np.load(lab_path, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise DataError(f"{lab_path}: not a readable .npy array ({e})") from None
            if lab.ndim != 1 or len(lab) != len(a) or lab.dtype.kind not in "iu" or (len(lab) and lab.min() < 0):
                raise DataError(f"{lab_path}: expected {len(a)} non-negative integer labels, got {lab.dtype} "
                                f"{lab.shape}")
        with_labels.append(lab is not None)
        arrays.append(a)
        src.names += [f"{p}[{j}]" for j in range(len(a))]
        src.labels += (lab.tolist() if lab is not None else [-1] * len(a))
    if any(with_labels) and not all(with_labels):
        missing = [p for p, w in zip(paths, with_labels) if not w]
        raise DataError(f"{missing[0]}: has no .labels.npy beside it, but other inputs have labels; give every "
                        "array its labels or none")
    src.splits = [None] * len(src.names)
    if any(with_labels):
        src.class_names = [str(i) for i in range(max(src.labels) + 1)] if src.labels else []
    offsets = np.cumsum([0] + [len(a) for a in arrays])

    def load(i: int) -> np.ndarray:
        b = int(np.searchsorted(offsets, i, side="right") - 1)
        return np.asarray(arrays[b][i - offsets[b]], dtype=np.uint8)

    src.load = load
    return src


def _kind(path: str) -> str:
    base = os.path.basename(path.rstrip("/"))
    if os.path.isdir(path):
        files = {n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n))}
        batches = {n for n in files if _CIFAR_TRAIN.match(n) or _CIFAR_VALID.match(n)}
        # CIFAR-10's data_batch_N / test_batch; CIFAR-100's generic names (train, test) only beside its meta file
        if any(n.startswith(("data_batch_", "test_batch")) for n in batches) or (batches and "meta" in files):
            return "cifar"
        return "folder"
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file or directory")
    if base.lower().endswith(".npy"):
        return "npy"
    if base.lower().endswith(IMAGE_EXT):
        return "folder"
    if _CIFAR_TRAIN.match(base) or _CIFAR_VALID.match(base):
        return "cifar"
    raise DataError(f"{path}: not an image input (expected a folder of PNG/JPEG files, CIFAR python batches "
                    "(data_batch_N, test_batch) or their folder, or a .npy array of uint8 images)")


def open_sources(inputs: list[str]) -> _Source:
    if not inputs:
        raise DataError("empty input: no input files were given")
    inputs = [p for p in inputs if not p.endswith(".labels.npy")]  # read beside their images
    kinds = {p: _kind(p) for p in inputs}
    if len(set(kinds.values())) > 1:
        raise DataError("inputs mix image sources (" + ", ".join(f"{p}: {k}" for p, k in kinds.items())
                        + "); prepare each kind into its own directory")
    kind = next(iter(kinds.values()))
    return {"folder": _folder_source, "cifar": _cifar_source, "npy": _npy_source}[kind](inputs)


# ----------------------------------------------------------------------------------------------------
# the command


def _write_labels(out: str, split: str, labels: list) -> dict:
    rel = f"{split}/labels.npy"
    path = os.path.join(out, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as fh:
        np.save(fh, np.asarray(labels, dtype=np.int32), allow_pickle=False)
    os.replace(path + ".tmp", path)
    return {"path": rel, "bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def prepare_images(inputs: list[str], out: str, image_size: str = "", val_fraction: float = 0.01,
                   samples_per_shard: int = 1024, seed: int = 0, on_corrupt: str = "error",
                   seq_len: Optional[int] = None, quiet: bool = False) -> dict:
    """Images -> pixel-token shards in ``out`` (see the module doc); returns the manifest it writes."""
    if not 0.0 <= val_fraction <= 1.0:
        raise DataError(f"--val-fraction must be in [0, 1], got {val_fraction}")
    if samples_per_shard < 1:
        raise DataError("--samples-per-shard must be >= 1")
    if on_corrupt not in ("error", "skip"):
        raise DataError(f"--on-corrupt must be error or skip, got {on_corrupt!r}")
    if os.path.exists(os.path.join(out, MANIFEST)):
        raise DataError(f"{out}: already holds a prepared dataset ({MANIFEST}); remove it or choose another --out")
    want = parse_image_size(image_size)
    t0 = time.time()
    src = open_sources(inputs)
    n = len(src.names)
    if n == 0:
        raise DataError(f"{', '.join(inputs)}: no images")
    if src.shape is not None and any(w is not None and w != s for w, s in zip(want, src.shape)):
        raise DataError(f"--image-size {image_size} does not match the inputs' {'x'.join(map(str, src.shape))}")
    shape = src.shape if src.shape is not None else (want if None not in want else None)
    key = hashlib.blake2b(str(seed).encode(), digest_size=16).digest()
    threshold = int(val_fraction * 2.0 ** 64) if val_fraction < 1 else 1 << 64
    tok = pixel_tokenizer()
    tok.save(os.path.join(out, "tokenizer"))
    writers = {s: ShardWriter(out, s, samples_per_shard) for s in SPLITS}
    labels = {s: [] for s in SPLITS}
    skipped, skipped_names = 0, []
    order = np.random.default_rng(seed).permutation(n)  # class-sorted inputs must not give class-sorted shards
    bar = _progress(n, quiet)
    for done, i in enumerate(order.tolist()):
        name = src.names[i]
        try:
            pixels = src.load(i)
            if shape is None:
                h, w, c = pixels.shape
                shape = (want[0] or h, want[1] or w, want[2] or c)
            if pixels.shape != shape:
                h, w, c = pixels.shape
                raise _Bad(f"{w}x{h} pixels with {c} channel(s); expected {shape[1]}x{shape[0]} with {shape[2]} "
                           f"(the first image's, or --image-size)")
        except _Bad as e:
            if on_corrupt == "error":
                raise DataError(f"{name}: {e}; {_SKIP_HINT}") from None
            skipped += 1
            if len(skipped_names) < 20:
                skipped_names.append(f"{name}: {e}")
            continue
        flat = pixels.reshape(-1)  # raster order, channels interleaved
        split = src.splits[i]
        if split is None:
            h = hashlib.blake2b(flat.tobytes(), digest_size=8, key=key).digest()
            split = "valid" if int.from_bytes(h, "little") < threshold else "train"
        writers[split].write(flat)
        labels[split].append(src.labels[i])
        if bar is not None and (done % 256 == 0 or done == n - 1):
            bar(done + 1)
    if shape is None or not any(writers[s].num_samples for s in SPLITS):
        raise DataError(f"{', '.join(inputs)}: produced no samples ({skipped} of {n} images were bad)")
    length = int(np.prod(shape))
    if seq_len is not None and seq_len != length:
        raise DataError(f"--seq-len {seq_len} does not match the images: {shape[0]}x{shape[1]}x{shape[2]} = "
                        f"{length} pixel tokens per image (leave --seq-len out with --images)")
    labelled = all(v >= 0 for s in SPLITS for v in labels[s])
    splits = {}
    for s in SPLITS:
        shards = writers[s].close()
        splits[s] = {"num_samples": writers[s].num_samples, "num_tokens": writers[s].num_samples * length,
                     "shards": shards}
        if labelled:
            splits[s]["labels"] = _write_labels(out, s, labels[s])
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "seq_len": length, "packing": "images", "dtype": "uint8",
        "tokenizer": "tokenizer", "tokenizer_spec": "pixels", "vocab_size": tok.vocab_size,
        "specials": tok.special_ids, "val_fraction": val_fraction, "seed": seed,
        "inputs": [os.path.abspath(p) for p in inputs], "num_files": n if src.kind == "folder" else len(inputs),
        "image": {"shape": list(shape), "num_classes": len(src.class_names) if labelled else 0,
                  "class_names": src.class_names if labelled else [], "source": src.kind},
        "skipped_images": skipped, "skipped_examples": skipped_names, "splits": splits,
    }
    write_manifest(out, manifest)
    if not quiet:
        dt = max(time.time() - t0, 1e-9)
        kept = sum(splits[s]["num_samples"] for s in SPLITS)
        classes = f", {manifest['image']['num_classes']} classes" if labelled else ", no labels"
        print(f"prepared {out}: " + ", ".join(f"{s} {splits[s]['num_samples']:,} images in {len(splits[s]['shards'])} "
                                               f"shards" for s in SPLITS)
              + f" | {shape[0]}x{shape[1]}x{shape[2]} = {length} pixel tokens per image{classes} | {kept:,} images "
              f"in {dt:.1f}s" + (f" | skipped {skipped} bad image(s)" if skipped else ""), flush=True)
        for line in skipped_names[:5]:
            print(f"  skipped {line}", file=sys.stderr)
    return manifest


def _progress(total: int, quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    bar = tqdm(total=total, unit="img", desc="prepare", mininterval=0.5)

    def update(done: int):
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
    return update


# ----------------------------------------------------------------------------------------------------
# reading back: labels of a split, the image layout of a prepared directory


def read_split_labels(root: str, manifest: dict, split: str) -> Optional[np.ndarray]:
    """The split's labels (int64, one per sample) if the manifest lists them, checked against its size and sha256."""
    entry = manifest["splits"][split].get("labels")
    if entry is None:
        return None
    path = os.path.join(root, entry["path"])
    if not os.path.isfile(path) or os.path.getsize(path) != entry["bytes"] or file_sha256(path) != entry["sha256"]:
        raise DataError(f"{path}: missing, or its size or sha256 differs from {os.path.join(root, MANIFEST)}; "
                        "re-run mdtrain prepare --images")
    arr = np.load(path, allow_pickle=False)
    count = manifest["splits"][split]["num_samples"]
    k = int(manifest.get("image", {}).get("num_classes", 0))
    if arr.ndim != 1 or len(arr) != count or arr.dtype.kind not in "iu" or (len(arr) and not 0 <= arr.min()
                                                                            <= arr.max() < k):
        raise DataError(f"{path}: expected {count} labels in [0, {k}), got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# images out: tokens -> arrays -> PNG grid


def tokens_to_images(tokens, shape) -> np.ndarray:
    """(N, H·W·C) pixel tokens -> (N, H, W, C) uint8; ids above 255 (masks left unfilled) render as mid-grey."""
    arr = np.asarray(tokens, dtype=np.int64)
    h, w, c = (int(s) for s in shape)
    if arr.ndim != 2 or arr.shape[1] != h * w * c:
        raise ValueError(f"tokens of shape {arr.shape} are not images of {h}x{w}x{c} = {h * w * c} tokens")
    arr = np.where((arr >= 0) & (arr < PIXEL_VALUES), arr, 127)
    return arr.astype(np.uint8).reshape(-1, h, w, c)


def image_grid(images: np.ndarray, ncol: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """(N, H, W, C) -> one (rows·(H+pad)+pad, ncol·(W+pad)+pad, C) array, row-major, black padding."""
    n, h, w, c = images.shape
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / ncol))
    grid = np.zeros((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def save_png(array: np.ndarray, path: str) -> None:
    """Write an (H, W, 1 or 3) uint8 array as a PNG, atomically."""
    from PIL import Image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array, mode="L" if array.shape[2] == 1 else "RGB")
    tmp = path + ".tmp"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def write_image_grid(tokens, shape, path: str, ncol: Optional[int] = None) -> np.ndarray:
    """Samples' tokens -> a PNG grid at ``path``; returns the (N, H, W, C) images."""
    images = tokens_to_images(tokens, shape)
    save_png(image_grid(images, ncol), path)
    return images


def iter_images(root: str, split: str) -> Iterator[np.ndarray]:
    """The (H, W, C) uint8 images of one split of a prepared directory, in sample order (for inspection)."""
    from mdtrain.data.shards import read_manifest, read_shard
    m = read_manifest(root)
    shape = m["image"]["shape"]
    for sh in m["splits"][split]["shards"]:
        ids, _ = read_shard(os.path.join(root, sh["path"]), sh["samples"], m["seq_len"], np.dtype(m["dtype"]))
        yield from tokens_to_images(ids, shape)


def check_image_layout(image_shape, loader) -> None:
    """A DataError when the model's ``image_shape`` is not the prepared images' (H·W·C alike is not enough: a
    transposed layout would train on scrambled pixels without any other error)."""
    image = getattr(getattr(loader, "source", None), "image", None)
    if image and image_shape and list(image["shape"]) != list(image_shape):
        raise DataError(f"the data holds {'x'.join(map(str, image['shape']))} images (H x W x C), but "
                        f"model.image_shape={list(image_shape)}; set model.image_shape={list(image['shape'])}")


def label_kwargs(num_classes: int, batch: dict, device) -> dict:
    """``{"labels": LongTensor[B]}`` for a class-conditional model (``model.num_classes > 0``), else ``{}``;
    a DataError when the data has no labels or a label the model has no class for."""
    if num_classes <= 0:
        return {}
    labels = batch.get("labels")
    if labels is None:
        raise DataError(f"model.num_classes={num_classes} trains class-conditionally, but the data has no labels "
                        "(prepare it with mdtrain prepare --images from CIFAR batches, class sub-folders or "
                        ".npy arrays with .labels.npy), or set model.num_classes=0")
    top = int(labels.max()) if labels.numel() else 0
    if top >= num_classes:
        raise DataError(f"the data holds class {top}, but model.num_classes={num_classes}; set model.num_classes to "
                        "the manifest's image.num_classes")
    return {"labels": labels.to(device, non_blocking=True)}
