"""Checkpoints that are damaged, foreign or unwritable, --ckpt-step, retention and async save:
each fault gives a clear error naming the directory and the way out, and nothing is lost."""

import glob
import os
import signal
import subprocess
import sys

import pytest

from megatron_rlp.pretrain import main, parse_run_config, run_training
from megatron_rlp.training import parallel
from megatron_rlp.training.checkpoint import (
    CheckpointError,
    available_iterations,
    iteration_dir,
    read_tracker,
)
from training_fixtures import tiny_run_args, write_corpus


def _train(argv):
    try:
        return run_training(parse_run_config(argv))
    finally:
        parallel.destroy()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("faults") / "data" / "corpus"), num_docs=60)


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory):
    """A run with checkpoints at iterations 2 and 4 (do not modify: copy it)."""
    root = str(tmp_path_factory.mktemp("saved") / "run")
    _train(tiny_run_args(data, iters=4, save=root, save_interval=2))
    assert available_iterations(root) == [2, 4]
    return root


def _copy(src, tmp_path):
    import shutil

    dst = str(tmp_path / "run")
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_names_the_directory_and_the_previous_iteration(data, saved, tmp_path, capsys):
    root = _copy(saved, tmp_path)
    shard = sorted(glob.glob(os.path.join(iteration_dir(root, 4), "*.distcp")))[0]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    assert main(tiny_run_args(data, iters=6, load=root, save=root)) == 2
    err = capsys.readouterr().err
    assert iteration_dir(root, 4) in err and "incomplete or corrupt" in err and "--ckpt-step 2" in err
    # The way out works: the previous complete iteration resumes.
    history = _train(tiny_run_args(data, iters=6, load=root, save=str(tmp_path / "again"), ckpt_step=2))
    assert [h["iteration"] for h in history] == [3, 4, 5, 6]


def test_missing_metadata(data, saved, tmp_path, capsys):
    root = _copy(saved, tmp_path)
    for name in os.listdir(iteration_dir(root, 4)):
        if "metadata" in name:
            os.remove(os.path.join(iteration_dir(root, 4), name))
    assert main(tiny_run_args(data, iters=6, load=root, save=root)) == 2
    err = capsys.readouterr().err
    assert iteration_dir(root, 4) in err and "--ckpt-step 2" in err


def test_ckpt_step_that_does_not_exist(data, saved, capsys):
    assert main(tiny_run_args(data, iters=6, load=saved, save=saved, ckpt_step=3)) == 2
    err = capsys.readouterr().err
    assert "--ckpt-step 3" in err and "[2, 4]" in err


def _foreign_checkpoint(data, root, num_layers=2, drop_objective=False):
    """What Megatron-LM's torch_dist save writes for a GPT model: the model's sharded tensors and
    common entries of its own (args, checkpoint_version) — no model_signature.  With
    ``drop_objective``: this project's signature but no objective/scheduler state."""
    from megatron.core import dist_checkpointing

    from megatron_rlp.pretrain import setup_run
    from megatron_rlp.training.checkpoint import TRACKER, unwrap_model
    from megatron_rlp.training.loop import model_signature

    run = parse_run_config(tiny_run_args(data, iters=1, num_layers=num_layers))
    try:
        state, _, _ = setup_run(run)
        sd = {"model": unwrap_model(state.model[0]).sharded_state_dict(), "iteration": 7}
        if drop_objective:
            sd["model_signature"] = model_signature(state.preset)
        else:
            sd.update(checkpoint_version=3.0, args={"num_layers": num_layers})
        os.makedirs(iteration_dir(root, 7))
        dist_checkpointing.save(sd, iteration_dir(root, 7))
        with open(os.path.join(root, TRACKER), "w") as f:
            f.write("7")
    finally:
        parallel.destroy()
    return root


def test_foreign_checkpoint_loads_when_the_tensors_fit(data, tmp_path, capsys):
    root = _foreign_checkpoint(data, str(tmp_path / "mlm"))
    history = _train(tiny_run_args(data, iters=2, load=root))
    assert [h["iteration"] for h in history] == [1, 2]
    assert "written by another tool" in capsys.readouterr().out


