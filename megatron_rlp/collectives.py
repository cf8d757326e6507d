"""The package's only door to torch.distributed collectives and point-to-point calls.

On GPUs the training groups are NCCL, and NCCL has no CPU backend: a collective on a tensor that
lives on the host kills the job.  On CPU (gloo) the same call succeeds, so the mistake is
invisible in tests.  Every collective of the package goes through this module, which

* builds any tensor it needs (flags, scalars) on :func:`megatron_rlp.platform.device`;
* under the CPU shim's strict mode (``MEGATRON_RLP_STRICT_DEVICE=1``) refuses, by name of the
  operation and the tensor's origin, a tensor a CUDA run would keep on the host.

``tests/unit/test_collectives_discipline.py`` fails on a direct ``torch.distributed``
collective anywhere else in the package or the tools.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_rlp import platform

ReduceOp = dist.ReduceOp


def _check(op: str, tensors, group) -> None:
    if platform.strict_device_enabled():
        for t in tensors:
            platform.check_collective_tensor(op, t, group)


def all_reduce(tensor: torch.Tensor, op=ReduceOp.SUM, group=None) -> torch.Tensor:
    """In-place all-reduce; returns ``tensor``."""
    _check("all_reduce", [tensor], group)
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank when ``flag`` is true on any rank of ``group`` (default: the world)."""
    box = torch.tensor([1.0 if flag else 0.0], device=platform.device())
    all_reduce(box, op=ReduceOp.MAX, group=group)
    return bool(box.item())


def broadcast(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """In-place broadcast from global rank ``src``; returns ``tensor``."""
    _check("broadcast", [tensor], group)
    dist.broadcast(tensor, src=src, group=group)
    return tensor


def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), in group-rank order."""
    _check("all_gather", [tensor], group)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def all_gather_into_tensor(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """[N, ...] per rank -> [world * N, ...] (the concatenated output form every backend accepts)."""
    _check("all_gather_into_tensor", [tensor], group)
    world = dist.get_world_size(group=group)
    out = torch.empty((world * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    dist.all_gather_into_tensor(out, tensor.contiguous(), group=group)
    return out


def isend(tensor: torch.Tensor, dst: int, group=None):
    """Non-blocking send to global rank ``dst``; returns the work handle."""
    _check("isend", [tensor], group)
    return dist.isend(tensor, dst, group=group)


def recv(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """Blocking receive from global rank ``src`` into ``tensor``; returns it."""
    _check("recv", [tensor], group)
    dist.recv(tensor, src, group=group)
    return tensor


def barrier(group=None) -> None:
    # NCCL's barrier allocates on the current CUDA device itself; nothing of ours travels.
    dist.barrier(group=group)


def broadcast_object(obj: Any, src: int, group=None) -> Any:
    """Pickle ``obj`` from global rank ``src`` to every rank (torch places the byte tensors on
    the current CUDA device for NCCL groups, on the host for gloo)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj: Any, group=None) -> list:
    """Every rank's picklable ``obj``, in group-rank order (torch places the byte tensors on the
    current CUDA device for NCCL groups, on the host for gloo)."""
    gathered: list = [None] * dist.get_world_size(group=group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


__all__ = [
    "ReduceOp", "all_reduce", "any_rank", "broadcast", "all_gather", "all_gather_into_tensor",
    "isend", "recv", "barrier", "broadcast_object", "all_gather_object",
]

