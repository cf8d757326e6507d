"""preprocess -> train -> save -> resume, and how bad input is reported (single process)."""

import json
import math
import os

import pytest

from megatron_rlp.pretrain import main, parse_run_config, run_training
from megatron_rlp.training import parallel
from megatron_rlp.training.checkpoint import CheckpointError, read_tracker
from megatron_rlp.data.documents import DataError
from tools.preprocess_data import main as preprocess_main
from training_fixtures import NULL_VOCAB, losses, tiny_run_args, write_jsonl_corpus


def _train(argv):
    try:
        return run_training(parse_run_config(argv))
    finally:
        parallel.destroy()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    jsonl = write_jsonl_corpus(str(root / "corpus.jsonl"))
    rc = preprocess_main([
        "--input", jsonl, "--output-prefix", str(root / "corpus"), "--append-eod",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", str(NULL_VOCAB), "--no-progress",
    ])
    assert rc == 0
    return str(root / "corpus_text_document")


def test_preprocess_train_save_resume_is_identical(dataset, tmp_path, capsys):
    save = str(tmp_path / "ckpt")
    tb = str(tmp_path / "tb")
    straight = _train(tiny_run_args(dataset, iters=6))
    first = _train(tiny_run_args(dataset, iters=3, save=save, tensorboard_dir=tb))
    assert read_tracker(save) == 3
    resumed = _train(tiny_run_args(dataset, iters=6, load=save))
    assert losses(first) + losses(resumed) == pytest.approx(losses(straight), abs=1e-6)
    assert losses(straight)[-1] < losses(straight)[0]
    out = capsys.readouterr().out
    # Megatron's log line, with throughput and grad norm.
    line = next(l for l in out.splitlines() if "iteration        3/       3" in l)
    for field in ("consumed samples:           24", "elapsed time per iteration (ms)",
                  "throughput per GPU (TFLOP/s/GPU)", "learning rate", "lm loss", "grad norm",
                  "elapsed time per phase (ms): forward-backward "):
        assert field in line
    # The measured peak after each process's first iteration (to compare with --dry-run), labelled
    # as what it is on CPU; a resumed run measures its own first iteration.
    peaks = [l for l in out.splitlines() if l.startswith("peak memory after iteration")]
    assert [l.split()[4] for l in peaks] == ["1", "1", "4"]
    assert all("(CPU run: peak process RSS; compare with --dry-run): stage 0: max " in l and "(rank 0)" in l
               for l in peaks)
    peak_gib = float(peaks[0].split("max ")[1].split()[0])
    assert 0.05 < peak_gib < 64  # an RSS in GiB, not bytes or KiB
    # TFLOP/s: the cost model's next-token iteration (8 rows of 32 tokens, optimizer included).
    from megatron_rlp.training.cost_model import ntp_iteration_cost

    flops = ntp_iteration_cost(_tiny_two_layers(), 8, 32).model_flops
    assert first[-1]["model_flops"] == pytest.approx(flops, rel=1e-12)
    events = [f for f in os.listdir(tb) if f.startswith("events.out.tfevents")]
    assert events, "TensorBoard event file was not written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb)
    acc.Reload()
    assert [e.step for e in acc.Scalars("lm loss")] == [1, 2, 3]
    for name in ("timers/forward-backward", "timers/optimizer"):
        assert [e.step for e in acc.Scalars(name)] == [1, 2, 3] and all(e.value > 0 for e in acc.Scalars(name))


def _tiny_two_layers():
    import dataclasses

    from megatron_rlp.models.presets import get_preset

    return dataclasses.replace(get_preset("tiny"), num_layers=2)


