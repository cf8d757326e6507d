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
import os
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
from megatron_rlp import platform
from megatron_rlp.models.init import initialize_layout_invariant
from megatron_rlp.models.builder import build_model, transformer_config, validate_parallel_layout
from megatron_rlp.models.architecture import architecture_args, resolve_architecture
from megatron_rlp.models.presets import ModelPreset
from megatron_rlp.training import checkpoint as ckpt
from megatron_rlp.training import parallel
from megatron_rlp.training.logging import (
    MetricsWriter, format_log_line, format_validation_line, validation_scalars,
)
from megatron_rlp.training.timers import Timers


class TrainingError(RuntimeError):
    pass


@dataclass
class RunConfig:
    parallel: cfg.ParallelConfig = field(default_factory=cfg.ParallelConfig)
    model: cfg.ModelConfig = field(default_factory=cfg.ModelConfig)
    training: cfg.TrainingConfig = field(default_factory=cfg.TrainingConfig)
    data: cfg.DataConfig = field(default_factory=cfg.DataConfig)
    logging: cfg.LoggingConfig = field(default_factory=cfg.LoggingConfig)
    evaluation: cfg.EvaluationConfig = field(default_factory=cfg.EvaluationConfig)
    checkpoint: cfg.CheckpointConfig = field(default_factory=cfg.CheckpointConfig)
    extra: dict = field(default_factory=dict)  # objective-specific configs (e.g. "rlp")


def resolve_preset(
    model: cfg.ModelConfig,
    tokenizer_vocab: Optional[int] = None,
    *,
    tp: int = 1,
    seq_length: Optional[int] = None,
    load: Optional[str] = None,
) -> ModelPreset:
    """The run's architecture: --model-preset, Megatron-LM's architecture flags, or (with
    --use-checkpoint-args) the --load checkpoint's; see megatron_rlp.models.architecture."""
    preset = resolve_architecture(model, tokenizer_vocab, tp=tp, seq_length=seq_length, load=load)
    if tokenizer_vocab is not None and tokenizer_vocab > preset.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer_vocab} tokens but model {preset.name!r} has a "
            f"vocabulary of {preset.vocab_size}; pass --model-vocab-size {tokenizer_vocab} (or "
            "larger) or use a matching tokenizer"
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
    sync_parameters: "ParameterSync"
    iteration: int = 0
    consumed_model_flops: float = 0.0  # cost-model FLOPs since the run began (--exit-model-flops)


def validate_overlap(par: cfg.ParallelConfig) -> None:
    """Megatron-LM's rules for the overlap flags."""
    if par.overlap_param_gather and not par.use_distributed_optimizer:
        raise ValueError(
            "--overlap-param-gather needs --use-distributed-optimizer (only the distributed "
            "optimizer gathers parameters after its step)"
        )
    if par.overlap_param_gather and not par.overlap_grad_reduce:
        raise ValueError("--overlap-param-gather needs --overlap-grad-reduce as well")


