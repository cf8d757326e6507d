"""`make demo`: warm up a tiny model with next-token prediction, then RLP, and measure thinking.

1. Corpus (megatron_rlp/data/demo_corpus.py): short documents of 3-digit addition, one problem
   per document (keeps sequences short on a 2-core CPU).  Warm-up documents show, for half of the
   problems, a worked thought right before one answer digit; RLP and held-out documents are plain
   text.  A SentencePiece tokenizer is trained on it (digits split, <think> and </think> single
   tokens) and the text becomes .bin/.idx.
2. Warm-up: next-token pretraining of the `tiny` preset, stopped where thinking helps but thoughts
   are often wrong.  The skill that is missing is copying the right operand digits into the later
   steps of a thought; it appears abruptly (held-out, worked tens-column thoughts exactly right:
   5% at iteration 600, 33% at 650, 68% at 700, 90% at 900), so the demo stops at 650.
3. Evaluation on held-out documents at the answer digits: information gain and accuracy with a
   sampled thought, and accuracy without one.
4. RLP on plain documents at the answer digits (no next-token term, as in the paper).
5. The same evaluation after RLP; changes are paired per held-out document.
6. Control: continued next-token pretraining on the same plain documents, same number of steps and
   learning rate, from the same warm-up checkpoint — what the RLP data alone does without RLP.

How this differs from the paper: a 0.8M-parameter model instead of Qwen3-1.7B, arithmetic
instead of web text, G=4 thoughts of at most 24 tokens instead of 16 of 2048, and RLP positions
restricted to answer digits (the paper scores every position).  The algorithm is the same.
Prints the numbers and ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from megatron_rlp.data import demo_corpus
from megatron_rlp.data.tokenizer import THINK_CLOSE, build_tokenizer


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare_corpus(out: str, n_warmup: int, n_rlp: int, n_heldout: int, seed: int, problems: int = 1) -> dict:
    from megatron_rlp.data.tokenizer import train_sentencepiece
    from tools.preprocess_data import preprocess

    kw = dict(problems_per_document=problems)
    warm = demo_corpus.generate_documents(n_warmup, seed=seed, split="train", with_thoughts=True, **kw)
    plain = demo_corpus.generate_documents(n_rlp, seed=seed + 1, split="train", with_thoughts=False, **kw)
    held = demo_corpus.generate_documents(n_heldout, seed=seed + 2, split="heldout", with_thoughts=False, **kw)
    model_path = train_sentencepiece([d.text for d in warm + plain], os.path.join(out, "tokenizer"), vocab_size=128)
    tok = build_tokenizer("SentencePieceTokenizer", model_path)
    paths = {"tokenizer": model_path}
    for name, docs in (("warmup", warm), ("rlp", plain), ("heldout", held)):
        jsonl = demo_corpus.write_jsonl(docs, os.path.join(out, f"{name}.jsonl"), tokenizer=tok)
        prefix = preprocess(jsonl, os.path.join(out, name), tok, append_eod=True, show_progress=False)["text"]
        paths[name] = prefix
        positions_file = os.path.join(out, f"{name}_positions.json")
        with open(positions_file, "w") as f:
            json.dump(demo_corpus.read_answer_token_positions(jsonl), f)
        paths[f"{name}_positions"] = positions_file
    return paths


def worked_thought_match(result, documents: list, tokenizer) -> dict:
    """Share of sampled thoughts that are exactly the worked thought of their answer digit, by
    answer column (0 = units ... 3 = thousands) and overall.  ``result.thought_ids`` follows the
    evaluation's contexts: every answer digit of every document, in order."""
    close_id = tokenizer.token_to_id(THINK_CLOSE)
    hits, counts = {}, {}
    contexts = [(doc, j) for doc in documents for j in range(len(doc.answer_spans))]
    if len(contexts) != len(result.thought_ids):
        raise ValueError(f"{len(result.thought_ids)} evaluated contexts for {len(contexts)} answer digits")
    for (doc, j), thoughts in zip(contexts, result.thought_ids):
        col, want = doc.answer_columns[j], doc.worked_thought(j).replace(" ", "")
        for ids in thoughts:
            text = tokenizer.detokenize([i for i in ids if i != close_id]).replace(" ", "")
            hits[col] = hits.get(col, 0) + (text == want)
            counts[col] = counts.get(col, 0) + 1
    out = {f"column_{c}": hits[c] / counts[c] for c in sorted(counts)}
    out["all"] = sum(hits.values()) / sum(counts.values())
    return out


def common_args(paths: dict, seed: int) -> list[str]:
    return [
        "--model-preset", "tiny", "--layout-invariant-init", "--seed", str(seed),
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", paths["tokenizer"],
        "--log-interval", "25", "--adam-beta2", "0.95",
    ]


