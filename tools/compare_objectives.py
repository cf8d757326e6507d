"""The paper's comparison at matched compute: continued pretraining (CPT), RLP and an RPT-style
reward, from one checkpoint, on the same data, then evaluated on the same held-out documents.

    python tools/compare_objectives.py --load BASE_CKPT --rlp-iters 60 --out cmp \\
        --eval-data-path HELDOUT_PREFIX --eval-positions-file heldout_positions.json \\
        [training flags shared by every run: --model-preset, --tokenizer-*, --data-path, --seq-length,
         --micro-batch-size, --global-batch-size, --lr, --lr-decay-style, --rlp-* ...]

1. RLP runs --rlp-iters iterations (or, with --flops-budget F, until F model FLOPs).  With
   --rlp-iters the budget is what those iterations cost: the cost model's count of every phase
   (teacher, sampling, update, optimizer, EMA), summed over the run.
2. CPT (next-token training, the same --data-path, --seq-length rows of --global-batch-size) and
   RPT-style RL (--rlp-reward prefix-match on positions with the teacher's highest next-token
   entropy, --rlp-position-filter entropy) each run until they have spent the same budget
   (--exit-model-flops).  All runs go through the project's training entry point and start from
   --load's weights with a fresh optimizer.
3. Each run saves --eval-points checkpoints on the way; every one and the base checkpoint are
   evaluated on the held-out documents with tools/eval_info_gain.py's evaluation: information gain,
   next-token accuracy with and without a thought, standard errors over documents and changes
   against the base paired per document.

Model FLOPs are counted as Megatron-LM's TFLOP/s counts them (megatron_rlp/training/cost_model.py):
forward 2·(dense parameters)·tokens plus the attention and Mamba terms, the backward twice the
forward, recompute not counted; for CPT one iteration is the forward-backward of global batch x
seq-length tokens, for RLP/RPT the sum of its phases over the real (unpadded) tokens of that batch.
Prints a table, writes a PNG of the held-out metrics against FLOPs and ends with one line of JSON.
Launch it under torchrun for TP/PP: every rank runs the same sequence of runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

if __package__ in (None, ""):  # python tools/compare_objectives.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OBJECTIVES = ("cpt", "rlp", "rpt")


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--load", required=True, help="checkpoint every run starts from (weights only)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--rlp-iters", type=int, help="RLP iterations; the FLOP budget is what they cost")
    budget.add_argument("--flops-budget", type=float, help="model FLOPs every objective may spend, e.g. 2e15")
    p.add_argument("--out", required=True, help="directory for the runs' checkpoints, the JSON and the plot")
    p.add_argument("--objectives", default=",".join(OBJECTIVES),
                   help="comma-separated subset of cpt,rlp,rpt (default all three)")
    p.add_argument("--eval-points", type=int, default=3, help="checkpoints evaluated per run (default 3)")
    p.add_argument("--eval-data-path", required=True, help="held-out .bin/.idx prefix")
    p.add_argument("--eval-positions-file", default=None, help="JSON list of allowed positions per held-out document")
    p.add_argument("--eval-docs", type=int, default=128)
    p.add_argument("--eval-thoughts", type=int, default=4)
    p.add_argument("--eval-thought-len", type=int, default=None, help="default: --rlp-thought-len")
    p.add_argument("--eval-temperature", type=float, default=None, help="default: --rlp-temperature")
    p.add_argument("--rpt-entropy-top-frac", type=float, default=0.5,
                   help="RPT: positions whose teacher entropy is in this top fraction (default 0.5)")
    p.add_argument("--rpt-match-tokens", type=int, default=1, help="RPT: tokens the prediction must match")
    ours, training_argv = p.parse_known_args(argv)
    from megatron_rlp.pretrain import build_parser

    train_ns = build_parser().parse_args(training_argv)
    chosen = [o.strip() for o in ours.objectives.split(",") if o.strip()]
    unknown = [o for o in chosen if o not in OBJECTIVES]
    if unknown or not chosen:
        p.error(f"--objectives {ours.objectives!r}: choose among {', '.join(OBJECTIVES)}")
    if ours.rlp_iters is not None and ours.rlp_iters < 1:
        p.error(f"--rlp-iters must be >= 1, got {ours.rlp_iters}")
    if ours.rlp_iters is not None and "rlp" not in chosen:
        p.error("--rlp-iters sets the budget by running RLP: keep rlp in --objectives or pass --flops-budget")
    if ours.eval_points < 1:
        p.error(f"--eval-points must be >= 1, got {ours.eval_points}")
    for flag in ("--save", "--pretrained-checkpoint", "--train-iters", "--exit-model-flops", "--save-interval", "--rlp"):
        if any(a == flag or a.startswith(flag + "=") for a in training_argv):
            p.error(f"{flag} is set by the tool for each run; leave it out of the training flags")
    ours.objectives = chosen
    return ours, train_ns


def run_config(ns: argparse.Namespace, **overrides):
    """The training entry point's RunConfig for ``ns`` with ``overrides`` applied (flag dests)."""
    from megatron_rlp.pretrain import _run_config

    ns = copy.copy(ns)
    for key, value in overrides.items():
        if not hasattr(ns, key):
            raise ValueError(f"this build has no --{key.replace('_', '-')} flag, which the comparison needs")
        setattr(ns, key, value)
    return _run_config(ns)


