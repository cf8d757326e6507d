"""``--dry-run``: check a cluster layout on a laptop before queueing it.

``python -m megatron_rlp.pretrain <the job's own flags> --dry-run --world-size N`` runs nothing. It

1. validates the layout with the checks a real start makes (parallel sizes against the model and
   the world size, the uneven pipeline split, recompute and overlap flags, batch sizes, RLP lengths);
2. builds the model chunk of every distinct rank — one per (pipeline stage, tensor-parallel rank);
   data-parallel replicas hold the same — with megatron-core on the meta device (shapes and dtypes,
   no storage), inside a fake process group of N ranks (torch's "fake" backend: collectives return
   at once) with megatron's gloo side groups off;
3. prints per rank the parameters of those models, and memory per GPU and FLOPs per iteration from
   the one cost model (:mod:`megatron_rlp.training.cost_model`): estimates, and labelled so;
4. fails, naming the rank and its largest memory term, when a GPU would need more than
   ``--dry-run-gpu-memory-gb``, or when the layout is invalid.

A real run logs each stage's measured peak memory after its first iteration (training/loop.py),
to compare with the estimate here.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

GIB = 2**30


class LayoutDoesNotFit(RuntimeError):
    """A rank's estimated peak memory exceeds --dry-run-gpu-memory-gb."""


@dataclass
class RankModel:
    """The model chunk of one distinct rank, counted from its meta-device build."""

    stage: int
    tp_rank: int
    rank: int           # the lowest global rank holding this chunk (data-parallel rank 0)
    layers: int         # decoder layers built on this stage
    parameters: int     # elements on this GPU
    weight_bytes: int   # those elements in their dtypes
    tp_sharded: int     # elements split over the tensor-parallel group (each TP rank holds its own)
    tied_copy: int      # the last stage's copy of a tied output weight (the embedding counted on stage 0)


@dataclass
class DryRunReport:
    preset: object
    world_size: int
    tp: int
    pp: int
    dp: int
    ranks: list
    memory: dict = field(default_factory=dict)   # variant name -> list[StageMemory]
    flops: object = None                           # cost_model.IterationCost
    settings: object = None                        # cost_model.RLPSettings
    layout: object = None                          # cost_model.Layout (the run's flags)
    limit_bytes: int = 0
    recompute: str = "none"
    cost_model_parameters: list = field(default_factory=list)

    @property
    def total_parameters(self) -> int:
        return unique_parameters(self.ranks)

    def ranks_of(self, stage: int, tp_rank: int) -> list[int]:
        return [tp_rank + self.tp * d + self.tp * self.dp * stage for d in range(self.dp)]


def unique_parameters(ranks: list[RankModel]) -> int:
    """Parameters of the whole model from its distinct ranks: tensor-parallel shards summed over
    the TP ranks, replicated tensors (norms, ...) once per stage, a tied output weight once."""
    total = 0
    for r in ranks:
        replicated = r.parameters - r.tp_sharded
        total += r.tp_sharded - r.tied_copy
        if r.tp_rank == 0:
            total += replicated
    return total


def simulated_rank(stage: int, tp_rank: int, tp: int, dp: int) -> int:
    """Global rank of (pipeline stage, TP rank, DP rank 0) in megatron's default order
    tp-cp-ep-dp-pp (TP fastest, pipeline slowest; no context or expert parallelism here)."""
    return tp_rank + tp * dp * stage


