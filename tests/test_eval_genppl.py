"""Generative perplexity with unigram entropy: an HF causal LM directory (`hf:DIR`, a random tiny GPT-2 built and
saved here) as the scorer, checked against a float64 recomputation; `mdtrain eval ... eval.gen_ppl_model=hf:DIR`
gives one row (sampler, steps, NFE, gen-PPL, entropy) that agrees with `mdtrain sample`'s samples (same seed,
another process) scored and counted here."""
import json
import math
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

TINY = ["model.flavor=debug", "model.dropout=0.0", "data.train=synthetic:markov", "data.seq_len=32",
        "train.global_batch_size=4", "train.micro_batch_size=4", "train.steps=2", "logging.every=1",
        "eval.batches=1", "eval.batch_size=4", "logging.progress_bar=false", "train.ema=0"]
GEN = ["sample.num_samples=6", "sample.batch_size=4", "sample.steps=8", "sample.seed=3", "sample.sampler=ddpm"]


def _mdtrain(*args):
    r = subprocess.run([sys.executable, "-m", "mdtrain", *args], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, f"mdtrain {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random 2-layer GPT-2 with a byte-level BPE tokenizer, saved as a Hugging Face directory (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    d = str(tmp_path_factory.mktemp("hf_gpt2"))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["abcdefghijklmnopqrstuvwxyz " * 20, "the quick brown fox jumps"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.save_pretrained(d)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=24, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(d)
    return d


def _hf_nll64(d, texts):
    """Σ −log p and token count, float64, one full forward per 24-token chunk of [EOS] text [EOS] (GPT-2's BOS)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d).double().eval()
    nll, n = 0.0, 0
    for t in texts:
        ids = [tok.eos_token_id] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for s in range(0, len(ids) - 1, 24):
            chunk = torch.tensor([ids[s:s + 24]])
            if chunk.shape[1] < 2:
                continue
            with torch.no_grad():
                logp = torch.log_softmax(model(chunk).logits[0, :-1], -1)
            nll -= float(logp.gather(1, chunk[0, 1:, None]).sum())
            n += chunk.shape[1] - 1
    return nll, n


def test_hf_scorer_matches_a_float64_recomputation(hf_dir):
    from mdtrain.eval_cli import load_scorer
    from mdtrain.evaluate import generative_perplexity
    texts = ["the quick brown fox", "abc " * 20, "jumps over the lazy dog, twice: jumps over the lazy dog"]
    got = generative_perplexity(texts, load_scorer(f"hf:{hf_dir}"), batch_size=2)
    nll, n = _hf_nll64(hf_dir, texts)
    assert got["gen_tokens"] == n and n > 3 * 24  # several chunks of the scorer's context
    assert got["gen_nll"] == pytest.approx(nll / n, rel=1e-6)
    assert got["gen_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-6)
    with pytest.raises(FileNotFoundError, match="hf:DIR takes a local"):
        load_scorer(f"hf:{hf_dir}/missing")


def test_eval_gen_ppl_row_is_reproducible_and_agrees_with_mdtrain_sample(hf_dir, tmp_path):
    run = str(tmp_path / "run")
    _mdtrain("train", *TINY, f"train.run_dir={run}")
    out = _mdtrain("eval", run, f"eval.gen_ppl_model=hf:{hf_dir}", *GEN)
    g = json.loads(out.stdout.strip().splitlines()[-1])["gen_ppl"]
    assert "gen-ppl" in out.stdout and "entropy" in out.stdout
    assert {"sampler", "steps", "nfe", "gen_ppl", "entropy", "num_samples", "seed", "scorer"} <= set(g)
    assert g["sampler"] == "ddpm" and g["steps"] == 8 and g["num_samples"] == 6 and g["nfe"] >= 8
    assert 0 < g["nfe_per_sample"] <= 8 + 1  # each sequence's own evaluations (steps, + noise removal)
    # fixed seeds: another process (`mdtrain sample`) draws the same samples; scored and counted here
    samples = str(tmp_path / "samples.jsonl")
    _mdtrain("sample", run, *GEN, f"sample.out={samples}", "sample.show=0")
    recs = [json.loads(ln) for ln in open(samples)]
    ent = []
    for r in recs:
        c = Counter(r["ids"])
        ent.append(-sum(v / len(r["ids"]) * math.log(v / len(r["ids"])) for v in c.values()))
    assert g["entropy"] == pytest.approx(sum(ent) / len(ent), rel=1e-12)
    nll, n = _hf_nll64(hf_dir, [r["text"] for r in recs])
    assert g["gen_tokens"] == n and g["gen_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-6)
