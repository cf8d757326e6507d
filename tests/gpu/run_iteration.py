"""One training iteration per objective (next-token, RLP) of a tiny model in bf16, as a user's
run does it, one objective after the other in the same process.

Run by tests/gpu/test_gpu.py in a fresh process (one rank: the default group is NCCL with CUDA)
or under torchrun (two GPUs).  Prints one JSON line: the iteration's metrics and what was built
(layer spec, device, dtype, softmax fusion, Mamba ops).

    python tests/gpu/run_iteration.py --preset tiny --spec local --objectives ntp,rlp --data PREFIX
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

NULL_VOCAB = 500  # NullTokenizer ids 0..499, eod = 500 (tests/training_fixtures.py's corpus)
OPEN, CLOSE = 501, 502


class MarkerTokenizer:
    """NullTokenizer ids plus the two thought markers (the tiny presets' vocabulary is 512)."""

    eod = NULL_VOCAB
    vocab_size = CLOSE + 1

    def token_to_id(self, piece):
        return {"<think>": OPEN, "</think>": CLOSE}.get(piece)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", choices=("tiny", "tiny-hybrid"), required=True)
    p.add_argument("--spec", choices=("local", "te"), required=True,
                   help="local: megatron-core's local layers even when Transformer Engine imports")
    p.add_argument("--objectives", default="ntp,rlp", help="comma-separated: ntp, rlp")
    p.add_argument("--data", required=True, help="prefix of a .bin/.idx corpus (NullTokenizer ids)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    from megatron_rlp.models import builder

    if args.spec == "local":
        builder.transformer_engine_available = lambda: False  # GPT and hybrid specs ask this
    elif not builder.transformer_engine_available():
        raise SystemExit("--spec te: Transformer Engine does not import here")

    from megatron_rlp.pretrain import build_objective, parse_run_config, setup_run
    from megatron_rlp.training import loop, parallel

    histories = {}
    for objective_name in args.objectives.split(","):
        run = parse_run_config(_flags(args, objective_name))
        state, tokenizer, stream = setup_run(run)
        if objective_name == "rlp":
            from megatron_rlp.rlp.step import RLPObjective

            objective = RLPObjective(run.extra["rlp"], state, MarkerTokenizer(), stream)
        else:
            objective = build_objective(run, state, tokenizer, stream)
        histories[objective_name] = loop.train(state, objective)

    from megatron.core.transformer.attention import Attention

    from megatron_rlp.training.checkpoint import unwrap_model

    model = unwrap_model(state.model[0] if isinstance(state.model, list) else state.model)
    param = next(model.parameters())
    cores = sorted({type(m.core_attention).__name__ for m in model.modules() if isinstance(m, Attention)})
    fusion = sorted({bool(getattr(m.core_attention, "scale_mask_softmax", None)
                          and m.core_attention.scale_mask_softmax.scaled_masked_softmax_fusion)
                     for m in model.modules() if isinstance(m, Attention)})
    mixer_ops = None
    if args.preset == "tiny-hybrid":
        from megatron.core.ssm import mamba_mixer

        fn = getattr(mamba_mixer, "mamba_chunk_scan_combined", None)
        mixer_ops = getattr(fn, "__module__", None)
    result = {
        "history": histories,
        "backend": dist.get_backend(),
        "world_size": dist.get_world_size(),
        "param_device": str(param.device.type),
        "param_dtype": str(param.dtype),
        "core_attention": cores,
        "masked_softmax_fusion": fusion,
        "mamba_scan_module": mixer_ops,
        "torch": torch.__version__,
    }
    if dist.get_rank() == 0:
        print("RESULT=" + json.dumps(result, default=str), flush=True)
    parallel.destroy()
    dist.barrier()
    dist.destroy_process_group()
    return result


def _flags(args, objective: str) -> list:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    flags = [
        "--model-preset", args.preset, "--bf16", "--layout-invariant-init",
        "--tensor-model-parallel-size", str(args.tp), "--pipeline-model-parallel-size", str(args.pp),
        "--micro-batch-size", "2", "--global-batch-size", str(2 * world // (args.tp * args.pp)),
        "--seq-length", "64", "--train-iters", "1", "--lr", "1e-4", "--lr-decay-style", "constant",
        "--data-path", args.data, "--tokenizer-type", "NullTokenizer", "--vocab-size", str(NULL_VOCAB),
        "--seed", "7",
    ]
    if objective == "rlp":
        flags += ["--rlp", "--rlp-num-thoughts", "4", "--rlp-thought-len", "8",
                  "--rlp-positions-per-doc", "2", "--rlp-min-context", "4"]
    elif objective != "ntp":
        raise SystemExit(f"unknown objective {objective!r}: use ntp and/or rlp")
    return flags


if __name__ == "__main__":
    main()
