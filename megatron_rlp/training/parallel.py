"""Process-group setup: torch.distributed, megatron-core parallel_state and RNG seeding."""

from __future__ import annotations

import os
import random
from datetime import timedelta
from typing import Mapping

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import parallel_state, tensor_parallel

from megatron_rlp import platform


def launch_environment(env: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for this process.

    torchrun sets them itself.  ``srun`` with one task per GPU sets SLURM_* instead: rank from
    SLURM_PROCID, world size from SLURM_STEP_NUM_TASKS (the step's tasks — SLURM_NTASKS would be
    the whole allocation's, also inside the batch script), local rank from SLURM_LOCALID, the
    master from the first node of the step (or an exported MASTER_ADDR) and a port derived from
    the job id, so every task agrees without talking.  Without either launcher: one process.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        out = {k: env[k] for k in ("RANK", "WORLD_SIZE")}
        out["LOCAL_RANK"] = env.get("LOCAL_RANK", "0")
        out["MASTER_ADDR"] = env.get("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" in env:
            out["MASTER_PORT"] = env["MASTER_PORT"]
        return out
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        master = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else None)
        if master is None:
            raise ValueError("srun launch: neither MASTER_ADDR nor SLURM_STEP_NODELIST/SLURM_JOB_NODELIST "
                             "is set; export MASTER_ADDR=<first node> in the batch script")
        job = int(env.get("SLURM_JOB_ID", "0"))
        return {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": master,
            "MASTER_PORT": env.get("MASTER_PORT", str(10000 + job % 50000)),
        }
    out = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1")}
    if "MASTER_PORT" in env:
        out["MASTER_PORT"] = env["MASTER_PORT"]
    return out


def first_host(nodelist: str) -> str:
    """The first host of a slurm node list: "gpu[007-009,012],cpu1" -> "gpu007"."""
    nodelist = nodelist.strip()
    head = nodelist.split(",", 1)[0]
    if "[" not in head:
        return head
    prefix, ranges = nodelist.split("[", 1)
    return prefix + ranges.split("]", 1)[0].split(",")[0].split("-")[0]


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's or srun's environment (one process without
    either; see :func:`launch_environment`).  Returns (rank, world_size)."""
    platform.setup_platform()
    if not dist.is_initialized():
        os.environ.update(launch_environment(os.environ))
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
        if platform.cuda_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(
            backend=platform.dist_backend(),
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=int(os.environ.get("MEGATRON_RLP_DIST_TIMEOUT_MIN", "30"))),
        )
    return dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The process groups megatron-core created in init_model_parallel: its destroy_model_parallel only
# forgets them, and every gloo group keeps its threads and sockets until it is destroyed — a
# process that re-initialises many times (tests, the demo's phases) would pile up thousands.
_created_groups: list = []


def _live_groups() -> list:
    from torch.distributed import distributed_c10d as c10d

    world = getattr(getattr(c10d, "_world", None), "pg_map", None)
    if world is None:
        return []
    return [g for g in list(world) if g is not c10d.GroupMember.WORLD]


def init_model_parallel(tp: int, pp: int) -> None:
    """(Re)create megatron-core's tensor/pipeline/data parallel groups."""
    destroy()
    before = set(_live_groups())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    _created_groups.extend(g for g in _live_groups() if g not in before)


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch and megatron's tensor-parallel RNG tracker.

    Parameters are initialised identically on every data-parallel rank; the tensor-parallel
    tracker gives each TP rank its own stream for dropout inside TP regions.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down megatron-core's parallel state and the process groups it created."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    live = set(_live_groups())
    while _created_groups:
        group = _created_groups.pop()
        if group in live:  # not already destroyed with another one
            dist.destroy_process_group(group)


def reporting_rank(pipeline_model_parallel_size: int, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is global rank 0 of the last pipeline stage — the one rank of a tool run
    under torchrun that prints and writes files (megatron's rank order: TP fastest, then DP, then
    PP).  Known from the launcher's environment alone, so it holds after the groups are destroyed."""
    world = int(environ.get("WORLD_SIZE", "1"))
    pp = pipeline_model_parallel_size
    return int(environ.get("RANK", "0")) == (world // pp) * (pp - 1)
