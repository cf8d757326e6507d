"""Evaluation while training (--eval-interval, --eval-iters, --split, --valid-data-path) and W&B.

Each run is a fresh single-rank process (as a user runs it); tiny model and corpus."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from training_fixtures import NULL_VOCAB, run_single_process, tiny_run_args, write_corpus

SPLIT = "90,10,0"  # 120 documents: 0..107 train, 108..119 validation
RLP = dict(rlp=True, rlp_num_thoughts=2, rlp_thought_len=3, rlp_min_context=2,
           rlp_think_open=NULL_VOCAB - 2, rlp_think_close=NULL_VOCAB - 1, rlp_temperature=0.7)
TIMING = ("elapsed_ms", "tflops_per_gpu", "timers_ms")  # wall times differ run to run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("eval") / "corpus"))


def _training_part(history):
    return [{k: v for k, v in h.items() if " validation" not in k and k not in TIMING} for h in history]


def _validation_part(history):
    return {h["iteration"]: {k: v for k, v in h.items() if " validation" in k} for h in history}


# -- the split ---------------------------------------------------------------------------------
def test_split_reads_like_megatron_core_and_training_reads_only_its_share(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_rlp.data.documents import DocumentStream, split_documents

    assert split_documents("969,30,1", 1000) == [range(0, 969), range(969, 999), range(999, 1000)]
    assert split_documents("969, 30, 1", 120) == [range(0, 116), range(116, 120), range(120, 120)]
    assert split_documents("90,10", 7) == [range(0, 6), range(6, 7), range(0)]  # missing shares are 0
    assert split_documents("2/1/1", 8) == [range(0, 4), range(4, 6), range(6, 8)]
    for bad in ("a,b", "-1,2", "0,0,0", "1,2,3,4", ""):
        with pytest.raises(ValueError, match="one to three non-negative proportions"):
            split_documents(bad, 10)

    dataset = IndexedDataset(corpus, mmap=True)
    train = DocumentStream(dataset, 512, seed=7, documents=split_documents(SPLIT, 120)[0])
    seen = {w.document for w in train.next_windows(400, 64, 1)}  # several epochs
    assert seen == set(range(108))
    # Without --split the order is the one runs had before (a seeded permutation of all documents).
    whole = DocumentStream(dataset, 512, seed=7)
    order = [w.document for w in whole.next_windows(120, 1 << 20, 0)]
    assert order == np.random.default_rng([7, 0]).permutation(120).tolist()


def test_bad_evaluation_flags_are_refused_before_training(corpus, tmp_path):
    from megatron_rlp.pretrain import parse_run_config, run_training

    cases = [
        (dict(eval_interval=2), "--eval-interval needs validation data: pass --split"),
        (dict(eval_interval=2, split="100,0,0"), "leaves the validation split .* empty"),
        (dict(eval_interval=2, split="1,1", valid_data_path=corpus), "pass one of them"),
        (dict(eval_interval=2, valid_data_path=str(tmp_path / "missing")), "--valid-data-path .* no .*missing.bin"),
        (dict(eval_interval=0, split=SPLIT), "--eval-interval and --eval-iters must be >= 1"),
        (dict(split="x"), "--split 'x': expected one to three"),
    ]
    for extra, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            run_training(parse_run_config(tiny_run_args(corpus, iters=1, **extra)))


# -- next-token: validation loss -----------------------------------------------------------------
def test_ntp_evaluation_leaves_training_bitwise_unchanged(corpus):
    plain = run_single_process(tiny_run_args(corpus, iters=3, split=SPLIT))
    evaluated = run_single_process(tiny_run_args(corpus, iters=3, split=SPLIT, eval_interval=2, eval_iters=2))
    assert _training_part(evaluated) == _training_part(plain)
    values = _validation_part(evaluated)
    # Every 2 iterations, and once more at the end of training (3 is no multiple of 2).
    assert [i for i, v in values.items() if v] == [2, 3]
    assert values[3]["lm loss validation"] != values[2]["lm loss validation"]  # the model changed
    for v in (values[2], values[3]):
        assert v["lm loss validation ppl"] == pytest.approx(math.exp(v["lm loss validation"]), rel=1e-12)


def _independent_validation_loss(corpus, eval_iters, global_batch, seq_length, seed):
    """The tiny initial model's mean per-token loss on the first eval_iters x global_batch packed
    samples of the validation split, computed without the loop."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_rlp import platform
    from megatron_rlp.data.documents import DocumentStream, split_documents
    from megatron_rlp.models.builder import build_model, transformer_config
    from megatron_rlp.models.init import initialize_layout_invariant
    from megatron_rlp.models.presets import get_preset
    from megatron_rlp.training import parallel

    platform.setup_platform()
    parallel.init_distributed()
    try:
        parallel.init_model_parallel(1, 1)
        parallel.set_seed(seed)
        preset = get_preset("tiny").replace(num_layers=2)
        model = build_model(preset, transformer_config(preset))
        initialize_layout_invariant(model, seed, preset.num_layers)
        model.eval()
        stream = DocumentStream(IndexedDataset(corpus, mmap=True), preset.vocab_size, seed=seed,
                                documents=split_documents(SPLIT, 120)[1])
        rows = torch.from_numpy(stream.next_samples(eval_iters * global_batch, seq_length))
        with torch.no_grad():
            tokens, labels = rows[:, :-1], rows[:, 1:]
            losses = model(tokens, torch.arange(seq_length).expand_as(tokens), None, labels=labels)
        return losses.double().mean().item()
    finally:
        parallel.destroy()