def test_malformed_jsonl_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "1 2 3"}\n{"text": "4 5\n')
    existing = tmp_path / "out_text_document.bin"
    existing.write_bytes(b"keep me")
    rc = preprocess_main(["--input", str(path), "--output-prefix", str(tmp_path / "out"),
                          "--tokenizer-type", "NullTokenizer", "--vocab-size", "10", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{path}:2" in err and "malformed JSON" in err
    assert existing.read_bytes() == b"keep me"  # nothing already written is lost
    assert not list(tmp_path.glob("*.tmp*"))


def test_empty_document_is_rejected_with_its_line(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"text": "1 2 3"}\n{"text": "   "}\n')
    rc = preprocess_main(["--input", str(path), "--output-prefix", str(tmp_path / "out"),
                          "--tokenizer-type", "NullTokenizer", "--vocab-size", "10", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{path}:2" in err and "empty document" in err and "--skip-empty" in err
    rc = preprocess_main(["--input", str(path), "--output-prefix", str(tmp_path / "out"), "--skip-empty",
                          "--tokenizer-type", "NullTokenizer", "--vocab-size", "10", "--no-progress"])
    assert rc == 0


def test_token_id_outside_vocabulary(dataset, tmp_path):
    # The dataset holds ids up to 500; a model with a 64-token vocabulary cannot read it.
    argv = tiny_run_args(dataset, iters=1)
    argv[argv.index("--vocab-size") + 1] = "40"  # tokenizer ids 0..40
    run = parse_run_config(argv + ["--model-vocab-size", "64"])
    with pytest.raises(DataError, match=r"document \d+ holds token id \d+, outside the tokenizer's vocabulary \[0, 41\)"):
        try:
            run_training(run)
        finally:
            parallel.destroy()


def test_missing_tokenizer_model(dataset, capsys):
    argv = tiny_run_args(dataset, iters=1)
    argv[argv.index("NullTokenizer")] = "SentencePieceTokenizer"
    argv += ["--tokenizer-model", "/nonexistent/tok.model"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "/nonexistent/tok.model" in err and "--tokenizer-model" in err


def test_load_from_directory_without_checkpoint(dataset, tmp_path, capsys):
    assert main(tiny_run_args(dataset, iters=1, load=str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert "holds no checkpoint" in err and str(tmp_path) in err


def test_checkpoint_for_another_model_is_refused(dataset, tmp_path, capsys):
    save = str(tmp_path / "ckpt")
    _train(tiny_run_args(dataset, iters=1, save=save))
    argv = tiny_run_args(dataset, iters=2, load=save)
    argv[argv.index("--num-layers") + 1] = "4"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "different model" in err and "num_layers: checkpoint 2 vs flags 4" in err
    assert read_tracker(save) == 1  # the checkpoint is untouched


def test_non_finite_loss_stops_before_the_step_and_keeps_the_checkpoint(dataset, tmp_path):
    import torch

    from megatron_rlp.training import loop
    from megatron_rlp.training.ntp import NextTokenObjective

    save = str(tmp_path / "ckpt")
    _train(tiny_run_args(dataset, iters=2, save=save))
    run = parse_run_config(tiny_run_args(dataset, iters=4, load=save, save=save, save_interval=1))

    class PoisonAtIteration4(NextTokenObjective):
        def forward_step(self, data_iterator, model):
            out, loss_func = super().forward_step(data_iterator, model)
            return out * float("nan") if self.iteration == 3 else out, loss_func

        def microbatches(self, iteration, num_microbatches, model_chunks):
            self.iteration = iteration
            return super().microbatches(iteration, num_microbatches, model_chunks)

    from megatron_rlp.data.documents import DocumentStream, open_indexed_dataset

    try:
        preset = loop.resolve_preset(run.model)
        state = loop.setup(run, preset)
        stream = DocumentStream(open_indexed_dataset(dataset), preset.vocab_size, seed=7)
        objective = PoisonAtIteration4(stream, 32, 2)
        with pytest.raises(loop.TrainingError, match="iteration 4: non-finite lm loss"):
            loop.train(state, objective)
        params = [p.detach().clone() for p in state.model[0].parameters()]
        assert all(torch.isfinite(p).all() for p in params)
    finally:
        parallel.destroy()
    assert read_tracker(save) == 3  # iteration 3 was saved; nothing after it
    assert not any(name.endswith(".tmp") for name in os.listdir(save))


def test_bf16_training_learns(dataset):
    history = _train(tiny_run_args(dataset, iters=4, bf16=True, lr=3e-3))
    assert all(math.isfinite(l) for l in losses(history))
    assert losses(history)[-1] < losses(history)[0]


def test_script_without_main_guard_saves_once(dataset, tmp_path):
    # megatron-core's checkpoint writer serves its results queue from a Manager process; when that
    # process is *spawned* it re-imports the caller's __main__, so a plain script (no
    # `if __name__ == "__main__"`) would run its training a second time inside it and crash.
    import subprocess
    import sys

    save = str(tmp_path / "ckpt")
    script = tmp_path / "train_script.py"
    script.write_text(
        "import sys\n"
        "from megatron_rlp.pretrain import parse_run_config, run_training\n"
        "print('module body ran', flush=True)\n"
        f"run_training(parse_run_config({tiny_run_args(dataset, iters=2, save=save)!r}))\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.path.join(repo, "tests")]))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("module body ran") == 1
    assert read_tracker(save) == 2
