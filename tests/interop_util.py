"""Builders shared by the interop tests: small Hugging Face tokenizers and random tiny transformers models,
written to disk the way ``save_pretrained`` writes them (nothing is downloaded)."""
import json
import os

import torch

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "mdlm_dit")
TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
        "How vexingly quick daft zebras jump; 0123456789 (sphinx of black quartz, judge my vow).\n")


def char_tokenizer(out: str, n: int, eos: str = "<|endoftext|>", bos: str | None = None) -> int:
    """A character-level Hugging Face tokenizer of ``n`` ids: the specials first, then printable ASCII."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {eos: 0}
    if bos:
        vocab[bos] = 1
    for c in [chr(i) for i in range(32, 127)][: n - len(vocab)]:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=eos))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos).save_pretrained(out)
    return len(vocab)


def mdlm_tokenizer(out: str) -> str:
    """The fixture's vocabulary: 96 ids plus the mask MDLM appends (97 rows, mask 96)."""
    os.makedirs(out, exist_ok=True)
    char_tokenizer(out, 96)
    return out


def perturb_(model, scale=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def hf_model(kind: str, out: str, vocab: int = 90):
    """A random tiny transformers causal LM of family ``kind`` saved with a tokenizer in ``out``.

    llama: grouped-query attention (4 heads, 2 kv), Llama 3 rotary scaling, untied; qwen2: one kv head, qkv
    biases, YaRN scaling, tied, an embedding padded past the tokenizer; gpt2: LayerNorm, GELU, learned positions.
    """
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                          rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 4.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 16},
                          tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab + 6, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                          rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0,
                                           "original_max_position_embeddings": 32},
                          tie_word_embeddings=True)
        model = Qwen2ForCausalLM(cfg)
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    else:
        raise ValueError(kind)
    perturb_(model)
    model.save_pretrained(out)
    char_tokenizer(out, vocab, bos="<s>" if kind == "llama" else None)
    return model.eval()


def read_json(path):
    with open(path) as fh:
        return json.load(fh)
