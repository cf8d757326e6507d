"""Launch environments (torchrun, srun one task per GPU), where a run starts, and the sbatch
examples executed with slurm's and torchrun's commands stubbed."""

import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_rlp import config as cfg
from megatron_rlp.pretrain import build_parser
from megatron_rlp.training.checkpoint import CheckpointError
from megatron_rlp.training.loop import resolve_start
from megatron_rlp.training.parallel import first_host, launch_environment

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SBATCH = ["examples/qwen3_1.7b/rlp.sbatch", "examples/nemotron_nano_12b_v2/rlp.sbatch"]


# -- launch variables ---------------------------------------------------------------------------
def test_srun_one_task_per_gpu():
    env = {"SLURM_PROCID": "11", "SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "99", "SLURM_LOCALID": "3",
           "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_JOB_NODELIST": "gpu[001-010]", "SLURM_JOB_ID": "123456"}
    got = launch_environment(env)
    assert got == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "gpu007",
                   "MASTER_PORT": str(10000 + 123456 % 50000)}
    # The batch script exports MASTER_ADDR/PORT: they win.
    got = launch_environment(dict(env, MASTER_ADDR="head", MASTER_PORT="6000"))
    assert (got["MASTER_ADDR"], got["MASTER_PORT"]) == ("head", "6000")


