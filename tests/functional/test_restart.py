"""Restart semantics as in Megatron-LM, through the command a user runs.

--load = --save = the run's own directory, the base model through --pretrained-checkpoint: the
first start loads the base weights; SIGUSR1 (slurm's warning) saves at the end of the iteration
and exits 0; the same command again resumes exactly; once more after the end it does nothing.
"""

import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from megatron_rlp.pretrain import parse_run_config, run_training
from megatron_rlp.training import parallel
from megatron_rlp.training.checkpoint import iteration_dir, read_tracker
from training_fixtures import NULL_VOCAB, tiny_run_args, write_corpus

ITERS = 8


def _command(data, run_dir, base):
    args = tiny_run_args(
        data, iters=ITERS, load=run_dir, save=run_dir, pretrained_checkpoint=base, save_interval=100,
        rlp=True, rlp_num_thoughts=2, rlp_thought_len=3, rlp_min_context=2,
        rlp_think_open=NULL_VOCAB - 2, rlp_think_close=NULL_VOCAB - 1,
    )
    return [sys.executable, "-u", "-m", "megatron_rlp.pretrain", *args]


def _env():
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith(("TORCHELASTIC", "SLURM_"))}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    return env


def _metrics(stdout: str) -> dict[int, str]:
    """Iteration -> its log line without the timestamp, time and throughput fields."""
    out = {}
    for line in stdout.splitlines():
        m = re.search(r"iteration\s+(\d+)/", line)
        if not m or "|" not in line:
            continue
        fields = [f.strip() for f in line.split("|")[1:]]
        keep = [f for f in fields if f and not f.startswith(("elapsed time", "throughput"))]
        out[int(m.group(1))] = " | ".join(keep)
    return out


def _tensors(checkpoint: str, tmp) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = str(tmp / (os.path.basename(os.path.dirname(checkpoint)) + ".pt"))
    dcp_to_torch_save(checkpoint, path)
    return torch.load(path, weights_only=False)


def _snapshot(directory: str) -> dict:
    return {os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns
            for r, _, files in os.walk(directory) for f in files}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("restart")
    data = write_corpus(str(root / "data" / "corpus"), num_docs=60)
    base_dir = str(root / "base")
    try:
        run_training(parse_run_config(tiny_run_args(data, iters=2, save=base_dir)))
    finally:
        parallel.destroy()
    return data, base_dir


