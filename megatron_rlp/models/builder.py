"""Build megatron-core models from presets.

GPT family: a megatron-core ``GPTModel`` in the Qwen3 shape (RMSNorm, SwiGLU, GQA, per-head
QK RMSNorm, RoPE, no biases, tied or untied embeddings).  The Transformer Engine layer spec is
used when TE imports, megatron-core's local spec otherwise.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_rlp.models.presets import ModelPreset


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def fused_softmax_kernels_available() -> bool:
    """megatron's fused masked-softmax CUDA extensions (built by NVIDIA apex, present in NGC
    containers).  With ``masked_softmax_fusion`` on and them missing, every bf16 attention of a
    qualifying shape fails with ModuleNotFoundError (fused_softmax.py imports them lazily)."""
    if not torch.cuda.is_available():
        return False
    try:
        import scaled_masked_softmax_cuda  # noqa: F401
        import scaled_upper_triang_masked_softmax_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def validate_parallel_layout(preset: ModelPreset, tp: int, pp: int, world_size: int) -> None:
    """Reject layouts megatron-core cannot shard, before any model is built."""
    problems = []
    if tp < 1 or pp < 1:
        problems.append(f"tensor ({tp}) and pipeline ({pp}) parallel sizes must be >= 1")
    else:
        if preset.num_attention_heads % tp:
            problems.append(
                f"--tensor-model-parallel-size {tp} does not divide the {preset.num_attention_heads} "
                f"attention heads of preset {preset.name!r}"
            )
        if preset.num_query_groups % tp:
            problems.append(
                f"--tensor-model-parallel-size {tp} does not divide the {preset.num_query_groups} "
                f"KV groups (num_query_groups) of preset {preset.name!r}"
            )
        if preset.family == "hybrid" and preset.mamba_num_heads % tp:
            problems.append(
                f"--tensor-model-parallel-size {tp} does not divide the {preset.mamba_num_heads} "
                f"Mamba heads of preset {preset.name!r}"
            )
        if preset.family == "gpt" and preset.num_layers % pp:
            problems.append(
                f"--pipeline-model-parallel-size {pp} does not divide the {preset.num_layers} "
                f"layers of preset {preset.name!r}"
            )
        if world_size % (tp * pp):
            problems.append(
                f"world size {world_size} is not a multiple of tensor x pipeline parallel size "
                f"{tp} x {pp} = {tp * pp}"
            )
    if problems:
        raise ValueError("invalid parallel layout: " + "; ".join(problems))


def transformer_config(
    preset: ModelPreset,
    tp: int = 1,
    pp: int = 1,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
) -> TransformerConfig:
    """megatron-core TransformerConfig for a preset."""
    on_gpu = torch.cuda.is_available()
    bf16 = params_dtype == torch.bfloat16
    activation = F.silu if preset.activation == "swiglu" else _squared_relu
    return TransformerConfig(
        num_layers=preset.num_layers,
        hidden_size=preset.hidden_size,
        ffn_hidden_size=preset.ffn_hidden_size,
        num_attention_heads=preset.num_attention_heads,
        num_query_groups=preset.num_query_groups,
        kv_channels=preset.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=preset.norm_epsilon,
        gated_linear_unit=preset.activation == "swiglu",
        activation_func=activation,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=preset.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        bf16=bf16,
        pipeline_dtype=params_dtype,
        autocast_dtype=params_dtype,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        masked_softmax_fusion=fused_softmax_kernels_available(),
        bias_dropout_fusion=on_gpu,
        bias_activation_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        deallocate_pipeline_outputs=False,
    )


def _squared_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.pow(F.relu(x), 2)


def gpt_layer_spec(preset: ModelPreset):
    from megatron.core.models.gpt import gpt_layer_specs

    if transformer_engine_available():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=preset.qk_layernorm
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=preset.qk_layernorm, normalization="RMSNorm"
    )


def _rlp_gpt_model_class():
    from megatron.core.models.gpt import GPTModel

    class RLPGPTModel(GPTModel):
        """megatron-core's GPTModel that can hand back its final (normed) hidden states.

        With ``return_hidden = True`` a training/scoring forward (no inference context) on the last
        stage returns hidden states [s, b, h] instead of logits, so the log-probabilities of chosen
        tokens come from the fused linear log-prob kernel without materialising [s, b, V] logits.
        """

        return_hidden = False

        def _postprocess(self, hidden_states, **kwargs):
            if self.return_hidden and kwargs.get("inference_context") is None:
                return hidden_states
            return super()._postprocess(hidden_states, **kwargs)

    return RLPGPTModel


def build_gpt_model(
    preset: ModelPreset,
    config: TransformerConfig,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
):
    """A megatron-core GPTModel for this pipeline stage (parallel_state must be initialised)."""
    GPTModel = _rlp_gpt_model_class()

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    model = GPTModel(
        config=config,
        transformer_layer_spec=gpt_layer_spec(preset),
        vocab_size=preset.vocab_size,
        max_sequence_length=preset.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=preset.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(preset.rotary_base),
    )
    return model


def build_model(preset: ModelPreset, config: TransformerConfig):
    """Dispatch on the preset family."""
    if preset.family == "gpt":
        return build_gpt_model(preset, config)
    if preset.family == "hybrid":
        from megatron_rlp.models.hybrid import build_hybrid_model

        return build_hybrid_model(preset, config)
    raise ValueError(f"unknown model family {preset.family!r} in preset {preset.name!r}")