def evaluate(paths: dict, ckpt: str, args, seed: int):
    from megatron_rlp.pretrain import parse_run_config
    from tools.eval_info_gain import evaluate_checkpoint

    run = parse_run_config(common_args(paths, seed) + ["--data-path", paths["heldout"], "--load", ckpt])
    return evaluate_checkpoint(run, args.eval_docs, paths["heldout_positions"], args.num_thoughts,
                               args.thought_len, args.temperature, seed=seed + 99)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--warmup-iters", type=int, default=650)
    p.add_argument("--warmup-decay-iters", type=int, default=1500)
    p.add_argument("--rlp-iters", type=int, default=250)
    p.add_argument("--num-thoughts", type=int, default=4)
    p.add_argument("--thought-len", type=int, default=24)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--rlp-docs-per-step", type=int, default=8)
    p.add_argument("--rlp-lr", type=float, default=1e-4)
    p.add_argument("--eval-docs", type=int, default=128)
    p.add_argument("--no-control", action="store_true", help="skip the continued-pretraining control (step 6)")
    args = p.parse_args(argv)

    from megatron_rlp.pretrain import parse_run_config, run_training
    from megatron_rlp.rlp.evaluate import paired_change
    from megatron_rlp.training import parallel

    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    _log("1/6 corpus, tokenizer, .bin/.idx")
    paths = prepare_corpus(args.out, n_warmup=40000, n_rlp=8000, n_heldout=args.eval_docs, seed=args.seed)

    _log(f"2/6 next-token warm-up: {args.warmup_iters} iterations")
    warm_ckpt = os.path.join(args.out, "ckpt_warmup")
    history = run_training(parse_run_config(common_args(paths, args.seed) + [
        "--data-path", paths["warmup"], "--seq-length", "128", "--micro-batch-size", "32",
        "--global-batch-size", "32", "--lr", "3e-3", "--min-lr", "3e-5", "--lr-warmup-iters", "20",
        "--lr-decay-style", "cosine", "--lr-decay-iters", str(args.warmup_decay_iters),
        "--train-iters", str(args.warmup_iters), "--weight-decay", "0.01", "--save", warm_ckpt,
    ]))
    parallel.destroy()
    loss = [h["lm loss"] for h in history]
    _log(f"   lm loss {loss[0]:.3f} -> {loss[-1]:.3f}")

    _log("3/6 held-out evaluation before RLP")
    before = evaluate(paths, warm_ckpt, args, args.seed)

    _log(f"4/6 RLP: {args.rlp_iters} iterations, G={args.num_thoughts}, thought cap {args.thought_len}")
    rlp_ckpt = os.path.join(args.out, "ckpt_rlp")
    rlp_hist = run_training(parse_run_config(common_args(paths, args.seed) + [
        "--data-path", paths["rlp"], "--rlp", "--rlp-positions-file", paths["rlp_positions"],
        "--rlp-num-thoughts", str(args.num_thoughts), "--rlp-thought-len", str(args.thought_len),
        "--rlp-temperature", str(args.temperature), "--rlp-positions-per-doc", "2",
        "--micro-batch-size", str(args.rlp_docs_per_step), "--global-batch-size", str(args.rlp_docs_per_step),
        "--lr", str(args.rlp_lr), "--lr-decay-style", "constant", "--weight-decay", "0.0",
        "--train-iters", str(args.rlp_iters), "--load", warm_ckpt, "--finetune", "--save", rlp_ckpt,
        "--tensorboard-dir", os.path.join(args.out, "tb_rlp"),
    ]))
    parallel.destroy()
    _log(f"   reward {rlp_hist[0].get('rlp/reward_mean', float('nan')):+.3f} -> {rlp_hist[-1].get('rlp/reward_mean', float('nan')):+.3f}")

    _log("5/6 held-out evaluation after RLP")
    after = evaluate(paths, rlp_ckpt, args, args.seed)

    control = None
    if not args.no_control:
        _log(f"6/6 control: {args.rlp_iters} next-token iterations on the same plain documents")
        ntp_ckpt = os.path.join(args.out, "ckpt_ntp_control")
        run_training(parse_run_config(common_args(paths, args.seed) + [
            "--data-path", paths["rlp"], "--seq-length", "128",
            "--micro-batch-size", str(args.rlp_docs_per_step), "--global-batch-size", str(args.rlp_docs_per_step),
            "--lr", str(args.rlp_lr), "--lr-decay-style", "constant", "--weight-decay", "0.0",
            "--train-iters", str(args.rlp_iters), "--load", warm_ckpt, "--finetune", "--save", ntp_ckpt,
        ]))
        parallel.destroy()
        control = evaluate(paths, ntp_ckpt, args, args.seed)

    b, a = before.summary(), after.summary()
    d_gain, se_gain = paired_change(before.gain, after.gain)
    d_acc, se_acc = paired_change(before.acc_think, after.acc_think)
    d_plain, se_plain = paired_change(before.acc_plain, after.acc_plain)
    print()
    print(f"held-out documents: {a['docs']}, answer-digit positions, G={args.num_thoughts} thoughts each")
    print(f"{'':32}{'before':>16}{'after':>16}{'paired change':>22}")
    print(f"{'information gain (nats)':32}{b['info_gain']:>9.3f} ± {b['info_gain_se']:.3f}{a['info_gain']:>9.3f} ± {a['info_gain_se']:.3f}"
          f"{d_gain:>+13.3f} ± {se_gain:.3f} ({d_gain / se_gain if se_gain else float('nan'):+.1f} SE)")
    print(f"{'accuracy with a thought':32}{b['acc_think']:>9.3f} ± {b['acc_think_se']:.3f}{a['acc_think']:>9.3f} ± {a['acc_think_se']:.3f}"
          f"{d_acc:>+13.3f} ± {se_acc:.3f} ({d_acc / se_acc if se_acc else float('nan'):+.1f} SE)")
    print(f"{'accuracy without a thought':32}{b['acc_plain']:>9.3f} ± {b['acc_plain_se']:.3f}{a['acc_plain']:>9.3f} ± {a['acc_plain_se']:.3f}"
          f"{d_plain:>+13.3f} ± {se_plain:.3f}")
    print(f"{'thought length (tokens)':32}{b['thought_len_mean']:>16.2f}{a['thought_len_mean']:>16.2f}")
    print(f"{'closed by the model':32}{b['closed_by_model_frac']:>16.3f}{a['closed_by_model_frac']:>16.3f}")
    if control is not None:
        c = control.summary()
        dc_gain, sc_gain = paired_change(before.gain, control.gain)
        dc_acc, sc_acc = paired_change(before.acc_think, control.acc_think)
        print("control (next-token training on the same text instead of RLP):")
        print(f"{'  information gain (nats)':32}{'':>16}{c['info_gain']:>9.3f} ± {c['info_gain_se']:.3f}"
              f"{dc_gain:>+13.3f} ± {sc_gain:.3f}")
        print(f"{'  accuracy with a thought':32}{'':>16}{c['acc_think']:>9.3f} ± {c['acc_think_se']:.3f}"
              f"{dc_acc:>+13.3f} ± {sc_acc:.3f}")
        print(f"{'  accuracy without a thought':32}{'':>16}{c['acc_plain']:>9.3f} ± {c['acc_plain_se']:.3f}")
    tokenizer = build_tokenizer("SentencePieceTokenizer", paths["tokenizer"])
    held = demo_corpus.read_jsonl(os.path.join(args.out, "heldout.jsonl"))[: args.eval_docs]
    matches = [("before", worked_thought_match(before, held, tokenizer)),
               ("after", worked_thought_match(after, held, tokenizer))]
    if control is not None:
        matches.append(("control", worked_thought_match(control, held, tokenizer)))
    print("sampled thought exactly the worked thought, by answer column (units, tens, hundreds, thousands):")
    for name, m in matches:
        cols = " ".join(f"{m[k]:.3f}" for k in sorted(m) if k.startswith("column_"))
        print(f"  {name:<8} {cols}   all {m['all']:.3f}")
    print(f"wall time: {time.time() - start:.0f} s")
    result = {
        "info_gain_before": b["info_gain"], "info_gain_after": a["info_gain"],
        "stderr_before": b["info_gain_se"], "stderr_after": a["info_gain_se"],
        "acc_think_before": b["acc_think"], "acc_think_after": a["acc_think"],
        "acc_stderr_before": b["acc_think_se"], "acc_stderr_after": a["acc_think_se"],
        "info_gain_paired_change": d_gain, "info_gain_paired_stderr": se_gain,
        "acc_think_paired_change": d_acc, "acc_think_paired_stderr": se_acc,
        "thought_len_after": a["thought_len_mean"], "closed_by_model_after": a["closed_by_model_frac"],
        "wall_time_s": round(time.time() - start, 1),
    }
    result.update(worked_thought_match_before=matches[0][1]["all"], worked_thought_match_after=matches[1][1]["all"])
    if control is not None:
        result.update(control_info_gain=control.summary()["info_gain"], control_acc_think=control.summary()["acc_think"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
