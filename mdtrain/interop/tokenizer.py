"""Tokenizers across the boundary: an imported model's tokenizer (with the specials mdtrain needs, adding as few
new ids as possible), and an mdtrain tokenizer written as a Hugging Face tokenizer directory
(``AutoTokenizer.from_pretrained`` loads it with the same ids)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from mdtrain.data.errors import DataError
from mdtrain.data.tokenizers import SPECIALS, HFTokenizer, Tokenizer, build_tokenizer

# Names of the specials mdtrain appends when a tokenizer lacks them (rendered in the HF tokenizer we write).
APPENDED_NAMES = {"mask": "<|mdtrain_mask|>", "bos": "<|mdtrain_bos|>", "eos": "<|mdtrain_eos|>",
                  "pad": "<|mdtrain_pad|>"}


def import_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer of an imported model from a spec (``hf:DIR``, ``bytes``, ``sentencepiece:PATH``).

    A Hugging Face tokenizer with an eos but no bos token (or the reverse) uses the one for both, as GPT-2 does;
    that choice is written into the saved ``tokenizer_config.json``, so ``--tokenizer hf:EXPORT/tokenizer`` in
    ``mdtrain prepare`` gives the same ids. A missing mask or pad is appended as a new id (the pad must be an id
    text never produces: the loader masks it out of attention and loss).
    """
    kind, _, rest = spec.partition(":")
    if kind != "hf" or not rest:
        return build_tokenizer(spec)
    probe = HFTokenizer(rest, spec=spec)
    base = probe.base_size
    have = {n: i for n, i in probe.special_ids.items() if i < base}  # those the files name
    fill = {}
    for name, fallbacks in (("bos", ("eos",)), ("eos", ("bos",))):
        if name not in have:
            src = next((f for f in fallbacks if f in have), None)
            if src is not None:
                fill[name] = probe.tok.id_to_token(have[src])
    if not fill:
        return probe
    staging = tempfile.mkdtemp(prefix="mdtrain-tok-")
    try:
        folder = rest if os.path.isdir(rest) else os.path.dirname(rest)
        for name in HFTokenizer.FILES:
            src = os.path.join(folder, name) if name != "tokenizer.json" or os.path.isdir(rest) else rest
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(staging, name))
        cfg_path = os.path.join(staging, "tokenizer_config.json")
        cfg = {}
        if os.path.isfile(cfg_path):
            with open(cfg_path) as fh:
                cfg = json.load(fh)
        for name, token in fill.items():
            cfg[f"{name}_token"] = token
        with open(cfg_path, "w") as fh:
            json.dump(cfg, fh, indent=1)
        return HFTokenizer(staging, spec=spec)  # holds the files' text: the staging dir can go
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# mdtrain tokenizer -> Hugging Face tokenizer directory


def _byte_model(n_base: int, pieces=None):
    """A tokenizers BPE model with no merges: each character is its own piece (``pieces``), or, with byte
    fallback and only ``<0xNN>`` pieces, each UTF-8 byte is id NN."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models

    if pieces is None:
        vocab = {f"<0x{i:02X}>": i for i in range(n_base)}
        tok = HFTok(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    else:
        tok = HFTok(models.BPE(vocab={c: i for i, c in enumerate(pieces)}, merges=[]))
        tok.decoder = decoders.Fuse()
    return tok


def write_hf_tokenizer(tok: Tokenizer, out_dir: str, model_max_length: int, drop_mask: bool = False) -> dict:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` into ``out_dir``; returns the special tokens' strings.

    Ids are mdtrain's: the backend's vocabulary, then the specials mdtrain appended, added as special tokens in
    id order; ``drop_mask`` leaves an appended mask out (an AR export without its mask row: the ids after it move
    down by one). Supported kinds: hf (its own tokenizer.json), bytes and alphabet (a BPE model without merges).
    """
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTok

    saved = {}
    if tok.kind == "hf":
        with tempfile.TemporaryDirectory(prefix="mdtrain-tok-") as tmp:
            tok.save(tmp)
            hf = HFTok.from_file(os.path.join(tmp, "tokenizer.json"))
            if os.path.isfile(os.path.join(tmp, "tokenizer_config.json")):
                with open(os.path.join(tmp, "tokenizer_config.json")) as fh:
                    saved = json.load(fh)
    elif tok.kind == "bytes":
        hf = _byte_model(tok.base_size)
    elif tok.kind == "alphabet":
        hf = _byte_model(tok.base_size, tok.alphabet)
    else:
        raise DataError(f"a {tok.kind} tokenizer cannot be written as a Hugging Face tokenizer yet (hf, bytes and "
                        "alphabet tokenizers can); export the model with `mdtrain export` instead")
    names = {}
    dropped = drop_mask and tok.mask_id >= tok.base_size
    for i in range(tok.base_size, tok.vocab_size):
        kinds = [n for n in SPECIALS if getattr(tok, f"{n}_id") == i]
        if dropped and i == tok.mask_id:
            continue
        token = APPENDED_NAMES[kinds[0]]
        if hf.token_to_id(token) is not None:
            raise DataError(f"the tokenizer already has a token {token!r}; cannot name the appended {kinds[0]}")
        hf.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        want = i - (1 if dropped and i > tok.mask_id else 0)
        if hf.token_to_id(token) != want:
            raise DataError(f"adding {token!r} gave id {hf.token_to_id(token)}, expected {want}")
    for name in SPECIALS:
        i = getattr(tok, f"{name}_id")
        names[name] = None if dropped and i == tok.mask_id else hf.id_to_token(i - (1 if dropped and i > tok.mask_id
                                                                                    else 0))
    os.makedirs(out_dir, exist_ok=True)
    hf.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False,
              **{f"{n}_token": names[n] for n in SPECIALS if names[n] is not None}}
    for key in ("chat_template", "add_bos_token", "add_eos_token"):  # keep the original's chat template and the like
        if key in saved:
            config[key] = saved[key]
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as fh:
        json.dump(config, fh, indent=1)
    return names