# ---------------------------------------------------------------------------------------------
# Validation: the checks a real start makes, in the order it makes them
# ---------------------------------------------------------------------------------------------
def validate_run(run, preset, world_size: int) -> int:
    """Raise ValueError naming the flag for a layout a real start would refuse; returns DP."""
    from megatron_rlp.models.builder import validate_parallel_layout, validate_recompute
    from megatron_rlp.training.loop import _validate_batch, validate_overlap

    if world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {world_size}")
    par, t = run.parallel, run.training
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    validate_parallel_layout(preset, tp, pp, world_size, par.decoder_first_pipeline_num_layers,
                             par.decoder_last_pipeline_num_layers)
    validate_overlap(par)
    if preset.vocab_size % tp:
        raise ValueError(f"vocabulary size {preset.vocab_size} is not divisible by --tensor-model-parallel-size {tp}")
    dp = world_size // (tp * pp)
    _validate_batch(run, dp)
    validate_recompute(t.recompute_granularity, t.recompute_method, t.recompute_num_layers)
    if par.sequence_parallel and tp > 1 and t.seq_length % tp:
        raise ValueError(
            f"--sequence-parallel splits each sequence over the {tp} tensor-parallel ranks: "
            f"--seq-length {t.seq_length} must be a multiple of --tensor-model-parallel-size {tp}"
        )
    rlp = run.extra.get("rlp")
    if rlp is None:
        raise ValueError(
            "--dry-run models RLP iterations (--rlp with its --rlp-* flags); the memory of "
            "next-token runs is not in the cost model yet"
        )
    from megatron_rlp.rlp.config import validate_rlp_config, validate_rlp_lengths

    validate_rlp_config(rlp)
    validate_rlp_lengths(t.seq_length, preset.max_position_embeddings, rlp.rlp_thought_len, rlp.rlp_min_context)
    if rlp.rlp_sampler_micro_batch_size is not None and rlp.rlp_sampler_micro_batch_size < 1:
        raise ValueError(f"--rlp-sampler-micro-batch-size must be >= 1, got {rlp.rlp_sampler_micro_batch_size}")
    return dp


# ---------------------------------------------------------------------------------------------
# The meta-device build, one distinct rank at a time
# ---------------------------------------------------------------------------------------------
def build_rank_models(run, preset, world_size: int) -> list[RankModel]:
    """Build the model chunk of every (pipeline stage, TP rank) on the meta device, each inside a
    fake process group in which this process is that rank; count its parameters."""
    import logging

    import torch
    import torch.distributed as dist

    from megatron_rlp import platform

    if dist.is_initialized():
        raise RuntimeError("the dry run simulates its ranks in a fake process group: call it in a "
                           "process without torch.distributed initialised")
    if torch.cuda.is_available():  # megatron would pick Transformer Engine layers; keep one code path
        raise RuntimeError("the dry run builds on the CPU code path: start it with CUDA_VISIBLE_DEVICES= "
                           "(python -m megatron_rlp.pretrain --dry-run does)")
    platform.setup_platform()
    tp, pp = run.parallel.tensor_model_parallel_size, run.parallel.pipeline_model_parallel_size
    dp = world_size // (tp * pp)
    dtype = torch.bfloat16 if run.model.bf16 else torch.float32
    # The torch Mamba path warns once per layer that megatron does not test it for training; on
    # the cluster the mamba-ssm kernels are used, so the warning says nothing about the plan.
    mixer_log = logging.getLogger("megatron.core.ssm.mamba_mixer")
    level = mixer_log.level
    mixer_log.setLevel(logging.ERROR)
    try:
        return _build_all(run, preset, world_size, tp, pp, dp, dtype)
    finally:
        mixer_log.setLevel(level)


