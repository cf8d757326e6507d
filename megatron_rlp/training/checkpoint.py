"""Checkpoints through megatron-core dist_checkpointing (torch_dist), in Megatron-LM's layout.

    {save}/latest_checkpointed_iteration.txt
    {save}/iter_0000100/            model, optimizer, objective tensors (e.g. the EMA teacher),
                                    plus common state: iteration, scheduler, data cursor, RNG,
                                    the model's architecture

A checkpoint is written to ``iter_XXXXXXX.tmp`` and renamed only when every rank has
finished, then the tracker file is replaced atomically: a crash or preemption mid-save leaves
the last good checkpoint untouched.  Model and optimizer tensors are saved with their global
shapes, so a checkpoint written at one TP/PP layout loads at another; RNG states are per rank
and are restored only when the layout matches.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_rlp import collectives

TRACKER = "latest_checkpointed_iteration.txt"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(RuntimeError):
    pass


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> Optional[int]:
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def _layout() -> dict:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_sharded_object() -> ShardedObject:
    state = {
        "random": __import__("random").getstate(),
        "numpy": __import__("numpy").random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    pp = parallel_state.get_pipeline_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_rank()
    dp = parallel_state.get_data_parallel_rank()
    layout = _layout()
    return ShardedObject(
        "rng_state", state, (layout["pp"], layout["tp"], layout["dp"]), (pp, tp, dp), replica_id=0
    )


def _restore_rng(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def unwrap_model(chunk):
    """The bare megatron model inside DDP / Float16Module wrappers (checkpoint keys come from it)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _model_sharded_state_dict(model_chunks) -> dict:
    if len(model_chunks) == 1:
        return {"model": unwrap_model(model_chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap_model(c).sharded_state_dict() for i, c in enumerate(model_chunks)}


def _write(state: dict, directory: str) -> None:
    """dist_checkpointing.save, with megatron-core's writer-results queue served by a forked
    process: its default, a *spawned* Manager, re-imports the caller's ``__main__``, so a script
    without an ``if __name__ == "__main__"`` guard would start training again inside it."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None and "fork" in mp.get_all_start_methods():
        filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()
    dist_checkpointing.save(state, directory)


def _begin_save(root: str, iteration: int) -> tuple[str, str]:
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    collectives.barrier()
    return final, tmp


def _commit_save(root: str, iteration: int, final: str, tmp: str) -> None:
    """Rename the finished checkpoint into place, then point the tracker at it (atomically)."""
    collectives.barrier()
    if dist.get_rank() == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(iteration))
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
    collectives.barrier()


def save_model_checkpoint(root: str, model_chunks, model_signature: dict, iteration: int = 0) -> str:
    """A weights-only checkpoint (what the converters write); --load starts training from it."""
    final, tmp = _begin_save(root, iteration)
    state = dict(_model_sharded_state_dict(model_chunks))
    state["iteration"] = iteration
    state["model_signature"] = model_signature
    state["parallel_layout"] = _layout()
    state["weights_only"] = True
    _write(state, tmp)
    _commit_save(root, iteration, final, tmp)
    return final


def save_checkpoint(
    root: str,
    iteration: int,
    model_chunks,
    optimizer,
    scheduler,
    objective,
    model_signature: dict,
) -> str:
    """Save everything needed to resume exactly; returns the checkpoint directory."""
    final, tmp = _begin_save(root, iteration)
    model_sd = _model_sharded_state_dict(model_chunks)
    state = dict(model_sd)
    state["optimizer"] = optimizer.sharded_state_dict(
        model_sd["model"] if "model" in model_sd else model_sd, metadata=OPTIMIZER_METADATA
    )
    state["objective_tensors"] = objective.sharded_state_dict(model_sd)
    state["rng_state"] = _rng_sharded_object()
    state["iteration"] = iteration
    state["scheduler"] = scheduler.state_dict()
    state["objective"] = objective.state_dict()
    state["model_signature"] = model_signature
    state["parallel_layout"] = _layout()
    _write(state, tmp)
    _commit_save(root, iteration, final, tmp)
    return final


def _check_signature(saved: dict, current: dict, where: str) -> None:
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs flags {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise CheckpointError(
            f"{where} was saved for a different model than the flags describe ("
            + "; ".join(diffs)
            + "); pass the same model flags (--model-preset and overrides) as the run that saved it"
        )


def load_checkpoint(
    root: str,
    model_chunks,
    optimizer,
    scheduler,
    objective,
    model_signature: dict,
    load_optimizer: bool = True,
    load_rng: bool = True,
    finetune: bool = False,
) -> int:
    """Load the latest checkpoint under ``root``; returns its iteration."""
    if not os.path.isdir(root):
        raise CheckpointError(f"--load {root!r} is not a directory; point it at a --save directory")
    iteration = read_tracker(root)
    if iteration is None:
        raise CheckpointError(
            f"--load {root!r} holds no checkpoint ({TRACKER} is missing); point --load at a "
            "directory written by --save, or drop --load to start from scratch"
        )
    ckpt = iteration_dir(root, iteration)
    if not os.path.isdir(ckpt):
        raise CheckpointError(f"{root}/{TRACKER} names iteration {iteration} but {ckpt} is missing")

    common = dist_checkpointing.load_common_state_dict(ckpt)
    _check_signature(common["model_signature"], model_signature, ckpt)
    same_layout = common["parallel_layout"] == _layout()

    model_sd = _model_sharded_state_dict(model_chunks)
    request = dict(model_sd)
    if common.get("weights_only") or finetune:
        loaded = dist_checkpointing.load(request, ckpt)
        for key in model_sd:
            unwrap_model(model_chunks[int(key[5:] or 0)]).load_state_dict(loaded[key], strict=True)
        if dist.get_rank() == 0:
            print(f"loaded the weights of {ckpt}; training starts at iteration 0", flush=True)
        return 0
    if load_optimizer and optimizer is not None:
        _prime_optimizer_state(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(
            model_sd["model"] if "model" in model_sd else model_sd,
            is_loading=True,
            metadata=OPTIMIZER_METADATA,
        )
    # The objective's plain state first: it says which tensors (e.g. an EMA teacher) exist.
    objective.load_state_dict(common["objective"])
    request["objective_tensors"] = objective.sharded_state_dict(model_sd)
    if load_rng and same_layout:
        request["rng_state"] = _rng_sharded_object()
    loaded = dist_checkpointing.load(request, ckpt)

    for key in model_sd:
        unwrap_model(model_chunks[int(key[5:] or 0)]).load_state_dict(loaded[key], strict=True)
    if "optimizer" in request:
        with _tolerate_per_param_step(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(common["scheduler"])
    objective.load_sharded_state_dict(loaded.get("objective_tensors", {}))
    if "rng_state" in request:
        _restore_rng(loaded["rng_state"])
    elif load_rng and dist.get_rank() == 0:
        print(
            f"note: {ckpt} was saved at layout {common['parallel_layout']}, this run is {_layout()}; "
            "per-rank RNG states are not restored",
            flush=True,
        )
    return int(common["iteration"])


@contextlib.contextmanager
def _tolerate_per_param_step(optimizer):
    """Work around megatron-core 0.16.1's distributed optimizer on torch Adam (no TE/apex).

    torch's Adam keeps ``step`` in every parameter's state; megatron's checkpoint stores it once
    per param group and puts it back in load_state_dict, then copies the per-parameter tensors
    (param, exp_avg, exp_avg_sq) over the state's keys — ``step`` included, which the checkpoint
    does not hold (KeyError: 'step').  Keep the restored step for that key, and give each
    parameter its own step tensor afterwards.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = dict(tensors, step=step.clone())
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original
    # load_state_dict also gives every parameter the *same* step tensor; torch's Adam increments
    # each parameter's step in place, so a shared one would advance once per parameter per step.
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def _prime_optimizer_state(optimizer) -> None:
    """Create Adam's state tensors (including ``step``) before loading into them.

    megatron-core's torch-AdamW path (no TE/apex) builds state lazily, and its init_state_fn
    leaves out ``step``; the distributed optimizer's state_dict() then fails with
    KeyError: 'step' when a checkpoint is loaded before the first step.  The loaded
    checkpoint overwrites these placeholders.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(opt, "init_state_fn", None)
        inner = getattr(opt, "optimizer", None)
        if init is None or inner is None:
            continue
        init(inner, getattr(opt, "config", None))
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if "exp_avg" in state and "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
