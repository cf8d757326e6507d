"""Cost of one RLP iteration by phase: the shared-prefix update against the project's previous path
and a straightforward RLP.

``--analytic`` (the only mode so far) prints, from the FLOP model alone
(:mod:`megatron_rlp.training.cost_model`), the FLOPs of each phase — teacher baseline, sampling
prefill, sampling decode, S_pred scoring, update forward+backward, optimizer, EMA — for three ways
of running the same iteration:

* ``shared_prefix``: each context enters the update once, followed by its G branches;
* ``rows`` (the previous path): one row per thought in the update, shared prefill in the sampler,
  S_pred from the update's forward;
* ``straightforward``: each thought re-prefilled for sampling, a separate S_pred scoring pass, one
  row per thought in the update.

By default it covers ``qwen3-1.7b`` and ``nemotron-nano-12b-v2`` at the paper's settings (context
2048, G=16, 512 contexts per step, T=0.7 — the temperature changes no FLOP count) for mean thought
lengths 256, 1024 and 2048.  Each setting prints a table and one JSON line::

    {"preset": ..., "mean_thought_len": ..., "flops_ratio": ..., "flops_ratio_straightforward": ...,
     "update_flops_ratio": ..., "update_token_ratio": ..., "phases": {variant: {phase: flops}},
     "tokens": {variant: {phase: tokens through the model}}}

``flops_ratio`` is shared_prefix / rows over the whole iteration, ``flops_ratio_straightforward``
shared_prefix / straightforward; ``update_token_ratio`` is (C + G(L+2)) / (G(C+L+2)).  FLOPs are
model FLOPs (forward + backward, Megatron-LM's TFLOP/s convention); with ``--recompute`` the
hardware FLOPs (recomputed forward included) are printed as well.

Running mode (wall time per phase on a real model) needs the shared-prefix update of issue 12
item 1, which is not built yet; without ``--analytic`` the script says so and exits with status 2.

    .venv/bin/python tools/bench_rlp.py --analytic
    .venv/bin/python tools/bench_rlp.py --analytic --presets tiny --context-len 256 --num-thoughts 8 \\
        --contexts 8 --thought-lens 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from megatron_rlp.models.presets import get_preset  # noqa: E402
from megatron_rlp.training.cost_model import PHASES, VARIANTS, RLPSettings, rlp_iteration_cost  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--analytic", action="store_true", help="print the FLOP model's breakdown without running")
    p.add_argument("--presets", nargs="+", default=["qwen3-1.7b", "nemotron-nano-12b-v2"])
    p.add_argument("--thought-lens", nargs="+", type=float, default=[256, 1024, 2048],
                   help="mean thought lengths L (tokens before the close marker)")
    p.add_argument("--context-len", type=int, default=2048, help="context length C")
    p.add_argument("--num-thoughts", type=int, default=16, help="G")
    p.add_argument("--contexts", type=int, default=512, help="contexts per iteration (B*k)")
    p.add_argument("--positions-per-doc", type=int, default=1, help="k")
    p.add_argument("--recompute", default="none", choices=("none", "selective", "full"),
                   help="also print hardware FLOPs with this recompute granularity")
    return p.parse_args(argv)


def analyse(preset_name: str, settings: RLPSettings, recompute: str) -> dict:
    preset = get_preset(preset_name)
    costs = {v: rlp_iteration_cost(preset, settings, v, recompute) for v in VARIANTS}
    c, g, l = settings.context_len, settings.num_thoughts, settings.thought_len
    shared, rows, straight = costs["shared_prefix"], costs["rows"], costs["straightforward"]
    record = {
        "preset": preset_name,
        "mean_thought_len": l,
        "context_len": c,
        "num_thoughts": g,
        "contexts": settings.contexts,
        "flops_ratio": shared.model_flops / rows.model_flops,
        "flops_ratio_straightforward": shared.model_flops / straight.model_flops,
        "update_flops_ratio": shared.phases["update"].model_flops / rows.phases["update"].model_flops,
        "update_token_ratio": (c + g * (l + 2)) / (g * (c + l + 2)),
        "phases": {v: {k: p.model_flops for k, p in cost.phases.items()} for v, cost in costs.items()},
        "tokens": {v: {k: p.tokens for k, p in cost.phases.items()} for v, cost in costs.items()},
    }
    if recompute != "none":
        record["recompute"] = recompute
        record["hardware_flops"] = {v: cost.hardware_flops for v, cost in costs.items()}
    return record


def format_table(record: dict) -> str:
    lines = [
        f"{record['preset']}: C={record['context_len']} G={record['num_thoughts']} "
        f"L={record['mean_thought_len']:g} contexts={record['contexts']}  (model FLOPs, PFLOP per iteration)",
        f"  {'phase':<18}" + "".join(f"{v:>17}" for v in VARIANTS),
    ]
    for phase in PHASES:
        lines.append(f"  {phase:<18}" + "".join(f"{record['phases'][v][phase] / 1e15:17.3f}" for v in VARIANTS))
    totals = {v: sum(record["phases"][v].values()) for v in VARIANTS}
    lines.append(f"  {'total':<18}" + "".join(f"{totals[v] / 1e15:17.3f}" for v in VARIANTS))
    if "hardware_flops" in record:
        lines.append(f"  {'hardware (' + record['recompute'] + ')':<18}"
                     + "".join(f"{record['hardware_flops'][v] / 1e15:17.3f}" for v in VARIANTS))
    lines.append(
        f"  shared_prefix / rows = {record['flops_ratio']:.3f} (update alone {record['update_flops_ratio']:.3f}, "
        f"token ratio {record['update_token_ratio']:.3f});  shared_prefix / straightforward = "
        f"{record['flops_ratio_straightforward']:.3f}"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.analytic:
        print(
            "bench_rlp.py: the running mode needs the shared-prefix RLP update (issue 12 item 1), which "
            "is not built yet; run with --analytic for the FLOP model's per-phase breakdown",
            file=sys.stderr,
        )
        return 2
    for name in args.presets:
        get_preset(name)  # unknown names fail before any output
        for l in args.thought_lens:
            settings = RLPSettings(contexts=args.contexts, context_len=args.context_len,
                                   num_thoughts=args.num_thoughts, thought_len=l,
                                   positions_per_doc=args.positions_per_doc)
            record = analyse(name, settings, args.recompute)
            print(format_table(record))
            print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
