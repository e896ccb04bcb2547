"""The zero-shot perplexity suite: the papers' detokenisers on text shaped like each set (expected outputs worked
out by hand from the rules), `mdtrain prepare --tokenizer from:RUN --detokenize NAME`, and the `mdtrain eval
RUN eval.extra=[...]` table."""
import json
import os
import subprocess
import sys

import pytest

from mdtrain.data.detokenize import DETOKENIZERS, get_detokenizer
from mdtrain.data.errors import DataError
from mdtrain.data.tokenizers import build_tokenizer, load_tokenizer

# (set, raw text shaped like the set's distribution, what the papers' preprocessing makes of it)
SAMPLES = {
    "wikitext": (
        ' = = Gameplay = = \n The game \'s budget was 1 @,@ 000 @.@ 5 million ( about 20 % ) ; critics said " it is'
        ' great " . \n',
        ' == Gameplay ==\nThe game\'s budget was 1,000.5 million (about 20 %); critics said "it is great".\n'),
    "ptb": (
        "the company 's shares rose $ N to N N N a share but they do n't know <unk> 1\\/2",
        "the company's shares rose $1 to 1 1 1 a share but they don't know ? 1/2"),
    "lm1b": (
        'The company \'s shares ( about 5 % ) rose . Analysts said : " it is good " , see http : / / example.com / a'
        " ; costs $ 5 or \N{POUND SIGN} 4 . Really ?",
        'The company\'s shares (about 5 %) rose. Analysts said: "it is good", see http://example.com/a; costs $5 or'
        " \N{POUND SIGN}4. Really?"),
    "lambada": (
        "\N{LEFT DOUBLE QUOTATION MARK}Hi,\N{RIGHT DOUBLE QUOTATION MARK} he said to his sister.  \n",
        '\n"Hi," he said to his sister.'),
    "scientific_papers": (
        "we find that @xmath0 ( see fig . 1 ) . the results , however , differ .",
        "we find that @xmath0 (see fig. 1). the results, however, differ."),
    "none": (  # AG News and OpenWebText are scored as they are
        "Wall St. Bears Claw Back Into the Black (Reuters) Reuters - Short-sellers, Wall Street's dwindling band...",
        "Wall St. Bears Claw Back Into the Black (Reuters) Reuters - Short-sellers, Wall Street's dwindling band..."),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_detokenizers_undo_each_sets_tokenisation(name):
    raw, want = SAMPLES[name]
    assert get_detokenizer(name)(raw) == want
    assert set(DETOKENIZERS) == set(SAMPLES)


def test_wikitext_rules_in_the_papers_order():
    """Order matters: number separators before punctuation, brackets before heading markers; quirks kept."""
    wt = get_detokenizer("wikitext")
    assert wt("3 @-@ 4 @.@ 5") == "3-4.5"
    assert wt("= = = = Sub = = = =") == "==== Sub ===="
    assert wt("a ( b ) [ c ] { d } ' e '") == "a (b) [c] {d} 'e'"
    assert wt("20 \N{DEGREE SIGN} C") == "20\N{DEGREE SIGN}C"
    assert wt("year N was") == "year 1 was"
    assert wt("the players ' union") == "the players' union"


def test_unknown_detokenizer_is_a_clear_error():
    with pytest.raises(DataError, match="unknown --detokenize 'wikitext103'.*wikitext"):
        get_detokenizer("wikitext103")


def _mdtrain(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "mdtrain", *args], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    if check and r.returncode != 0:
        raise AssertionError(f"mdtrain {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n"
                             f"{r.stderr[-4000:]}")
    return r


def test_tokenizer_from_a_run_export_or_dataset_is_the_saved_one(tmp_path):
    """`from:PATH` finds the tokenizer saved with a prepared dataset, an export-like dir, a checkpoint step and a
    run dir (its newest checkpoint), and restores the same ids."""
    tok = build_tokenizer("sentencepiece:train:320", texts=["hello world, " * 200, "a b c d e f g " * 200])
    run = tmp_path / "run"
    for step in (2, 10):
        tok.save(str(run / "checkpoints" / f"step_{step:08d}" / "tokenizer"))
    tok.save(str(tmp_path / "export" / "tokenizer"))
    for spec in (f"from:{run}", f"from:{run}/checkpoints", f"from:{run}/checkpoints/step_00000010",
                 f"from:{tmp_path / 'export'}", f"from:{tmp_path / 'export' / 'tokenizer'}"):
        got = build_tokenizer(spec)
        assert got.encode("hello world") == tok.encode("hello world") and got.vocab_size == tok.vocab_size
    with pytest.raises(DataError, match="no saved mdtrain tokenizer"):
        build_tokenizer(f"from:{tmp_path / 'nothing'}")


ZS = ["model.flavor=debug", "model.dropout=0.0", "data.seq_len=32", "train.global_batch_size=4",
      "train.micro_batch_size=4", "train.steps=2", "logging.every=1", "eval.batch_size=4", "eval.batches=0",
      "logging.progress_bar=false", "train.ema=0"]

# Text shaped like each zero-shot set, in the form its public copy comes in (one document per line or field).
SETS = {
    "ptb": ("ptb.valid.txt", "ptb", "line",
            "\n".join(f"the N companies said they would n't sell shares of <unk> unit {i} to investors"
                      for i in range(40))),
    "wikitext2": ("wiki.valid.raw", "wikitext", "line",
                  "\n".join(f" = Section {i} = \n The team 's score was {i} @,@ 000 points ( a record ) ."
                            for i in range(30))),
    "lambada": ("lambada_test.jsonl", "lambada", None,
                "\n".join(json.dumps({"text": f"\N{LEFT DOUBLE QUOTATION MARK}Come in,\N{RIGHT DOUBLE QUOTATION MARK} "
                                              f"said the woman number {i}, and he went in."}) for i in range(40))),
}


@pytest.fixture(scope="module")
def zero_shot_run(tmp_path_factory):
    """A 2-step MDLM run on its own small corpus, and the zero-shot sets prepared with its tokenizer."""
    d = tmp_path_factory.mktemp("zs")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(f"The team said it would sell {i} shares, a record (for now)." for i in range(200)))
    _mdtrain("prepare", "--input", str(corpus), "--tokenizer", "sentencepiece:train:400", "--seq-len", "32",
             "--doc-per", "line", "--val-fraction", "0.1", "--out", str(d / "train_data"))
    run = str(d / "run")
    _mdtrain("train", *ZS, f"data.train={d / 'train_data'}", f"train.run_dir={run}")
    prepared = {}
    for name, (fname, detok, doc_per, text) in SETS.items():
        src = d / fname
        src.write_text(text + "\n")
        out = str(d / name)
        args = ["--doc-per", doc_per] if doc_per else []
        _mdtrain("prepare", "--input", str(src), "--tokenizer", f"from:{run}", "--detokenize", detok,
                 "--seq-len", "32", "--packing", "mdlm", "--val-fraction", "1", "--out", out, *args)
        prepared[name] = out
    return run, prepared


