"""The `model.llama` config section: what the Llama-family backbone (``model.name=llama``) needs beyond the
flavor's layers / width / heads. ``mdtrain import hf`` fills it from a Hugging Face ``config.json``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from mdtrain.configtools import ConfigError, doc

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass
class LlamaConfig:
    attention: str = doc("bidirectional", "causal (for objective.name=ar), bidirectional (LLaDA's architecture, for "
                                          "the masked objectives) or anneal (causal -> full over the first "
                                          "anneal_steps training steps, DiffuLLaMA's attention-mask annealing)",
                         choices=("causal", "bidirectional", "anneal"))
    anneal_steps: int = doc(0, "attention=anneal: steps over which the share of future keys a query may see rises "
                               "linearly from 0 to 1 (each query-key pair drawn independently per forward); "
                               "evaluation and sampling always use full attention", ge=0)
    n_kv_heads: Optional[int] = doc(None, "key/value heads (grouped-query attention); null = model.n_heads", ge=1)
    head_dim: Optional[int] = doc(None, "attention head width; null = d_model / n_heads", ge=1)
    ffn_hidden: Optional[int] = doc(None, "MLP hidden width; null = 4·d_model (gelu) or Llama's rule "
                                          "256·ceil(8·d_model/3/256) (swiglu)", ge=1)
    mlp: str = doc("swiglu", "MLP: swiglu (down(silu(gate x) * up x): Llama, Qwen2), gelu_tanh (GPT-2's gelu_new) "
                             "or gelu", choices=("swiglu", "gelu_tanh", "gelu"))
    norm: str = doc("rmsnorm", "rmsnorm (Llama, Qwen2) or layernorm (with bias: GPT-2)",
                    choices=("rmsnorm", "layernorm"))
    norm_eps: float = doc(1e-5, "epsilon of every norm (Llama 1e-5 or 1e-6, GPT-2 1e-5)", gt=0)
    positions: str = doc("rope", "rope (rotary, rotate-half layout) or learned (GPT-2's absolute position table)",
                         choices=("rope", "learned"))
    max_positions: int = doc(0, "learned: rows of the position table (required); rope: the context length the "
                                "dynamic and yarn scalings refer to (HF's max_position_embeddings; 0: none)", ge=0)
    rope_theta: float = doc(10000.0, "rotary base (Llama 3: 500000, Qwen2: 1000000)", gt=0)
    rope_scaling: dict[str, Any] = doc({}, "rotary scaling as Hugging Face writes it: {} = none, or {rope_type: "
                                 "linear | dynamic | llama3 | yarn, factor: F, ...} with llama3's low_freq_factor, "
                                 "high_freq_factor, original_max_position_embeddings and yarn's beta_fast, "
                                 "beta_slow, attention_factor, original_max_position_embeddings")
    tie_embeddings: bool = doc(False, "the output head reuses the token embedding matrix")
    qkv_bias: bool = doc(False, "biases on the query/key/value projections (Qwen2, GPT-2)")
    out_bias: bool = doc(False, "bias on the attention output projection (GPT-2)")
    mlp_bias: bool = doc(False, "biases on the MLP projections (GPT-2)")
    init_std: float = doc(0.02, "std of the normal init of every weight when training from scratch (HF's "
                                "initializer_range)", gt=0)

    def validate(self):
        if self.anneal_steps < 0:
            raise ConfigError(f"model.llama.anneal_steps must be >= 0, got {self.anneal_steps}")
        if self.attention == "anneal" and self.anneal_steps == 0:
            raise ConfigError("model.llama.attention=anneal needs model.llama.anneal_steps > 0 (or use "
                              "attention=bidirectional)")
        for key in ("n_kv_heads", "head_dim", "ffn_hidden"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"model.llama.{key} must be >= 1 or null, got {v}")
        if self.positions == "learned" and self.max_positions < 1:
            raise ConfigError("model.llama.positions=learned needs model.llama.max_positions >= 1 (the table's rows)")
        if self.norm_eps <= 0 or self.rope_theta <= 0 or self.init_std <= 0:
            raise ConfigError("model.llama.norm_eps, rope_theta and init_std must be > 0")
        if self.rope_scaling:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ROPE_TYPES:
                raise ConfigError(f"model.llama.rope_scaling: rope_type {kind!r} is not supported "
                                  f"({', '.join(ROPE_TYPES)})")
            if kind != "default" and not float(self.rope_scaling.get("factor", 0)) > 0:
                raise ConfigError(f"model.llama.rope_scaling: rope_type {kind} needs a factor > 0")
