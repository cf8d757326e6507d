"""The embedded demo corpus: short documents of 3-digit addition where thinking helps.

Each document holds two problems written as short prose, e.g.::

    Question: what is 417 plus 385? Answer: 802. Add 664 and 158: the sum is 822.

Documents come in two kinds, from the same problems for a given seed and split:

* **plain** (``with_thoughts=False``) — for RLP and held-out evaluation: no thoughts at all;
* **warm-up** (``with_thoughts=True``) — for ordinary next-token pretraining: each problem shows,
  with probability ``thought_fraction`` (default one half), a worked thought placed right before one
  randomly chosen answer digit::

      Question: what is 417 plus 385? Answer: 8<think>7+5=12 1+8+1=10</think>02.

Answer digits are written in the natural order (most significant first).  Numbering the columns from
the right (0 = units, 1 = tens, 2 = hundreds), the digit of column ``k`` depends on columns
``0 .. k`` of the operands: the units digit on the units column alone, the tens digit on the tens and
units columns (through the carry), the hundreds digit on all three columns, and the thousands digit
(present only when the sum is at least 1000, where it is always 1) is the carry out of the hundreds
column, so it too depends on all columns.  The first digit written therefore needs the most work.

A thought works only the columns the following digit depends on, least significant first, one step
per column: ``a+b=s`` (``a+b+1=s`` when a carry comes in), steps separated by spaces; before a
thousands digit it ends with ``c1`` (the final carry).  The digit that follows the thought is always
the last character the thought computes, so thinking is in distribution at every answer position:
a model that learned to think here can think before any answer digit of a plain document.  With a
SentencePiece model from :func:`megatron_rlp.data.tokenizer.train_sentencepiece` (digits split) a
thought is at most 29 tokens including both markers (28 where ``▁c`` is one piece), and removing
the thought's tokens from a warm-up document gives exactly the tokens of the plain document — the
sequences RLP builds, ``(x_<t, <think>, c, </think>, x_t)``, are the warm-up documents' own shape.
Token counts with the demo's 128-piece model: plain documents 38-44, warm-up documents 38-97
(mean about 58).

Train and held-out problems never overlap: an unordered pair ``{a, b}`` belongs to the held-out split
when a hash of it falls in the held-out tenth, whatever the seed.

For RLP and evaluation the positions that matter are the answer digits.  Every document records the
character span of each answer digit (``answer_spans``); :func:`answer_token_positions` turns them into
token positions for a tokenizer (each digit must be a single token, which ``split_digits`` ensures),
and :func:`write_jsonl` stores them next to the text so the demo can restrict RLP and evaluation to
those positions after ``tools/preprocess_data.py`` has turned the ``text`` field into ``.bin/.idx``.
Token positions index the document's own tokens (an appended end-of-document token comes after them).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from typing import Iterable

from megatron_rlp.data.tokenizer import THINK_CLOSE, THINK_OPEN

SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 10
OPERAND_MIN, OPERAND_MAX = 100, 999

# Each template ends with the answer followed by a full stop; ``{s}`` is where the digits go.
TEMPLATES = (
    "Question: what is {a} plus {b}? Answer: {s}.",
    "Add {a} and {b}: the sum is {s}.",
    "What do {a} and {b} make? They make {s}.",
)


def problem_split(a: int, b: int) -> str:
    """``"heldout"`` or ``"train"``: the split the unordered problem ``{a, b}`` belongs to."""
    lo, hi = min(a, b), max(a, b)
    h = int.from_bytes(hashlib.sha256(f"{lo}+{hi}".encode()).digest()[:8], "big")
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def _digit(x: int, column: int) -> int:
    return (x // 10**column) % 10


def answer_columns(a: int, b: int) -> list[int]:
    """Column of each answer digit of ``a + b`` in written order, e.g. ``[2, 1, 0]`` or ``[3, 2, 1, 0]``."""
    n = len(str(a + b))
    return list(range(n - 1, -1, -1))


def worked_thought(a: int, b: int, column: int) -> str:
    """The worked thought (without markers) that ends with answer digit ``column`` of ``a + b``.

    Works columns ``0 .. min(column, 2)`` least significant first; before the thousands digit
    (``column == 3``) it adds the final carry ``c1``.  Example: ``worked_thought(417, 385, 1)`` is
    ``"7+5=12 1+8+1=10"``, ending with the tens digit 0 of 802.
    """
    if column not in answer_columns(a, b):
        raise ValueError(f"{a}+{b}={a + b} has no answer digit in column {column}")
    steps, carry = [], 0
    for col in range(min(column, 2) + 1):
        da, db = _digit(a, col), _digit(b, col)
        total = da + db + carry
        steps.append(f"{da}+{db}+1={total}" if carry else f"{da}+{db}={total}")
        carry = total // 10
    if column == 3:
        steps.append(f"c{carry}")
    return " ".join(steps)


@dataclass(frozen=True)
class DemoDocument:
    """One generated document and where its answer digits (and thoughts) are.

    ``answer_spans[j]`` is the ``[start, end)`` character span of answer digit ``j`` (one character),
    listed in document order; ``answer_columns[j]`` is its column (0 = units, ..., 3 = thousands) and
    ``answer_problems[j]`` the index into ``problems`` of the problem ``(a, b)`` it answers.
    ``thought_spans`` are the ``[start, end)`` spans of each ``<think>...</think>`` (markers included);
    empty for plain documents.
    """

    text: str
    problems: tuple[tuple[int, int], ...]
    answer_spans: tuple[tuple[int, int], ...]
    answer_columns: tuple[int, ...]
    answer_problems: tuple[int, ...]
    thought_spans: tuple[tuple[int, int], ...] = ()

    @property
    def answer_offsets(self) -> list[int]:
        """Character offset of each answer digit."""
        return [start for start, _ in self.answer_spans]

    def worked_thought(self, j: int) -> str:
        """The reference thought (without markers) for answer digit ``j`` of this document."""
        a, b = self.problems[self.answer_problems[j]]
        return worked_thought(a, b, self.answer_columns[j])

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "problems": [list(p) for p in self.problems],
            "answer_spans": [list(s) for s in self.answer_spans],
            "answer_columns": list(self.answer_columns),
            "answer_problems": list(self.answer_problems),
            "thought_spans": [list(s) for s in self.thought_spans],
        }

    @classmethod
    def from_json(cls, record: dict) -> "DemoDocument":
        return cls(
            text=record["text"],
            problems=tuple(tuple(int(v) for v in p) for p in record["problems"]),
            answer_spans=tuple(tuple(int(v) for v in s) for s in record["answer_spans"]),
            answer_columns=tuple(int(c) for c in record["answer_columns"]),
            answer_problems=tuple(int(i) for i in record["answer_problems"]),
            thought_spans=tuple(tuple(int(v) for v in s) for s in record.get("thought_spans", [])),
        )


def _draw_problem(rng: random.Random, split: str) -> tuple[int, int]:
    while True:
        a = rng.randint(OPERAND_MIN, OPERAND_MAX)
        b = rng.randint(OPERAND_MIN, OPERAND_MAX)
        if problem_split(a, b) == split:
            return a, b


def generate_documents(
    n: int,
    seed: int,
    split: str = "train",
    with_thoughts: bool = False,
    thought_fraction: float = 0.5,
    problems_per_document: int = 2,
) -> list[DemoDocument]:
    """``n`` documents, deterministic in ``(seed, split)``.

    The problems and templates depend only on ``(seed, split)``, so the warm-up documents
    (``with_thoughts=True``) and the plain ones of the same seed differ only by their thoughts, and
    the first ``m`` documents of a call with ``n > m`` are the documents of a call with ``m``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if not 0.0 <= thought_fraction <= 1.0:
        raise ValueError(f"thought_fraction must be in [0, 1], got {thought_fraction}")
    if problems_per_document < 1:
        raise ValueError(f"problems_per_document must be at least 1, got {problems_per_document}")
    problem_rng = random.Random(f"megatron-rlp-demo/{seed}/{split}/problems")
    thought_rng = random.Random(f"megatron-rlp-demo/{seed}/{split}/thoughts")

    docs = []
    for _ in range(n):
        text = ""
        problems, spans, columns, owners, thoughts = [], [], [], [], []
        for p in range(problems_per_document):
            a, b = _draw_problem(problem_rng, split)
            head, tail = TEMPLATES[problem_rng.randrange(len(TEMPLATES))].split("{s}")
            cols = answer_columns(a, b)
            think_before = None
            if with_thoughts and thought_rng.random() < thought_fraction:
                think_before = thought_rng.randrange(len(cols))
            if p:
                text += " "
            text += head.format(a=a, b=b)
            for k, (ch, col) in enumerate(zip(str(a + b), cols)):
                if k == think_before:
                    start = len(text)
                    text += THINK_OPEN + worked_thought(a, b, col) + THINK_CLOSE
                    thoughts.append((start, len(text)))
                spans.append((len(text), len(text) + 1))
                columns.append(col)
                owners.append(p)
                text += ch
            text += tail
            problems.append((a, b))
        docs.append(
            DemoDocument(
                text=text,
                problems=tuple(problems),
                answer_spans=tuple(spans),
                answer_columns=tuple(columns),
                answer_problems=tuple(owners),
                thought_spans=tuple(thoughts),
            )
        )
    return docs


