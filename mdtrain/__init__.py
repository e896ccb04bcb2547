"""mdtrain: distributed training of masked-diffusion language models (MDLM, MD4/GenMD4) and their baselines."""
__version__ = "0.1.0"