def one_rlp_iteration_flops(ns: argparse.Namespace) -> float:
    """The cost model's FLOPs of one RLP iteration whose thoughts all reach --rlp-thought-len at the
    longest context the rows allow: the most one iteration can cost."""
    from megatron_rlp.data.tokenizer import build_tokenizer
    from megatron_rlp.training import loop
    from megatron_rlp.training.cost_model import RLPSettings, rlp_iteration_cost

    run = run_config(ns, rlp=True)
    c, t = run.extra["rlp"], run.training
    tokenizer = build_tokenizer(run.data.tokenizer_type, run.data.tokenizer_model, run.model.vocab_size)
    preset = loop.resolve_preset(run.model, tokenizer.vocab_size, tp=run.parallel.tensor_model_parallel_size,
                                 seq_length=t.seq_length, load=None)
    context = max(1, t.seq_length - c.rlp_thought_len - 2)
    settings = RLPSettings(contexts=t.global_batch_size * c.rlp_positions_per_doc, context_len=context,
                           num_thoughts=c.rlp_num_thoughts, thought_len=c.rlp_thought_len,
                           positions_per_doc=c.rlp_positions_per_doc, window_len=t.seq_length)
    variant = "shared_prefix" if c.rlp_update_layout == "shared" else "rows"
    return rlp_iteration_cost(preset, settings, variant).model_flops


def ntp_iteration_flops(ns: argparse.Namespace) -> float:
    from megatron_rlp.data.tokenizer import build_tokenizer
    from megatron_rlp.training import loop
    from megatron_rlp.training.cost_model import ntp_iteration_cost

    run = run_config(ns, rlp=False)
    t = run.training
    tokenizer = build_tokenizer(run.data.tokenizer_type, run.data.tokenizer_model, run.model.vocab_size)
    preset = loop.resolve_preset(run.model, tokenizer.vocab_size, tp=run.parallel.tensor_model_parallel_size,
                                 seq_length=t.seq_length, load=None)
    return ntp_iteration_cost(preset, t.global_batch_size, t.seq_length,
                              t.recompute_granularity or "none").model_flops


def train(ns: argparse.Namespace, run_dir: str, base: str, iters: int, save_interval: int,
          budget: Optional[float], **objective) -> list[dict]:
    from megatron_rlp.pretrain import run_training
    from megatron_rlp.training import parallel

    run = run_config(ns, pretrained_checkpoint=base, load=run_dir, save=run_dir, train_iters=iters,
                     save_interval=save_interval, exit_model_flops=budget, **objective)
    try:
        return run_training(run)
    finally:
        parallel.destroy()


def evaluate(ns: argparse.Namespace, ours, ckpt_dir: str, step: Optional[int]):
    from tools.eval_info_gain import evaluate_checkpoint

    run = run_config(ns, rlp=False, data_path=ours.eval_data_path, load=ckpt_dir, ckpt_step=step,
                     split=None, valid_data_path=None, eval_interval=None)
    return evaluate_checkpoint(
        run, ours.eval_docs, ours.eval_positions_file, ours.eval_thoughts,
        ours.eval_thought_len or ns.rlp_thought_len, ours.eval_temperature or ns.rlp_temperature,
        seed=ns.seed + 99, min_context=ns.rlp_min_context, open_piece=ns.rlp_think_open,
        close_piece=ns.rlp_think_close,
    )


def objective_overrides(name: str, ours) -> dict:
    if name == "cpt":
        return {"rlp": False}
    if name == "rlp":
        return {"rlp": True}
    return {"rlp": True, "rlp_reward": "prefix-match", "rlp_reward_match_tokens": ours.rpt_match_tokens,
            "rlp_position_filter": "entropy", "rlp_entropy_top_frac": ours.rpt_entropy_top_frac}


def point(result, base, flops: float, iteration: int) -> dict:
    from megatron_rlp.rlp.evaluate import paired_change

    s = result.summary()
    out = {"flops": flops, "iteration": iteration, **{k: s[k] for k in (
        "info_gain", "info_gain_se", "acc_think", "acc_think_se", "acc_plain", "acc_plain_se", "thought_len_mean")}}
    if base is not None:
        for key, values, ref in (("info_gain", result.gain, base.gain), ("acc_think", result.acc_think, base.acc_think),
                                 ("acc_plain", result.acc_plain, base.acc_plain)):
            change, se = paired_change(ref, values)
            out[f"{key}_change"], out[f"{key}_change_se"] = change, se
    return out