def _build_all(run, preset, world_size, tp, pp, dp, dtype) -> list[RankModel]:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_rlp import platform
    from megatron_rlp.models.builder import build_model, transformer_config
    from megatron_rlp.training import parallel

    par, t = run.parallel, run.training
    out = []
    for stage in range(pp):
        for tp_rank in range(tp):
            rank = simulated_rank(stage, tp_rank, tp, dp)
            dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
            try:
                parallel_state.initialize_model_parallel(
                    tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                    create_gloo_process_groups=False,
                )
                where = (parallel_state.get_pipeline_model_parallel_rank(),
                         parallel_state.get_tensor_model_parallel_rank())
                if where != (stage, tp_rank):  # megatron changed its rank order
                    raise RuntimeError(f"simulated rank {rank} is (stage, TP rank) {where}, expected {(stage, tp_rank)}")
                parallel.set_seed(t.seed)
                config = transformer_config(
                    preset, tp=tp, pp=pp, params_dtype=dtype, sequence_parallel=par.sequence_parallel and tp > 1,
                    first_stage_layers=par.decoder_first_pipeline_num_layers,
                    last_stage_layers=par.decoder_last_pipeline_num_layers,
                    recompute_granularity=t.recompute_granularity, recompute_method=t.recompute_method,
                    recompute_num_layers=t.recompute_num_layers,
                )
                # Parameters are allocated on 'cuda', which is mapped to meta.  Initialisation stays on:
                # on meta it does no work, and it is where megatron marks the tensor-parallel
                # shards (tensor_model_parallel) that the model total depends on.
                config = dataclasses.replace(config, use_cpu_initialization=False)
                with platform.meta_device():
                    model = build_model(preset, config)
                    if run.model.bf16:  # as the loop does: every weight in bf16 (fp32 main copies in the optimizer)
                        from megatron.core.transformer.module import Float16Module

                        model = Float16Module(config, model).module
                out.append(_count(model, stage, tp_rank, rank))
            finally:
                if parallel_state.model_parallel_is_initialized():
                    parallel_state.destroy_model_parallel()
                dist.destroy_process_group()
    return out


def _count(model, stage: int, tp_rank: int, rank: int) -> RankModel:
    params = list(model.parameters())
    not_meta = [p for p in params if p.device.type != "meta"]
    if not_meta:  # something allocated real memory: the dry run would not stay on a laptop
        raise RuntimeError(f"{len(not_meta)} parameters were built off the meta device ({not_meta[0].device})")
    sharded = sum(p.numel() for p in params if getattr(p, "tensor_model_parallel", False))
    # With tied embeddings and PP > 1 the last stage keeps a copy of the embedding as its output
    # weight (megatron marks it shared_embedding); the first stage holds the original.
    tied = sum(p.numel() for p in params if getattr(p, "shared_embedding", False) and not model.pre_process)
    decoder = getattr(model, "decoder", None)
    layers = len(decoder.layers) if decoder is not None and hasattr(decoder, "layers") else 0
    return RankModel(stage, tp_rank, rank, layers, sum(p.numel() for p in params),
                     sum(p.numel() * p.element_size() for p in params), sharded, tied)


# ---------------------------------------------------------------------------------------------
# The plan: validation, build, cost model
# ---------------------------------------------------------------------------------------------
def _recompute(t) -> str:
    return t.recompute_granularity or "none"