def test_signal_save_resume_is_exact_and_a_finished_run_does_nothing(base, tmp_path):
    data, base_dir = base
    straight_dir, run_dir = str(tmp_path / "straight"), str(tmp_path / "run")

    straight = subprocess.run(_command(data, straight_dir, base_dir), capture_output=True, text=True,
                              env=_env(), timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "loaded the weights of" in straight.stdout and base_dir in straight.stdout
    expected = _metrics(straight.stdout)
    assert sorted(expected) == list(range(1, ITERS + 1))

    # First start: SIGUSR1 once iteration 1 is logged -> save at the end of the iteration, exit 0.
    proc = subprocess.Popen(_command(data, run_dir, base_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(r"iteration\s+1/", line):
            proc.send_signal(signal.SIGUSR1)
            break
    rest, err = proc.communicate(timeout=600)
    first_out = "".join(lines) + rest
    assert proc.returncode == 0, err[-3000:]
    stopped = read_tracker(run_dir)
    assert stopped is not None and 1 <= stopped < ITERS, first_out[-2000:]
    assert f"exiting at iteration {stopped} on a termination signal" in first_out

    # Same command again: resumes at that iteration; the continuation equals the straight run.
    resumed = subprocess.run(_command(data, run_dir, base_dir), capture_output=True, text=True,
                             env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "loaded the weights of" not in resumed.stdout  # the base model is not loaded again
    got = {**_metrics(first_out), **_metrics(resumed.stdout)}
    assert sorted(_metrics(resumed.stdout)) == list(range(stopped + 1, ITERS + 1))
    assert got == expected  # losses, rlp/* metrics, lr, grad norm at printed precision
    assert any(k.startswith("rlp/") for k in expected[ITERS].split(" | ") for k in [k.split(":")[0]])

    # Final weights, optimizer state and EMA teacher: bitwise equal.
    a = _tensors(iteration_dir(straight_dir, ITERS), tmp_path)
    b = _tensors(iteration_dir(run_dir, ITERS), tmp_path)
    assert sorted(a) == sorted(b)
    assert any(k.startswith("ema.") for k in a)
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key

    # Once more after the end: says so, exits 0, touches nothing.
    before = _snapshot(run_dir)
    again = subprocess.run(_command(data, run_dir, base_dir), capture_output=True, text=True,
                           env=_env(), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished" in again.stdout and f"iteration {ITERS}" in again.stdout
    assert _snapshot(run_dir) == before


def _train(argv):
    try:
        return run_training(parse_run_config(argv))
    finally:
        parallel.destroy()


def test_exit_interval_and_duration_save_and_stop(base, tmp_path, capsys):
    data, _ = base
    run_dir = str(tmp_path / "interval")
    history = _train(tiny_run_args(data, iters=6, save=run_dir, load=run_dir, exit_interval=2))
    assert [h["iteration"] for h in history] == [1, 2] and read_tracker(run_dir) == 2
    assert "exiting at iteration 2 on --exit-interval 2" in capsys.readouterr().out
    # The process has been running for more than 1e-4 minutes: stop after the first iteration.
    run_dir = str(tmp_path / "duration")
    history = _train(tiny_run_args(data, iters=6, save=run_dir, exit_duration_in_mins=1e-4))
    assert len(history) == 1 and read_tracker(run_dir) == 1
    assert "on --exit-duration-in-mins" in capsys.readouterr().out


def test_exit_model_flops_is_a_budget_kept_across_restarts(base, tmp_path, capsys):
    """RLP iterations differ in cost (thought lengths): the budget is the cost model's running sum,
    saved with the checkpoint, so a resumed run stops where one uninterrupted run would."""
    data, _ = base
    rlp = dict(rlp=True, rlp_num_thoughts=2, rlp_thought_len=3, rlp_min_context=2,
               rlp_think_open=NULL_VOCAB - 2, rlp_think_close=NULL_VOCAB - 1)
    whole = _train(tiny_run_args(data, iters=6, **rlp))
    spent = [h["consumed_model_flops"] for h in whole]
    assert spent == pytest.approx(torch.tensor([h["model_flops"] for h in whole], dtype=torch.float64).cumsum(0).tolist())
    assert len(set(h["model_flops"] for h in whole)) > 1  # iterations really differ in cost
    budget = (spent[2] + spent[3]) / 2  # reached during iteration 4
    run_dir = str(tmp_path / "flops")
    first = _train(tiny_run_args(data, iters=6, save=run_dir, load=run_dir, exit_interval=2,
                                 exit_model_flops=budget, **rlp))
    assert [h["iteration"] for h in first] == [1, 2] and read_tracker(run_dir) == 2  # --exit-interval first
    second = _train(tiny_run_args(data, iters=6, save=run_dir, load=run_dir, exit_model_flops=budget, **rlp))
    assert [h["iteration"] for h in second] == [3, 4] and read_tracker(run_dir) == 4
    assert [h["consumed_model_flops"] for h in second] == pytest.approx(spent[2:4])
    assert "on --exit-model-flops" in capsys.readouterr().out
    assert _train(tiny_run_args(data, iters=6, save=run_dir, load=run_dir, exit_model_flops=budget, **rlp)) == []
    assert "the run's FLOP budget is spent" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--exit-model-flops must be > 0"):
        _train(tiny_run_args(data, iters=2, save=run_dir, exit_model_flops=-1.0))


def test_exit_flags_need_save_and_training_needs_lr(base):
    data, _ = base
    with pytest.raises(ValueError, match="--exit-interval saves a checkpoint before exiting: pass --save"):
        _train(tiny_run_args(data, iters=2, exit_interval=1))
    argv = tiny_run_args(data, iters=2)
    i = argv.index("--lr")
    with pytest.raises(ValueError, match="--lr is required"):
        _train(argv[:i] + argv[i + 2:])


def test_a_changed_schedule_on_resume_must_be_chosen(base, tmp_path, capsys):
    """Megatron-LM's rule: more --train-iters or a new --lr on resume is refused until a flag says
    whose schedule wins (before, the extra iterations silently kept the old schedule)."""
    data, _ = base
    run_dir = str(tmp_path / "run")
    _train(tiny_run_args(data, iters=2, save=run_dir, load=run_dir))
    longer = tiny_run_args(data, iters=4, save=run_dir, load=run_dir)
    longer[longer.index("--lr") + 1] = "2e-3"
    from megatron_rlp.pretrain import main

    assert main(longer) == 2
    err = capsys.readouterr().err
    assert "another learning-rate schedule" in err and "--lr: checkpoint 0.001, flags 0.002" in err
    assert "--override-opt_param-scheduler" in err and "--use-checkpoint-opt_param-scheduler" in err
    assert read_tracker(run_dir) == 2  # nothing was trained or written

    import shutil

    kept = str(tmp_path / "kept")
    shutil.copytree(run_dir, kept)
    overridden = _train(longer + ["--override-opt_param-scheduler"])
    assert [h["lr"] for h in overridden] == [2e-3, 2e-3]
    argv = tiny_run_args(data, iters=4, save=kept, load=kept)
    argv[argv.index("--lr") + 1] = "2e-3"
    checkpoint_schedule = _train(argv + ["--use-checkpoint-opt_param-scheduler"])
    assert [h["lr"] for h in checkpoint_schedule] == [1e-3, 1e-3]
    with pytest.raises(ValueError, match="contradict each other"):
        _train(argv + ["--use-checkpoint-opt_param-scheduler", "--override-opt_param-scheduler"])


def test_resume_inside_a_sample_batch_finishes_it(base, tmp_path):
    """--rlp-updates-per-batch 2 stopped after the first update of a batch: the resumed run
    finishes that batch (same sequences, θ_old and advantages) and keeps the KL reference θ_0."""
    data, _ = base
    rlp = dict(rlp=True, rlp_num_thoughts=2, rlp_thought_len=3, rlp_min_context=2,
               rlp_think_open=NULL_VOCAB - 2, rlp_think_close=NULL_VOCAB - 1,
               rlp_updates_per_batch=2, rlp_kl_beta=0.1)
    straight = _train(tiny_run_args(data, iters=4, **rlp))
    run_dir = str(tmp_path / "run")
    first = _train(tiny_run_args(data, iters=4, save=run_dir, load=run_dir, exit_interval=1, **rlp))
    assert [h["iteration"] for h in first] == [1] and read_tracker(run_dir) == 1  # mid-batch
    resumed = _train(tiny_run_args(data, iters=4, save=run_dir, load=run_dir, **rlp))
    keys = [k for k in straight[0] if k.startswith("rlp") or k in ("grad_norm", "lr")]
    assert "rlp/kl" in keys
    for got, want in zip(first + resumed, straight):
        assert {k: got[k] for k in keys} == {k: want[k] for k in keys}, got["iteration"]


def test_torchrun_forwards_sigusr1_to_the_worker_which_saves(base, tmp_path):
    """The sbatch examples' torchrun launch: told to handle SIGUSR1 (--signals-to-handle) and to
    wait for the workers (--shutdown-timeout), torchrun passes slurm's warning to the worker, which
    saves at the end of its iteration (an unhandled SIGUSR1 would kill torchrun and orphan it)."""
    data, _ = base
    save = str(tmp_path / "ckpt")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "1",
           "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "300",
           "-m", "megatron_rlp.pretrain", *tiny_run_args(data, iters=500, save=save)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(r"iteration\s+1/", line):
            proc.send_signal(signal.SIGUSR1)
            break
    rest, _ = proc.communicate(timeout=600)
    out = "".join(lines) + rest
    stopped = read_tracker(save)
    assert stopped is not None and stopped < 500, out[-3000:]
    assert f"exiting at iteration {stopped} on a termination signal" in out
