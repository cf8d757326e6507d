"""The RMSNorm of the local (Transformer-Engine-free) layer specs."""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.transformer.transformer_config import TransformerConfig


class ConfigRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built from the config, usable with sequence parallelism.

    megatron's ``WrappedTorchNorm`` refuses ``sequence_parallel``.  Under sequence parallelism each
    tensor-parallel rank normalises its own slice of the sequence, so the replicated weight gets
    only a partial gradient there; the weight is tagged ``sequence_parallel`` (as Transformer
    Engine's norms are) and megatron's ``finalize_model_grads`` then sums it over the TP group.
    The epsilon is the config's unless one is passed (``MambaLayer`` builds its norm without one).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: Optional[float] = None, **_):
        if config.normalization != "RMSNorm":
            raise ValueError(f"ConfigRMSNorm needs normalization='RMSNorm', got {config.normalization!r}")
        super().__init__(hidden_size, eps=config.layernorm_epsilon if eps is None else eps)
        self.weight.sequence_parallel = config.sequence_parallel
