"""tools/eval_info_gain.py on a tiny demo-corpus checkpoint, and the reward-curve plot."""

import json
import os

import numpy as np
import pytest

from megatron_rlp.data import demo_corpus
from megatron_rlp.data.tokenizer import build_tokenizer, train_sentencepiece
from megatron_rlp.pretrain import parse_run_config, run_training
from megatron_rlp.rlp.evaluate import paired_change
from megatron_rlp.training import parallel
from tools.eval_info_gain import main as eval_main
from tools.eval_info_gain import plot_reward_curve
from tools.preprocess_data import preprocess


@pytest.fixture(scope="module")
def demo_setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("evalgain"))
    warm = demo_corpus.generate_documents(300, seed=1, with_thoughts=True)
    held = demo_corpus.generate_documents(8, seed=2, split="heldout")
    model = train_sentencepiece([d.text for d in warm], os.path.join(root, "tok"), vocab_size=128)
    tok = build_tokenizer("SentencePieceTokenizer", model)
    paths = {"tok": model}
    for name, docs in (("warm", warm), ("held", held)):
        jsonl = demo_corpus.write_jsonl(docs, os.path.join(root, f"{name}.jsonl"), tokenizer=tok)
        paths[name] = preprocess(jsonl, os.path.join(root, name), tok, append_eod=True, show_progress=False)["text"]
        with open(os.path.join(root, f"{name}_pos.json"), "w") as f:
            json.dump(demo_corpus.read_answer_token_positions(jsonl), f)
        paths[name + "_pos"] = os.path.join(root, f"{name}_pos.json")
    common = ["--model-preset", "tiny", "--num-layers", "2", "--tokenizer-type", "SentencePieceTokenizer",
              "--tokenizer-model", model]
    ckpt = os.path.join(root, "ckpt")
    try:
        run_training(parse_run_config(common + ["--data-path", paths["warm"], "--seq-length", "64",
                                                "--micro-batch-size", "4", "--global-batch-size", "4",
                                                "--train-iters", "2", "--lr", "3e-4", "--save", ckpt]))
    finally:
        parallel.destroy()
    return root, paths, common, ckpt


def test_eval_reports_gain_and_accuracy_with_standard_errors(demo_setup, capsys):
    root, paths, common, ckpt = demo_setup
    out = os.path.join(root, "eval.json")
    rc = eval_main(common + ["--data-path", paths["held"], "--load", ckpt, "--positions-file", paths["held_pos"],
                             "--num-docs", "6", "--num-thoughts", "2", "--thought-len", "4", "--output", out])
    assert rc == 0
    table = capsys.readouterr().out
    assert "information gain (nats)" in table and "accuracy with a thought" in table
    result = json.load(open(out))
    assert result["docs"] == 6
    for key in ("info_gain", "info_gain_se", "acc_think", "acc_think_se", "acc_plain", "acc_plain_se"):
        assert np.isfinite(result[key]), key
    assert 0.0 <= result["acc_think"] <= 1.0 and 0.0 <= result["acc_plain"] <= 1.0
    assert len(result["per_document"]["gain"]) == 6
    assert 1.0 <= result["thought_len_mean"] <= 5.0


def test_paired_change():
    mean, se = paired_change(np.array([0.1, 0.2, 0.3]), np.array([0.2, 0.4, 0.3]))
    assert mean == pytest.approx(0.1)
    assert se == pytest.approx(np.std([0.1, 0.2, 0.0], ddof=1) / np.sqrt(3))


def test_reward_curve_plot(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    for step in range(1, 6):
        writer.add_scalar("rlp/reward_mean", 0.1 * step, step)
    writer.close()
    png = str(tmp_path / "curve.png")
    assert plot_reward_curve(str(tmp_path / "tb"), png) == ["rlp/reward_mean"]
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="none of"):
        plot_reward_curve(str(tmp_path / "tb"), png, tags=("rlp/missing",))
