"""megatron-rlp: RLP (reinforcement as a pretraining objective) on Megatron-Core."""
import sys

from setuptools import find_packages, setup

install_requires = [
    "megatron-core==0.16.1",
    # A range, never a bare name: on CPU machines the 2.13.0 CPU build must satisfy it.
    "torch>=2.4",
    "sentencepiece",
    "numpy",
    "einops",
    "tensorboard",
    "psutil",
    "tqdm",
]
if sys.platform.startswith("linux"):
    install_requires.append("triton")

setup(
    name="megatron-rlp",
    version="0.1.0",
    description="RLP (arXiv 2510.01265) as a pretraining objective inside Megatron-Core",
    packages=find_packages(include=["megatron_rlp", "megatron_rlp.*"]),
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require={
        "test": ["pytest", "transformers>=4.51", "safetensors", "matplotlib"],
        # CUDA-only; install inside an NGC PyTorch container.
        "gpu": ["transformer-engine[pytorch]", "mamba-ssm", "causal-conv1d"],
        "convert": ["transformers>=4.51", "safetensors"],
        # Optional, as in Megatron-LM: only --wandb-project needs it.
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["megatron-rlp-pretrain=megatron_rlp.pretrain:main"]},
)