def test_foreign_checkpoint_that_does_not_fit_is_named(data, tmp_path, capsys):
    root = _foreign_checkpoint(data, str(tmp_path / "mlm"), num_layers=2)
    assert main(tiny_run_args(data, iters=2, load=root, num_layers=3)) == 2
    err = capsys.readouterr().err
    assert "written by another tool" in err and "does not fit" in err and "decoder.layers" in err


def test_checkpoint_without_objective_state(data, tmp_path, capsys):
    root = _foreign_checkpoint(data, str(tmp_path / "partial"), drop_objective=True)
    assert main(tiny_run_args(data, iters=2, load=root, save=root)) == 2
    err = capsys.readouterr().err
    assert "no objective" in err and "--pretrained-checkpoint" in err


def test_unwritable_save_fails_before_training(data, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert main(tiny_run_args(data, iters=2, save=str(blocker / "ckpt"))) == 2
    out = capsys.readouterr()
    assert "not writable" in out.err and "nothing has been trained yet" in out.err
    assert "iteration" not in out.out  # no iteration ran


def test_retention_keeps_the_last_n_and_every_mth(data, tmp_path):
    root = str(tmp_path / "run")
    _train(tiny_run_args(data, iters=7, save=root, save_interval=1, ckpt_keep_last=2, ckpt_keep_every=3))
    assert available_iterations(root) == [3, 6, 7] and read_tracker(root) == 7
    with pytest.raises(ValueError, match="--ckpt-keep-every only adds to --ckpt-keep-last"):
        _train(tiny_run_args(data, iters=1, save=root, ckpt_keep_every=3))


SLOW_WRITER = r'''
import os, signal, sys, time
from megatron.core.dist_checkpointing.strategies import async_utils

# The background write of every checkpoint takes an extra second; with KILL_AT set, the
# process is killed (no clean-up at all) when that iteration's log line is printed.
original = async_utils.AsyncCallsQueue.schedule_async_request

def slow(self, request):
    fn = request.async_fn
    def slow_fn(*a, **k):
        time.sleep(1.0)
        return fn(*a, **k)
    return original(self, request._replace(async_fn=slow_fn))

async_utils.AsyncCallsQueue.schedule_async_request = slow
kill_at = os.environ.get("KILL_AT")
from megatron_rlp.pretrain import parse_run_config, run_training

def on_iteration(iteration, record):
    print(f"ITERATION {iteration}", flush=True)
    if kill_at and iteration == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)

from megatron_rlp.pretrain import setup_run, build_objective
from megatron_rlp.training import loop
run = parse_run_config(sys.argv[1:])
state, tok, stream = setup_run(run)
loop.train(state, build_objective(run, state, tok, stream), on_iteration=on_iteration)
'''


def _run_script(args, env_extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("TORCHELASTIC")}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), os.path.join(os.getcwd(), "tests"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-u", "-c", SLOW_WRITER, *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_async_save_lets_the_loop_continue_and_a_crash_keeps_the_previous_checkpoint(data, tmp_path):
    root = str(tmp_path / "async")
    out = _run_script(tiny_run_args(data, iters=4, save=root, save_interval=2, async_save=True), {})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    committed = lines.index(next(l for l in lines if l.startswith("saved checkpoint") and l.endswith("iter_0000002")))
    assert lines.index("ITERATION 3") < committed  # iteration 3 ran while iteration 2 was written
    assert read_tracker(root) == 4 and available_iterations(root) == [2, 4]

    crashed = str(tmp_path / "crashed")
    out = _run_script(tiny_run_args(data, iters=6, save=crashed, save_interval=2, async_save=True), {"KILL_AT": "5"})
    assert out.returncode == -signal.SIGKILL
    # Iteration 4's write had not finished (it takes > 1 s; iteration 5 is fast): 2 is the latest.
    assert read_tracker(crashed) == 2 and available_iterations(crashed) == [2]
    history = _train(tiny_run_args(data, iters=6, load=crashed, save=crashed))
    assert [h["iteration"] for h in history] == [3, 4, 5, 6]
    assert available_iterations(crashed) == [2, 6] and not glob.glob(os.path.join(crashed, "*.tmp"))