def test_prepare_with_a_runs_tokenizer_and_a_detokenizer(zero_shot_run):
    """The shards hold the detokenised documents in the run's token ids, packed as MDLM wraps them (documents + EOS
    concatenated, cut into seq_len − 2 pieces framed [BOS] piece [EOS]): rebuilt here from the raw text."""
    from mdtrain.config import Config
    from mdtrain.data.loader import build_loader

    run, prepared = zero_shot_run
    run_tok = build_tokenizer(f"from:{run}")
    for name, out in prepared.items():
        with open(os.path.join(out, "manifest.json")) as fh:
            manifest = json.load(fh)
        assert manifest["detokenize"] == SETS[name][1] and manifest["tokenizer_spec"] == f"from:{run}"
        tok = load_tokenizer(os.path.join(out, "tokenizer"))
        assert tok.vocab_size == run_tok.vocab_size and tok.encode("said the") == run_tok.encode("said the")
        fname, detok, doc_per, raw = SETS[name]
        docs = [json.loads(ln)["text"] for ln in raw.splitlines()] if doc_per is None else raw.splitlines()
        stream = []
        for d in docs:
            if d.strip():
                stream += run_tok.encode(get_detokenizer(detok)(d)) + [run_tok.eos_id]
        cfg = Config()
        cfg.data.train, cfg.data.seq_len = out, 32
        samples = [row for b in build_loader(cfg.data, "valid", 4, 0, 1, seed=0, infinite=False)
                   for row, m in zip(b["input_ids"].tolist(), b["attention_mask"].tolist()) if any(m)]
        assert len(samples) == manifest["splits"]["valid"]["num_samples"] == len(stream) // 30
        for k, row in enumerate(samples):
            assert row == [run_tok.bos_id] + stream[30 * k:30 * (k + 1)] + [run_tok.eos_id]


def test_eval_prints_the_zero_shot_table_with_bounds_and_standard_errors(zero_shot_run):
    """`mdtrain eval RUN eval.extra=[...]`: one row per set (ppl marked as an upper bound, its Monte Carlo standard
    error), and the same numbers in the final JSON line."""
    run, prepared = zero_shot_run
    sets = ",".join(prepared.values())
    r = _mdtrain("eval", run, f"eval.extra=[{sets}]", "eval.mc_samples=2")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(result["zero_shot"]) == set(prepared)
    table = r.stdout
    for name, row in result["zero_shot"].items():
        assert row["bound"] == "upper" and row["nll_se"] > 0 and row["tokens"] > 0
        line = next(ln for ln in table.splitlines() if ln.startswith(name + ":"))
        assert f"ppl <= {row['ppl']:.3f} ± {row['ppl_se']:.3f}" in line and f"nll {row['nll']:.4f} ± " in line