# -- RLP: held-out information gain ---------------------------------------------------------------
def test_rlp_evaluation_leaves_training_bitwise_unchanged(corpus):
    """Evaluating between the two updates on one sample batch (--rlp-updates-per-batch 2) must not
    touch the data cursor, the sampling seeds, the cached batch or the model's mode."""
    common = dict(split=SPLIT, rlp_updates_per_batch=2, **RLP)
    plain = run_single_process(tiny_run_args(corpus, iters=2, **common))
    evaluated = run_single_process(tiny_run_args(corpus, iters=2, eval_interval=1, eval_iters=1, **common))
    assert _training_part(evaluated) == _training_part(plain)
    values = _validation_part(evaluated)
    assert sorted(values) == [1, 2]
    for v in values.values():
        assert v["rlp/eval_windows validation"] == 8  # --eval-iters 1 x --global-batch-size 8 windows
        assert 0 <= v["rlp/eval_acc_think validation"] <= 1 and 0 <= v["rlp/eval_acc_plain validation"] <= 1
        assert math.isfinite(v["rlp/eval_info_gain validation"]) and v["rlp/eval_info_gain_se validation"] > 0
        assert 1 <= v["rlp/eval_thought_len_mean validation"] <= 4  # thought + close marker
    assert values[2]["rlp/eval_info_gain validation"] != values[1]["rlp/eval_info_gain validation"]


# -- W&B -------------------------------------------------------------------------------------------
_WANDB_RUNNER = r"""
import json, sys, types
mode, out = sys.argv[1], sys.argv[2]
rec = {"init": None, "log": [], "finished": 0}
if mode == "stub":  # records what the writer sends
    class Run:
        def log(self, data, step=None):
            rec["log"].append([dict(data), step])
        def finish(self):
            rec["finished"] += 1
    def init(**kwargs):
        rec["init"] = {k: v for k, v in kwargs.items() if k != "config"}
        rec["config"] = {k: kwargs["config"][k] for k in ("lr", "eval_interval", "split")}
        return Run()
    sys.modules["wandb"] = types.SimpleNamespace(init=init)
else:  # the real package, offline: spy on what reaches it
    from wandb.sdk import wandb_run
    log, finish = wandb_run.Run.log, wandb_run.Run.finish
    def spy_log(self, data, step=None, **kw):
        rec["log"].append([dict(data), step])
        return log(self, data, step=step, **kw)
    def spy_finish(self, *a, **kw):
        rec["finished"] += 1
        return finish(self, *a, **kw)
    wandb_run.Run.log, wandb_run.Run.finish = spy_log, spy_finish
from megatron_rlp.pretrain import main
rc = main(sys.argv[3:])
json.dump(rec, open(out, "w"))
sys.exit(rc)
"""


def _run_with_wandb(mode, args, tmp_path):
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("TORCHELASTIC")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    out = tmp_path / "wandb_calls.json"
    proc = subprocess.run([sys.executable, "-c", _WANDB_RUNNER, mode, str(out), *args], capture_output=True,
                          text=True, env=env, timeout=600)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def _tensorboard_scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir)
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


@pytest.mark.parametrize("mode", ["stub", "offline"])
def test_validation_loss_is_right_and_wandb_gets_the_tensorboard_scalars(corpus, tmp_path, mode):
    """W&B (faked, or the real package offline) gets the TensorBoard scalars; with --lr 0 the model
    stays the initial one, so every validation loss must be the independently computed one."""
    if mode == "offline":
        pytest.importorskip("wandb")
    tb, wb = str(tmp_path / "tb"), str(tmp_path / "wb")
    args = tiny_run_args(corpus, iters=3, split=SPLIT, eval_interval=2, eval_iters=2, tensorboard_dir=tb,
                         wandb_project="rlp-test", wandb_exp_name="tiny", wandb_save_dir=wb) + ["--lr", "0"]
    proc, calls = _run_with_wandb(mode, args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    sent = {(k, step): v for data, step in calls["log"] for k, v in data.items()}
    board = _tensorboard_scalars(tb)
    assert sorted(sent) == sorted(board)  # the same tags at the same steps
    for key, value in sent.items():
        assert np.float32(value) == pytest.approx(board[key], rel=1e-6), key
    steps = {step for _, step in sent}
    assert steps == {1, 2, 3}
    assert {("lm loss validation", 2), ("lm loss validation", 3), ("lm loss validation ppl", 3)} <= set(sent)
    assert calls["finished"] == 1
    if mode == "stub":
        assert calls["init"] == {"project": "rlp-test", "name": "tiny", "dir": wb}
        assert calls["config"] == {"lr": 0.0, "eval_interval": 2, "split": SPLIT}
        want = _independent_validation_loss(corpus, eval_iters=2, global_batch=8, seq_length=32, seed=7)
        for step in (2, 3):
            assert sent[("lm loss validation", step)] == pytest.approx(want, rel=1e-5)
    else:
        assert any(name.startswith("offline-run-") for name in os.listdir(os.path.join(wb, "wandb")))


def test_wandb_flags_without_the_package_fail_at_start(corpus, tmp_path, monkeypatch, capsys):
    from megatron_rlp.pretrain import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    tb = str(tmp_path / "tb")
    assert main(tiny_run_args(corpus, iters=2, tensorboard_dir=tb, wandb_project="p", wandb_exp_name="x")) == 2
    out = capsys.readouterr()
    assert "--wandb-project needs the wandb package" in out.err and "megatron-rlp[wandb]" in out.err
    assert "iteration" not in out.out and not os.path.exists(tb)  # nothing ran
    assert main(tiny_run_args(corpus, iters=2, wandb_project="p")) == 2
    assert "--wandb-project needs --wandb-exp-name" in capsys.readouterr().err
