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
from torch.distributed.checkpoint.api import CheckpointException

from megatron_rlp import collectives

TRACKER = "latest_checkpointed_iteration.txt"
# torch.distributed.checkpoint reports a failed read as CheckpointException, a BaseException.
_READ_ERRORS = (Exception, CheckpointException)
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


def available_iterations(root: str) -> list[int]:
    """Iterations of the complete checkpoints under ``root`` (``iter_XXXXXXX``, not ``.tmp``)."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        if name.startswith("iter_") and name[5:].isdigit() and os.path.isdir(os.path.join(root, name)):
            found.append(int(name[5:]))
    return sorted(found)


def check_writable(root: str) -> None:
    """Fail before training if --save cannot be written (not after the iterations ran)."""
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(
            f"--save {root!r} is not writable ({e.strerror or e}); pick a directory this job can "
            "write to — nothing has been trained yet"
        ) from None


def remove_incomplete(root: str) -> list[str]:
    """Delete checkpoints a crash left half-written (``iter_XXXXXXX.tmp``): none of them was ever
    the latest, and only this run writes under its --save directory."""
    if not os.path.isdir(root):
        return []
    stale = [os.path.join(root, n) for n in sorted(os.listdir(root)) if n.startswith("iter_") and n.endswith(".tmp")]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def apply_retention(root: str, keep_last: Optional[int], keep_every: Optional[int]) -> list[int]:
    """Delete complete checkpoints outside the policy (the last ``keep_last``, every iteration
    that is a multiple of ``keep_every``, and always the latest); returns the deleted iterations."""
    if not keep_last:
        return []
    iterations = available_iterations(root)
    latest = read_tracker(root)
    keep = set(iterations[-keep_last:])
    if keep_every:
        keep |= {i for i in iterations if i % keep_every == 0}
    if latest is not None:
        keep.add(latest)
    doomed = [i for i in iterations if i not in keep]
    for i in doomed:
        shutil.rmtree(iteration_dir(root, i), ignore_errors=True)
    return doomed


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


def _write(state: dict, directory: str, async_save: bool = False):
    """dist_checkpointing.save, with megatron-core's writer-results queue served by a forked
    process: its default, a *spawned* Manager, re-imports the caller's ``__main__``, so a script
    without an ``if __name__ == "__main__"`` guard would start training again inside it.
    With ``async_save`` the tensors are written by a background process; returns its request."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None and "fork" in mp.get_all_start_methods():
        from multiprocessing.managers import SyncManager

        manager = SyncManager(ctx=mp.get_context("fork"))
        manager.start(_die_with_parent)
        filesystem_async._results_queue = manager.Queue()
    return dist_checkpointing.save(state, directory, async_sharded_save=async_save)


def _die_with_parent() -> None:
    """Ask Linux to kill this helper process when the rank that started it dies: a killed or
    preempted rank must not leave a writer helper behind (it holds the job's pipes and memory)."""
    import ctypes
    import signal as signal_module
    import sys

    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal_module.SIGKILL))


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


