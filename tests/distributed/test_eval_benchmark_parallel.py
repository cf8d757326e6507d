"""tools/eval_benchmark.py at TP=2 gives the single-process generations (greedy, with and
without a thought) on a checkpoint saved at TP=1."""

import json
import os
import subprocess
import sys

import torch.distributed as dist

from tools import eval_benchmark

SETUP = r"""
import json, os, sys
from megatron_rlp.data import demo_corpus
from megatron_rlp.data.tokenizer import build_tokenizer, train_sentencepiece
from megatron_rlp.pretrain import parse_run_config, run_training
from tools.preprocess_data import preprocess
from tools import eval_benchmark
root = sys.argv[1]
warm = demo_corpus.generate_documents(200, seed=1, with_thoughts=True)
model = train_sentencepiece([d.text for d in warm], os.path.join(root, "tok"), vocab_size=128)
tok = build_tokenizer("SentencePieceTokenizer", model)
jsonl = demo_corpus.write_jsonl(warm, os.path.join(root, "warm.jsonl"), tokenizer=tok)
data = preprocess(jsonl, os.path.join(root, "warm"), tok, append_eod=True, show_progress=False)["text"]
common = ["--model-preset", "tiny", "--num-layers", "2", "--tokenizer-type", "SentencePieceTokenizer",
          "--tokenizer-model", model, "--seq-length", "96", "--layout-invariant-init"]
ckpt = os.path.join(root, "ckpt")
run_training(parse_run_config(common + ["--data-path", data, "--micro-batch-size", "4", "--global-batch-size", "4",
                                        "--train-iters", "2", "--lr", "3e-4", "--save", ckpt]))
bench = demo_corpus.write_benchmark(4, os.path.join(root, "bench.jsonl"), seed=3)
args = common + ["--load", ckpt, "--data", bench, "--prompt-template", demo_corpus.BENCHMARK_TEMPLATE,
                 "--thought-len", "6", "--answer-len", "5", "--stop", ".", "--no-progress"]
json.dump(args, open(os.path.join(root, "args.json"), "w"))
assert eval_benchmark.main(args + ["--output", os.path.join(root, "tp1.json")]) == 0
"""


def _launcher_free_env():
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
            "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("TORCHELASTIC")}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    return env


def test_tp2_generations_equal_tp1(tmp_path_factory):
    box = [str(tmp_path_factory.mktemp("benchpar")) if dist.get_rank() == 0 else None, None]
    if dist.get_rank() == 0:
        out = subprocess.run([sys.executable, "-c", SETUP, box[0]], capture_output=True, text=True,
                             env=_launcher_free_env(), timeout=900)
        box[1] = None if out.returncode == 0 else out.stderr[-3000:]
    dist.broadcast_object_list(box, src=0)
    assert box[1] is None, box[1]
    root = box[0]
    args = json.load(open(os.path.join(root, "args.json")))
    out = os.path.join(root, "tp2.json")
    assert eval_benchmark.main(args + ["--tensor-model-parallel-size", "2", "--output", out]) == 0
    if dist.get_rank() == 0:
        tp1, tp2 = json.load(open(os.path.join(root, "tp1.json"))), json.load(open(out))
        for mode in ("think", "plain"):
            assert tp2[mode + "_generations"] == tp1[mode + "_generations"]
            assert tp2[mode]["accuracy"] == tp1[mode]["accuracy"]
    else:
        assert not os.path.exists(out) or dist.get_rank() != 0
    dist.barrier()
