"""Benchmark files, answer extraction and scoring (megatron_rlp.rlp.answers)."""

import math
import re

import pytest

from megatron_rlp.rlp import answers as A


def _write(tmp_path, lines):
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_reference_answers_of_gsm8k_and_math_style():
    assert A.reference_answer("He pays 3*4=12 dollars.\n#### 1,200") == "1200"
    assert A.reference_answer("so the answer is $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert A.reference_answer(" 72. ") == "72"
    assert A.reference_answer("3.50") == "3.5"


def test_extraction():
    text = "3 + 4 = 7, then 7 * 2 = 14. So 14."
    assert A.extract_answer(text, "last-number") == "14"
    assert A.extract_answer("no digits here", "last-number") is None
    assert A.extract_answer("x \\boxed{2} y \\boxed{\\sqrt{3}}", "boxed") == "\\sqrt{3}"
    assert A.extract_answer("unclosed \\boxed{3", "boxed") is None
    pattern = re.compile(r"answer is (\w+)")
    assert A.extract_answer("the answer is 5. no wait, the answer is 6", "regex", pattern) == "6"
    assert A.extract_answer("nothing", "regex", pattern) is None
    with pytest.raises(A.BenchmarkError, match="--extract-regex"):
        A.compile_regex("(unclosed")
    with pytest.raises(A.BenchmarkError, match="unknown --extract 'first'"):
        A.extract_answer("1", "first")


def test_scoring_pass_at_k_and_majority():
    problems = [A.Problem("q1", "3", 1), A.Problem("q2", "5", 2)]
    extracted = [["3", "4", "3", None], ["1", "2", "5", "2"]]
    s = A.score(problems, extracted, k=2)
    assert s["accuracy"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert s["accuracy_se"] == pytest.approx(abs(0.5 - 0.25) / 2)  # sd of (0.5, 0.25) / sqrt(2)
    # pass@2 = 1 - C(n-c, 2) / C(n, 2): q1 1 - 1/6, q2 1 - 3/6
    assert s["pass@2"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6)) / 2)
    assert s["majority"] == pytest.approx(0.5)  # q1 votes "3" (right), q2 votes "2" (wrong)
    assert s["extracted_frac"] == pytest.approx(7 / 8)
    assert A.pass_at_k(5, 0, 3) == 0.0 and A.pass_at_k(5, 3, 3) == 1.0
    assert math.isnan(A.mean_and_se([1.0])[1])


def test_bad_benchmark_lines_name_file_and_line(tmp_path):
    good = '{"question": "1+1?", "answer": "2"}'
    path = _write(tmp_path, [good, "", '{"question": "2+2?"}'])
    with pytest.raises(A.BenchmarkError, match=r"bench.jsonl:3: no 'answer'"):
        A.load_benchmark(path)
    path = _write(tmp_path, [good, "not json"])
    with pytest.raises(A.BenchmarkError, match=r"bench.jsonl:2: not a JSON object"):
        A.load_benchmark(path)
    path = _write(tmp_path, [good, "[1, 2]"])
    with pytest.raises(A.BenchmarkError, match=r"bench.jsonl:2: a JSON list"):
        A.load_benchmark(path)
    with pytest.raises(A.BenchmarkError, match="holds no problems"):
        A.load_benchmark(_write(tmp_path, [""]))
    with pytest.raises(A.BenchmarkError, match="No such file"):
        A.load_benchmark(str(tmp_path / "missing.jsonl"))
    problems = A.load_benchmark(_write(tmp_path, [good, good, good]), limit=2)
    assert [p.line for p in problems] == [1, 2] and problems[0].answer == "2"
