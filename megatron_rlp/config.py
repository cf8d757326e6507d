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
    use_distributed_optimizer: bool = option(False, "Shard optimizer state over data-parallel ranks.")


@dataclass
class ModelConfig:
    model_preset: str = option("tiny", "Model preset: tiny, qwen3-1.7b, tiny-hybrid, nemotron-nano-12b-v2.")
    num_layers: Optional[int] = option(None, "Override the preset's number of layers.")
    hidden_size: Optional[int] = option(None, "Override the preset's hidden size.")
    ffn_hidden_size: Optional[int] = option(None, "Override the preset's FFN hidden size.")
    num_attention_heads: Optional[int] = option(None, "Override the preset's attention heads.")
    num_query_groups: Optional[int] = option(None, "Override the preset's KV groups.")
    kv_channels: Optional[int] = option(None, "Override the preset's head dimension.")
    untie_embeddings_and_output_weights: bool = option(False, "Untie input and output embeddings.")
    bf16: bool = option(False, "bf16 parameters and activations, fp32 main params in the optimizer.")
    vocab_size: Optional[int] = option(None, "NullTokenizer: number of token ids before the end-of-document id (Megatron-LM's --vocab-size).")
    model_vocab_size: Optional[int] = option(
        None, "Override the preset's (padded) model vocabulary; it must hold every tokenizer id."
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


@dataclass
class DataConfig:
    data_path: Optional[str] = option(None, "Prefix of a Megatron .bin/.idx dataset (without extension).")
    tokenizer_type: str = option("NullTokenizer", "SentencePieceTokenizer, GPTSentencePieceTokenizer, HuggingFaceTokenizer or NullTokenizer.")
    tokenizer_model: Optional[str] = option(None, "Tokenizer model file (SentencePiece) or local directory (HuggingFace).")
    shuffle_documents: bool = option(True, "Shuffle document order each epoch (seeded).")


@dataclass
class LoggingConfig:
    log_interval: int = option(1, "Print a log line every N iterations.")
    tensorboard_dir: Optional[str] = option(None, "Write TensorBoard scalars here.")
    log_throughput: bool = option(True, "Report TFLOP/s/GPU in the log line.")


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


CONFIG_GROUPS = {
    "parallel": ParallelConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "logging": LoggingConfig,
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
        if kind is bool:
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
