"""tools/eval_benchmark.py on a benchmark file made from the demo corpus: the tool's scoring with
answers of known correctness, a real generation run with and without a thought, bad input."""

import json
import os

import pytest

from megatron_rlp.data import demo_corpus
from megatron_rlp.data.tokenizer import build_tokenizer, train_sentencepiece
from megatron_rlp.pretrain import parse_run_config, run_training
from megatron_rlp.training import parallel
from tools import eval_benchmark
from tools.preprocess_data import preprocess


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("evalbench"))
    warm = demo_corpus.generate_documents(300, seed=1, with_thoughts=True)
    model = train_sentencepiece([d.text for d in warm], os.path.join(root, "tok"), vocab_size=128)
    tok = build_tokenizer("SentencePieceTokenizer", model)
    jsonl = demo_corpus.write_jsonl(warm, os.path.join(root, "warm.jsonl"), tokenizer=tok)
    data = preprocess(jsonl, os.path.join(root, "warm"), tok, append_eod=True, show_progress=False)["text"]
    common = ["--model-preset", "tiny", "--num-layers", "2", "--tokenizer-type", "SentencePieceTokenizer",
              "--tokenizer-model", model, "--seq-length", "96"]
    ckpt = os.path.join(root, "ckpt")
    try:
        run_training(parse_run_config(common + ["--data-path", data, "--micro-batch-size", "4",
                                                "--global-batch-size", "4", "--train-iters", "2", "--lr", "3e-4",
                                                "--save", ckpt]))
    finally:
        parallel.destroy()
    bench = demo_corpus.write_benchmark(6, os.path.join(root, "bench.jsonl"), seed=3)
    return root, common, ckpt, bench, tok


def _args(setup, *extra):
    root, common, ckpt, bench, _ = setup
    return common + ["--load", ckpt, "--data", bench, "--prompt-template", demo_corpus.BENCHMARK_TEMPLATE,
                     "--thought-len", "8", "--answer-len", "6", "--stop", ".", "--no-progress", *extra]


def test_scoring_through_the_tool_with_answers_of_known_correctness(setup, monkeypatch, capsys):
    """The generation replaced by one that writes the reference answer for the first 4 problems
    (in every sample) and a wrong one for the rest: accuracy must be exactly 4/6."""
    _, _, _, bench, tok = setup
    problems = [json.loads(line) for line in open(bench)]
    answers = {}
    import megatron_rlp.sampling.generate as gen

    calls = []

    def fake_generate(model, prompts, num_samples, max_new_tokens, **kw):
        calls.append(kw)
        if kw.get("open_id") is not None:  # the thought: a fixed two-token one
            return [[[5, kw["close_id"]] for _ in range(num_samples)] for _ in prompts]
        out = []
        for p in prompts:
            text = tok.detokenize(p.tolist())
            i = next(j for j, q in enumerate(problems) if q["question"] in text)
            reply = problems[i]["answer"] if i < 4 else "1"
            out.append([tok.tokenize(reply + ". more text") for _ in range(num_samples)])
            answers[i] = reply
        return out

    monkeypatch.setattr(gen, "generate", fake_generate)
    rc = eval_benchmark.main(_args(setup, "--temperature", "0.7", "--samples", "3"))
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for mode in ("think", "plain"):
        assert result[mode]["accuracy"] == pytest.approx(4 / 6)
        assert result[mode]["pass@3"] == pytest.approx(4 / 6) and result[mode]["majority"] == pytest.approx(4 / 6)
        assert result[mode]["unextracted"] == 0
    assert any(c.get("stop_sequences") for c in calls)  # the stop string reached the sampler


def test_generation_with_and_without_a_thought(setup, tmp_path, capsys):
    out = str(tmp_path / "result.json")
    rc = eval_benchmark.main(_args(setup, "--output", out))
    assert rc == 0
    summary = json.load(open(out))
    problems = [json.loads(line) for line in open(setup[3])]
    assert summary["problems"] == 6
    for mode in ("think", "plain"):
        gens = summary[mode + "_generations"]
        assert [g["reference"] for g in gens] == [p["answer"] for p in problems]
        correct = [s["extracted"] == g["reference"] for g in gens for s in g["samples"]]
        assert summary[mode]["accuracy"] == pytest.approx(sum(correct) / len(correct))
        for g in gens:
            for s in g["samples"]:
                assert "." not in s["answer"]  # cut at the stop string
    think = summary["think_generations"]
    assert all(0 < len(s["thought"]) for g in think for s in g["samples"])
    assert 0 < summary["think"]["thought_len_mean"] <= 9


def test_bad_input(setup, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "what is 1 plus 2?", "answer": "3"}\n{"question": "what is 2 plus 2?"}\n')
    root, common, ckpt, bench, _ = setup
    args = _args(setup)
    i = args.index("--data")
    assert eval_benchmark.main(args[:i + 1] + [str(bad)] + args[i + 2:]) == 2
    assert "bad.jsonl:2: no 'answer'" in capsys.readouterr().err
    assert eval_benchmark.main(_args(setup, "--samples", "4")) == 2
    assert "--temperature > 0" in capsys.readouterr().err
    assert eval_benchmark.main(_args(setup, "--extract", "regex")) == 2
    assert "--extract-regex" in capsys.readouterr().err
    with pytest.warns(UserWarning, match=r"matched no answer in 6 of 6 plain samples"):
        assert eval_benchmark.main(_args(setup, "--modes", "plain", "--extract", "regex",
                                         "--extract-regex", "ANSWER=(\\d+)")) == 0
    assert eval_benchmark.main(_args(setup, "--thought-len", "200")) == 2
    assert "raise --seq-length" in capsys.readouterr().err
