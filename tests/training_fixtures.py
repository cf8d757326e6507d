"""Small shared builders for training tests: a synthetic .bin/.idx corpus and a tiny run config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch

NULL_VOCAB = 500  # NullTokenizer ids 0..499, eod = 500; the tiny preset's vocabulary is 512


def write_corpus(prefix: str, num_docs: int = 120, seed: int = 0) -> str:
    """Documents of arithmetic progressions mod NULL_VOCAB (learnable, varied lengths)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(seed)
    for _ in range(num_docs):
        length, start, step = int(rng.integers(5, 50)), int(rng.integers(0, NULL_VOCAB)), int(rng.integers(1, 4))
        ids = [(start + j * step) % NULL_VOCAB for j in range(length)] + [NULL_VOCAB]
        builder.add_item(torch.tensor(ids))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def write_jsonl_corpus(path: str, num_docs: int = 60, seed: int = 0) -> str:
    """The same kind of corpus as text for NullTokenizer (space-separated ids)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(num_docs):
            length, start = int(rng.integers(5, 50)), int(rng.integers(0, NULL_VOCAB))
            f.write(json.dumps({"text": " ".join(str((start + 2 * j) % NULL_VOCAB) for j in range(length))}) + "\n")
    return path


def tiny_run_args(data_prefix: str, tp: int = 1, pp: int = 1, iters: int = 4, **extra) -> list[str]:
    args = [
        "--model-preset", "tiny", "--num-layers", "2", "--layout-invariant-init",
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--micro-batch-size", "2", "--global-batch-size", "8", "--seq-length", "32",
        "--train-iters", str(iters), "--lr", "1e-3", "--lr-decay-style", "constant",
        "--data-path", data_prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", str(NULL_VOCAB),
        "--seed", "7",
    ]
    for key, value in extra.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return args


def run_single_process(args: list[str], env_extra: dict | None = None) -> list[dict]:
    """Run pretraining in a fresh single-rank process; returns its per-iteration history."""
    code = (
        "import json, sys\n"
        "from megatron_rlp.pretrain import parse_run_config, run_training\n"
        "h = run_training(parse_run_config(sys.argv[1:]))\n"
        "print('HISTORY=' + json.dumps(h))\n"
    )
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                     "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE")
    # A child of a torchrun rank must not join torchrun's rendezvous store.
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars and not k.startswith("TORCHELASTIC")}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise AssertionError(f"single-process run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    line = next(l for l in out.stdout.splitlines() if l.startswith("HISTORY="))
    return json.loads(line[len("HISTORY="):])


def losses(history: list[dict], key: str = "lm loss") -> list[float]:
    return [h[key] for h in history]
