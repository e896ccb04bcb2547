"""mdtrain: distributed training of masked-diffusion language models. `pip install -e .` compiles nothing."""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _reqs(name):
    with open(os.path.join(HERE, name)) as fh:
        return [ln.split("#")[0].strip() for ln in fh if ln.split("#")[0].strip()]


setup(
    name="mdtrain",
    version="0.1.0",
    description="Distributed training of masked-diffusion language models (MDLM, MD4/GenMD4, SEDD, D3PM, AR)",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mdtrain", "mdtrain.*"]),
    include_package_data=True,
    install_requires=_reqs("requirements.txt"),
    extras_require={
        # GPU kernels; never installed in CPU CI (they need CUDA to build or import).
        "gpu": ["flash-attn==2.8.3.post2", "mamba-ssm==2.3.2.post1", "causal-conv1d==1.7.0"],
        "dev": _reqs("requirements-dev.txt"),
        # Hugging Face model directories: loading `mdtrain export --format hf` outputs, and the hf:DIR scorer of
        # generative perplexity (`mdtrain eval eval.gen_ppl_model=hf:DIR`); mdtrain's training never imports it
        "hf": ["transformers==5.24.0"],
    },
    entry_points={"console_scripts": ["mdtrain=mdtrain.cli:main"]},
)
