"""Build megatron-core models from presets.

GPT family: a megatron-core ``GPTModel`` in the Qwen3 shape (RMSNorm, SwiGLU, GQA, per-head
QK RMSNorm, RoPE, no biases, tied or untied embeddings).  The Transformer Engine layer spec is
used when TE imports, megatron-core's local spec otherwise (with
:class:`~megatron_rlp.models.norm.ConfigRMSNorm` for its norms, so that it runs sequence-parallel);
either way its core attention also runs the RLP update's shared-prefix rows
(:mod:`megatron_rlp.models.shared_prefix`).

Sequence parallelism and activation recompute follow Megatron-LM's flags (``--sequence-parallel``,
``--recompute-granularity/-method/-num-layers``); :func:`transformer_config` validates them.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_rlp.models.norm import ConfigRMSNorm
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


def pipeline_stage_sizes(
    num_layers: int, pp: int, first: Optional[int] = None, last: Optional[int] = None
) -> list[int]:
    """Decoder layers per pipeline stage, Megatron-LM's split: the first / last stage hold
    ``first`` / ``last`` layers where given, the remaining layers are divided evenly among the
    other stages.  Raises ValueError (naming the flags) when that split is impossible."""
    if pp == 1:
        if first is not None or last is not None:
            raise ValueError(
                "--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1"
            )
        return [num_layers]
    for flag, value in (("first", first), ("last", last)):
        if value is not None and not 0 < value < num_layers:
            raise ValueError(
                f"--decoder-{flag}-pipeline-num-layers {value} must be between 1 and "
                f"{num_layers - 1} (the model has {num_layers} layers)"
            )
    middle_stages = pp - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    if first is None and last is None and num_layers % pp:
        raise ValueError(
            f"--pipeline-model-parallel-size {pp} does not divide the {num_layers} layers; set "
            "--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers for an uneven split"
        )
    if middle_stages == 0 and middle_layers != 0:
        raise ValueError(
            f"--decoder-first-pipeline-num-layers {first} + --decoder-last-pipeline-num-layers {last} "
            f"must add up to the {num_layers} layers at --pipeline-model-parallel-size {pp}"
        )
    if middle_stages and (middle_layers < middle_stages or middle_layers % middle_stages):
        raise ValueError(
            f"the {middle_layers} layers left after the first/last stage do not divide evenly "
            f"over the other {middle_stages} pipeline stages (with at least one layer each); "
            "change --decoder-first/last-pipeline-num-layers"
        )
    per_middle = middle_layers // middle_stages if middle_stages else 0
    return [
        first if r == 0 and first is not None else last if r == pp - 1 and last is not None else per_middle
        for r in range(pp)
    ]


def validate_parallel_layout(
    preset: ModelPreset,
    tp: int,
    pp: int,
    world_size: int,
    first_stage_layers: Optional[int] = None,
    last_stage_layers: Optional[int] = None,
) -> None:
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
        try:
            pipeline_stage_sizes(preset.num_layers, pp, first_stage_layers, last_stage_layers)
        except ValueError as e:
            problems.append(f"{e} (preset {preset.name!r})")
        if world_size % (tp * pp):
            problems.append(
                f"world size {world_size} is not a multiple of tensor x pipeline parallel size "
                f"{tp} x {pp} = {tp * pp}"
            )
    if problems:
        raise ValueError("invalid parallel layout: " + "; ".join(problems))


RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


def validate_recompute(
    granularity: Optional[str], method: Optional[str], num_layers: Optional[int]
) -> None:
    """Megatron-LM's rules for the recompute flags, as errors that name the flags.

    full: every layer's input is kept and the layer is re-run in backward, for the layers chosen
    by --recompute-method (uniform: chunks of --recompute-num-layers layers; block: the first
    --recompute-num-layers layers of each pipeline stage).  selective: megatron's default
    recompute module, the core attention, in every layer; it takes no method or layer count.
    """
    if granularity is None:
        if method is not None or num_layers is not None:
            raise ValueError(
                "--recompute-method / --recompute-num-layers need --recompute-granularity full"
            )
        return
    if granularity not in RECOMPUTE_GRANULARITIES:
        raise ValueError(
            f"--recompute-granularity must be one of {RECOMPUTE_GRANULARITIES}, got {granularity!r}"
        )
    if granularity == "selective":
        if method is not None or num_layers is not None:
            raise ValueError(
                "--recompute-granularity selective recomputes the core attention of every layer "
                "and takes no --recompute-method or --recompute-num-layers (those are for full)"
            )
        return
    if method not in RECOMPUTE_METHODS:
        raise ValueError(
            f"--recompute-granularity full needs --recompute-method uniform or block, got {method!r}"
        )
    if num_layers is None or num_layers < 1:
        raise ValueError(
            "--recompute-granularity full needs --recompute-num-layers >= 1 (uniform: layers per "
            f"recomputed chunk; block: recomputed layers per pipeline stage), got {num_layers!r}"
        )


def transformer_config(
    preset: ModelPreset,
    tp: int = 1,
    pp: int = 1,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    first_stage_layers: Optional[int] = None,
    last_stage_layers: Optional[int] = None,
    recompute_granularity: Optional[str] = None,
    recompute_method: Optional[str] = None,
    recompute_num_layers: Optional[int] = None,
) -> TransformerConfig:
    """megatron-core TransformerConfig for a preset (``first/last_stage_layers``: the uneven
    pipeline split of --decoder-first/last-pipeline-num-layers).

    ``sequence_parallel`` at ``tp == 1`` is switched off with a warning, as Megatron-LM does (it
    would change nothing: there is no other rank to split the sequence with).
    """
    if sequence_parallel and tp == 1:
        warnings.warn(
            "--sequence-parallel has no effect at --tensor-model-parallel-size 1; disabled "
            "(as Megatron-LM does)",
            stacklevel=2,
        )
        sequence_parallel = False
    validate_recompute(recompute_granularity, recompute_method, recompute_num_layers)
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
        num_layers_in_first_pipeline_stage=first_stage_layers,
        num_layers_in_last_pipeline_stage=last_stage_layers,
        sequence_parallel=sequence_parallel,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
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
    """One decoder layer: TE's spec when TE imports; else megatron-core's local spec with every
    norm a :class:`ConfigRMSNorm` (megatron's ``WrappedTorchNorm`` refuses sequence parallelism)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if transformer_engine_available():
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=preset.qk_layernorm
        )
        _with_shared_prefix_attention(spec)
        return spec
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=preset.qk_layernorm, normalization="RMSNorm"
    )
    _with_shared_prefix_attention(spec)
    spec.submodules.input_layernorm = ConfigRMSNorm
    spec.submodules.pre_mlp_layernorm = ConfigRMSNorm
    if preset.qk_layernorm:
        spec.submodules.self_attention.submodules.q_layernorm = ConfigRMSNorm
        spec.submodules.self_attention.submodules.k_layernorm = ConfigRMSNorm
    return spec


