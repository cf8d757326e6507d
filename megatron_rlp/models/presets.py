"""Named model presets: the architecture facts a run needs, independent of parallelism."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ModelPreset:
    """Architecture of a decoder-only model.

    ``family`` is ``"gpt"`` (Qwen3-style GPTModel) or ``"hybrid"`` (Nemotron-H MambaModel).
    """

    name: str
    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    tie_embeddings: bool
    rotary_base: float = 1_000_000.0
    qk_layernorm: bool = True
    norm_epsilon: float = 1e-6
    activation: str = "swiglu"  # "swiglu" or "squared_relu"
    # Hybrid (Mamba) fields; only used when family == "hybrid".
    hybrid_pattern: Optional[str] = None
    mamba_num_heads: int = 0
    mamba_head_dim: int = 0
    mamba_state_dim: int = 0
    mamba_num_groups: int = 0

    def replace(self, **changes) -> "ModelPreset":
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        """Parameter count of a GPT-family preset (embedding counted once when tied)."""
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.vocab_size
        q = self.num_attention_heads * self.kv_channels
        kv = self.num_query_groups * self.kv_channels
        attn = h * (q + 2 * kv) + q * h + (2 * self.kv_channels if self.qk_layernorm else 0)
        mlp = h * f * (2 if self.activation == "swiglu" else 1) + f * h
        per_layer = attn + mlp + 2 * h
        emb = v * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + emb + h


PRESETS: dict[str, ModelPreset] = {
    # Qwen3-1.7B (RLP_SPEC.md "Model facts").
    "qwen3-1.7b": ModelPreset(
        name="qwen3-1.7b",
        family="gpt",
        num_layers=28,
        hidden_size=2048,
        ffn_hidden_size=6144,
        num_attention_heads=16,
        num_query_groups=8,
        kv_channels=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        tie_embeddings=True,
        rotary_base=1_000_000.0,
    ),
    # A CPU-sized model with the same structure (GQA 2:1, QK-norm, SwiGLU, RoPE).
    "tiny": ModelPreset(
        name="tiny",
        family="gpt",
        num_layers=4,
        hidden_size=128,
        ffn_hidden_size=384,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=32,
        vocab_size=512,
        max_position_embeddings=1024,
        tie_embeddings=True,
        rotary_base=10_000.0,
    ),
    # Nemotron-Nano-12B-v2 (RLP_SPEC.md "Model facts").
    "nemotron-nano-12b-v2": ModelPreset(
        name="nemotron-nano-12b-v2",
        family="hybrid",
        num_layers=62,
        hidden_size=5120,
        ffn_hidden_size=20480,
        num_attention_heads=40,
        num_query_groups=8,
        kv_channels=128,
        vocab_size=131072,
        max_position_embeddings=131072,
        tie_embeddings=False,
        qk_layernorm=False,
        norm_epsilon=1e-5,
        activation="squared_relu",
        hybrid_pattern="M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-",
        mamba_num_heads=128,
        mamba_head_dim=80,
        mamba_state_dim=128,
        mamba_num_groups=8,
    ),
    "tiny-hybrid": ModelPreset(
        name="tiny-hybrid",
        family="hybrid",
        num_layers=6,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=16,
        vocab_size=512,
        max_position_embeddings=1024,
        tie_embeddings=False,
        qk_layernorm=False,
        norm_epsilon=1e-5,
        activation="squared_relu",
        hybrid_pattern="M*-M*-",
        mamba_num_heads=8,
        mamba_head_dim=16,
        mamba_state_dim=16,
        mamba_num_groups=2,
    ),
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r}; choose one of {sorted(PRESETS)} (--model-preset)"
        ) from None
