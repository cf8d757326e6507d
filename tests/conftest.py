"""Shared test setup: the CPU platform shim is installed before any megatron-core import runs."""
import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")
# Multi-rank runs (torchrun) check device discipline: a tensor a CUDA run keeps on the host must
# not reach an NCCL collective (see megatron_rlp.platform, strict device mode).
if "WORLD_SIZE" in os.environ:
    os.environ.setdefault("MEGATRON_RLP_STRICT_DEVICE", "1")
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

from megatron_rlp import platform  # noqa: E402

platform.setup_platform()
