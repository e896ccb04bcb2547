"""Tokenizers: round trips, special and mask ids, save/load, errors (all built in the test, nothing downloaded)."""
import glob
import io
import json
import os
import pickle

import pytest

from mdtrain.data.errors import DataError
from mdtrain.data.tokenizers import META_FILE, build_tokenizer, load_tokenizer

STDLIB = os.path.dirname(os.__file__)
SAMPLES = [
    "def f(x):\n\treturn  x  + 1  # trailing   spaces   \n\n",
    "Ünïcödé: é ü 漢字 🙂 — “quotes” and ½",
    "literal specials stay text: <mask> [MASK] <s> </s> <pad> <|endoftext|>",
    "  leading and trailing whitespace  ",
    "",
]


@pytest.fixture(scope="module")
def stdlib_docs():
    files = sorted(glob.glob(os.path.join(STDLIB, "json", "*.py")) + glob.glob(os.path.join(STDLIB, "email", "*.py")))
    return [open(f, encoding="utf-8").read() for f in files]


def check_roundtrip(tok, texts):
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert not {tok.mask_id, tok.pad_id} & set(ids), f"text produced a special id: {text!r}"
        assert tok.decode(ids) == text


def check_save_load(tok, tmp_path, texts):
    d = tmp_path / "tok"
    tok.save(str(d))
    back = load_tokenizer(str(d))
    assert type(back) is type(tok)
    assert back.special_ids == tok.special_ids and back.vocab_size == tok.vocab_size
    for text in texts:
        assert back.encode(text) == tok.encode(text)
    again = pickle.loads(pickle.dumps(tok))  # what DataLoader / prepare workers receive
    assert again.encode(texts[0]) == tok.encode(texts[0])
    return back


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_trained_in_process_round_trips(stdlib_docs, tmp_path, model_type):
    tok = build_tokenizer(f"sentencepiece:train:800:{model_type}", texts=iter(stdlib_docs))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 2, 3, 4)
    assert tok.vocab_size == tok.sp.get_piece_size() <= 800  # the mask is inside the trained vocabulary
    check_roundtrip(tok, SAMPLES + stdlib_docs[:3])
    assert len(tok.encode(stdlib_docs[0])) < len(stdlib_docs[0]) / 2  # it learned merges, not just bytes
    check_save_load(tok, tmp_path, SAMPLES)
    # the saved model loads as a plain `sentencepiece:PATH.model` too, with the same specials
    again = build_tokenizer("sentencepiece:" + str(tmp_path / "tok" / "spm.model"))
    assert again.special_ids == tok.special_ids and again.vocab_size == tok.vocab_size


def test_sentencepiece_model_without_mask_or_pad_gets_new_ids(stdlib_docs, tmp_path):
    import sentencepiece as spm

    buf = io.BytesIO()
    lines = [ln for d in stdlib_docs for ln in d.split("\n") if ln.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=400, pad_id=-1,
                                   byte_fallback=True, hard_vocab_limit=False, minloglevel=2)
    path = tmp_path / "plain.model"
    path.write_bytes(buf.getvalue())
    tok = build_tokenizer(f"sentencepiece:{path}")
    n = tok.sp.get_piece_size()
    assert (tok.mask_id, tok.pad_id, tok.vocab_size) == (n, n + 1, n + 2)
    assert (tok.bos_id, tok.eos_id) == (tok.sp.bos_id(), tok.sp.eos_id())
    ids = tok.encode("x = 1")
    assert tok.decode([tok.bos_id] + ids + [tok.mask_id, tok.eos_id, tok.pad_id]) == "x = 1[MASK]"
    check_save_load(tok, tmp_path, ["x = 1", "déjà vu"])


def make_hf_dir(path, docs, config=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] + (["[MASK]"] if config else [])
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    if config:
        with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
            json.dump(config, fh)
    return tok


def test_hf_directory_gpt2_style_gets_mask_appended(stdlib_docs, tmp_path):
    raw = make_hf_dir(str(tmp_path / "hf"), stdlib_docs)
    tok = build_tokenizer(f"hf:{tmp_path / 'hf'}")
    eot = raw.token_to_id("<|endoftext|>")
    n = raw.get_vocab_size()
    # as MDLM does for GPT-2: BOS = EOS = <|endoftext|>, the mask is a new id right after the vocabulary
    assert (tok.bos_id, tok.eos_id, tok.mask_id, tok.pad_id, tok.vocab_size) == (eot, eot, n, n + 1, n + 2)
    check_roundtrip(tok, SAMPLES)
    assert eot not in tok.encode("<|endoftext|>")  # document text never yields a special
    back = check_save_load(tok, tmp_path, SAMPLES)
    assert back.decode([eot] + tok.encode("hi") + [tok.mask_id]) == "hi[MASK]"


def test_hf_directory_with_config_uses_its_specials(stdlib_docs, tmp_path):
    config = {"mask_token": "[MASK]", "eos_token": {"content": "<|endoftext|>"}, "bos_token": "<|endoftext|>"}
    raw = make_hf_dir(str(tmp_path / "hf"), stdlib_docs, config)
    tok = build_tokenizer(f"hf:{tmp_path / 'hf'}")
    assert tok.mask_id == raw.token_to_id("[MASK]") < raw.get_vocab_size()
    assert tok.pad_id == raw.get_vocab_size() == tok.vocab_size - 1
    check_roundtrip(tok, SAMPLES)
    back = check_save_load(tok, tmp_path, SAMPLES)
    assert os.path.isfile(tmp_path / "tok" / "tokenizer_config.json") and back.mask_id == tok.mask_id


def test_bytes_tokenizer_ids_and_round_trip(tmp_path):
    tok = build_tokenizer("bytes")
    assert (tok.mask_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258, 259, 260)
    assert tok.encode("aé") == [97, 0xC3, 0xA9]
    check_roundtrip(tok, SAMPLES)
    check_save_load(tok, tmp_path, SAMPLES)


def test_decode_renders_mask_and_drops_or_shows_specials():
    tok = build_tokenizer("bytes")
    ids = [tok.bos_id, *tok.encode("ab"), tok.mask_id, *tok.encode("c"), tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "ab[MASK]c"
    assert tok.decode(ids, mask_text=None) == "abc"
    assert tok.decode(ids, mask_text="_", skip_special=False) == "<bos>ab_c<eos><pad>"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])


def test_bad_specs_and_tampered_directories(tmp_path):
    with pytest.raises(DataError, match="unknown tokenizer spec"):
        build_tokenizer("gpt2")
    with pytest.raises(DataError, match="sentencepiece:train:VOCAB"):
        build_tokenizer("sentencepiece:train:many", texts=["x"])
    with pytest.raises(DataError, match="too small"):
        build_tokenizer("sentencepiece:train:100", texts=["x"])
    with pytest.raises(DataError, match="nope.model"):
        build_tokenizer(f"sentencepiece:{tmp_path}/nope.model")
    with pytest.raises(DataError, match="tokenizer.json"):
        build_tokenizer(f"hf:{tmp_path}")
    with pytest.raises(DataError, match=META_FILE):
        load_tokenizer(str(tmp_path))
    tok = build_tokenizer("bytes")
    tok.save(str(tmp_path / "t"))
    meta_path = tmp_path / "t" / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["vocab_size"] = 300
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="modified"):
        load_tokenizer(str(tmp_path / "t"))
