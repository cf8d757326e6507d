"""Question/answer benchmarks (GSM8K- and MATH-style): reading the file, pulling the answer out of
generated text, and scoring (accuracy with its standard error, pass@k, majority vote).

Pure functions; the generation lives in tools/eval_benchmark.py.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

EXTRACTORS = ("last-number", "boxed", "regex")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


class BenchmarkError(ValueError):
    """A benchmark file or flag that cannot be used as given."""


@dataclass
class Problem:
    question: str
    answer: str  # the reference answer, normalised (see reference_answer)
    line: int


def load_benchmark(path: str, limit: Optional[int] = None) -> list[Problem]:
    """JSON lines {"question": ..., "answer": ...}; blank lines are skipped.  GSM8K's answers
    ("... #### 72") and MATH's ("... \\boxed{1/2}") are reduced to the final answer."""
    problems = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise BenchmarkError(f"--data {path!r}: {e.strerror}") from None
    with f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{path}:{number}: not a JSON object ({e.msg}); each line must be "
                                     '{"question": ..., "answer": ...}') from None
            if not isinstance(record, dict):
                raise BenchmarkError(f"{path}:{number}: a JSON {type(record).__name__}, not an object with "
                                     '"question" and "answer"')
            missing = [k for k in ("question", "answer") if record.get(k) in (None, "")]
            if missing:
                raise BenchmarkError(f"{path}:{number}: no {' and no '.join(repr(k) for k in missing)}; each "
                                     'line must be {"question": ..., "answer": ...}')
            problems.append(Problem(str(record["question"]), reference_answer(str(record["answer"])), number))
            if limit is not None and len(problems) >= limit:
                break
    if not problems:
        raise BenchmarkError(f"--data {path!r} holds no problems")
    return problems


def reference_answer(text: str) -> str:
    if "####" in text:
        return normalize(text.rsplit("####", 1)[1])
    boxed = last_boxed(text)
    return normalize(boxed if boxed is not None else text)


def last_boxed(text: str) -> Optional[str]:
    """The contents of the last \\boxed{...} (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{") - 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1: j]
    return None


def normalize(answer: str) -> str:
    """Whitespace, a trailing period and $ signs off; numbers without thousands separators and
    trailing zeros (\"1,000.50\" -> \"1000.5\")."""
    a = answer.strip().strip("$").strip().rstrip(".").strip()
    if _NUMBER.fullmatch(a):
        value = a.replace(",", "")
        if "." in value:
            value = value.rstrip("0").rstrip(".")
        return value if value not in ("", "-") else "0"
    return " ".join(a.split())


def extract_answer(text: str, how: str, pattern: Optional[re.Pattern] = None) -> Optional[str]:
    """The answer in generated ``text``: the last number, the last \\boxed{...}, or the first
    group (else the whole match) of the last match of ``pattern``; None when there is none."""
    if how == "last-number":
        found = _NUMBER.findall(text)
        return normalize(found[-1]) if found else None
    if how == "boxed":
        boxed = last_boxed(text)
        return normalize(boxed) if boxed is not None else None
    if how == "regex":
        if pattern is None:
            raise BenchmarkError("--extract regex needs --extract-regex PATTERN")
        matches = list(pattern.finditer(text))
        if not matches:
            return None
        m = matches[-1]
        return normalize(m.group(1) if m.groups() else m.group(0))
    raise BenchmarkError(f"unknown --extract {how!r}; choose one of {', '.join(EXTRACTORS)}")


def compile_regex(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise BenchmarkError(f"--extract-regex {pattern!r} is not a valid regular expression: {e}") from None


def majority(answers: Sequence[Optional[str]]) -> Optional[str]:
    """The most frequent extracted answer (ties: the one seen first); None if none was extracted."""
    seen = [a for a in answers if a is not None]
    if not seen:
        return None
    counts = Counter(seen)
    best = max(counts.values())
    return next(a for a in seen if counts[a] == best)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def score(problems: Sequence[Problem], extracted: Sequence[Sequence[Optional[str]]], k: int) -> dict:
    """``extracted[i]``: the answers pulled from problem i's ``n >= k`` samples.  Accuracy is the
    mean over problems of the share of correct samples (pass@1); standard errors are over problems."""
    per_problem, passed, voted = [], [], []
    for problem, answers in zip(problems, extracted):
        correct = [a == problem.answer for a in answers]
        per_problem.append(sum(correct) / len(correct))
        passed.append(pass_at_k(len(correct), sum(correct), k))
        voted.append(float(majority(answers) == problem.answer))
    acc, acc_se = mean_and_se(per_problem)
    pk, pk_se = mean_and_se(passed)
    maj, maj_se = mean_and_se(voted)
    return {"accuracy": acc, "accuracy_se": acc_se, f"pass@{k}": pk, f"pass@{k}_se": pk_se,
            "majority": maj, "majority_se": maj_se,
            "extracted_frac": sum(a is not None for ans in extracted for a in ans) / max(1, sum(map(len, extracted)))}
