"""Run configuration: one dataclass per concern; command-line flags are generated from the fields.

Flag names follow Megatron-LM (``--tensor-model-parallel-size``, ``--lr``, ...) for everything
Megatron-LM also has; RLP's own knobs are ``--rlp-*``.  A field's flag is its name with
underscores turned into dashes unless ``flag=`` says otherwise; its help text is the field's
``help=`` metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, get_type_hints


def option(default: Any, help: str, flag: Optional[str] = None, choices=None, **kwargs):
    """A dataclass field that becomes a command-line flag."""
    metadata = {"help": help, "flag": flag, "choices": choices}
    if callable(default) and not isinstance(default, (int, float, str, bool)):
        return dataclasses.field(default_factory=default, metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = option(1, "Tensor model parallel size (TP).")
    pipeline_model_parallel_size: int = option(1, "Pipeline model parallel size (PP).")
    sequence_parallel: bool = option(
        False, "Split the activations outside tensor-parallel regions (norms, residuals) along the "
        "sequence over the TP ranks (Megatron-LM's sequence parallelism). Needs "
        "--tensor-model-parallel-size > 1; at TP=1 it is switched off with a warning, as in "
        "Megatron-LM. Thought sampling runs with it off, on the same weights.")
    use_distributed_optimizer: bool = option(False, "Shard optimizer state over data-parallel ranks.")
    overlap_grad_reduce: bool = option(
        False, "Reduce each gradient bucket over data-parallel ranks as soon as the last "
        "micro-batch's backward has filled it, overlapping communication with backward compute."
    )
    overlap_param_gather: bool = option(
        False, "Gather the parameters the distributed optimizer updated in shards during the next "
        "forward (per bucket) instead of right after the step. Requires --use-distributed-optimizer "
        "and --overlap-grad-reduce."
    )
    decoder_first_pipeline_num_layers: Optional[int] = option(
        None, "Layers on the first pipeline stage (uneven split); the remaining layers are divided "
        "evenly among the other stages (or the middle ones, with --decoder-last-pipeline-num-layers)."
    )
    decoder_last_pipeline_num_layers: Optional[int] = option(
        None, "Layers on the last pipeline stage (uneven split); the remaining layers are divided "
        "evenly among the other stages."
    )


@dataclass
class ModelConfig:
    """The model: a preset, Megatron-LM's architecture flags, or the --load checkpoint's
    architecture (resolved by :func:`megatron_rlp.models.architecture.resolve_architecture`).

    Every architecture flag defaults to None ("not given"): given with --model-preset it replaces
    that field of the preset; without a preset the flags define the model, with Megatron-LM's
    defaults for the ones left out."""

    model_preset: Optional[str] = option(
        None, "Named architecture as a shorthand: tiny, qwen3-1.7b, tiny-hybrid, "
        "nemotron-nano-12b-v2; architecture flags given with it replace its fields."
    )
    use_checkpoint_args: bool = option(
        False, "Take the architecture from the checkpoint in --load (as the converter or a "
        "training run wrote it); as in Megatron-LM its values override the architecture flags."
    )
    num_layers: Optional[int] = option(None, "Number of transformer (or hybrid) layers.")
    hidden_size: Optional[int] = option(None, "Hidden size.")
    ffn_hidden_size: Optional[int] = option(
        None, "MLP hidden size (without a preset: 4 x hidden, or Megatron-LM's 8/3 x hidden "
        "rounded down to a multiple of 64 with --swiglu).")
    num_attention_heads: Optional[int] = option(None, "Number of attention heads.")
    group_query_attention: Optional[bool] = option(
        None, "Grouped-query attention with --num-query-groups KV groups.")
    num_query_groups: Optional[int] = option(
        None, "KV groups under --group-query-attention (needs it, as in Megatron-LM).")
    kv_channels: Optional[int] = option(
        None, "Attention head dimension (without a preset: hidden size / heads).")
    max_position_embeddings: Optional[int] = option(
        None, "Maximum sequence length the model supports (without a preset: --seq-length).")
    rotary_base: Optional[float] = option(None, "RoPE base (without a preset: 10000).")
    norm_epsilon: Optional[float] = option(None, "RMSNorm epsilon (without a preset: 1e-5).")
    swiglu: Optional[bool] = option(None, "SwiGLU MLP (Qwen3).")
    squared_relu: Optional[bool] = option(None, "Squared-ReLU MLP (Nemotron-H).")
    qk_layernorm: Optional[bool] = option(None, "RMSNorm on each head's queries and keys (Qwen3).")
    untie_embeddings_and_output_weights: Optional[bool] = option(
        None, "Separate input embedding and output layer weights.")
    hybrid_override_pattern: Optional[str] = option(
        None, "Hybrid (Mamba) model layer pattern, one symbol per layer: M = Mamba, * = "
        "attention, - = MLP (e.g. 'M-M*-'); its length is the number of layers.")
    mamba_num_heads: Optional[int] = option(
        None, "Mamba heads (without a preset: 2 x hidden / --mamba-head-dim).")
    mamba_head_dim: Optional[int] = option(None, "Mamba head dimension (without a preset: 64).")
    mamba_state_dim: Optional[int] = option(None, "Mamba state dimension (without a preset: 128).")
    mamba_num_groups: Optional[int] = option(None, "Mamba groups (without a preset: 8).")
    make_vocab_size_divisible_by: int = option(
        128, "Without a preset or --model-vocab-size, the model vocabulary is the tokenizer's "
        "padded to a multiple of this x --tensor-model-parallel-size (Megatron-LM's rule).")
    bf16: bool = option(False, "bf16 parameters and activations, fp32 main params in the optimizer.")
    vocab_size: Optional[int] = option(None, "NullTokenizer: number of token ids before the end-of-document id (Megatron-LM's --vocab-size).")
    model_vocab_size: Optional[int] = option(
        None, "The model's (padded) vocabulary; it must hold every tokenizer id (default: the "
        "preset's, or the tokenizer's padded as --make-vocab-size-divisible-by says)."
    )
    layout_invariant_init: bool = option(
        False, "Draw each weight from a generator keyed by its global name, so the initial model "
        "is bitwise the same at any TP/PP layout (costs a full-size draw per shard at start)."
    )


@dataclass
class TrainingConfig:
    micro_batch_size: int = option(1, "Samples per micro-batch per data-parallel rank.")
    global_batch_size: int = option(8, "Samples per optimizer step across all data-parallel ranks.")
    seq_length: int = option(128, "Tokens per training sample.")
    train_iters: int = option(100, "Number of optimizer steps to run (total, including resumed ones).")
    optimizer: str = option("adam", "Optimizer.", choices=["adam", "sgd"])
    sgd_momentum: float = option(0.9, "Momentum of the SGD optimizer.")
    lr: Optional[float] = option(None, "Peak learning rate (required, as in Megatron-LM; the RLP recipe uses 1e-6).")
    min_lr: float = option(0.0, "Minimum learning rate at the end of decay.")
    lr_decay_style: str = option("linear", "Learning rate decay style (Megatron-LM's default: linear).", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    lr_warmup_iters: int = option(0, "Linear warm-up iterations.")
    lr_decay_iters: Optional[int] = option(None, "Decay iterations (default: --train-iters).")
    weight_decay: float = option(0.01, "Weight decay.")
    adam_beta1: float = option(0.9, "Adam beta1.")
    adam_beta2: float = option(0.999, "Adam beta2 (Megatron-LM's default; LLM recipes often pass 0.95).")
    adam_eps: float = option(1e-8, "Adam epsilon.")
    clip_grad: float = option(1.0, "Gradient clipping by global norm (0 disables).")
    seed: int = option(1234, "Random seed.")
    override_opt_param_scheduler: bool = option(
        False, "On resume, take the learning-rate / weight-decay schedule from the flags, not from the "
        "checkpoint (e.g. after raising --train-iters or changing --lr).",
        flag="--override-opt_param-scheduler")
    use_checkpoint_opt_param_scheduler: bool = option(
        False, "On resume, keep the checkpoint's learning-rate / weight-decay schedule whatever the flags say.",
        flag="--use-checkpoint-opt_param-scheduler")
    check_for_nan_in_loss_and_grad: bool = option(
        True, "Check each rank's gradients for NaN/Inf before the data-parallel reduction and stop "
        "with an error naming the iteration (Megatron-LM's default; --no-check-for-nan-in-loss-and-grad "
        "turns it off)."
    )
    recompute_granularity: Optional[str] = option(
        None, "Activation recompute: 'full' re-runs whole layers in backward (choose them with "
        "--recompute-method and --recompute-num-layers); 'selective' re-runs the core attention "
        "of every layer.", choices=["full", "selective"])
    recompute_method: Optional[str] = option(
        None, "With --recompute-granularity full: 'uniform' recomputes every layer, in chunks of "
        "--recompute-num-layers layers; 'block' recomputes the first --recompute-num-layers "
        "layers of each pipeline stage.", choices=["uniform", "block"])
    recompute_num_layers: Optional[int] = option(
        None, "uniform: layers per recomputed chunk; block: recomputed layers per pipeline stage.")


@dataclass
class DataConfig:
    data_path: Optional[str] = option(None, "Prefix of a Megatron .bin/.idx dataset (without extension).")
    tokenizer_type: str = option("NullTokenizer", "SentencePieceTokenizer, GPTSentencePieceTokenizer, HuggingFaceTokenizer or NullTokenizer.")
    tokenizer_model: Optional[str] = option(None, "Tokenizer model file (SentencePiece) or local directory (HuggingFace).")
    shuffle_documents: bool = option(True, "Shuffle document order each epoch (seeded).")
    split: Optional[str] = option(
        None, "Train/validation/test proportions of the documents of --data-path, e.g. '969,30,1' "
        "(Megatron-LM's --split: normalised, each split a contiguous range of documents in dataset "
        "order; training reads only its own range). Default: every document trains (Megatron-LM "
        "defaults to '969,30,1').")
    valid_data_path: Optional[str] = option(
        None, "Prefix of a separate .bin/.idx validation dataset (instead of a --split share of "
        "--data-path).")


@dataclass
class EvaluationConfig:
    eval_interval: Optional[int] = option(
        None, "Evaluate on the validation data every N iterations and at the end of training "
        "(Megatron-LM's default is 1000; here no evaluation unless given). Needs --split with a "
        "validation share or --valid-data-path.")
    eval_iters: int = option(
        100, "Iterations (of --global-batch-size samples) per evaluation; every evaluation reads the "
        "same held-out samples, from the start of the validation data.")


@dataclass
class LoggingConfig:
    log_interval: int = option(1, "Print a log line every N iterations.")
    tensorboard_dir: Optional[str] = option(None, "Write TensorBoard scalars here.")
    log_throughput: bool = option(True, "Report TFLOP/s/GPU in the log line.")
    timing_log_level: int = option(
        1, "Phase timers (forward-backward, optimizer, RLP's teacher, sampling, EMA) in the log line and "
        "TensorBoard: 0 off; 1 on the logged iterations only (they synchronize the GPU at each phase "
        "boundary, the others run untimed); 2 on every iteration, the log line showing the mean over "
        "--log-interval (Megatron-LM's default is 0).", choices=[0, 1, 2])
    log_timers_to_tensorboard: bool = option(True, "Write the phase timers to TensorBoard as timers/<phase> "
                                             "(Megatron-LM's default is off).")
    wandb_project: Optional[str] = option(
        None, "Send the TensorBoard scalars to this Weights & Biases project as well (needs the "
        "wandb package: pip install megatron-rlp[wandb]).")
    wandb_exp_name: Optional[str] = option(None, "W&B run name (required with --wandb-project, as in Megatron-LM).")
    wandb_save_dir: Optional[str] = option(None, "W&B's local directory (default: <--save>/wandb).")


@dataclass
class CheckpointConfig:
    save: Optional[str] = option(None, "Directory to save checkpoints to (the run's own directory; usually the same as --load).")
    load: Optional[str] = option(None, "Directory to resume from (the run's own directory). When it holds no checkpoint yet "
                                 "and is the --save directory, the run starts fresh (from --pretrained-checkpoint if given).")
    pretrained_checkpoint: Optional[str] = option(
        None, "A checkpoint to start from (e.g. a converted base model): its weights are loaded, with a fresh "
        "optimizer, scheduler and data cursor, only when --load holds no checkpoint of this run yet."
    )
    save_interval: Optional[int] = option(None, "Save every N iterations (and at the end).")
    finetune: bool = option(False, "Load model weights only and start at iteration 0 with a fresh optimizer, scheduler and data cursor (e.g. RLP from a pretrained checkpoint).")
    no_load_optim: bool = option(False, "Do not load optimizer state.")
    no_load_rng: bool = option(False, "Do not load RNG state.")
    exit_signal_handler: bool = option(True, "On SIGTERM/SIGUSR1 (slurm preemption) save and exit cleanly "
                                       "(Megatron-LM's default is off).")
    ckpt_step: Optional[int] = option(None, "Load this iteration of --load instead of the latest (e.g. when the latest is damaged).")
    async_save: bool = option(False, "Write checkpoints in the background (megatron-core's async torch_dist save); "
                              "the checkpoint becomes the latest only when every rank has finished writing it.")
    ckpt_keep_last: Optional[int] = option(None, "Keep only the last N checkpoints under --save (default: keep all).")
    ckpt_keep_every: Optional[int] = option(None, "With --ckpt-keep-last: also keep every checkpoint whose iteration is a multiple of M.")
    exit_interval: Optional[int] = option(None, "Save and exit when the iteration number is a multiple of N.")
    exit_duration_in_mins: Optional[float] = option(
        None, "Save and exit after this many minutes of the process's run time (set it below the job's time limit).")
    exit_model_flops: Optional[float] = option(
        None, "Save and exit once the run has done this many model FLOPs (the cost model's count behind the log "
        "line's TFLOP/s, every phase, whole job; cumulative across restarts of the run), e.g. 3e18: a FLOP budget.")


CONFIG_GROUPS = {
    "parallel": ParallelConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "logging": LoggingConfig,
    "evaluation": EvaluationConfig,
    "checkpoint": CheckpointConfig,
}


def _flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def add_dataclass_args(parser: argparse.ArgumentParser, cls, title: Optional[str] = None) -> None:
    group = parser.add_argument_group(title or cls.__name__)
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = _flag(field)
        kind = hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if kind is bool or kind == Optional[bool]:  # Optional: None means "not given"
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                               default=default, help=field.metadata["help"])
            continue
        base = kind
        if getattr(kind, "__origin__", None) is not None:  # Optional[X]
            base = next(a for a in kind.__args__ if a is not type(None))
        group.add_argument(flag, dest=field.name, type=base, default=default,
                           choices=field.metadata.get("choices"), help=field.metadata["help"])


def from_namespace(cls, namespace: argparse.Namespace):
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})
