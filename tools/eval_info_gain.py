"""Think-vs-no-think gain on held-out documents, and the reward curve of a run.

    python tools/eval_info_gain.py --load CKPT_DIR --data-path HELDOUT_PREFIX \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model \\
        --positions-file heldout_positions.json --num-docs 128 --num-thoughts 4 --thought-len 32 \\
        --output eval.json
    python tools/eval_info_gain.py --plot-tensorboard RUN_TB_DIR --plot-out reward.png

Prints a table (mean and standard error over documents) of the information gain
log p(x_t | x_<t, c) − log p(x_t | x_<t) — the quantity of RLP_SPEC.md Prop. 3 — and of the
next-token accuracy with and without a thought; writes the same as JSON.  Model flags
(--model-preset and overrides) must match the checkpoint, or pass --use-checkpoint-args.  --seq-length
bounds every scored row (context + markers + thought, as in RLP training): longer documents are
evaluated in windows.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def load_positions(path: Optional[str], docs, min_context: int) -> list[list[int]]:
    if path is None:
        return [list(range(min_context, len(d))) for d in docs]
    with open(path) as f:
        allowed = json.load(f)
    if len(allowed) < len(docs):
        raise ValueError(f"--positions-file {path!r} lists {len(allowed)} documents, fewer than the {len(docs)} evaluated")
    return [[t for t in allowed[i] if min_context <= t < len(d)] for i, d in enumerate(docs)]


def evaluate_checkpoint(run, num_docs: int, positions_file: Optional[str], num_thoughts: int, thought_len: int,
                        temperature: float, seed: int, min_context: int = 1, open_piece="<think>",
                        close_piece="</think>") -> "ThinkingEval":
    import torch

    from megatron_rlp.pretrain import setup_run
    from megatron_rlp.rlp.evaluate import evaluate_thinking
    from megatron_rlp.sampling import sample_thoughts
    from megatron_rlp.training import checkpoint, loop, parallel

    from megatron_rlp.rlp.config import validate_rlp_lengths

    run.data.shuffle_documents = False
    state, tokenizer, stream = setup_run(run)
    try:
        # Rows hold at most --seq-length inputs: long documents are evaluated in windows.
        validate_rlp_lengths(run.training.seq_length, state.preset.max_position_embeddings, thought_len, min_context,
                             thought_flag="--thought-len", context_flag="--min-context")
        signature = loop.model_signature(state.preset)
        checkpoint.load_checkpoint(run.checkpoint.load, state.model, None, None, None, signature, finetune=True,
                                   step=run.checkpoint.ckpt_step)
        docs = [torch.from_numpy(d) for d in stream.next_documents(min(num_docs, stream.num_documents))]
        positions = load_positions(positions_file, docs, min_context)
        keep = [i for i, p in enumerate(positions) if p]
        docs, positions = [docs[i] for i in keep], [positions[i] for i in keep]
        open_id, close_id = tokenizer.token_to_id(open_piece), tokenizer.token_to_id(close_piece)
        if open_id is None or close_id is None:
            raise ValueError(f"the tokenizer has no single token for {open_piece!r} / {close_piece!r}")
        model = checkpoint.unwrap_model(state.model[0])
        return evaluate_thinking(
            model, docs, positions, sample_thoughts, num_thoughts, thought_len, temperature,
            open_id, close_id, tokenizer.eod, seed, run.training.seq_length,
            vocab_size=tokenizer.vocab_size, min_context=min_context,
        )
    finally:
        parallel.destroy()


def format_table(summary: dict) -> str:
    rows = [
        ("information gain (nats)", summary["info_gain"], summary["info_gain_se"]),
        ("accuracy with a thought", summary["acc_think"], summary["acc_think_se"]),
        ("accuracy without a thought", summary["acc_plain"], summary["acc_plain_se"]),
    ]
    lines = [f"{'metric':<30}{'mean':>10}{'stderr':>10}"]
    lines += [f"{name:<30}{mean:>10.4f}{se:>10.4f}" for name, mean, se in rows]
    lines.append(f"{'thought length (tokens)':<30}{summary['thought_len_mean']:>10.2f}")
    lines.append(f"{'closed by the model':<30}{summary['closed_by_model_frac']:>10.3f}")
    lines.append(f"documents: {summary['docs']}")
    return "\n".join(lines)


def plot_reward_curve(tb_dir: str, out_png: str, tags=("rlp/reward_mean", "rlp/info_gain")) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir)
    acc.Reload()
    available = set(acc.Tags().get("scalars", []))
    found = [t for t in tags if t in available]
    if not found:
        raise ValueError(f"{tb_dir}: none of {list(tags)} logged (scalars there: {sorted(available)[:12]})")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for tag in found:
        events = acc.Scalars(tag)
        ax.plot([e.step for e in events], [e.value for e in events], label=tag)
    ax.set_xlabel("iteration")
    ax.set_ylabel("nats")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return found


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_rlp import config as cfg
    from megatron_rlp.training.loop import RunConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for title, cls in cfg.CONFIG_GROUPS.items():
        cfg.add_dataclass_args(parser, cls, title)
    parser.add_argument("--positions-file", default=None, help="JSON list of allowed positions per document")
    parser.add_argument("--num-docs", type=int, default=128)
    parser.add_argument("--num-thoughts", type=int, default=4)
    parser.add_argument("--thought-len", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--min-context", type=int, default=1)
    parser.add_argument("--output", default=None, help="write the summary as JSON here")
    parser.add_argument("--plot-tensorboard", default=None, help="a run's --tensorboard-dir to plot")
    parser.add_argument("--plot-out", default="reward_curve.png")
    ns = parser.parse_args(argv)

    if ns.plot_tensorboard:
        tags = plot_reward_curve(ns.plot_tensorboard, ns.plot_out)
        print(f"wrote {ns.plot_out} ({', '.join(tags)})")
        if not ns.load:
            return 0
    if not ns.load:
        print("error: --load (a checkpoint directory) is required to evaluate", file=sys.stderr)
        return 2
    run = RunConfig(**{name: cfg.from_namespace(cls, ns) for name, cls in cfg.CONFIG_GROUPS.items()})
    result = evaluate_checkpoint(run, ns.num_docs, ns.positions_file, ns.num_thoughts, ns.thought_len,
                                 ns.temperature, ns.seed, ns.min_context)
    if result is None:  # not the last pipeline stage: that one reports
        return 0
    summary = result.summary()
    print(format_table(summary))
    if ns.output:
        with open(ns.output, "w") as f:
            json.dump(dict(summary, per_document={"gain": result.gain.tolist(),
                                                  "acc_think": result.acc_think.tolist(),
                                                  "acc_plain": result.acc_plain.tolist()}), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