def save_model_checkpoint(root: str, model_chunks, model_signature: dict, iteration: int = 0,
                          model_args: Optional[dict] = None) -> str:
    """A weights-only checkpoint (what the converters write); --load starts training from it.
    ``model_args``: the architecture as flag values, for --use-checkpoint-args."""
    final, tmp = _begin_save(root, iteration)
    state = dict(_model_sharded_state_dict(model_chunks))
    state["iteration"] = iteration
    state["model_signature"] = model_signature
    if model_args is not None:
        state["model_args"] = model_args
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
    model_args: Optional[dict] = None,
    async_queue=None,
    on_committed=None,
    consumed_model_flops: float = 0.0,
) -> str:
    """Save everything needed to resume exactly; returns the checkpoint directory.
    ``model_args``: the architecture as flag values, for --use-checkpoint-args.

    With ``async_queue`` (megatron-core's AsyncCallsQueue, --async-save) the tensors are written
    in the background and the checkpoint is renamed into place and made the latest only when
    every rank's write has finished (``async_queue.maybe_finalize_async_calls``); a crash before
    then leaves the previous checkpoint as the latest.  ``on_committed(path)`` runs on every rank
    once the checkpoint is in place.
    """
    if async_queue is not None:
        async_queue.maybe_finalize_async_calls(blocking=True)  # one background save at a time
    final, tmp = _begin_save(root, iteration)
    model_sd = _model_sharded_state_dict(model_chunks)
    state = dict(model_sd)
    state["optimizer"] = optimizer.sharded_state_dict(
        model_sd["model"] if "model" in model_sd else model_sd, metadata=OPTIMIZER_METADATA
    )
    state["objective_tensors"] = objective.sharded_state_dict(model_sd)
    state["rng_state"] = _rng_sharded_object()
    state["iteration"] = iteration
    state["consumed_model_flops"] = float(consumed_model_flops)
    state["scheduler"] = scheduler.state_dict()
    state["objective"] = objective.state_dict()
    state["model_signature"] = model_signature
    if model_args is not None:
        state["model_args"] = model_args
    state["parallel_layout"] = _layout()

    def commit():
        _commit_save(root, iteration, final, tmp)
        if on_committed is not None:
            on_committed(final)

    if async_queue is None:
        _write(state, tmp)
        commit()
    else:
        request = _write(state, tmp, async_save=True)
        request.add_finalize_fn(commit)
        async_queue.schedule_async_request(request)
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
            + "); pass the same model flags (--model-preset and overrides) as the run that saved it, "
            "or --use-checkpoint-args"
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
    step: Optional[int] = None,
) -> int:
    """Load the latest checkpoint under ``root`` (or iteration ``step``, --ckpt-step); returns
    its iteration (0 when only weights are loaded)."""
    if not os.path.isdir(root):
        raise CheckpointError(f"--load {root!r} is not a directory; point it at a --save directory")
    if step is not None:
        iteration = step
        if iteration not in available_iterations(root):
            raise CheckpointError(
                f"--ckpt-step {step}: {root} has no complete checkpoint of iteration {step} "
                f"(it has {available_iterations(root) or 'none'})"
            )
    else:
        iteration = read_tracker(root)
        if iteration is None:
            raise CheckpointError(
                f"--load {root!r} holds no checkpoint ({TRACKER} is missing); point --load at a "
                "directory written by --save, or drop --load to start from scratch"
            )
    ckpt = iteration_dir(root, iteration)
    if not os.path.isdir(ckpt):
        raise CheckpointError(f"{root}/{TRACKER} names iteration {iteration} but {ckpt} is missing"
                              + _previous_hint(root, iteration))

    try:
        common = dist_checkpointing.load_common_state_dict(ckpt)
    except _READ_ERRORS as e:  # a missing metadata file, a truncated common.pt, ...
        raise CheckpointError(_unreadable(root, ckpt, iteration, e)) from None
    model_sd = _model_sharded_state_dict(model_chunks)
    request = dict(model_sd)

    if "model_signature" not in common:
        # Written by another tool (e.g. Megatron-LM): its tensors decide whether it fits.
        _check_foreign_tensors(ckpt, model_sd)
        _load_weights(ckpt, root, iteration, request, model_chunks)
        if dist.get_rank() == 0:
            print(f"loaded the weights of {ckpt} (written by another tool: no optimizer, scheduler or "
                  "data state is taken from it); training starts at iteration 0", flush=True)
        return 0
    _check_signature(common["model_signature"], model_signature, ckpt)
    same_layout = common.get("parallel_layout") == _layout()

    if common.get("weights_only") or finetune:
        _load_weights(ckpt, root, iteration, request, model_chunks)
        if dist.get_rank() == 0:
            print(f"loaded the weights of {ckpt}; training starts at iteration 0", flush=True)
        return 0
    missing = [k for k in ("objective", "scheduler", "iteration") if k not in common]
    if missing:
        raise CheckpointError(
            f"{ckpt} holds model weights but no {', '.join(missing)} state, so a run cannot resume "
            "from it; pass it as --pretrained-checkpoint (weights only, fresh optimizer)"
        )
    if load_optimizer and scheduler is not None:
        _check_schedule(scheduler, common["scheduler"], ckpt)
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
    try:
        loaded = dist_checkpointing.load(request, ckpt)
    except _READ_ERRORS as e:  # a truncated or missing shard
        raise CheckpointError(_unreadable(root, ckpt, iteration, e)) from None

    for key in model_sd:
        unwrap_model(model_chunks[int(key[5:] or 0)]).load_state_dict(loaded[key], strict=True)
    if "optimizer" in request:
        # megatron-core keeps each param group's own max_lr/min_lr, which the loaded optimizer
        # state brings back from the checkpoint: --override-opt_param-scheduler must reset them.
        flag_lrs = [(g.get("max_lr"), g.get("min_lr")) for g in optimizer.param_groups]
        with _tolerate_per_param_step(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
        if scheduler.override_opt_param_scheduler:
            for group, (max_lr, min_lr) in zip(optimizer.param_groups, flag_lrs):
                if max_lr is not None:
                    group["max_lr"], group["min_lr"] = max_lr, min_lr
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


def consumed_model_flops(root: str, iteration: int) -> float:
    """The model FLOPs a run had done when it saved iteration ``iteration`` under ``root`` (0 for
    checkpoints written before the count was kept, or by another tool)."""
    common = dist_checkpointing.load_common_state_dict(iteration_dir(root, iteration))
    return float(common.get("consumed_model_flops", 0.0))


# The scheduler's saved values and the flags that set them.
_SCHEDULE_FLAGS = {
    "max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters",
    "lr_decay_steps": "--lr-decay-iters / --train-iters", "lr_decay_style": "--lr-decay-style",
    "start_wd": "--weight-decay", "end_wd": "--weight-decay",
    "wd_incr_steps": "--lr-decay-iters / --train-iters", "wd_incr_style": "weight-decay schedule",
}


def _check_schedule(scheduler, saved: dict, ckpt: str) -> None:
    """Megatron-LM's rule on resume: a learning-rate / weight-decay schedule that differs from the
    checkpoint's is an error unless --override-opt_param-scheduler (take the flags') or
    --use-checkpoint-opt_param-scheduler (keep the checkpoint's) says which one wins."""
    if scheduler.override_opt_param_scheduler or scheduler.use_checkpoint_opt_param_scheduler:
        return
    current = scheduler.state_dict()
    ignore = set()
    # Lengths that cannot change a constant schedule (e.g. a run resumed with more --train-iters).
    if saved.get("lr_decay_style") == current["lr_decay_style"] == "constant":
        ignore.add("lr_decay_steps")
    if saved.get("wd_incr_style") == current["wd_incr_style"] == "constant":
        ignore.add("wd_incr_steps")
    diffs = [f"{_SCHEDULE_FLAGS[k]}: checkpoint {saved[k]!r}, flags {current[k]!r}"
             for k in _SCHEDULE_FLAGS if k in saved and k not in ignore and saved[k] != current[k]]
    if not diffs:
        # megatron-core would still assert on the ignored lengths: they are equivalent, keep its.
        scheduler.use_checkpoint_opt_param_scheduler = True
    if diffs:
        raise CheckpointError(
            f"{ckpt} was trained with another learning-rate schedule than the flags give ("
            + "; ".join(dict.fromkeys(diffs)) + "); pass --override-opt_param-scheduler to continue "
            "with the flags' schedule, or --use-checkpoint-opt_param-scheduler to keep the checkpoint's"
        )


def _previous_hint(root: str, iteration: int) -> str:
    earlier = [i for i in available_iterations(root) if i < iteration]
    if earlier:
        return f"; load the previous complete iteration with --ckpt-step {earlier[-1]}"
    return "; no earlier checkpoint is left in this directory"


def _unreadable(root: str, ckpt: str, iteration: int, error: Exception) -> str:
    reason = f"{type(error).__name__}: {error}".strip()
    if len(reason) > 300:
        reason = reason[:300] + " ..."
    return (f"{ckpt} cannot be read — it is incomplete or corrupt (a truncated shard or missing "
            f"metadata?) [{reason}]" + _previous_hint(root, iteration))


def _load_weights(ckpt: str, root: str, iteration: int, request: dict, model_chunks) -> None:
    try:
        loaded = dist_checkpointing.load(request, ckpt)
    except _READ_ERRORS as e:
        raise CheckpointError(_unreadable(root, ckpt, iteration, e)) from None
    for key in request:
        unwrap_model(model_chunks[int(key[5:] or 0)]).load_state_dict(loaded[key], strict=True)


def _check_foreign_tensors(ckpt: str, model_sd: dict) -> None:
    """A checkpoint without this project's model signature fits when it holds every tensor of the
    model with the same global shape; otherwise name what is missing or different."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    try:
        saved = dist_checkpointing.load_tensors_metadata(ckpt)
    except Exception as e:
        raise CheckpointError(f"{ckpt} has no readable tensor metadata ({type(e).__name__}: {e}); "
                              "it is not a torch_dist checkpoint") from None
    missing, different = [], []
    for value in nested_values(model_sd):
        if not isinstance(value, ShardedTensor):
            continue
        if value.key not in saved:
            missing.append(value.key)
        elif tuple(saved[value.key].global_shape) != tuple(value.global_shape):
            different.append(f"{value.key}: checkpoint {tuple(saved[value.key].global_shape)} vs "
                             f"model {tuple(value.global_shape)}")
    if missing or different:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) of the model, e.g. {', '.join(missing[:4])}")
        if different:
            parts.append(f"{len(different)} of different shape, e.g. {'; '.join(different[:4])}")
        raise CheckpointError(
            f"{ckpt} was written by another tool (no model_signature) and does not fit the model the "
            f"flags describe: {'; '.join(parts)}; pass the architecture flags of the model that saved it"
        )


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