def answer_token_positions(doc: DemoDocument, tokenizer) -> list[int]:
    """Token index (in ``tokenizer.tokenize(doc.text)``) of each answer digit of ``doc``.

    ``tokenizer`` is a :class:`megatron_rlp.data.tokenizer.Tokenizer`.  Raises ``ValueError`` when an
    answer digit is not a token of its own (a tokenizer trained without ``split_digits``).
    """
    ids, starts = tokenizer.tokenize_with_offsets(doc.text)
    bounds = starts[1:] + [len(doc.text)]
    at = {}
    for i, (s, e) in enumerate(zip(starts, bounds)):
        at.setdefault(s, []).append((i, e))
    positions = []
    for start, end in doc.answer_spans:
        digit = doc.text[start:end]
        found = [
            i for i, e in at.get(start, [])
            if e == end and tokenizer.detokenize([ids[i]]).strip() == digit
        ]
        if len(found) != 1:
            raise ValueError(
                f"answer digit {digit!r} at character {start} of {doc.text!r} is not a single token "
                f"under {tokenizer!r}; train the tokenizer with split_digits "
                "(megatron_rlp.data.tokenizer.train_sentencepiece does)"
            )
        positions.append(found[0])
    return positions


def write_jsonl(docs: Iterable[DemoDocument], path: str, tokenizer=None) -> str:
    """Write one JSON object per document: ``{"text": ..., "answer_spans": ..., ...}``.

    ``text`` is what ``tools/preprocess_data.py`` tokenizes into ``.bin/.idx`` (one document per line,
    in order).  With ``tokenizer`` each record also gets ``answer_token_positions`` (see
    :func:`answer_token_positions`).  The file is replaced only once fully written.  Returns ``path``.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in docs:
                record = doc.to_json()
                if tokenizer is not None:
                    record["answer_token_positions"] = answer_token_positions(doc, tokenizer)
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_jsonl(path: str) -> list[DemoDocument]:
    """The documents of a file written by :func:`write_jsonl`."""
    with open(path, encoding="utf-8") as f:
        return [DemoDocument.from_json(json.loads(line)) for line in f if line.strip()]


def read_answer_token_positions(path: str) -> list[list[int]]:
    """Per document, the answer digits' token positions stored by ``write_jsonl(..., tokenizer=...)``."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "answer_token_positions" not in record:
                raise KeyError(
                    f"{path}:{line_no} has no answer_token_positions; write the file with "
                    "write_jsonl(docs, path, tokenizer=...)"
                )
            out.append([int(p) for p in record["answer_token_positions"]])
    return out


def strip_thoughts(text: str) -> str:
    """``text`` with every ``<think>...</think>`` removed."""
    return re.sub(re.escape(THINK_OPEN) + r".*?" + re.escape(THINK_CLOSE), "", text)



BENCHMARK_TEMPLATE = "Question: {question} Answer: "


def write_benchmark(n: int, path: str, seed: int = 0, split: str = "heldout") -> str:
    """``n`` addition problems of ``split`` as a question/answer benchmark file (JSON lines
    {"question": "what is 417 plus 385?", "answer": "802"}) for tools/eval_benchmark.py, whose
    prompt template :data:`BENCHMARK_TEMPLATE` restores the corpus's first template up to the
    answer digits (where a thought goes)."""
    rng = random.Random(f"megatron-rlp-demo/{seed}/{split}/benchmark")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = _draw_problem(rng, split)
            f.write(json.dumps({"question": f"what is {a} plus {b}?", "answer": str(a + b)}) + "\n")
    return path
