"""Single-device backbones (DiT, causal transformer, bidirectional Mamba), flavors and FLOP counts."""
