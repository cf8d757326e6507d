"""FLOP accounting for the TFLOP/s/GPU figure in the log line."""

from __future__ import annotations

from megatron_rlp.models.presets import ModelPreset


def forward_flops_per_token(preset: ModelPreset, seq_length: int) -> float:
    """Forward FLOPs of one token in a sequence of ``seq_length`` (matmuls only, 2 FLOPs/MAC).

    Attention scores and the weighted sum are counted for the full (not causal-halved) square,
    as Megatron-LM does, so figures compare with Megatron-LM's.
    """
    h = preset.hidden_size
    q = preset.num_attention_heads * preset.kv_channels
    kv = preset.num_query_groups * preset.kv_channels
    mlp_in = preset.ffn_hidden_size * (2 if preset.activation == "swiglu" else 1)
    if preset.family == "hybrid" and preset.hybrid_pattern:
        pattern = preset.hybrid_pattern
        n_attn, n_mlp, n_mamba = pattern.count("*"), pattern.count("-"), pattern.count("M")
        d_inner = preset.mamba_num_heads * preset.mamba_head_dim
        in_proj = 2 * d_inner + 2 * preset.mamba_num_groups * preset.mamba_state_dim + preset.mamba_num_heads
        mamba = h * in_proj + d_inner * h + 2 * 2 * d_inner * preset.mamba_state_dim
        per_token = (
            n_attn * (h * (q + 2 * kv) + q * h + 2 * seq_length * q)
            + n_mlp * (h * mlp_in + preset.ffn_hidden_size * h)
            + n_mamba * mamba
        )
    else:
        attention = h * (q + 2 * kv) + q * h + 2 * seq_length * q
        mlp = h * mlp_in + preset.ffn_hidden_size * h
        per_token = preset.num_layers * (attention + mlp)
    return 2.0 * (per_token + preset.vocab_size * h)


def training_flops(preset: ModelPreset, tokens: int, seq_length: int) -> float:
    """Forward + backward (backward = 2x forward) FLOPs for ``tokens`` tokens."""
    return 3.0 * tokens * forward_flops_per_token(preset, seq_length)
