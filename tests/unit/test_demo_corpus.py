"""The embedded demo corpus: determinism, disjoint splits, correct thoughts, answer positions."""
import importlib.util
import json
import os
import random
import re

import pytest
import sentencepiece as spm

from megatron_rlp.data.demo_corpus import (
    THINK_CLOSE,
    THINK_OPEN,
    answer_token_positions,
    generate_documents,
    problem_split,
    read_answer_token_positions,
    read_jsonl,
    strip_thoughts,
    worked_thought,
    write_jsonl,
)
from megatron_rlp.data.tokenizer import build_tokenizer, train_sentencepiece

THOUGHT = re.compile(re.escape(THINK_OPEN) + r"(.*?)" + re.escape(THINK_CLOSE))
STEP = re.compile(r"(\d)\+(\d)(\+1)?=(\d+)")


@pytest.fixture(scope="module")
def warm():
    return generate_documents(600, seed=3, split="train", with_thoughts=True)


@pytest.fixture(scope="module")
def plain():
    return generate_documents(600, seed=3, split="train", with_thoughts=False)


@pytest.fixture(scope="module")
def heldout():
    return generate_documents(300, seed=3, split="heldout")


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory, warm, plain):
    prefix = str(tmp_path_factory.mktemp("demo_sp") / "demo")
    return build_tokenizer("SentencePieceTokenizer", train_sentencepiece([d.text for d in warm + plain], prefix, 128))


def _problem_of(doc, j):
    return doc.problems[doc.answer_problems[j]]


# -- generation ------------------------------------------------------------------------------
def test_deterministic_and_prefix_stable():
    a = generate_documents(50, seed=7, split="train", with_thoughts=True)
    assert a == generate_documents(50, seed=7, split="train", with_thoughts=True)
    assert a[:20] == generate_documents(20, seed=7, split="train", with_thoughts=True)
    assert [d.text for d in a] != [d.text for d in generate_documents(50, seed=8, split="train", with_thoughts=True)]


def test_splits_share_no_problem(plain, heldout):
    train_keys = {frozenset(p) for d in plain + generate_documents(600, seed=4) for p in d.problems}
    held = heldout + generate_documents(300, seed=4, split="heldout")
    held_keys = {frozenset(p) for d in held for p in d.problems}
    assert len(held_keys) > 500 and not train_keys & held_keys
    assert all(problem_split(*p) == "heldout" for d in held for p in d.problems)
    assert all(problem_split(b, a) == problem_split(a, b) for d in held for a, b in d.problems)
    rng = random.Random(0)
    share = sum(problem_split(rng.randint(100, 999), rng.randint(100, 999)) == "heldout" for _ in range(20000)) / 20000
    assert 0.08 < share < 0.12


def test_document_shape(plain, warm):
    for doc in plain:
        assert len(doc.problems) == 2 and THINK_OPEN not in doc.text and doc.thought_spans == ()
        assert all(100 <= x <= 999 for p in doc.problems for x in p)
    n_thoughts = sum(len(d.thought_spans) for d in warm)
    assert 0.42 < n_thoughts / (2 * len(warm)) < 0.58  # half of the problems show a thought
    assert all(len(THOUGHT.findall(d.text)) == len(d.thought_spans) for d in warm)


def test_warmup_equals_plain_with_thoughts_removed(warm, plain):
    for w, p in zip(warm, plain):
        assert w.problems == p.problems and w.answer_columns == p.answer_columns
        assert strip_thoughts(w.text) == p.text


def test_answer_spans_point_at_the_answer_digits(warm, plain, heldout):
    for doc in warm + plain + heldout:
        assert len(doc.answer_spans) == len(doc.answer_columns) == len(doc.answer_problems)
        for p, (a, b) in enumerate(doc.problems):
            js = [j for j in range(len(doc.answer_spans)) if doc.answer_problems[j] == p]
            digits = "".join(doc.text[s:e] for s, e in (doc.answer_spans[j] for j in js))
            assert digits == str(a + b)
            assert [doc.answer_columns[j] for j in js] == list(range(len(digits) - 1, -1, -1))
            last = doc.answer_spans[js[-1]][1]
            assert doc.text[last] == "."  # the answer is the end of its sentence