class ParameterSync:
    """Forces the parameter all-gather that --overlap-param-gather defers.

    With it the distributed optimizer's step updates only each data-parallel rank's shard of the
    parameters; the other shards stay stale until the next forward's pre-hooks gather them.
    Anything that reads θ outside that forward (the EMA update, the thought sampler, a checkpoint,
    the caller after training) calls this first.  A no-op without the flag or when θ is already
    gathered since the last step, so callers need not coordinate.
    """

    def __init__(self, model_chunks: list, overlapped: bool):
        self.model_chunks = model_chunks
        self.overlapped = overlapped
        self.stale = False

    def mark_stale(self) -> None:
        """After optimizer.step()."""
        self.stale = self.overlapped

    def __call__(self) -> None:
        if not self.stale:
            return
        for chunk in self.model_chunks:
            # A gather a forward hook prefetched before the step but no module's hook ever
            # waited for (RLP never calls the output layer module: log-probs come from the fused
            # kernel) holds pre-step shards: megatron's force_sync would only wait on it and
            # return.  Finish those first, so the forced gather below reads this step's shards.
            for group in chunk.bucket_groups + chunk.expert_parallel_bucket_groups:
                if group.param_gather_handle is not None:
                    group.param_gather_handle.wait()
                    group.param_gather_handle = None
            # Synchronous all-gather of every bucket; the next forward's hooks then find the
            # buckets dispatched and gather nothing again.
            chunk.start_param_sync(force_sync=True)
        self.stale = False


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
    if t.override_opt_param_scheduler and t.use_checkpoint_opt_param_scheduler:
        raise ValueError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler "
                         "contradict each other; pass one")
    ck = run.checkpoint
    if ck.ckpt_keep_every and not ck.ckpt_keep_last:
        raise ValueError("--ckpt-keep-every only adds to --ckpt-keep-last N (without it every checkpoint is kept)")
    for flag, value in (("--exit-interval", ck.exit_interval), ("--exit-duration-in-mins", ck.exit_duration_in_mins),
                        ("--exit-model-flops", ck.exit_model_flops),
                        ("--ckpt-keep-last", ck.ckpt_keep_last), ("--ckpt-keep-every", ck.ckpt_keep_every)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
        if value is not None and not ck.save and flag.startswith("--exit"):
            raise ValueError(f"{flag} saves a checkpoint before exiting: pass --save")
    if run.logging.log_interval < 1:
        raise ValueError(f"--log-interval must be >= 1, got {run.logging.log_interval}")


def setup(run: RunConfig, preset: ModelPreset) -> TrainState:
    """Process groups, model, DDP, optimizer and scheduler (no checkpoint loading)."""
    _, world_size = parallel.init_distributed()
    par = run.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    validate_parallel_layout(preset, tp, pp, world_size, par.decoder_first_pipeline_num_layers,
                             par.decoder_last_pipeline_num_layers)
    validate_overlap(par)
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
    t = run.training
    tconfig = transformer_config(
        preset, tp=tp, pp=pp, params_dtype=dtype, sequence_parallel=run.parallel.sequence_parallel,
        first_stage_layers=par.decoder_first_pipeline_num_layers,
        last_stage_layers=par.decoder_last_pipeline_num_layers,
        recompute_granularity=t.recompute_granularity, recompute_method=t.recompute_method,
        recompute_num_layers=t.recompute_num_layers,
    )
    if tconfig.sequence_parallel and t.seq_length % tp:
        raise ValueError(
            f"--sequence-parallel splits each sequence over the {tp} tensor-parallel ranks: "
            f"--seq-length {t.seq_length} must be a multiple of --tensor-model-parallel-size {tp}"
        )
    model = build_model(preset, tconfig)
    if run.model.layout_invariant_init:
        initialize_layout_invariant(model, run.training.seed, preset.num_layers)
    if run.model.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(tconfig, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather,
        use_distributed_optimizer=par.use_distributed_optimizer,
        check_for_nan_in_grad=run.training.check_for_nan_in_loss_and_grad,
    )
    model = DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=model)
    chunks = [model]

    t = run.training
    # Evaluation and conversion build the optimizer without stepping it; train() requires --lr.
    lr = t.lr if t.lr is not None else 0.0
    opt_config = OptimizerConfig(
        optimizer=t.optimizer,
        sgd_momentum=t.sgd_momentum,
        lr=lr,
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
        init_lr=0.0 if t.lr_warmup_iters else lr,
        max_lr=lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=max(decay_iters, t.lr_warmup_iters + 1),
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=decay_iters,
        wd_incr_style="constant",
        # Megatron-LM's resume rule: a schedule that differs from the checkpoint's is refused
        # unless one of the two flags chooses (checked with a clear message in load_checkpoint).
        override_opt_param_scheduler=t.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=t.use_checkpoint_opt_param_scheduler,
        wsd_decay_steps=max(1, decay_iters // 10) if t.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if t.lr_decay_style == "WSD" else None,
    )
    tconfig.grad_scale_func = optimizer.scale_loss
    # The schedule defers the gradient reduction to the last micro-batch; with
    # --overlap-grad-reduce that micro-batch's backward hooks launch it bucket by bucket.
    tconfig.no_sync_func = model.no_sync
    # Without it, TP replicas of layer norms (e.g. QK-norm) drift apart and DP grads are unreduced.
    tconfig.finalize_model_grads_func = finalize_model_grads
    return TrainState(run, preset, chunks, optimizer, scheduler, tconfig,
                      sync_parameters=ParameterSync(chunks, par.overlap_param_gather))


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


def _with_loss_check(forward_step, iteration: Callable[[], int]):
    """--check-for-nan-in-loss-and-grad, the loss half (as Megatron-LM's loss functions do): each
    micro-batch's loss and reported values must be finite, checked before its backward."""

    def checked_forward_step(data_iterator, model):
        output, loss_func = forward_step(data_iterator, model)

        def checked_loss_func(*args, **kwargs):
            result = loss_func(*args, **kwargs)
            loss, report = result[0], result[-1]
            values = {"loss": loss.detach().float().reshape(-1)}
            values.update({k: v.detach().float().reshape(-1)[:1] for k, v in report.items()})
            finite = torch.isfinite(torch.cat(list(values.values())))
            if not finite.all():  # one host sync per micro-batch, as in Megatron-LM
                bad = [k for k, v in values.items() if not torch.isfinite(v).all()]
                names = [k for k in bad if k != "loss"] or bad
                raise TrainingError(
                    f"iteration {iteration()}: non-finite {', '.join(names)} on rank "
                    f"{dist.get_rank()} in the forward pass (--check-for-nan-in-loss-and-grad); "
                    "stopped before the optimizer step, the last saved checkpoint is intact — "
                    "lower --lr or check the data"
                )
            return result

        return output, checked_loss_func

    return checked_forward_step


def _explain_gradient_check(error: RuntimeError, iteration: int) -> Exception:
    """megatron-core's --check-for-nan-in-loss-and-grad failure, restated with our iteration
    (its own message counts iterations of a rerun state machine this loop does not drive)."""
    text = str(error)
    if "before data-parallel communication collective" not in text:
        return error
    kind = "NaN" if "found NaN" in text else "Inf"
    return TrainingError(
        f"iteration {iteration}: rank {dist.get_rank()}'s gradients hold {kind} before the "
        f"data-parallel reduction (--check-for-nan-in-loss-and-grad; megatron-core: {text}); "
        "stopped before the optimizer step, the last saved checkpoint is intact — lower --lr or "
        "check the data"
    )


def resolve_start(ck: cfg.CheckpointConfig) -> tuple[str, Optional[str]]:
    """Where a run starts, as in Megatron-LM: ("resume", --load) when the run's own directory holds
    a checkpoint; ("weights", dir) for weights only with a fresh optimizer, scheduler and data
    cursor (--finetune, or --pretrained-checkpoint while --load holds no checkpoint yet);
    ("fresh", None) otherwise.  A requeued job therefore resumes where it stopped."""
    if ck.load and ckpt.read_tracker(ck.load) is not None:
        return ("weights" if ck.finetune else "resume"), ck.load
    if ck.pretrained_checkpoint:
        if ckpt.read_tracker(ck.pretrained_checkpoint) is None:
            raise ckpt.CheckpointError(
                f"--pretrained-checkpoint {ck.pretrained_checkpoint!r} holds no checkpoint "
                f"({ckpt.TRACKER} is missing); point it at a directory written by "
                "tools/convert_checkpoint.py or by --save"
            )
        return "weights", ck.pretrained_checkpoint
    if ck.load and not _same_directory(ck.load, ck.save):
        raise ckpt.CheckpointError(
            f"--load {ck.load!r} holds no checkpoint ({ckpt.TRACKER} is missing); point --load at "
            "a directory written by --save (the run's own directory, usually --load = --save), pass "
            "the base model as --pretrained-checkpoint, or drop --load to start from scratch"
        )
    return "fresh", None


def _same_directory(a: Optional[str], b: Optional[str]) -> bool:
    return a is not None and b is not None and os.path.abspath(a) == os.path.abspath(b)


def _process_start_time() -> float:
    import psutil

    return psutil.Process().create_time()


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

    def any_rank(self, also: bool = False) -> bool:
        """True on every rank when any rank got the signal (or has ``also`` set)."""
        # On the device: the default group is NCCL in a GPU run, and NCCL has no CPU backend.
        return collectives.any_rank(self.raised or also)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def peak_memory_line(iteration: int) -> str:
    """Every rank's measured peak memory, gathered and summarised per pipeline stage, to compare
    with ``--dry-run``'s estimate.  A collective: every rank calls it.  On a GPU
    torch.cuda.max_memory_allocated; on CPU the process's peak resident set size (labelled so:
    it includes the interpreter and libraries, and is no GPU estimate)."""
    if platform.cuda_available():
        peak, what = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        peak, what = rss * (1 if sys.platform == "darwin" else 1024), "CPU run: peak process RSS"
    mine = torch.tensor([float(peak), float(parallel_state.get_pipeline_model_parallel_rank())],
                        device=platform.device())
    everyone = collectives.all_gather(mine)
    stages: dict[int, list[tuple[float, int]]] = {}
    for rank, t in enumerate(everyone):
        stages.setdefault(int(t[1].item()), []).append((t[0].item(), rank))
    parts = []
    for stage, peaks in sorted(stages.items()):
        (hi, hi_rank), (lo, _) = max(peaks), min(peaks)
        parts.append(f"stage {stage}: max {hi / 2**30:.2f} GiB (rank {hi_rank}), min {lo / 2**30:.2f} GiB")
    return f"peak memory after iteration {iteration} ({what}; compare with --dry-run): " + "; ".join(parts)


def _open_writer(run: RunConfig) -> MetricsWriter:
    """The logging rank's writer; a failure there (e.g. wandb.init) fails every rank, not only
    the one that hit it (the others would wait for it in the next collective)."""
    log_cfg, ck = run.logging, run.checkpoint
    writer, error = None, None
    try:
        writer = MetricsWriter(
            log_cfg.tensorboard_dir, enabled=is_logging_rank(), wandb_project=log_cfg.wandb_project,
            wandb_exp_name=log_cfg.wandb_exp_name,
            wandb_save_dir=log_cfg.wandb_save_dir or (os.path.join(ck.save, "wandb") if ck.save else None),
            config=_flat_config(run),
        )
    except Exception as e:  # reported on every rank below
        error = f"{type(e).__name__}: {e}"
    error = _broadcast_from_logging_rank({"error": error})["error"]
    if error is not None:
        if writer is not None:
            writer.close()
        raise TrainingError(f"could not open the TensorBoard / W&B writer on rank {dist.get_world_size() - 1}: {error}")
    return writer


def _flat_config(run: RunConfig) -> dict:
    """Every flag's value (W&B's run config, like Megatron-LM's vars(args))."""
    flat = {}
    for group in (run.parallel, run.model, run.training, run.data, run.logging, run.evaluation, run.checkpoint,
                  *run.extra.values()):
        flat.update(dataclasses.asdict(group))
    return flat


class Evaluation:
    """--eval-interval / --eval-iters: the objective's ``evaluate`` on the validation data, from one
    place in the loop.  It leaves training as it was: it reads only the validation stream, runs
    forward-only under the pipeline schedule, and restores every RNG stream afterwards, so the
    training iterations are bitwise the same with and without it."""

    def __init__(self, state: TrainState, objective, validation, writer: MetricsWriter):
        self.config = state.run.evaluation
        self.state, self.objective, self.writer = state, objective, writer
        self.last_iteration: Optional[int] = None
        if self.config.eval_interval is None:
            return
        if validation is None:
            raise ValueError("--eval-interval needs validation data: pass --split or --valid-data-path")
        if not hasattr(objective, "evaluate"):
            raise ValueError(f"the {objective.name!r} objective has no evaluation; drop --eval-interval")
        objective.prepare_evaluation(validation)

    def due(self, iteration: int) -> bool:
        return self.config.eval_interval is not None and iteration % self.config.eval_interval == 0

    def __call__(self, iteration: int, label: Optional[str] = None) -> dict:
        """Evaluate, print Megatron-LM's validation line, write the scalars; returns them."""
        self.state.sync_parameters()  # --overlap-param-gather: θ must be gathered
        rng = ckpt._rng_sharded_object().data
        try:
            values = self.objective.evaluate(self.state.model, self.config.eval_iters)
        finally:
            ckpt._restore_rng(rng)
        values = _broadcast_from_logging_rank(values if is_logging_rank() else {})
        self.writer.log(format_validation_line(label or f"iteration {iteration}", values))
        scalars = validation_scalars(values)
        self.writer.scalars(iteration, scalars)
        self.last_iteration = iteration
        return scalars


def train(state: TrainState, objective, on_iteration: Optional[Callable[[int, dict], None]] = None,
          validation=None) -> list[dict]:
    """Run until --train-iters; returns the per-iteration metrics (identical on every rank).
    ``validation``: the held-out document stream --eval-interval evaluates on."""
    run = state.run
    t, log_cfg, ck = run.training, run.logging, run.checkpoint
    if t.lr is None:
        raise ValueError("--lr is required (Megatron-LM has no default either); the RLP recipe uses "
                         "--lr 1e-6 --lr-decay-style constant")
    signature = model_signature(state.preset)
    start_kind, start_dir = resolve_start(ck)
    if start_kind != "fresh":
        state.iteration = ckpt.load_checkpoint(
            start_dir, state.model, state.optimizer, state.scheduler, objective, signature,
            load_optimizer=not ck.no_load_optim, load_rng=not ck.no_load_rng,
            finetune=start_kind == "weights", step=ck.ckpt_step if start_dir == ck.load else None,
        )
        if start_kind == "resume" and state.iteration > 0:  # (a foreign checkpoint loads as iteration 0)
            state.consumed_model_flops = ckpt.consumed_model_flops(start_dir, state.iteration)
    elif ck.load and dist.get_rank() == 0:
        print(f"note: --load {ck.load} holds no checkpoint of this run yet; starting at iteration 0 "
              "from a freshly initialised model", flush=True)
    if ck.exit_model_flops and state.consumed_model_flops >= ck.exit_model_flops and state.iteration < t.train_iters:
        if dist.get_rank() == 0:
            print(f"the run's FLOP budget is spent: {start_dir} is at iteration {state.iteration} with "
                  f"{state.consumed_model_flops:.4g} model FLOPs done and --exit-model-flops is "
                  f"{ck.exit_model_flops:.4g}; nothing to do (raise --exit-model-flops to continue)", flush=True)
        return []
    if state.iteration >= t.train_iters:
        if dist.get_rank() == 0:
            print(f"the run already finished: {start_dir} is at iteration {state.iteration} and "
                  f"--train-iters is {t.train_iters}; nothing to do (to continue, raise --train-iters "
                  "and pass --override-opt_param-scheduler for the new schedule)",
                  flush=True)
        return []
    if ck.save and dist.get_rank() == 0:
        ckpt.check_writable(ck.save)
        for path in ckpt.remove_incomplete(ck.save):
            print(f"removed {path}: a checkpoint whose writing never finished", flush=True)
    writer = _open_writer(run)
    try:
        evaluate = Evaluation(state, objective, validation, writer)
    except Exception:
        writer.close()
        raise
    async_queue = None
    if ck.async_save:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        async_queue = AsyncCallsQueue()

    def committed(path: str) -> None:
        writer.log(f"saved checkpoint {path}")
        if dist.get_rank() == 0:
            deleted = ckpt.apply_retention(ck.save, ck.ckpt_keep_last, ck.ckpt_keep_every)
            if deleted:
                writer.log(f"removed checkpoints of iterations {deleted} (--ckpt-keep-last {ck.ckpt_keep_last})")

    preempt = _PreemptionFlag(ck.exit_signal_handler)
    forward_backward = get_forward_backward_func()
    forward_step = objective.forward_step
    if t.check_for_nan_in_loss_and_grad:
        forward_step = _with_loss_check(forward_step, lambda: state.iteration + 1)
    history: list[dict] = []
    world = dist.get_world_size()
    timers = Timers(log_cfg.timing_log_level)
    objective.timers = timers  # the objective times its own phases (RLP: teacher, sampling, EMA)
    try:
        while state.iteration < t.train_iters:
            logged = (state.iteration + 1) % log_cfg.log_interval == 0 or state.iteration + 1 == t.train_iters
            timers.start_iteration(logged)
            start = time.perf_counter()
            num_mb = get_num_microbatches()
            for chunk in state.model:
                chunk.zero_grad_buffer()
            state.optimizer.zero_grad()
            microbatches = objective.microbatches(state.iteration, num_mb, state.model)
            try:
                with timers("forward-backward"):
                    reports = forward_backward(
                        forward_step_func=forward_step,
                        data_iterator=iter(microbatches),
                        model=state.model,
                        num_microbatches=num_mb,
                        seq_length=microbatches[0]["tokens"].shape[1],
                        micro_batch_size=microbatches[0]["tokens"].shape[0],
                        forward_only=False,
                    )
            except RuntimeError as e:
                raise _explain_gradient_check(e, state.iteration + 1) from e
            metrics = _reduce_reports(reports) if parallel_state.is_pipeline_last_stage() else {}
            metrics = _broadcast_from_logging_rank(metrics if is_logging_rank() else {})
            bad = [k for k, v in metrics.items() if not math.isfinite(v)]
            if bad:
                raise TrainingError(
                    f"iteration {state.iteration + 1}: non-finite {', '.join(bad)} "
                    f"({', '.join(f'{k}={metrics[k]}' for k in bad)}); stopped before the optimizer "
                    "step, the last saved checkpoint is intact — lower --lr or check the data"
                )
            with timers("optimizer"):
                update_ok, grad_norm, _ = state.optimizer.step()
            if grad_norm is not None and not math.isfinite(grad_norm):
                # megatron's fp32 and bf16 optimizers have no loss scaler: the step is applied
                # with the non-finite gradients, so say so rather than claim it was skipped.
                last = ckpt.read_tracker(ck.save) if ck.save else None
                raise TrainingError(
                    f"iteration {state.iteration + 1}: gradient norm is {grad_norm}; the optimizer "
                    "step was applied with it, so the weights in memory are no longer finite and "
                    "are not saved. "
                    + (f"The last saved checkpoint (iteration {last} in {ck.save}) is intact — " if last is not None
                       else "No checkpoint was saved yet — ")
                    + "lower --lr or check the data (--check-for-nan-in-loss-and-grad names the "
                    "rank and stops before the step)"
                )
            state.sync_parameters.mark_stale()
            state.scheduler.step(increment=1)
            state.iteration += 1
            metrics.update(objective.after_optimizer_step(state.model, state.iteration))
            elapsed = time.perf_counter() - start

            # Every phase's model FLOPs (cost model, real tokens only), as Megatron-LM's TFLOP/s.
            model_flops = objective.iteration_cost(state.preset, t.global_batch_size,
                                                   t.recompute_granularity or "none").model_flops
            tflops = model_flops / (elapsed * world) / 1e12
            state.consumed_model_flops += model_flops
            lr = state.optimizer.param_groups[0]["lr"]
            phase_ms = timers.collect() if logged else {}
            record = dict(metrics, iteration=state.iteration, lr=lr, grad_norm=grad_norm,
                          elapsed_ms=elapsed * 1000, tflops_per_gpu=tflops, model_flops=model_flops,
                          consumed_model_flops=state.consumed_model_flops,
                          timers_ms=phase_ms)
            history.append(record)
            if len(history) == 1:
                writer.log(peak_memory_line(state.iteration))
            if on_iteration is not None:
                on_iteration(state.iteration, record)
            if state.iteration % log_cfg.log_interval == 0 or state.iteration == t.train_iters:
                writer.log(format_log_line(
                    state.iteration, t.train_iters, state.iteration * t.global_batch_size,
                    elapsed * 1000, tflops if log_cfg.log_throughput else None, lr,
                    t.global_batch_size, metrics, grad_norm, skipped=0 if update_ok else 1, phase_ms=phase_ms,
                ))
                writer.scalars(state.iteration, dict(metrics, **{
                    "learning-rate": lr, "grad-norm": grad_norm, "throughput/tflops_per_gpu": tflops,
                    "iteration-time-ms": elapsed * 1000,
                }))
                if log_cfg.log_timers_to_tensorboard:
                    writer.scalars(state.iteration, {f"timers/{k}": v for k, v in phase_ms.items()})
            out_of_time = bool(ck.exit_duration_in_mins) and (
                (time.time() - _process_start_time()) / 60.0 >= ck.exit_duration_in_mins
            )
            stop_reason = None
            if preempt.any_rank(also=out_of_time):
                stop_reason = "a termination signal" if preempt.raised else "--exit-duration-in-mins"
            elif ck.exit_interval and state.iteration % ck.exit_interval == 0 and state.iteration < t.train_iters:
                stop_reason = f"--exit-interval {ck.exit_interval}"
            elif (ck.exit_model_flops and state.consumed_model_flops >= ck.exit_model_flops
                  and state.iteration < t.train_iters):
                stop_reason = (f"--exit-model-flops {ck.exit_model_flops:.4g} "
                               f"({state.consumed_model_flops:.4g} model FLOPs done)")
            stop = stop_reason is not None
            due = ck.save and (
                (ck.save_interval and state.iteration % ck.save_interval == 0)
                or state.iteration == t.train_iters or stop
            )
            if due:
                state.sync_parameters()
                ckpt.save_checkpoint(ck.save, state.iteration, state.model, state.optimizer,
                                     state.scheduler, objective, signature,
                                     model_args=architecture_args(state.preset),
                                     async_queue=async_queue, on_committed=committed,
                                     consumed_model_flops=state.consumed_model_flops)
            if async_queue is not None:
                async_queue.maybe_finalize_async_calls(blocking=stop or state.iteration == t.train_iters)
            if stop:
                writer.log(f"exiting at iteration {state.iteration} on {stop_reason}")
                break
            if evaluate.due(state.iteration):
                record.update(evaluate(state.iteration))
        else:  # Megatron-LM evaluates once more at the end of training (not after a stop)
            if evaluate.config.eval_interval and evaluate.last_iteration != state.iteration:
                history[-1].update(evaluate(state.iteration, f"the end of training (iteration {state.iteration})"))
        state.sync_parameters()  # the caller gets the gathered θ
    finally:
        preempt.restore()
        writer.close()
    return history
