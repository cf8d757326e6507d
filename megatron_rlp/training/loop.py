"""The pretraining loop, built from megatron-core's own pieces.

parallel_state (TP/PP/DP groups) -> model chunks from a preset -> DistributedDataParallel ->
get_megatron_optimizer + OptimizerParamScheduler -> per iteration: the objective's
micro-batches -> get_forward_backward_func (the pipeline schedule) -> optimizer step ->
objective.after_optimizer_step (e.g. the EMA teacher) -> log line / TensorBoard -> checkpoint.

The objective (next-token prediction or RLP) is one hook object; the loop has no
objective-specific branches.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.num_microbatches_calculator import (
    destroy_num_microbatches_calculator,
    get_num_microbatches,
    init_num_microbatches_calculator,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rlp import collectives
from megatron_rlp import config as cfg
from megatron_rlp.models.init import initialize_layout_invariant
from megatron_rlp.models.builder import build_model, transformer_config, validate_parallel_layout
from megatron_rlp.models.presets import ModelPreset, get_preset
from megatron_rlp.training import checkpoint as ckpt
from megatron_rlp.training import parallel
from megatron_rlp.training.flops import training_flops
from megatron_rlp.training.logging import MetricsWriter, format_log_line


class TrainingError(RuntimeError):
    pass


@dataclass
class RunConfig:
    parallel: cfg.ParallelConfig = field(default_factory=cfg.ParallelConfig)
    model: cfg.ModelConfig = field(default_factory=cfg.ModelConfig)
    training: cfg.TrainingConfig = field(default_factory=cfg.TrainingConfig)
    data: cfg.DataConfig = field(default_factory=cfg.DataConfig)
    logging: cfg.LoggingConfig = field(default_factory=cfg.LoggingConfig)
    checkpoint: cfg.CheckpointConfig = field(default_factory=cfg.CheckpointConfig)
    extra: dict = field(default_factory=dict)  # objective-specific configs (e.g. "rlp")


def resolve_preset(model: cfg.ModelConfig, tokenizer_vocab: Optional[int] = None) -> ModelPreset:
    preset = get_preset(model.model_preset)
    overrides = {
        k: getattr(model, k)
        for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels")
        if getattr(model, k) is not None
    }
    if model.model_vocab_size is not None:
        overrides["vocab_size"] = model.model_vocab_size
    if model.untie_embeddings_and_output_weights:
        overrides["tie_embeddings"] = False
    preset = preset.replace(**overrides)
    if tokenizer_vocab is not None and tokenizer_vocab > preset.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer_vocab} tokens but model preset {preset.name!r} has a "
            f"vocabulary of {preset.vocab_size}; pass --vocab-size {tokenizer_vocab} (or larger) "
            "or use a matching tokenizer"
        )
    return preset


def model_signature(preset: ModelPreset) -> dict:
    """Architecture facts stored in checkpoints and compared on load."""
    sig = dataclasses.asdict(preset)
    sig.pop("name")
    sig.pop("max_position_embeddings")
    return sig


@dataclass
class TrainState:
    run: RunConfig
    preset: ModelPreset
    model: list  # DDP-wrapped model chunks
    optimizer: Any
    scheduler: OptimizerParamScheduler
    transformer_config: Any
    iteration: int = 0


def _validate_batch(run: RunConfig, dp: int) -> None:
    t = run.training
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ValueError(
            f"--global-batch-size {t.global_batch_size} is not a multiple of --micro-batch-size "
            f"{t.micro_batch_size} x data-parallel size {dp}"
        )
    for name in ("micro_batch_size", "global_batch_size", "seq_length", "train_iters"):
        if getattr(t, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(t, name)}")
    if run.logging.log_interval < 1:
        raise ValueError(f"--log-interval must be >= 1, got {run.logging.log_interval}")


def setup(run: RunConfig, preset: ModelPreset) -> TrainState:
    """Process groups, model, DDP, optimizer and scheduler (no checkpoint loading)."""
    _, world_size = parallel.init_distributed()
    tp, pp = run.parallel.tensor_model_parallel_size, run.parallel.pipeline_model_parallel_size
    validate_parallel_layout(preset, tp, pp, world_size)
    if preset.vocab_size % tp:
        raise ValueError(f"vocabulary size {preset.vocab_size} is not divisible by --tensor-model-parallel-size {tp}")
    dp = world_size // (tp * pp)
    _validate_batch(run, dp)
    parallel.init_model_parallel(tp, pp)
    parallel.set_seed(run.training.seed)
    destroy_num_microbatches_calculator()
    init_num_microbatches_calculator(
        dist.get_rank(), None, run.training.global_batch_size, run.training.micro_batch_size, dp
    )

    dtype = torch.bfloat16 if run.model.bf16 else torch.float32
    tconfig = transformer_config(preset, tp=tp, pp=pp, params_dtype=dtype)
    model = build_model(preset, tconfig)
    if run.model.layout_invariant_init:
        initialize_layout_invariant(model, run.training.seed, preset.num_layers)
    if run.model.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(tconfig, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=run.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    model = DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=model)
    chunks = [model]

    t = run.training
    opt_config = OptimizerConfig(
        optimizer=t.optimizer,
        sgd_momentum=t.sgd_momentum,
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=run.model.bf16,
        params_dtype=dtype,
        use_distributed_optimizer=run.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, chunks)
    decay_iters = t.lr_decay_iters or t.train_iters
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if t.lr_warmup_iters else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=max(decay_iters, t.lr_warmup_iters + 1),
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=decay_iters,
        wd_incr_style="constant",
        wsd_decay_steps=max(1, decay_iters // 10) if t.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if t.lr_decay_style == "WSD" else None,
    )
    tconfig.grad_scale_func = optimizer.scale_loss
    tconfig.no_sync_func = model.no_sync
    # Without it, TP replicas of layer norms (e.g. QK-norm) drift apart and DP grads are unreduced.
    tconfig.finalize_model_grads_func = finalize_model_grads
    return TrainState(run, preset, chunks, optimizer, scheduler, tconfig)


def is_logging_rank() -> bool:
    return dist.get_rank() == dist.get_world_size() - 1


def _reduce_reports(reports: list[dict]) -> dict[str, float]:
    """Sum [sum, count] pairs over micro-batches and data-parallel ranks (last stage only)."""
    if not reports:
        return {}
    keys = sorted(reports[0])
    totals = torch.stack([sum(r[k].float() for r in reports) for k in keys])  # [K, 2], on the device
    collectives.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    return {k: (totals[i, 0] / totals[i, 1].clamp(min=1)).item() for i, k in enumerate(keys)}


def _broadcast_from_logging_rank(values: dict) -> dict:
    return collectives.broadcast_object(values, src=dist.get_world_size() - 1)


class _PreemptionFlag:
    """SIGTERM / SIGUSR1 (slurm's warning before preemption) -> save at the next iteration end."""

    def __init__(self, enabled: bool):
        self.raised = False
        self._previous = {}
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                try:
                    self._previous[sig] = signal.signal(sig, self._handler)
                except ValueError:  # not in the main thread
                    pass

    def _handler(self, signum, frame):
        self.raised = True

    def any_rank(self) -> bool:
        # On the device: the default group is NCCL in a GPU run, and NCCL has no CPU backend.
        return collectives.any_rank(self.raised)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(state: TrainState, objective, on_iteration: Optional[Callable[[int, dict], None]] = None) -> list[dict]:
    """Run until --train-iters; returns the per-iteration metrics (identical on every rank)."""
    run = state.run
    t, log_cfg, ck = run.training, run.logging, run.checkpoint
    signature = model_signature(state.preset)
    if ck.load:
        state.iteration = ckpt.load_checkpoint(
            ck.load, state.model, state.optimizer, state.scheduler, objective, signature,
            load_optimizer=not ck.no_load_optim, load_rng=not ck.no_load_rng, finetune=ck.finetune,
        )
    writer = MetricsWriter(log_cfg.tensorboard_dir, enabled=is_logging_rank())
    preempt = _PreemptionFlag(ck.exit_signal_handler)
    forward_backward = get_forward_backward_func()
    history: list[dict] = []
    world = dist.get_world_size()
    try:
        while state.iteration < t.train_iters:
            start = time.perf_counter()
            num_mb = get_num_microbatches()
            for chunk in state.model:
                chunk.zero_grad_buffer()
            state.optimizer.zero_grad()
            microbatches = objective.microbatches(state.iteration, num_mb, state.model)
            reports = forward_backward(
                forward_step_func=objective.forward_step,
                data_iterator=iter(microbatches),
                model=state.model,
                num_microbatches=num_mb,
                seq_length=microbatches[0]["tokens"].shape[1],
                micro_batch_size=microbatches[0]["tokens"].shape[0],
                forward_only=False,
            )
            metrics = _reduce_reports(reports) if parallel_state.is_pipeline_last_stage() else {}
            metrics = _broadcast_from_logging_rank(metrics if is_logging_rank() else {})
            bad = [k for k, v in metrics.items() if not math.isfinite(v)]
            if bad:
                raise TrainingError(
                    f"iteration {state.iteration + 1}: non-finite {', '.join(bad)} "
                    f"({', '.join(f'{k}={metrics[k]}' for k in bad)}); stopped before the optimizer "
                    "step, the last saved checkpoint is intact — lower --lr or check the data"
                )
            update_ok, grad_norm, _ = state.optimizer.step()
            if grad_norm is not None and not math.isfinite(grad_norm):
                raise TrainingError(
                    f"iteration {state.iteration + 1}: gradient norm is {grad_norm}; the update was "
                    "skipped and the last saved checkpoint is intact — lower --lr or check the data"
                )
            state.scheduler.step(increment=1)
            state.iteration += 1
            metrics.update(objective.after_optimizer_step(state.model, state.iteration))
            elapsed = time.perf_counter() - start

            tokens, seq = objective.tokens_per_step(t.global_batch_size)
            tflops = training_flops(state.preset, tokens, seq) / (elapsed * world) / 1e12
            lr = state.optimizer.param_groups[0]["lr"]
            record = dict(metrics, iteration=state.iteration, lr=lr, grad_norm=grad_norm,
                          elapsed_ms=elapsed * 1000, tflops_per_gpu=tflops)
            history.append(record)
            if on_iteration is not None:
                on_iteration(state.iteration, record)
            if state.iteration % log_cfg.log_interval == 0 or state.iteration == t.train_iters:
                writer.log(format_log_line(
                    state.iteration, t.train_iters, state.iteration * t.global_batch_size,
                    elapsed * 1000, tflops if log_cfg.log_throughput else None, lr,
                    t.global_batch_size, metrics, grad_norm, skipped=0 if update_ok else 1,
                ))
                writer.scalars(state.iteration, dict(metrics, **{
                    "learning-rate": lr, "grad-norm": grad_norm, "throughput/tflops_per_gpu": tflops,
                    "iteration-time-ms": elapsed * 1000,
                }))
            stop = preempt.any_rank()
            due = ck.save and (
                (ck.save_interval and state.iteration % ck.save_interval == 0)
                or state.iteration == t.train_iters or stop
            )
            if due:
                path = ckpt.save_checkpoint(ck.save, state.iteration, state.model, state.optimizer,
                                            state.scheduler, objective, signature)
                writer.log(f"saved checkpoint {path}")
            if stop:
                writer.log(f"exiting at iteration {state.iteration} on a termination signal")
                break
    finally:
        preempt.restore()
        writer.close()
    return history
