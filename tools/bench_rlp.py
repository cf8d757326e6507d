"""Cost of one RLP iteration by phase: the shared-prefix update against the project's previous path
and a straightforward RLP.

Three ways of running the same iteration (same documents, positions and seeds):

* ``shared_prefix``: today's default (``--rlp-update-layout shared``): each context enters the
  update once, followed by its G branches; the sampler prefills each document once and forks
  the G branches of its positions from that cache; S_pred comes from the update's own forward;
* ``rows`` (the previous path, ``--rlp-update-layout rows``): the same sampler and fused
  scoring, one row (x_<t, <think>, c_i, </think>) per thought in the update;
* ``straightforward``: every thought re-prefilled on its own for sampling (the naive sampler of
  tools/bench_sampler.py, :func:`megatron_rlp.sampling.sample_thoughts_naive`), a separate no-grad
  scoring forward over the rows for S_pred (the rewards come from it), then the rows update
  (``RLPObjective(..., straightforward=True)``; a unit test shows it gives the rows path's loss,
  rewards and gradients).

**Running mode** (default): builds the model, optimizer and RLPObjective through the project's
own training setup (megatron_rlp.training.loop, CPU shim on a machine without CUDA), writes
random-token documents of ``--context-len`` + 1 tokens to a temporary .bin/.idx corpus, and runs
``--warmup-iters`` + ``--iters`` RLP iterations of each variant, phase timers on every iteration
(--timing-log-level 2); the variants take turns ``--rounds`` times (in rotated order, each round a
fresh model from the same seed), so a change in the machine's load falls on all of them.  Per
phase (teacher baseline, sampling prefill, sampling decode, the rest of sampling, scoring, update
forward+backward, optimizer, EMA, the rest of the iteration) it prints the median wall time over
all timed iterations (``total``: the median iteration time), the tokens through the model and the model
GFLOP of the cost model (:mod:`megatron_rlp.training.cost_model`, the log line's count of the real
batch: no padding), and the update's padded tokens.  The last line is JSON::

    {"flops_ratio": ..., "time_ratio": ..., "flops_ratio_straightforward": ...,
     "time_ratio_straightforward": ..., "phases": {variant: {phase: {"ms", "tokens", "gflop"}}}, ...}

(unsuffixed ratios: shared_prefix / rows over the whole iteration; suffixed: shared_prefix /
straightforward).  Positions t are uniform in [``--min-context``, ``--context-len``] (default
min: 7/8 of it), k per document.  A randomly initialised model rarely samples the close marker,
so most thoughts run to ``--thought-len``.  Wall times on a shared machine move with its load:
the load average is printed and recorded.

**``--analytic``** prints, from the FLOP model alone, each phase's model FLOPs for the three
variants, by default for ``qwen3-1.7b`` and ``nemotron-nano-12b-v2`` at the paper's settings
(context 2048, G=16, 512 contexts per step) for mean thought lengths 256, 1024 and 2048.  Thought
lengths follow ``--thought-dist``: "capped-geometric" (default; a constant probability of
sampling the close marker per token, set so that the mean is L, and the close forced at
``--thought-cap``, default the paper's 2048: at mean 1024 one thought in five hits the cap) or
"fixed" (every thought exactly L).  Each setting prints a table and one JSON line::

    {"preset", "mean_thought_len", "flops_ratio", "flops_ratio_straightforward",
     "flops_ratio_vs_rows_padded", "flops_ratio_vs_previous_path", "update_flops_ratio",
     "update_token_ratio", "phases": {variant: {phase: model flops}}, "tokens": ..., ...}

* ``flops_ratio`` / ``flops_ratio_straightforward``: model FLOPs (real tokens, no padding) of the
  whole iteration, shared_prefix / rows and shared_prefix / straightforward;
* ``flops_ratio_vs_rows_padded``: the update as executed with padding (see
  :func:`~megatron_rlp.training.cost_model.padded_update_cost`) in both, today's rows layout
  padding each micro-batch (``--micro-batch-size`` documents of k contexts) to its widest row;
* ``flops_ratio_vs_previous_path``: the same against the rows layout as it was before issue 12,
  every micro-batch padded to the widest row of the rank's whole step (``--contexts`` /
  ``--data-parallel-size`` contexts).

Teacher, sampling, optimizer and EMA are model FLOPs in every ratio (the same in shared_prefix and
rows).  FLOPs are model FLOPs (forward + backward, Megatron-LM's TFLOP/s convention); with
``--recompute`` the hardware FLOPs (recomputed forward included) are printed as well.

    .venv/bin/python tools/bench_rlp.py                       # tiny, C~256, G=8, k=2, thoughts <= 32
    .venv/bin/python tools/bench_rlp.py --analytic
    .venv/bin/python tools/bench_rlp.py --analytic --presets qwen3-1.7b --thought-lens 1024
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from megatron_rlp.models.presets import get_preset  # noqa: E402
from megatron_rlp.training.cost_model import (  # noqa: E402
    PHASES, VARIANTS, RLPSettings, ThoughtLengths, padded_update_cost, rlp_iteration_cost,
)

# Running mode: timer names (megatron_rlp.training.timers) of each reported phase.
RUN_PHASES = ("teacher", "sampling_prefill", "sampling_decode", "sampling_other", "scoring", "update",
              "optimizer", "ema", "other")
_TIMER_OF = {"teacher": "rlp-teacher", "sampling_prefill": "rlp-sampling-prefill",
             "sampling_decode": "rlp-sampling-decode", "scoring": "rlp-scoring", "update": "forward-backward",
             "optimizer": "optimizer", "ema": "rlp-ema"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--analytic", action="store_true", help="print the FLOP model's breakdown without running")
    # Shared (defaults differ by mode: None = the mode's default).
    p.add_argument("--context-len", type=int, default=None, help="C (running: the longest context; default 256; "
                   "analytic: 2048)")
    p.add_argument("--num-thoughts", type=int, default=None, help="G (running: 8; analytic: 16)")
    p.add_argument("--positions-per-doc", type=int, default=None, help="k (running: 2; analytic: 1)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="documents per update micro-batch")
    # Running mode.
    p.add_argument("--preset", default="tiny")
    p.add_argument("--thought-len", type=int, default=32, help="running: thought cap (--rlp-thought-len)")
    p.add_argument("--min-context", type=int, default=None, help="running: smallest t (default 7/8 of C)")
    p.add_argument("--docs", type=int, default=4, help="running: documents per iteration (--global-batch-size)")
    p.add_argument("--sampler-micro-batch-size", type=int, default=None,
                   help="running: rows per decode micro-batch (--rlp-sampler-micro-batch-size; default all)")
    p.add_argument("--sampler-layout", default="auto", choices=("auto", "tree", "rows"),
                   help="running: decode cache layout of the prefix-sharing sampler (shared_prefix, rows)")
    p.add_argument("--warmup-iters", type=int, default=1)
    p.add_argument("--iters", type=int, default=3, help="running: timed iterations per variant and round")
    p.add_argument("--rounds", type=int, default=2,
                   help="running: the variants run one after the other this many times, in rotated order "
                        "(a shared machine's load changes; medians are over all rounds' timed iterations)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1, help="running: torch CPU threads")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help="running: the variants to run (the ratios need all three)")
    # Analytic mode.
    p.add_argument("--presets", nargs="+", default=["qwen3-1.7b", "nemotron-nano-12b-v2"])
    p.add_argument("--thought-lens", nargs="+", type=float, default=[256, 1024, 2048],
                   help="analytic: mean thought lengths L (tokens before the close marker)")
    p.add_argument("--thought-cap", type=int, default=2048, help="analytic: --rlp-thought-len (the paper's 2048)")
    p.add_argument("--thought-dist", default="capped-geometric", choices=("capped-geometric", "fixed"),
                   help="analytic: thought-length distribution (see the description above)")
    p.add_argument("--contexts", type=int, default=512, help="analytic: contexts per iteration (B*k)")
    p.add_argument("--data-parallel-size", type=int, default=8,
                   help="analytic: ranks the contexts are split over (the previous path padded a rank's step)")
    p.add_argument("--recompute", default="none", choices=("none", "selective", "full"),
                   help="analytic: also print hardware FLOPs with this recompute granularity")
    args = p.parse_args(argv)
    defaults = {"context_len": (2048, 256), "num_thoughts": (16, 8), "positions_per_doc": (1, 2)}
    for name, (analytic, running) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, analytic if args.analytic else running)
    return args


# ---------------------------------------------------------------------------------------------
# Analytic mode
# ---------------------------------------------------------------------------------------------
def thought_lengths(dist: str, mean: float, cap: int) -> ThoughtLengths:
    if dist == "fixed":
        return ThoughtLengths.fixed(mean)
    return ThoughtLengths.capped_geometric(mean, cap)


def analyse(preset_name: str, settings: RLPSettings, recompute: str, microbatch_contexts: int,
            step_contexts: int, mean_thought_len: float) -> dict:
    """``microbatch_contexts``: contexts of one update micro-batch; ``step_contexts``: contexts of
    one rank's step (the previous path's padding group); ``mean_thought_len``: the L asked for
    (the distribution's mean, up to rounding)."""
    preset = get_preset(preset_name)
    costs = {v: rlp_iteration_cost(preset, settings, v, recompute) for v in VARIANTS}
    c, g = settings.context_len, settings.num_thoughts
    dist = settings.thought_distribution
    l = mean_thought_len
    shared, rows, straight = costs["shared_prefix"], costs["rows"], costs["straightforward"]
    executed = {
        "shared_prefix": padded_update_cost(preset, settings, "shared_prefix", microbatch_contexts, recompute),
        "rows": padded_update_cost(preset, settings, "rows", microbatch_contexts, recompute),
        "rows_step_padded": padded_update_cost(preset, settings, "rows", step_contexts, recompute),
    }

    def with_update(cost, update):  # whole iteration, the update as executed
        return cost.model_flops - cost.phases["update"].model_flops + update.model_flops

    shared_exec = with_update(shared, executed["shared_prefix"])
    record = {
        "preset": preset_name,
        "mean_thought_len": l,
        "thought_cap": max(dist.values),
        "forced_close_frac": sum(p for v, p in zip(dist.values, dist.probs) if v == max(dist.values)),
        "context_len": c,
        "num_thoughts": g,
        "contexts": settings.contexts,
        "flops_ratio": shared.model_flops / rows.model_flops,
        "flops_ratio_straightforward": shared.model_flops / straight.model_flops,
        "flops_ratio_vs_rows_padded": shared_exec / with_update(rows, executed["rows"]),
        "flops_ratio_vs_previous_path": shared_exec / with_update(rows, executed["rows_step_padded"]),
        "update_flops_ratio": shared.phases["update"].model_flops / rows.phases["update"].model_flops,
        "update_token_ratio": (c + g * (l + 2)) / (g * (c + l + 2)),
        "microbatch_contexts": microbatch_contexts,
        "step_contexts_per_rank": step_contexts,
        "phases": {v: {k: p.model_flops for k, p in cost.phases.items()} for v, cost in costs.items()},
        "tokens": {v: {k: p.tokens for k, p in cost.phases.items()} for v, cost in costs.items()},
        "update_executed": {k: {"flops": p.model_flops, "tokens": p.tokens} for k, p in executed.items()},
    }
    if recompute != "none":
        record["recompute"] = recompute
        record["hardware_flops"] = {v: cost.hardware_flops for v, cost in costs.items()}
    return record


def format_table(record: dict) -> str:
    ex = record["update_executed"]
    totals = {v: sum(record["phases"][v].values()) for v in VARIANTS}
    unit, scale = ("PFLOP", 1e15) if totals["rows"] >= 1e13 else ("GFLOP", 1e9)
    lines = [
        f"{record['preset']}: C={record['context_len']} G={record['num_thoughts']} "
        f"mean L={record['mean_thought_len']:g} (cap {record['thought_cap']:g}, "
        f"{100 * record['forced_close_frac']:.1f}% at the cap) contexts={record['contexts']}  "
        f"(model FLOPs, {unit} per iteration)",
        f"  {'phase':<18}" + "".join(f"{v:>17}" for v in VARIANTS),
    ]
    for phase in PHASES:
        lines.append(f"  {phase:<18}" + "".join(f"{record['phases'][v][phase] / scale:17.3f}" for v in VARIANTS))
    lines.append(f"  {'total':<18}" + "".join(f"{totals[v] / scale:17.3f}" for v in VARIANTS))
    if "hardware_flops" in record:
        lines.append(f"  {'hardware (' + record['recompute'] + ')':<18}"
                     + "".join(f"{record['hardware_flops'][v] / scale:17.3f}" for v in VARIANTS))
    lines.append(
        f"  update as executed (padding, {unit}): shared_prefix {ex['shared_prefix']['flops'] / scale:.3f}; rows "
        f"padded per micro-batch ({record['microbatch_contexts']} contexts) {ex['rows']['flops'] / scale:.3f}; "
        f"rows padded per step (previous path, {record['step_contexts_per_rank']} contexts per rank) "
        f"{ex['rows_step_padded']['flops'] / scale:.3f}")
    lines.append(
        f"  shared_prefix / rows = {record['flops_ratio']:.3f} model FLOPs (update alone "
        f"{record['update_flops_ratio']:.3f}, token ratio {record['update_token_ratio']:.3f});  "
        f"shared_prefix / straightforward = {record['flops_ratio_straightforward']:.3f}")
    lines.append(
        f"  executed with padding: vs today's rows (per micro-batch) {record['flops_ratio_vs_rows_padded']:.3f};  "
        f"vs the previous path (per step) {record['flops_ratio_vs_previous_path']:.3f}")
    return "\n".join(lines)


def run_analytic(args) -> int:
    k = args.positions_per_doc
    microbatch_contexts = args.micro_batch_size * k
    step_contexts = -(-args.contexts // args.data_parallel_size)
    for name in args.presets:
        get_preset(name)  # unknown names fail before any output
        for l in args.thought_lens:
            settings = RLPSettings(contexts=args.contexts, context_len=args.context_len,
                                   num_thoughts=args.num_thoughts,
                                   thought_len=thought_lengths(args.thought_dist, l, args.thought_cap),
                                   positions_per_doc=k)
            record = analyse(name, settings, args.recompute, microbatch_contexts, step_contexts, l)
            record["thought_dist"] = args.thought_dist
            print(format_table(record))
            print(json.dumps(record))
    return 0


# ---------------------------------------------------------------------------------------------
# Running mode
# ---------------------------------------------------------------------------------------------
class BenchTokenizer:
    """The ids the step needs from a tokenizer: markers and EOD at the top of the vocabulary
    (random documents never contain them)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1
        self._ids = {"<think>": vocab_size - 3, "</think>": vocab_size - 2}

    def token_to_id(self, piece):
        return self._ids.get(piece)


def write_documents(prefix: str, num_docs: int, length: int, vocab_size: int, seed: int) -> str:
    """``num_docs`` documents of ``length`` uniform random ids below the markers, as .bin/.idx."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16 if vocab_size <= 65535 else np.int32)
    rng = np.random.default_rng(seed)
    for _ in range(num_docs):
        builder.add_item(torch.from_numpy(rng.integers(0, vocab_size - 3, length).astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


class RecordingSource:
    """Wraps a thought source and keeps what it returned (to check the variants drew the same)."""

    def __init__(self, source):
        self.source, self.batches = source, []

    def __call__(self, *args, **kwargs):
        batch = self.source(*args, **kwargs)
        self.batches.append((batch.tokens.cpu(), batch.lengths.cpu()))
        return batch


def run_variant(variant: str, args, corpus: str) -> dict:
    """``--warmup-iters`` + ``--iters`` RLP iterations of one variant; per iteration its record
    (timers_ms, elapsed_ms), cost-model phases and the update's padded tokens."""
    from functools import partial

    from megatron_rlp.data.documents import DocumentStream, open_indexed_dataset
    from megatron_rlp.rlp.config import RLPConfig
    from megatron_rlp.rlp.step import RLPObjective, straightforward_thought_source
    from megatron_rlp.sampling import sample_thoughts
    from megatron_rlp.training import loop, parallel

    run = loop.RunConfig()
    run.model.model_preset = args.preset
    t = run.training
    t.seq_length = args.context_len + args.thought_len + 2  # the longest context and a whole thought
    t.micro_batch_size, t.global_batch_size = args.micro_batch_size, args.docs
    t.train_iters, t.lr, t.lr_decay_style, t.seed = args.warmup_iters + args.iters, args.lr, "constant", args.seed
    run.logging.log_interval, run.logging.timing_log_level = 1, 2
    preset = loop.resolve_preset(run.model)
    state = loop.setup(run, preset)
    try:
        stream = DocumentStream(open_indexed_dataset(corpus), preset.vocab_size, seed=args.seed, shuffle=False)
        config = RLPConfig(
            rlp_num_thoughts=args.num_thoughts, rlp_thought_len=args.thought_len,
            rlp_positions_per_doc=args.positions_per_doc, rlp_min_context=args.min_context,
            rlp_temperature=args.temperature, rlp_sampler_micro_batch_size=args.sampler_micro_batch_size,
            rlp_update_layout="shared" if variant == "shared_prefix" else "rows",
        )
        straightforward = variant == "straightforward"
        source = RecordingSource(straightforward_thought_source if straightforward
                                 else partial(sample_thoughts, layout=args.sampler_layout))
        objective = RLPObjective(config, state, BenchTokenizer(preset.vocab_size), stream, thought_source=source,
                                 straightforward=straightforward)
        iterations = []

        def on_iteration(_, record):
            iterations.append({
                "record": record,
                "cost": objective.iteration_cost(preset, t.global_batch_size),
                "padded_update_tokens": sum(mb["tokens"].numel() for mb in objective._cached),
                "thought_len_mean": record.get("rlp/thought_len_mean"),
            })

        with contextlib.redirect_stdout(io.StringIO()):  # the training log lines
            loop.train(state, objective, on_iteration=on_iteration)
    finally:
        parallel.destroy()
    return {"iterations": iterations, "thoughts": source.batches}


def summarise(rounds: list, warmup: int) -> dict:
    """Over the timed iterations of every round: per phase the median ms and the mean tokens
    (cost model) and GFLOP (model FLOPs); ``total`` ms is the median iteration time."""
    import statistics

    timed = [it for result in rounds for it in result["iterations"][warmup:]]
    n = len(timed)
    samples = {k: [] for k in RUN_PHASES + ("total",)}
    phases = {k: {"ms": 0.0, "tokens": 0.0, "gflop": 0.0} for k in RUN_PHASES + ("total",)}
    padded = 0.0
    for it in timed:
        ms, cost = it["record"]["timers_ms"], it["cost"].phases
        for phase, timer in _TIMER_OF.items():
            samples[phase].append(ms.get(timer, 0.0))
            phases[phase]["tokens"] += cost[phase].tokens / n
            phases[phase]["gflop"] += cost[phase].model_flops / 1e9 / n
        sampling = ms.get("rlp-sampling", 0.0)
        samples["sampling_other"].append(sampling - ms.get("rlp-sampling-prefill", 0.0)
                                         - ms.get("rlp-sampling-decode", 0.0))
        timed_ms = sampling + sum(ms.get(_TIMER_OF[k], 0.0) for k in _TIMER_OF if not k.startswith("sampling"))
        elapsed = it["record"]["elapsed_ms"]
        samples["other"].append(elapsed - timed_ms)
        samples["total"].append(elapsed)
        phases["total"]["tokens"] += sum(p.tokens for p in cost.values()) / n
        phases["total"]["gflop"] += it["cost"].model_flops / 1e9 / n
        padded += it["padded_update_tokens"] / n
    for phase, values in samples.items():
        phases[phase]["ms"] = statistics.median(values)
    return {"phases": phases, "update_padded_tokens": padded, "iteration_ms": samples["total"],
            "thought_len_mean": sum(it["thought_len_mean"] or 0.0 for it in timed) / n}


def same_thoughts(a: list, b: list) -> float:
    """Share of equal thought tokens in the first sampled batch of two variants."""
    (ta, la), (tb, lb) = a[0], b[0]
    if ta.shape != tb.shape:
        return 0.0
    return float(((ta == tb) | (ta < 0) & (tb < 0)).double().mean())


def format_run_table(args, summaries: dict, load: tuple, start_load: tuple) -> str:
    variants = list(summaries)
    contexts = args.docs * args.positions_per_doc
    lines = [
        f"{args.preset}: t in [{args.min_context}, {args.context_len}], G={args.num_thoughts}, "
        f"k={args.positions_per_doc}, thoughts <= {args.thought_len}, {args.docs} documents per iteration "
        f"({contexts} contexts, {contexts * args.num_thoughts} thoughts), update micro-batch "
        f"{args.micro_batch_size} document(s), sampler layout {args.sampler_layout}, T={args.temperature}; "
        f"median of {args.iters} iterations after {args.warmup_iters} warm-up x {args.rounds} rounds; "
        f"torch threads {args.threads}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end "
        f"({start_load[0]:.2f} at the start)",
        f"  {'phase':<17}" + "".join(f"{v:>30}" for v in variants),
        f"  {'':<17}" + "".join(f"{'ms':>10}{'tokens':>10}{'GFLOP':>10}" for _ in variants),
    ]
    for phase in RUN_PHASES + ("total",):
        row = f"  {phase:<17}"
        for v in variants:
            p = summaries[v]["phases"][phase]
            has_cost = phase not in ("sampling_other", "other")
            row += f"{p['ms']:10.1f}" + (f"{p['tokens']:10.0f}{p['gflop']:10.3f}" if has_cost else f"{'':>20}")
        lines.append(row)
    lines.append("  update tokens as run (padded):" + "".join(
        f"  {v} {summaries[v]['update_padded_tokens']:.0f}" for v in variants))
    lines.append("  mean thought length (with close):" + "".join(
        f"  {v} {summaries[v]['thought_len_mean']:.1f}" for v in variants))
    return "\n".join(lines)


def run_benchmark(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from megatron_rlp import platform

    platform.setup_platform()
    preset = get_preset(args.preset)
    if args.min_context is None:
        args.min_context = max(1, args.context_len - args.context_len // 8)
    if not 1 <= args.min_context <= args.context_len:
        raise SystemExit(f"--min-context {args.min_context} must be in [1, --context-len {args.context_len}]")
    if min(args.warmup_iters, args.iters - 1, args.rounds - 1, args.docs - 1, args.num_thoughts - 2) < 0:
        raise SystemExit("need --iters >= 1, --rounds >= 1, --warmup-iters >= 0, --docs >= 1 and --num-thoughts >= 2")
    if args.docs % args.micro_batch_size:
        raise SystemExit(f"--docs {args.docs} must be a multiple of --micro-batch-size {args.micro_batch_size}")
    start_load = os.getloadavg()
    results = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_documents(os.path.join(tmp, "docs"), args.docs * (args.warmup_iters + args.iters) + 1,
                                 args.context_len + 1, preset.vocab_size, args.seed)
        for r in range(args.rounds):
            order = args.variants[r % len(args.variants):] + args.variants[:r % len(args.variants)]
            for v in order:
                results[v].append(run_variant(v, args, corpus))
    load = os.getloadavg()
    summaries = {v: summarise(r, args.warmup_iters) for v, r in results.items()}
    print(format_run_table(args, summaries, load, start_load))

    def ratio(key, a, b):
        if a not in summaries or b not in summaries:
            return None
        return summaries[a]["phases"]["total"][key] / summaries[b]["phases"]["total"][key]

    out = {
        "flops_ratio": ratio("gflop", "shared_prefix", "rows"),
        "time_ratio": ratio("ms", "shared_prefix", "rows"),
        "flops_ratio_straightforward": ratio("gflop", "shared_prefix", "straightforward"),
        "time_ratio_straightforward": ratio("ms", "shared_prefix", "straightforward"),
        "phases": {v: s["phases"] for v, s in summaries.items()},
        "update_padded_tokens": {v: s["update_padded_tokens"] for v, s in summaries.items()},
        "iteration_ms": {v: s["iteration_ms"] for v, s in summaries.items()},
        "same_first_thoughts": {v: same_thoughts(results[args.variants[0]][0]["thoughts"], r[0]["thoughts"])
                                for v, r in results.items()},
        "settings": {"preset": args.preset, "context_len": args.context_len, "min_context": args.min_context,
                     "num_thoughts": args.num_thoughts, "positions_per_doc": args.positions_per_doc,
                     "thought_len": args.thought_len, "docs": args.docs, "micro_batch_size": args.micro_batch_size,
                     "sampler_micro_batch_size": args.sampler_micro_batch_size,
                     "sampler_layout": args.sampler_layout, "iters": args.iters,
                     "warmup_iters": args.warmup_iters, "rounds": args.rounds, "threads": args.threads},
        "load_average": list(load), "load_average_at_start": list(start_load),
    }
    print(json.dumps(out))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.analytic:
        return run_analytic(args)
    run_benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