def plan(run, world_size: int, gpu_memory_gb: float = 80.0) -> DryRunReport:
    """Validate, build every distinct rank on meta, and estimate memory and FLOPs."""
    from megatron_rlp.rlp.config import longest_context
    from megatron_rlp.training import cost_model as cm
    from megatron_rlp.training.loop import resolve_preset

    par, t = run.parallel, run.training
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    # The tokenizer need not be on this machine: a preset or the architecture flags give the
    # model's (padded) vocabulary.
    preset = resolve_preset(run.model, None, tp=tp, seq_length=t.seq_length, load=run.checkpoint.load)
    dp = validate_run(run, preset, world_size)
    rlp = run.extra["rlp"]
    ranks = build_rank_models(run, preset, world_size)

    stage_counts = [next(r.parameters for r in ranks if r.stage == s) for s in range(pp)]
    recompute = _recompute(t)
    settings = cm.RLPSettings(
        contexts=t.global_batch_size * rlp.rlp_positions_per_doc,
        context_len=longest_context(t.seq_length, rlp.rlp_thought_len),
        num_thoughts=rlp.rlp_num_thoughts,
        thought_len=rlp.rlp_thought_len,
        positions_per_doc=rlp.rlp_positions_per_doc,
        window_len=longest_context(t.seq_length, rlp.rlp_thought_len),
        baseline_interval=rlp.rlp_baseline_interval,
        updates_per_batch=rlp.rlp_updates_per_batch,
        ntp=rlp.rlp_ntp_weight > 0, kl_reference=rlp.rlp_kl_beta > 0,
    )
    layout = cm.Layout(
        tp=tp, pp=pp, dp=dp,
        first_stage_layers=par.decoder_first_pipeline_num_layers,
        last_stage_layers=par.decoder_last_pipeline_num_layers,
        distributed_optimizer=par.use_distributed_optimizer,
        params_dtype="bf16" if run.model.bf16 else "fp32",
        recompute=recompute, micro_batch_size=t.micro_batch_size,
        sequence_parallel=par.sequence_parallel and tp > 1,
        flash_attention=True,  # the cluster runs Transformer Engine's fused attention
        sampler_micro_batch_size=rlp.rlp_sampler_micro_batch_size,
        recompute_method=t.recompute_method or "uniform",
        recompute_num_layers=t.recompute_num_layers or 1,
    )

    def memory(**change):
        return cm.stage_memory(preset, dataclasses.replace(layout, **change), settings, parameters=stage_counts)

    report = DryRunReport(
        preset=preset, world_size=world_size, tp=tp, pp=pp, dp=dp, ranks=ranks,
        settings=settings, layout=layout, recompute=recompute,
        limit_bytes=int(gpu_memory_gb * GIB),
        flops=cm.rlp_iteration_cost(preset, settings, "rows", recompute),
        cost_model_parameters=cm.stage_parameters(preset, tp, pp, layout.first_stage_layers, layout.last_stage_layers),
    )
    report.memory = {
        "run": memory(),
        "plain_optimizer": memory(distributed_optimizer=False),
        "distributed_optimizer": memory(distributed_optimizer=True),
        "no_recompute": memory(recompute="none"),
        "full_recompute": memory(recompute="full") if recompute == "full" else
        memory(recompute="full", recompute_method="uniform", recompute_num_layers=1),
    }
    return report


def check_fits(report: DryRunReport) -> None:
    """Raise LayoutDoesNotFit naming the worst rank, its largest term and what to change."""
    over = [m for m in report.memory["run"] if m.peak > report.limit_bytes]
    if not over:
        return
    worst = max(over, key=lambda m: m.peak)
    rank = simulated_rank(worst.stage, 0, report.tp, report.dp)
    term = worst.largest_term
    others = [f"stage {m.stage} ({_gib(m.peak)} GiB)" for m in over if m is not worst]
    # The update's activations and the sampler's caches are never held together: when one is the
    # culprit, say whether the other alone would still be too much.
    then = ""
    other = {"activations": "sampler_cache", "sampler_cache": "activations"}.get(term)
    if other and worst.static + worst.terms[other] > report.limit_bytes:
        then = (f" Without it, the {TERM_NAMES[other]} ({_gib(worst.terms[other])} GiB) would still "
                f"make {_gib(worst.static + worst.terms[other])} GiB: {_HINTS[other]}")
    raise LayoutDoesNotFit(
        f"layout does not fit: rank {rank} (pipeline stage {worst.stage}; every rank of that stage "
        f"holds the same) needs an estimated {_gib(worst.peak)} GiB per GPU, more than "
        f"--dry-run-gpu-memory-gb {report.limit_bytes / GIB:g}; largest term: {TERM_NAMES[term]} "
        f"{_gib(worst.terms[term])} GiB. {_HINTS[term]}{then}"
        + (f" Also over: {', '.join(others)}." if others else "")
    )


TERM_NAMES = {
    "weights": "weights",
    "main_grads": "fp32 main gradients",
    "optimizer_states": "optimizer states",
    "ema_teacher": "fp32 EMA teacher",
    "activations": "update activations",
    "sampler_cache": "sampler KV cache + Mamba states",
}