def test_thought_arithmetic_is_correct(warm):
    columns_seen = set()
    for doc in warm:
        for start, end in doc.thought_spans:
            body = THOUGHT.fullmatch(doc.text[start:end]).group(1)
            j = [s for s, _ in doc.answer_spans].index(end)  # the answer digit right after it
            a, b = _problem_of(doc, j)
            column = doc.answer_columns[j]
            columns_seen.add(column)
            parts = body.split(" ")
            if column == 3:
                assert parts[-1] == "c1"
                parts = parts[:-1]
            assert len(parts) == min(column, 2) + 1
            carry = 0
            for col, part in enumerate(parts):
                m = STEP.fullmatch(part)
                assert m, part
                da, db, plus_one, total = int(m[1]), int(m[2]), m[3] is not None, int(m[4])
                assert (da, db) == ((a // 10**col) % 10, (b // 10**col) % 10)
                assert plus_one == (carry == 1)
                assert total == da + db + carry
                carry = total // 10
            if column == 3:
                assert carry == 1 and a + b >= 1000
            assert body == doc.worked_thought(j)
    assert columns_seen == {0, 1, 2, 3}


def test_thought_ends_with_the_digit_that_follows(warm):
    for doc in warm:
        for start, end in doc.thought_spans:
            assert doc.text[end - len(THINK_CLOSE) - 1] == doc.text[end]
            assert doc.text[end].isdigit() and end in {s for s, _ in doc.answer_spans}


def test_worked_thought_examples():
    assert worked_thought(417, 385, 0) == "7+5=12"
    assert worked_thought(417, 385, 1) == "7+5=12 1+8+1=10"
    assert worked_thought(417, 385, 2) == "7+5=12 1+8+1=10 4+3+1=8"
    assert worked_thought(417, 685, 3) == "7+5=12 1+8+1=10 4+6+1=11 c1"
    with pytest.raises(ValueError, match="no answer digit in column 3"):
        worked_thought(417, 385, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        generate_documents(1, seed=0, split="test")
    with pytest.raises(ValueError, match="thought_fraction"):
        generate_documents(1, seed=0, with_thoughts=True, thought_fraction=1.5)


# -- tokenisation ----------------------------------------------------------------------------
def test_sentencepiece_on_demo_corpus(sp_tok, warm):
    open_id, close_id = sp_tok.token_to_id(THINK_OPEN), sp_tok.token_to_id(THINK_CLOSE)
    assert open_id is not None and close_id is not None
    for doc in warm[:200]:
        ids = sp_tok.tokenize(doc.text)
        assert ids.count(open_id) == ids.count(close_id) == len(doc.thought_spans)
        assert sp_tok.detokenize(ids) == doc.text
        for i in ids:
            piece = sp_tok.id_to_piece(i)
            assert not any(c.isdigit() for c in piece) or len(piece) == 1, piece


def test_answer_token_positions(sp_tok, warm, plain, heldout):
    for doc in warm[:200] + plain[:200] + heldout[:100]:
        ids = sp_tok.tokenize(doc.text)
        positions = answer_token_positions(doc, sp_tok)
        assert positions == sorted(positions) and len(positions) == len(doc.answer_spans)
        assert [sp_tok.id_to_piece(ids[t]) for t in positions] == [doc.text[s:e] for s, e in doc.answer_spans]


def test_thoughts_in_distribution_for_rlp(sp_tok, warm, plain):
    """Warm-up tokens == plain tokens with (<think>, c, </think>) inserted before an answer digit."""
    open_id, close_id = sp_tok.token_to_id(THINK_OPEN), sp_tok.token_to_id(THINK_CLOSE)
    lengths = []
    for w, p in zip(warm, plain):
        w_ids, p_ids = sp_tok.tokenize(w.text), sp_tok.tokenize(p.text)
        p_positions = answer_token_positions(p, sp_tok)
        rebuilt, inserted_at, i = [], [], 0
        while i < len(w_ids):
            if w_ids[i] == open_id:
                k = w_ids.index(close_id, i)
                lengths.append(k - i + 1)
                inserted_at.append(len(rebuilt))
                i = k + 1
            else:
                rebuilt.append(w_ids[i])
                i += 1
        assert rebuilt == p_ids
        assert set(inserted_at) <= set(p_positions)  # each thought sits right before an answer digit
    assert lengths and max(lengths) <= 32


def test_digits_not_single_tokens_is_an_error(tmp_path, plain):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([d.text for d in plain]), model_prefix=str(tmp_path / "merged"),
        vocab_size=400, model_type="bpe", split_digits=False, hard_vocab_limit=False,
        num_threads=1, minloglevel=2,
    )
    tok = build_tokenizer("SentencePieceTokenizer", str(tmp_path / "merged.model"))
    assert any(len(tok.id_to_piece(i).strip("▁")) > 1 and tok.id_to_piece(i).strip("▁").isdigit()
               for i in range(tok.vocab_size))
    with pytest.raises(ValueError, match="split_digits"):
        for doc in plain:
            answer_token_positions(doc, tok)


# -- files -----------------------------------------------------------------------------------
def test_write_read_jsonl_and_preprocess(tmp_path, sp_tok, warm):
    docs = warm[:40]
    path = write_jsonl(docs, str(tmp_path / "corpus" / "warm.jsonl"), tokenizer=sp_tok)
    lines = open(path).read().splitlines()
    assert len(lines) == len(docs) and all(isinstance(json.loads(l)["text"], str) for l in lines)
    assert read_jsonl(path) == docs
    positions = read_answer_token_positions(path)
    assert positions == [answer_token_positions(d, sp_tok) for d in docs]

    bare = write_jsonl(docs, str(tmp_path / "bare.jsonl"))
    assert read_jsonl(bare) == docs
    with pytest.raises(KeyError, match="tokenizer="):
        read_answer_token_positions(bare)

    # The project's preprocessing tool turns the file into .bin/.idx; positions index each document.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(root, "tools", "preprocess_data.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    prefixes = tool.preprocess(path, str(tmp_path / "bin" / "warm"), sp_tok, append_eod=True, show_progress=False)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefixes["text"])
    assert len(ds) == len(docs)
    for k, doc in enumerate(docs):
        tokens = [int(t) for t in ds[k]]
        assert tokens[-1] == sp_tok.eod
        assert [sp_tok.id_to_piece(tokens[t]) for t in positions[k]] == [doc.text[s:e] for s, e in doc.answer_spans]


def test_worked_thought_match_scores_exact_thoughts_by_column(sp_tok, heldout):
    from types import SimpleNamespace

    from megatron_rlp.demo import worked_thought_match

    docs = heldout[:3]
    close = sp_tok.token_to_id(THINK_CLOSE)
    thought_ids = []
    for doc in docs:
        for j in range(len(doc.answer_spans)):
            right = sp_tok.tokenize(doc.worked_thought(j)) + [close]  # sampled close marker
            wrong = sp_tok.tokenize(doc.worked_thought(j) + "1")  # cut at the cap, no close
            thought_ids.append([right, wrong] if doc.answer_columns[j] == 0 else [right, right])
    m = worked_thought_match(SimpleNamespace(thought_ids=thought_ids), docs, sp_tok)
    assert m["column_0"] == 0.5 and m["column_1"] == 1.0 and m["column_2"] == 1.0
    n0 = sum(c == 0 for d in docs for c in d.answer_columns)
    n = sum(len(d.answer_columns) for d in docs)
    assert m["all"] == pytest.approx(1 - 0.5 * n0 / n)
    with pytest.raises(ValueError, match="evaluated contexts"):
        worked_thought_match(SimpleNamespace(thought_ids=thought_ids[:-1]), docs, sp_tok)
