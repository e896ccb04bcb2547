"""Configuration of a model exported by ``mdtrain export --format hf`` (loaded with ``trust_remote_code=True``).

Self-contained: it needs torch and transformers only. The fields describe the network exactly; ``mdtrain`` holds
what the network does not (the objective, its schedule, the mask token, the training length) so a sampler can be
written against it.
"""
from transformers import PretrainedConfig


class MdtrainConfig(PretrainedConfig):
    model_type = "mdtrain"

    def __init__(self, backbone: str = "dit", vocab_size: int = 2, d_model: int = 64, n_layers: int = 2,
                 n_heads: int = 4, cond_dim: int = 32, variant: str = "mdlm", llama: dict = None,
                 mask_token_id: int = 1, mdtrain: dict = None, **kwargs):
        self.backbone = backbone          # dit (adaLN-conditioned, bidirectional), causal, llama
        self.vocab_size = vocab_size      # includes the mask token
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.cond_dim = cond_dim          # dit: width of the time conditioning
        self.variant = variant            # dit / causal: mdlm or md4 block style
        self.llama = dict(llama or {})    # llama: attention, n_kv_heads, head_dim, ffn_hidden, mlp, norm, ...
        self.mask_token_id = mask_token_id
        self.mdtrain = dict(mdtrain or {})  # objective settings and provenance (not read by the network)
        kwargs.setdefault("tie_word_embeddings", False)  # tying, when there is any, is done in forward
        super().__init__(**kwargs)