def format_table(budget: float, base_point: dict, curves: dict) -> str:
    lines = [f"FLOP budget {budget:.4g} model FLOPs; held-out: {base_point['docs']} documents",
             f"{'objective':<10}{'iters':>6}{'FLOPs':>11}{'info gain':>18}{'acc think':>16}{'acc plain':>16}"
             f"{'Δ gain (paired)':>20}{'Δ acc think':>18}"]

    def row(name, p):
        change = lambda k: (f"{p[k + '_change']:+.3f} ± {p[k + '_change_se']:.3f}" if k + "_change" in p else "")
        return (f"{name:<10}{p['iteration']:>6}{p['flops']:>11.3g}{p['info_gain']:>10.3f} ± {p['info_gain_se']:.3f}"
                f"{p['acc_think']:>8.3f} ± {p['acc_think_se']:.3f}{p['acc_plain']:>8.3f} ± {p['acc_plain_se']:.3f}"
                f"{change('info_gain'):>20}{change('acc_think'):>18}")

    lines.append(row("base", base_point))
    for name, points in curves.items():
        lines.append(row(name, points[-1]))
    return "\n".join(lines)


def plot(curves: dict, base_point: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (("info_gain", "information gain (nats)"), ("acc_think", "accuracy with a thought"),
               ("acc_plain", "accuracy without a thought"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4))
    for ax, (key, label) in zip(axes, metrics):
        for name, points in curves.items():
            pts = [base_point] + points
            ax.errorbar([p["flops"] for p in pts], [p[key] for p in pts], yerr=[p[key + "_se"] for p in pts],
                        marker="o", capsize=2, label=name)
        ax.set_xlabel("model FLOPs")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ours, ns = parse_args(argv)
    from megatron_rlp.training.checkpoint import available_iterations, consumed_model_flops, read_tracker

    start = time.time()
    os.makedirs(ours.out, exist_ok=True)
    if read_tracker(ours.load) is None:
        print(f"error: --load {ours.load!r} holds no checkpoint", file=sys.stderr)
        return 2
    max_rlp = one_rlp_iteration_flops(ns)
    budget = ours.flops_budget
    if budget is not None and budget < max_rlp:
        print(f"error: --flops-budget {budget:.4g} is smaller than one RLP iteration at these settings "
              f"(up to {max_rlp:.4g} model FLOPs with thoughts of --rlp-thought-len {ns.rlp_thought_len}); "
              "raise the budget or pass --rlp-iters", file=sys.stderr)
        return 2
    order = ["rlp"] + [o for o in ours.objectives if o != "rlp"] if "rlp" in ours.objectives else ours.objectives
    runs = {}
    for name in order:
        run_dir = os.path.join(ours.out, name)
        if name == "cpt":
            iters = math.ceil(budget / ntp_iteration_flops(ns))
        elif name == "rlp" and ours.rlp_iters is not None:
            iters = ours.rlp_iters
        else:  # an RL run stops at the budget; its iterations cost at least a tenth of the most one can
            iters = math.ceil(10 * budget / max_rlp)
        expected = ours.rlp_iters if name != "cpt" and ours.rlp_iters else iters
        save_interval = max(1, math.ceil(expected / ours.eval_points))
        print(f"[compare] {name}: up to {iters} iterations, "
              + (f"budget {budget:.4g} model FLOPs" if budget is not None else "the budget follows"), flush=True)
        history = train(ns, run_dir, ours.load, iters, save_interval,
                        None if (name == "rlp" and ours.rlp_iters) else budget, **objective_overrides(name, ours))
        if name == "rlp" and budget is None:
            budget = history[-1]["consumed_model_flops"]
            print(f"[compare] budget: {ours.rlp_iters} RLP iterations = {budget:.4g} model FLOPs", flush=True)
        runs[name] = run_dir

    # Every rank takes part in every evaluation; the last pipeline stage holds the results.
    base = evaluate(ns, ours, ours.load, None)
    results = {name: [(step, evaluate(ns, ours, run_dir, step)) for step in available_iterations(run_dir)]
               for name, run_dir in runs.items()}
    from megatron_rlp.training import parallel

    if base is None or not parallel.reporting_rank(ns.pipeline_model_parallel_size):
        return 0
    base_point = dict(point(base, None, 0.0, 0), docs=base.summary()["docs"])
    curves = {name: [point(result, base, consumed_model_flops(runs[name], step), step) for step, result in pairs]
              for name, pairs in results.items()}
    print()
    print(format_table(budget, base_point, curves))
    png = os.path.join(ours.out, "compare_objectives.png")
    plot(curves, base_point, png)
    summary = {"flops_budget": budget, "base": base_point, "objectives": {k: v[-1] for k, v in curves.items()},
               "curves": curves, "plot": png, "wall_time_s": round(time.time() - start, 1)}
    with open(os.path.join(ours.out, "compare_objectives.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {png}; wall time {summary['wall_time_s']} s")
    print(json.dumps({k: summary[k] for k in ("flops_budget", "objectives", "wall_time_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
