"""Shared test setup: the CPU platform shim is installed before any megatron-core import runs."""
import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

from megatron_rlp import platform  # noqa: E402

platform.setup_platform()
