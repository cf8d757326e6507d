"""Question/answer benchmark accuracy with and without a thought (GSM8K- and MATH-style files).

    python tools/eval_benchmark.py --load CKPT --data gsm8k_test.jsonl \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model Qwen/Qwen3-1.7B --use-checkpoint-args \\
        --prompt-template 'Question: {question}\\nAnswer:' --thought-len 1024 --answer-len 64 \\
        --stop '\\n\\n' --temperature 0.7 --samples 8 --extract last-number --output result.json

Each line of --data is {"question": ..., "answer": ...} (GSM8K's "... #### 72" and MATH's
"\\boxed{...}" answers are reduced to the final answer).  For every problem the prompt is the
template with the question filled in; with a thought the model first samples a thought after the
open marker (until it samples the close marker, EOD or --thought-len tokens; a forced close is
appended), then the answer, which is generated until a --stop string, EOD or --answer-len tokens.
Without a thought the answer follows the prompt directly.  Generation runs through the project's
sampler at the checkpoint's tensor/pipeline parallel layout (launch under torchrun with the
training run's --tensor-model-parallel-size / --pipeline-model-parallel-size); greedy with
--temperature 0, else --samples k draws per problem for accuracy (mean over samples), pass@k and
majority vote.  Answers are extracted with --extract (last number, last \\boxed{...}, or the first
group of --extract-regex); a sample whose answer cannot be extracted counts as wrong, and the
number of those is reported (a warning when the regex never matches).  Standard errors are over
problems.  Prints a table and ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Optional, Sequence

if __package__ in (None, ""):  # python tools/eval_benchmark.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rlp.rlp import answers

MODES = ("think", "plain")


def build_parser() -> argparse.ArgumentParser:
    from megatron_rlp import config as cfg

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    for title, cls in cfg.CONFIG_GROUPS.items():
        cfg.add_dataclass_args(p, cls, title)
    g = p.add_argument_group("benchmark")
    g.add_argument("--data", required=True, help='JSON lines {"question": ..., "answer": ...}')
    g.add_argument("--prompt-template", default="Question: {question}\nAnswer:",
                   help="the prompt, with {question} where the question goes")
    g.add_argument("--modes", default="think,plain", help="think (with a thought), plain (without), or both")
    g.add_argument("--thought-len", type=int, default=256, help="thought budget in tokens")
    g.add_argument("--answer-len", type=int, default=32, help="answer budget in tokens")
    g.add_argument("--stop", action="append", default=None,
                   help="a string that ends the answer (repeatable; default: a newline)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    g.add_argument("--samples", type=int, default=1, help="samples per problem (pass@k, majority vote); needs T > 0 if > 1")
    g.add_argument("--extract", choices=answers.EXTRACTORS, default="last-number")
    g.add_argument("--extract-regex", default=None, help="with --extract regex: the answer is its first group")
    g.add_argument("--limit", type=int, default=None, help="evaluate the first N problems")
    g.add_argument("--batch-problems", type=int, default=16, help="problems per sampler call")
    g.add_argument("--think-open", default="<think>")
    g.add_argument("--think-close", default="</think>")
    g.add_argument("--output", default=None, help="write the summary and every generation as JSON here")
    g.add_argument("--no-progress", action="store_true")
    return p


def check_args(ns: argparse.Namespace) -> None:
    problems = []
    ns.modes = [m.strip() for m in ns.modes.split(",") if m.strip()]
    if not ns.modes or any(m not in MODES for m in ns.modes):
        problems.append(f"--modes: choose from {', '.join(MODES)} (comma-separated)")
    if "{question}" not in ns.prompt_template:
        problems.append("--prompt-template must contain {question}")
    if ns.samples < 1:
        problems.append(f"--samples must be >= 1, got {ns.samples}")
    if ns.samples > 1 and ns.temperature == 0:
        problems.append("--samples > 1 draws the same greedy answer every time: pass --temperature > 0")
    if ns.temperature < 0:
        problems.append(f"--temperature must be >= 0, got {ns.temperature}")
    if ns.thought_len < 1 or ns.answer_len < 1:
        problems.append("--thought-len and --answer-len must be >= 1")
    if ns.extract == "regex" and not ns.extract_regex:
        problems.append("--extract regex needs --extract-regex PATTERN")
    if ns.extract_regex and ns.extract != "regex":
        problems.append("--extract-regex is used only with --extract regex")
    if ns.load is None:
        problems.append("--load (a checkpoint directory) is required")
    if problems:
        raise answers.BenchmarkError("; ".join(problems))
    if ns.stop is None:
        ns.stop = ["\n"]


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """The answer text up to the first stop string (the sampler stops on the stop strings' token
    sequences; a stop string tokenized differently in context is caught here)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


class Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="problem", file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def evaluate(ns: argparse.Namespace) -> Optional[dict]:
    """Every rank generates; the summary is returned on the last pipeline stage (None elsewhere)."""
    import torch

    from megatron_rlp.pretrain import setup_run, _run_config
    from megatron_rlp.sampling import generate as gen
    from megatron_rlp.training import checkpoint, loop, parallel

    problems = answers.load_benchmark(ns.data, ns.limit)
    pattern = answers.compile_regex(ns.extract_regex) if ns.extract == "regex" else None
    run = _run_config(ns)
    state, tokenizer, _ = setup_run(run, need_data=False)
    try:
        signature = loop.model_signature(state.preset)
        checkpoint.load_checkpoint(run.checkpoint.load, state.model, None, None, None, signature, finetune=True,
                                   step=run.checkpoint.ckpt_step)
        model = checkpoint.unwrap_model(state.model[0])
        open_id, close_id = tokenizer.token_to_id(ns.think_open), tokenizer.token_to_id(ns.think_close)
        if "think" in ns.modes and (open_id is None or close_id is None):
            raise answers.BenchmarkError(f"the tokenizer has no single token for {ns.think_open!r} / "
                                         f"{ns.think_close!r}: pass --think-open/--think-close, or --modes plain")
        stop_ids = [tokenizer.tokenize(s) for s in ns.stop]
        prompts = [tokenizer.tokenize(ns.prompt_template.format(question=p.question)) for p in problems]
        longest = max(map(len, prompts)) + ns.answer_len + ("think" in ns.modes) * (ns.thought_len + 2)
        if longest > run.training.seq_length:
            raise answers.BenchmarkError(
                f"the longest prompt ({max(map(len, prompts))} tokens) with the thought and answer budgets "
                f"needs {longest} tokens but --seq-length is {run.training.seq_length}: raise --seq-length "
                "(up to the model's positions) or lower --thought-len / --answer-len")
        common = dict(temperature=ns.temperature, eod_id=tokenizer.eod, max_sequence_length=run.training.seq_length,
                      vocab_size=tokenizer.vocab_size)
        out = {m: [] for m in ns.modes}  # per problem: list of (thought ids, answer text)
        progress = Progress(len(problems) * len(ns.modes),
                            not ns.no_progress and parallel.reporting_rank(run.parallel.pipeline_model_parallel_size))
        for start in range(0, len(problems), ns.batch_problems):
            batch = [torch.tensor(p, dtype=torch.int64) for p in prompts[start: start + ns.batch_problems]]
            seed = ns.seed + start
            for mode in ns.modes:
                thoughts = [[[] for _ in range(ns.samples)] for _ in batch]
                contexts = [[b] * ns.samples for b in batch]
                if mode == "think":
                    thought = gen.generate(model, batch, ns.samples, ns.thought_len, seed=seed, open_id=open_id,
                                       close_id=close_id, **common)
                    thoughts = [[ids + [close_id] if ids[-1:] != [close_id] else ids for ids in per] for per in thought]
                    contexts = [[torch.cat([b, torch.tensor([open_id] + ids, dtype=torch.int64)]) for ids in per]
                                for b, per in zip(batch, thoughts)]
                flat = [c for per in contexts for c in per]
                generated = gen.generate(model, flat, 1, ns.answer_len, seed=seed + 7919, stop_sequences=stop_ids, **common)
                texts = [truncate_at_stop(tokenizer.detokenize([i for i in g[0] if i != tokenizer.eod]), ns.stop)
                         for g in generated]
                for i in range(len(batch)):
                    out[mode].append([(thoughts[i][s], texts[i * ns.samples + s]) for s in range(ns.samples)])
                progress.update(len(batch))
        progress.close()
    finally:
        parallel.destroy()
    if not parallel.reporting_rank(run.parallel.pipeline_model_parallel_size):
        return None
    summary = {"data": ns.data, "problems": len(problems), "samples": ns.samples, "temperature": ns.temperature}
    never = 0
    for mode, per_problem in out.items():
        extracted = [[answers.extract_answer(text, ns.extract, pattern) for _, text in samples] for samples in per_problem]
        scores = answers.score(problems, extracted, ns.samples)
        missing = sum(a is None for ans in extracted for a in ans)
        if ns.extract == "regex" and missing == sum(map(len, extracted)):
            never += 1
        summary[mode] = dict(scores, unextracted=missing,
                             thought_len_mean=(sum(len(t) for s in per_problem for t, _ in s)
                                               / max(1, sum(map(len, per_problem)))) if mode == "think" else 0.0)
        summary[mode + "_generations"] = [
            {"line": p.line, "reference": p.answer,
             "samples": [{"thought": tokenizer.detokenize(t) if t else "", "answer": text, "extracted": a}
                         for (t, text), a in zip(samples, ext)]}
            for p, samples, ext in zip(problems, per_problem, extracted)]
        if ns.extract == "regex" and missing:
            warnings.warn(f"--extract-regex {ns.extract_regex!r} matched no answer in {missing} of "
                          f"{sum(map(len, extracted))} {mode} samples (counted as wrong)", stacklevel=1)
    return summary


def format_table(summary: dict, k: int) -> str:
    lines = [f"{summary['data']}: {summary['problems']} problems, {k} sample(s) each, T={summary['temperature']}",
             f"{'':<16}{'accuracy':>18}{f'pass@{k}':>18}{'majority':>18}{'unextracted':>13}"]
    for mode in MODES:
        if mode in summary:
            s = summary[mode]
            lines.append(f"{'with a thought' if mode == 'think' else 'without':<16}"
                         f"{s['accuracy']:>10.3f} ± {s['accuracy_se']:.3f}{s[f'pass@{k}']:>10.3f} ± {s[f'pass@{k}_se']:.3f}"
                         f"{s['majority']:>10.3f} ± {s['majority_se']:.3f}{s['unextracted']:>13}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    start = time.time()
    try:
        check_args(ns)
        summary = evaluate(ns)
    except answers.BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if summary is None:
        return 0
    summary["wall_time_s"] = round(time.time() - start, 1)
    print(format_table(summary, ns.samples))
    if ns.output:
        with open(ns.output, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if not k.endswith("_generations")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
