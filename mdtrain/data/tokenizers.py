"""Tokenizers behind one interface (SentencePiece, a local Hugging Face directory, raw bytes, a small alphabet).

Every tokenizer has ``vocab_size`` (including the mask token), ``mask_id``, ``bos_id``, ``eos_id``, ``pad_id``,
``encode`` / ``decode`` and ``save(dir)``; :func:`load_tokenizer` restores a saved one exactly, so the tokenizer
travels with the shards and the checkpoints. A special the backend lacks is appended as a new id after the
backend's vocabulary, in the order mask, bos, eos, pad (so GPT-2 gets mask = 50257, as in MDLM).
Encoding never produces a special id from text: a literal "<mask>" in a document is tokenized as text.
"""
from __future__ import annotations

import abc
import io
import json
import os
import re
from typing import Iterable, Optional

from mdtrain.configtools import atomic_write_text
from mdtrain.data.errors import DataError

META_FILE = "mdtrain_tokenizer.json"
SPECIALS = ("mask", "bos", "eos", "pad")
MASK_TEXT = "[MASK]"
# How much text `sentencepiece:train` reads (from the start of the input) to train on; bounds its memory.
SP_TRAIN_MAX_CHARS = 100_000_000

# Names a backend may already use for each special (Hugging Face and SentencePiece conventions).
_SPECIAL_NAMES = {
    "mask": ("<mask>", "[MASK]", "<|mask|>"),
    "bos": ("<s>", "<bos>", "<|begin_of_text|>", "<|endoftext|>", "[CLS]"),
    "eos": ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[SEP]"),
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
}


class Tokenizer(abc.ABC):
    """Common part: special ids, validated decode, save. Backends implement ``_encode``/``_decode_base``."""

    kind = ""

    def __init__(self, base_size: int, specials: dict, spec: str = ""):
        self.base_size = int(base_size)
        self.spec = spec
        ids = {}
        next_id = self.base_size
        for name in SPECIALS:  # a special the backend lacks gets the next new id
            i = specials.get(name)
            if i is None or i < 0:
                i, next_id = next_id, next_id + 1
            ids[name] = int(i)
        self.vocab_size = max(next_id, max(ids.values()) + 1)
        self.mask_id, self.bos_id, self.eos_id, self.pad_id = (ids[n] for n in SPECIALS)
        self._special_name = {}
        for name in reversed(SPECIALS):  # bos == eos (GPT-2): the name shown is the first in SPECIALS
            self._special_name[ids[name]] = name

    @property
    def special_ids(self) -> dict:
        return {"mask": self.mask_id, "bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS (the packer adds those)."""
        return self._encode(text)

    def decode(self, ids, mask_text: Optional[str] = MASK_TEXT, skip_special: bool = True) -> str:
        """Text of ``ids``. Masked positions render as ``mask_text`` (None drops them); BOS/EOS/PAD are dropped
        unless ``skip_special=False``, which renders them as ``<bos>`` etc."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        out, run = [], []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside this tokenizer's vocabulary [0, {self.vocab_size})")
            name = self._special_name.get(i)
            if name is None and i < self.base_size:
                run.append(i)
                continue
            if run:
                out.append(self._decode_base(run))
                run = []
            if name == "mask":
                if mask_text is not None:
                    out.append(mask_text)
            elif not skip_special:
                out.append(f"<{name}>" if name else f"<unused:{i}>")
        if run:
            out.append(self._decode_base(run))
        return "".join(out)

    def save(self, directory: str) -> None:
        """Write the backend's files and ``mdtrain_tokenizer.json`` into ``directory``."""
        os.makedirs(directory, exist_ok=True)
        meta = {"kind": self.kind, "spec": self.spec, "vocab_size": self.vocab_size, "base_size": self.base_size,
                "specials": self.special_ids, **self._save_files(directory)}
        atomic_write_text(os.path.join(directory, META_FILE), json.dumps(meta, indent=1) + "\n")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, mask={self.mask_id}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id})")

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]:
        """The backend's ids of ``text``."""

    @abc.abstractmethod
    def _decode_base(self, ids: list[int]) -> str:
        """Text of backend ids (no appended specials among them)."""

    @abc.abstractmethod
    def _save_files(self, directory: str) -> dict:
        """Write the backend's files into ``directory``; return what the metadata needs to reload them."""


class BytesTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then mask 256, bos 257, eos 258, pad 259."""

    kind = "bytes"

    def __init__(self, specials: Optional[dict] = None, spec: str = "bytes"):
        super().__init__(256, specials or {}, spec)

    def _encode(self, text):
        return list(text.encode("utf-8"))

    def _decode_base(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")

    def _save_files(self, directory):
        return {}


class AlphabetTokenizer(Tokenizer):
    """One id per character of a fixed alphabet (the synthetic sources' symbols), then the specials."""

    kind = "alphabet"

    def __init__(self, alphabet: str, specials: Optional[dict] = None, spec: str = ""):
        if len(set(alphabet)) != len(alphabet) or not alphabet:
            raise ValueError(f"alphabet must be non-empty with distinct characters, got {alphabet!r}")
        self.alphabet = alphabet
        self._index = {c: i for i, c in enumerate(alphabet)}
        super().__init__(len(alphabet), specials or {}, spec or f"alphabet:{len(alphabet)}")

    def _encode(self, text):
        try:
            return [self._index[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this tokenizer's alphabet") from None

    def _decode_base(self, ids):
        return "".join(self.alphabet[i] for i in ids)

    def _save_files(self, directory):
        return {"alphabet": self.alphabet}


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (trained in-process by :func:`train_sentencepiece`, or loaded from a ``.model``)."""

    kind = "sentencepiece"
    MODEL_FILE = "spm.model"

    def __init__(self, model_proto: bytes, specials: Optional[dict] = None, spec: str = ""):
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self._proto)
        n = self.sp.get_piece_size()
        if specials is None:
            specials = {"bos": self.sp.bos_id(), "eos": self.sp.eos_id(), "pad": self.sp.pad_id()}
            for piece in _SPECIAL_NAMES["mask"]:
                i = self.sp.piece_to_id(piece)
                if 0 <= i < n and self.sp.id_to_piece(i) == piece and not self.sp.is_unknown(i):
                    specials["mask"] = i
                    break
        super().__init__(n, specials, spec)

    def _encode(self, text):
        return self.sp.encode(text, out_type=int)

    def _decode_base(self, ids):
        return self.sp.decode(ids)

    def _save_files(self, directory):
        with open(os.path.join(directory, self.MODEL_FILE), "wb") as fh:
            fh.write(self._proto)
        return {"model_file": self.MODEL_FILE}

    def __getstate__(self):  # the C++ processor does not pickle; DataLoader/prepare workers rebuild it
        state = dict(self.__dict__)
        del state["sp"]
        return state

    def __setstate__(self, state):
        import sentencepiece as spm

        self.__dict__.update(state)
        self.sp = spm.SentencePieceProcessor(model_proto=self._proto)


class HFTokenizer(Tokenizer):
    """A local Hugging Face ``tokenizer.json`` (read with the ``tokenizers`` package; nothing is downloaded).

    Specials come from ``tokenizer_config.json`` when present, else from the special added tokens by name.
    """

    kind = "hf"
    FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

    def __init__(self, directory: str, specials: Optional[dict] = None, spec: str = ""):
        from tokenizers import Tokenizer as HFTok

        path = directory if directory.endswith(".json") else os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise DataError(f"{path}: no Hugging Face tokenizer.json here (hf:DIR needs a local directory "
                            "holding tokenizer.json; nothing is downloaded)")
        try:
            self.tok = HFTok.from_file(path)
        except Exception as e:  # noqa: BLE001 - the Rust error type is not importable
            raise DataError(f"{path}: not a loadable Hugging Face tokenizer.json ({e})") from None
        self.tok.encode_special_tokens = True  # text like "<|endoftext|>" is tokenized as text, never a special
        self._files = {}
        folder = os.path.dirname(path)
        for name in self.FILES:
            p = os.path.join(folder, name)
            if os.path.isfile(p):
                with open(p, encoding="utf-8") as fh:
                    self._files[name] = fh.read()
        if specials is None:
            specials = self._find_specials()
        super().__init__(self.tok.get_vocab_size(with_added_tokens=True), specials, spec)

    def _find_specials(self) -> dict:
        found = {}
        cfg = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if name in self._files:
                try:
                    cfg = {**json.loads(self._files[name]), **cfg}
                except json.JSONDecodeError:
                    pass
        added = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        for name in SPECIALS:
            value = cfg.get(f"{name}_token")
            if isinstance(value, dict):
                value = value.get("content")
            candidates = [value] if isinstance(value, str) else [n for n in _SPECIAL_NAMES[name] if n in added]
            for piece in candidates:
                i = self.tok.token_to_id(piece)
                if i is not None:
                    found[name] = i
                    break
        return found

    def _encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def _decode_base(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)

    def _save_files(self, directory):
        for name, text in self._files.items():
            atomic_write_text(os.path.join(directory, name), text)
        return {"files": sorted(self._files)}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["tok"] = self.tok.to_str()
        return state

    def __setstate__(self, state):
        from tokenizers import Tokenizer as HFTok

        self.__dict__.update(state)
        self.tok = HFTok.from_str(state["tok"])
        self.tok.encode_special_tokens = True


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_type: str = "bpe",
                        max_chars: int = SP_TRAIN_MAX_CHARS, spec: str = "") -> SentencePieceTokenizer:
    """Train a SentencePiece model in memory on (the first ``max_chars`` characters of) ``texts``.

    Byte fallback (no unknown tokens), identity normalization (exact round trips of code and whitespace),
    pad/unk/bos/eos = 0/1/2/3 and a ``<mask>`` control symbol = 4 that text can never produce.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise DataError(f"sentencepiece model type must be bpe or unigram, got {model_type!r}")
    if vocab_size < 300:
        raise DataError(f"sentencepiece vocab size {vocab_size} is too small: byte fallback needs 256 byte pieces "
                        "plus specials; use at least 300")

    failure = []

    n_chars = [0]

    def lines():
        try:
            for doc in texts:
                for line in doc.split("\n"):
                    if line.strip():
                        yield line
                        n_chars[0] += len(line)
                if n_chars[0] >= max_chars:
                    return
        except Exception as e:  # reading the input failed: re-raised as itself below, not as SP's RuntimeError
            failure.append(e)
            raise

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3, control_symbols=["<mask>"],
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, hard_vocab_limit=False,
            max_sentence_length=1 << 16, num_threads=max(1, os.cpu_count() or 1), minloglevel=2)
    except RuntimeError as e:
        if failure:
            raise failure[0] from None
        raise DataError(f"training a sentencepiece {model_type} model of vocab {vocab_size} failed: {e}") from None
    tok = SentencePieceTokenizer(buf.getvalue(), spec=spec)
    if tok.vocab_size < vocab_size:  # hard_vocab_limit=False: SentencePiece stops when the corpus has no more pieces
        import sys
        print(f"note: sentencepiece was asked for {vocab_size} pieces; this corpus ({n_chars[0]:,} characters "
              f"read) supports {tok.vocab_size}, so the tokenizer has vocab_size={tok.vocab_size}. A larger "
              f"vocabulary needs more text (or ask for what it supports)", file=sys.stderr, flush=True)
    return tok


def saved_tokenizer_dir(path: str) -> str:
    """Where the tokenizer saved with ``path`` lies: a tokenizer directory itself, ``path/tokenizer/`` (an export,
    a checkpoint step or a prepared dataset), or a run's newest ``checkpoints/step_XXXXXXXX/tokenizer/``."""
    candidates = [path, os.path.join(path, "tokenizer")]
    for root in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(root):
            steps = sorted((d for d in os.listdir(root) if re.fullmatch(r"step_\d{8}", d)), reverse=True)
            candidates += [os.path.join(root, d, "tokenizer") for d in steps]
    for c in candidates:
        if os.path.isfile(os.path.join(c, META_FILE)):
            return c
    raise DataError(f"tokenizer spec 'from:{path}': no saved mdtrain tokenizer there (expected {path}/tokenizer/ "
                    f"of an export, checkpoint or prepared dataset, or {path}/checkpoints/step_*/tokenizer/ of a run)")


def build_tokenizer(spec: str, texts: Optional[Iterable[str]] = None) -> Tokenizer:
    """Tokenizer from a spec: ``sentencepiece:train:VOCAB[:bpe|:unigram]`` (trained on ``texts``),
    ``sentencepiece:PATH.model``, ``hf:DIR`` (local tokenizer.json), ``bytes``, or ``from:PATH`` (the one saved
    with a run, checkpoint, export or prepared dataset: same ids, so its data can be scored by that model)."""
    kind, _, rest = spec.partition(":")
    if spec == "bytes":
        return BytesTokenizer()
    if kind == "from" and rest:
        return load_tokenizer(saved_tokenizer_dir(rest))
    if kind == "sentencepiece" and rest.startswith("train:"):
        parts = rest.split(":")[1:]
        try:
            vocab = int(parts[0])
        except (IndexError, ValueError):
            raise DataError(f"tokenizer spec {spec!r}: expected sentencepiece:train:VOCAB[:bpe|:unigram]") from None
        if texts is None:
            raise DataError(f"tokenizer spec {spec!r} trains on the input text; none was given")
        return train_sentencepiece(texts, vocab, parts[1] if len(parts) > 1 else "bpe", spec=spec)
    if kind == "sentencepiece" and rest:
        if not os.path.isfile(rest):
            raise DataError(f"{rest}: sentencepiece model file not found (tokenizer spec {spec!r})")
        with open(rest, "rb") as fh:
            proto = fh.read()
        try:
            return SentencePieceTokenizer(proto, spec=spec)
        except (RuntimeError, OSError) as e:
            raise DataError(f"{rest}: not a sentencepiece model ({e})") from None
    if kind == "hf" and rest:
        return HFTokenizer(rest, spec=spec)
    raise DataError(f"unknown tokenizer spec {spec!r}; expected sentencepiece:train:VOCAB[:bpe|:unigram], "
                    "sentencepiece:PATH.model, hf:DIR, bytes or from:RUN_CHECKPOINT_EXPORT_OR_DATASET")


def load_tokenizer(directory: str) -> Tokenizer:
    """Restore a tokenizer written by ``Tokenizer.save`` (same ids, same vocabulary size)."""
    path = os.path.join(directory, META_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
        kind, specials = meta["kind"], meta["specials"]
    except FileNotFoundError:
        raise DataError(f"{path}: missing; {directory} is not a saved mdtrain tokenizer") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: unreadable tokenizer metadata ({e})") from None
    spec = meta.get("spec", "")
    if kind == "bytes":
        tok = BytesTokenizer(specials, spec)
    elif kind == "alphabet":
        tok = AlphabetTokenizer(meta["alphabet"], specials, spec)
    elif kind == "sentencepiece":
        name = meta.get("model_file")
        if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
            raise DataError(f"{path}: model_file {name!r} is not a file of {directory} (a saved tokenizer holds its "
                            "own files; this one points elsewhere)")
        with open(os.path.join(directory, name), "rb") as fh:
            tok = SentencePieceTokenizer(fh.read(), specials, spec)
    elif kind == "hf":
        tok = HFTokenizer(directory, specials, spec)
    else:
        raise DataError(f"{path}: unknown tokenizer kind {kind!r}")
    if tok.vocab_size != meta["vocab_size"] or tok.base_size != meta.get("base_size", tok.base_size):
        raise DataError(f"{directory}: the tokenizer files give vocab size {tok.vocab_size}, but {META_FILE} "
                        f"records {meta['vocab_size']}; the directory was modified")
    return tok