def _with_shared_prefix_attention(spec) -> None:
    """The spec's core attention, able to run the RLP update's packed shared-prefix rows as well
    (megatron_rlp.models.shared_prefix); every other forward is unchanged."""
    from megatron_rlp.models.shared_prefix import shared_prefix_core_attention

    attention = spec.submodules.self_attention.submodules
    attention.core_attention = shared_prefix_core_attention(attention.core_attention)


def gpt_block_spec(preset: ModelPreset, config: TransformerConfig):
    """The decoder of this pipeline stage: the layer spec (TE: megatron builds the block and its
    TE final norm), or with the local spec the stage's layers and a :class:`ConfigRMSNorm` final
    norm (megatron's default there is ``WrappedTorchNorm``).  parallel_state must be initialised."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layer = gpt_layer_spec(preset)
    num_layers = get_num_layers_to_build(config)
    k = config.recompute_num_layers
    if config.recompute_method == "uniform" and num_layers % k:
        # TransformerBlock's uniform recompute runs whole chunks of k layers (an IndexError past
        # the stage's last layer otherwise).
        raise ValueError(
            f"--recompute-num-layers {k} must divide the {num_layers} layers of pipeline stage "
            f"{parallel_state.get_pipeline_model_parallel_rank()} with --recompute-method uniform"
        )
    if transformer_engine_available():
        return layer
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=ConfigRMSNorm)


@contextlib.contextmanager
def sequence_parallel_off(model):
    """Run a sequence-parallel ``model`` (one bare pipeline stage) without sequence parallelism,
    on the same weights, and switch it back after, also on errors (no-op when it is off).

    For forwards under ``torch.no_grad()`` only (decoding, evaluation): the switch changes what
    the layers do in forward and backward, so no autograd graph may be alive across it.
    """
    config = getattr(model, "config", None)
    if config is None or not config.sequence_parallel:
        yield
        return
    if torch.is_grad_enabled():
        raise RuntimeError("sequence_parallel_off is for forwards under torch.no_grad() only")
    from megatron.core.transformer import utils as transformer_utils

    # megatron caches the modules to switch by id(model); ids are reused after a model is freed.
    if transformer_utils._sequence_parallel_attr_cache is not None:
        transformer_utils._sequence_parallel_attr_cache.pop(id(model), None)
    transformer_utils._init_sequence_parallel_cache(model, None)
    modules = transformer_utils._sequence_parallel_attr_cache[id(model)]
    # Restore each module's own value after (megatron's switch back would set every one to True).
    saved = [(m, attr, getattr(m, attr)) for attr, ms in modules.items() for m in ms]
    transformer_utils.set_model_to_sequence_parallel(model, False)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)
        config.sequence_parallel = True


def without_sequence_parallel(run):
    """Decorator: ``run(model, ...)`` under no_grad inside :func:`sequence_parallel_off`."""

    @functools.wraps(run)
    def wrapper(model, *args, **kwargs):
        with torch.no_grad(), sequence_parallel_off(model):
            return run(model, *args, **kwargs)

    return wrapper


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
        transformer_layer_spec=gpt_block_spec(preset, config),
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