def test_torchrun_variables_win_over_slurm():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5", "MASTER_ADDR": "n1", "MASTER_PORT": "29500",
           "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n1"}
    assert launch_environment(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5",
                                       "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}


def test_single_process_inside_a_batch_script():
    # The batch shell has SLURM_PROCID and the allocation's SLURM_NTASKS, but no step: one process.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "32", "SLURM_JOB_NODELIST": "n[1-4]"}
    assert launch_environment(env)["WORLD_SIZE"] == "1"


def test_srun_without_any_master_is_a_clear_error():
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        launch_environment({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"})


@pytest.mark.parametrize("nodelist,first", [
    ("node001", "node001"), ("a01,a02", "a01"), ("gpu[007-009,012],cpu1", "gpu007"),
    ("cpu1,gpu[1-2]", "cpu1"), ("rack3-n[0042,0050-0051]", "rack3-n0042"),
])
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first


# -- where a run starts -------------------------------------------------------------------------
def _checkpoint(path, iteration=3):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
    return str(path)


def test_resolve_start(tmp_path):
    run, base = str(tmp_path / "run"), _checkpoint(tmp_path / "base")
    ck = cfg.CheckpointConfig(load=run, save=run, pretrained_checkpoint=base)
    assert resolve_start(ck) == ("weights", base)  # first start: the base model
    _checkpoint(run)
    assert resolve_start(ck) == ("resume", run)  # a requeued job resumes its own run
    assert resolve_start(cfg.CheckpointConfig(load=run, finetune=True)) == ("weights", run)
    fresh = str(tmp_path / "fresh")
    assert resolve_start(cfg.CheckpointConfig(load=fresh, save=fresh)) == ("fresh", None)
    assert resolve_start(cfg.CheckpointConfig()) == ("fresh", None)


def test_resolve_start_errors(tmp_path):
    with pytest.raises(CheckpointError, match="--pretrained-checkpoint .* holds no checkpoint"):
        resolve_start(cfg.CheckpointConfig(load=str(tmp_path), save=str(tmp_path),
                                           pretrained_checkpoint=str(tmp_path / "missing")))
    # A load-only directory without a checkpoint is a mistake, not a fresh start.
    with pytest.raises(CheckpointError, match="--load .* holds no checkpoint"):
        resolve_start(cfg.CheckpointConfig(load=str(tmp_path / "a"), save=str(tmp_path / "b")))


# -- the sbatch examples ------------------------------------------------------------------------
STUB_SRUN = r"""#!/bin/bash
# Stands in for srun and the ranks: records its command line and the environment, then behaves
# like ranks that save on USR1/TERM.
{ echo "ARGS $*"; echo "ENV MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT CDMC=$CUDA_DEVICE_MAX_CONNECTIONS"; } >> "$STUB_LOG"
save() { echo "GOT $1" >> "$STUB_LOG"; mkdir -p "$RUN_DIR"; echo "$STUB_SAVED_ITER" > "$RUN_DIR/latest_checkpointed_iteration.txt"; exit 0; }
trap 'save USR1' USR1
trap 'save TERM' TERM
if [ "${STUB_MODE:-}" = finish ]; then echo "$STUB_SAVED_ITER" > "$RUN_DIR/latest_checkpointed_iteration.txt"; exit 0; fi
echo started >> "$STUB_LOG"
while true; do sleep 0.05; done
"""
STUB_SCONTROL = r"""#!/bin/bash
case "$1" in
  show) printf 'node001\nnode002\n' ;;
  requeue) echo "REQUEUE $2" >> "$STUB_LOG" ;;
esac
"""


def _stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _start(script, tmp_path, **extra):
    bin_dir = tmp_path / "bin" if (tmp_path / "bin").exists() else _stubs(tmp_path)
    log = tmp_path / "log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", STUB_LOG=str(log), SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="node[001-002]", SLURM_NNODES="2", SLURM_SUBMIT_DIR=REPO,
               DATA="/data/corpus", HF_DIR="/hf", BASE_CKPT="/base", RUN_DIR=str(tmp_path / "run"),
               STUB_SAVED_ITER="7")
    env.update(extra)
    proc = subprocess.Popen(["bash", script], cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, log


def _wait_started(log, proc):
    deadline = time.time() + 30
    while time.time() < deadline:
        if log.exists() and "started" in log.read_text():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the stubbed srun never started")


@pytest.mark.parametrize("script", SBATCH)
def test_sbatch_syntax_and_flags(script, tmp_path):
    assert subprocess.run(["bash", "-n", os.path.join(REPO, script)]).returncode == 0
    proc, log = _start(os.path.join(REPO, script), tmp_path, STUB_MODE="finish", STUB_SAVED_ITER="1000")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    text = log.read_text()
    assert "REQUEUE" not in text
    args = next(l for l in text.splitlines() if l.startswith("ARGS ")).split()[1:]
    assert args[args.index("python") + 1 : args.index("python") + 3] == ["-m", "megatron_rlp.pretrain"]
    assert "--ntasks-per-node=8" in args
    run_dir = str(tmp_path / "run")
    flags = args[args.index("megatron_rlp.pretrain") + 1 :]
    assert flags[flags.index("--load") + 1] == run_dir and flags[flags.index("--save") + 1] == run_dir
    assert flags[flags.index("--pretrained-checkpoint") + 1] == "/base"
    assert "--finetune" not in flags  # a requeued job must resume, not restart from the base model
    parsed = build_parser().parse_args(flags)  # every flag exists with a valid value
    assert parsed.exit_signal_handler and parsed.lr == 1e-6 and parsed.seq_length == 4096
    assert "ENV MASTER_ADDR=node001 MASTER_PORT=14242 CDMC=1" in text


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
@pytest.mark.parametrize("saved,requeued", [("7", True), ("1000", False)])
def test_time_limit_warning_saves_then_requeues_unless_finished(launcher, saved, requeued, tmp_path):
    proc, log = _start(os.path.join(REPO, SBATCH[0]), tmp_path, LAUNCHER=launcher, STUB_SAVED_ITER=saved)
    _wait_started(log, proc)
    proc.send_signal(signal.SIGUSR1)  # slurm's B:USR1 goes to the batch shell only
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    text = log.read_text()
    assert "GOT USR1" in text  # forwarded to the ranks, which saved
    assert ("REQUEUE 4242" in text) == requeued, text
    if launcher == "torchrun":
        args = next(l for l in text.splitlines() if l.startswith("ARGS ")).split()[1:]
        handled = args[args.index("--signals-to-handle") + 1].split(",")
        assert "SIGUSR1" in handled and "SIGTERM" in handled
        assert "--ntasks-per-node=1" in args and args[args.index("--rdzv_endpoint") + 1] == "node001:14242"


def test_preemption_saves_and_leaves_the_requeue_to_slurm(tmp_path):
    proc, log = _start(os.path.join(REPO, SBATCH[1]), tmp_path)
    _wait_started(log, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    text = log.read_text()
    assert "GOT TERM" in text and "REQUEUE" not in text


def test_unknown_launcher_is_refused(tmp_path):
    proc, log = _start(os.path.join(REPO, SBATCH[0]), tmp_path, LAUNCHER="mpirun")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "LAUNCHER must be srun or torchrun" in err