_HINTS = {
    "activations": "The update keeps every row of a micro-batch (one document = G rows of --seq-length "
                   "tokens): use --recompute-granularity full --recompute-method uniform "
                   "--recompute-num-layers 1, --sequence-parallel with TP > 1, or more TP/PP.",
    "sampler_cache": "The sampler holds every document's prefill cache and the decode caches of PP "
                     "micro-batches of --rlp-sampler-micro-batch-size rows at once: lower "
                     "--rlp-sampler-micro-batch-size, or spread the batch over more GPUs (more nodes), or "
                     "lower --global-batch-size or --seq-length.",
    "optimizer_states": "Use --use-distributed-optimizer, or more TP/PP.",
    "main_grads": "Use more TP/PP (the fp32 gradient buffer is per model-parallel shard).",
    "ema_teacher": "Use more TP/PP (the fp32 EMA teacher is per model-parallel shard).",
    "weights": "Use more TP/PP.",
}


# ---------------------------------------------------------------------------------------------
# The printout
# ---------------------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def _rank_list(ranks: list[int]) -> str:
    if len(ranks) <= 4:
        return ", ".join(map(str, ranks))
    step = ranks[1] - ranks[0]
    if step == 1:
        return f"{ranks[0]}-{ranks[-1]} ({len(ranks)} ranks)"
    return f"{ranks[0]}, {ranks[1]}, ..., {ranks[-1]} ({len(ranks)} ranks, step {step})"


def format_report(report: DryRunReport) -> str:
    from megatron_rlp.training import cost_model as cm

    r, s, L = report, report.settings, report.layout
    p = r.preset
    kinds = cm.stage_layer_kinds(p, r.pp, L.first_stage_layers, L.last_stage_layers)
    lines = [
        f"DRY RUN (nothing was run; memory and FLOPs are ESTIMATES): {p.name} on {r.world_size} GPUs = "
        f"TP {r.tp} x PP {r.pp} x DP {r.dp}",
        f"  parameters: megatron-core model chunks built on the meta device, one per (pipeline stage, "
        f"TP rank), in a fake process group",
        f"  memory, FLOPs: megatron_rlp/training/cost_model.py; update micro-batch {L.micro_batch_size} "
        f"document(s) x {s.positions_per_doc} position(s) x G={s.num_thoughts} rows of up to "
        f"{max(s.context_lens)} context + {max(s.thought_lens)} thought + 2 marker tokens "
        f"(longest context, full-length thoughts: an upper bound); {s.contexts} contexts per iteration",
        "",
        "Layer split",
    ]
    for i, k in enumerate(kinds):
        lines.append(f"  stage {i}: {len(k)} layers ({k})")
    lines += ["", "Ranks (data-parallel replicas are identical)",
              f"  {'stage':>5} {'TP rank':>7}  {'parameters':>15}  global ranks"]
    for rm in r.ranks:
        lines.append(f"  {rm.stage:>5} {rm.tp_rank:>7}  {rm.parameters:>15,}  {_rank_list(r.ranks_of(rm.stage, rm.tp_rank))}")
    lines.append(f"  model total: {r.total_parameters:,} parameters")
    built = [next(x.parameters for x in r.ranks if x.stage == i) for i in range(r.pp)]
    if built != r.cost_model_parameters:
        lines.append(f"  note: the cost model counts {r.cost_model_parameters} per stage; the built "
                     f"model {built} (used below)")

    run, mem = r.memory["run"], r.memory
    head = "".join(f"{f'stage {i}':>12}" for i in range(r.pp))
    lines += ["", f"Memory per GPU, GiB (estimate; * = this run's flags)   {head}"]

    def row(label: str, values, used: bool = True) -> None:
        mark = "*" if used else " "
        lines.append(f"  {mark} {label:<52}" + "".join(f"{_gib(v):>12}" for v in values))

    wdt = "bf16" if L.params_dtype == "bf16" else "fp32"
    row(f"weights ({wdt})", [m.terms["weights"] for m in run])
    row("main gradients (fp32)", [m.terms["main_grads"] for m in run])
    row("optimizer states (Adam)", [m.terms["optimizer_states"] for m in mem["plain_optimizer"]],
        not L.distributed_optimizer)
    row(f"optimizer states, --use-distributed-optimizer (/{r.dp})",
        [m.terms["optimizer_states"] for m in mem["distributed_optimizer"]], L.distributed_optimizer)
    row("EMA teacher (fp32)", [m.terms["ema_teacher"] for m in run])
    row("update activations, no recompute", [m.terms["activations"] for m in mem["no_recompute"]],
        report.recompute == "none")
    if report.recompute == "selective":
        row("update activations, selective recompute", [m.terms["activations"] for m in run])
    method, k = (L.recompute_method, L.recompute_num_layers) if report.recompute == "full" else ("uniform", 1)
    row(f"update activations, full recompute ({method}, {k} layer{'s' if k > 1 else ''})",
        [m.terms["activations"] for m in mem["full_recompute"]], report.recompute == "full")
    docs = -(-s.contexts // (s.positions_per_doc * r.dp))
    row(f"sampler KV cache + Mamba states, {docs} documents x G", [m.terms["sampler_cache"] for m in run])
    row("  of which one decode micro-batch", [m.sampler_microbatch for m in run], False)
    lines.append("  " + "-" * (54 + 12 * r.pp))
    row("peak = static + max(activations, sampler)", [m.peak for m in run])
    lines.append("    not counted: CUDA context, NCCL buffers, allocator fragmentation, the loss's "
                 "log-prob workspace (leave a few GiB)")
    lines.append(f"    limit --dry-run-gpu-memory-gb: {report.limit_bytes / GIB:g} GiB;  "
                 + ",  ".join(f"stage {m.stage}: {'fits' if m.peak <= report.limit_bytes else 'DOES NOT FIT'}"
                              f" (largest term {TERM_NAMES[m.largest_term]})" for m in run))

    cost = r.flops
    ph = cost.phases
    phases = [
        ("teacher (EMA forward)", ph["teacher"].model_flops, ph["teacher"].hardware_flops),
        ("sampling (prefill + decode)", ph["sampling_prefill"].model_flops + ph["sampling_decode"].model_flops,
         ph["sampling_prefill"].hardware_flops + ph["sampling_decode"].hardware_flops),
        ("update (forward + backward)", ph["update"].model_flops, ph["update"].hardware_flops),
        ("optimizer + EMA", ph["optimizer"].model_flops + ph["ema"].model_flops,
         ph["optimizer"].hardware_flops + ph["ema"].hardware_flops),
    ]
    lines += ["", f"FLOPs per iteration (estimate; hardware adds recompute = {report.recompute}"
              + (", counted as every layer" if report.recompute == "full" and L.recompute_method == "block" else "")
              + ")",
              f"  {'phase':<30}{'model PFLOP':>14}{'hardware PFLOP':>16}{'hw TFLOP per GPU':>18}"]
    for name, model_f, hw_f in phases + [("total", cost.model_flops, cost.hardware_flops)]:
        lines.append(f"  {name:<30}{model_f / 1e15:>14.1f}{hw_f / 1e15:>16.1f}{hw_f / r.world_size / 1e12:>18.1f}")
    return "\n".join(lines)


def dry_run(run, world_size: int, gpu_memory_gb: float = 80.0, print_fn=print) -> DryRunReport:
    """Plan, print and check; raises ValueError (invalid layout) or LayoutDoesNotFit."""
    report = plan(run, world_size, gpu_memory_gb)
    print_fn(format_report(report))
    check_fits(report)
    return report


def hide_gpus() -> None:
    """The dry run never touches a GPU (on a login node with one, it must not take it): hide them
    before torch initialises CUDA, so the same CPU code path builds the model."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["MEGATRON_RLP_FORCE_CPU"] = "1"
