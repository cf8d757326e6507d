"""Torch reference for the fused linear log-prob: chunked over tokens, vocabulary-parallel.

Same signatures and semantics as :func:`megatron_rlp.kernels.linear_logprob` /
:func:`megatron_rlp.kernels.information_gain`; it is the test oracle for the Triton kernel and
the fallback wherever Triton cannot run (CPU).  Per chunk of ``c`` token rows it materialises one
``[c, V_r]`` logits block (never ``N x V_r``); the backward recomputes that block chunk by chunk
instead of keeping logits or probabilities from the forward, so peak memory is about two chunk
blocks plus the weight gradient.

Numerics: fp32 (fp64 for fp64 inputs) throughout.  Low-precision weights are upcast once per
call (a ``V_r x D`` fp32 copy) so that logits are accumulated and stored in fp32, like the
Triton kernel; the hidden chunk is upcast per chunk.  The vocabulary-parallel semantics match
megatron-core's ``vocab_parallel_cross_entropy`` (rank ``r`` holds vocabulary rows
``[r * V_r, (r + 1) * V_r)``; log p(target) = -cross entropy), with one packed all-gather in
place of its three all-reduces (see :mod:`megatron_rlp.kernels.vocab_parallel`).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_rlp.kernels.vocab_parallel import (
    DEFAULT_IGNORE_INDEX,
    apply_information_gain,
    apply_linear_logprob,
)

# Logits elements per chunk (rows = budget // V_r).  Tuned with tools/bench_logprob.py on the
# CPU target shape (N=4096, D=256, V=32000 fp32): 1M elements = 32 rows (4 MiB fp32 blocks) is
# about as fast as materialising everything and keeps the peak well below 1/5 of it.
DEFAULT_CHUNK_ELEMENTS = 1 << 20


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 when any input is fp64, else fp32 (accumulation and statistics dtype)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def rows_per_chunk(shard_size: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(1, shard_size))


def reference_shard_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    local_tgt: torch.Tensor,
    entropy: bool,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Shard statistics [N, 2|3] = (lse_r, target logit or 0, shard entropy) chunk by chunk."""
    cd = compute_dtype(hidden, weight)
    w = weight.to(cd)
    n, shard = hidden.shape[0], w.shape[0]
    stats = torch.empty(n, 3 if entropy else 2, dtype=cd, device=hidden.device)
    has_t = local_tgt >= 0
    safe_t = local_tgt.clamp(min=0).unsqueeze(1)
    zero = torch.zeros((), dtype=cd, device=hidden.device)
    step = rows_per_chunk(shard, chunk_size)
    for s in range(0, n, step):
        e = min(n, s + step)
        z = torch.mm(hidden[s:e].to(cd), w.t())  # [c, V_r] logits, fp32
        stats[s:e, 1] = torch.where(has_t[s:e], z.gather(1, safe_t[s:e]).squeeze(1), zero)
        m = z.amax(dim=1, keepdim=True)
        z.sub_(m)  # z - max <= 0
        if entropy:
            p = torch.exp(z)
            sumexp = p.sum(dim=1)
            plogp = p.mul_(z).sum(dim=1)  # sum exp(z - m) * (z - m)
            del p
            stats[s:e, 2] = torch.log(sumexp) - plogp / sumexp
        else:
            sumexp = z.exp_().sum(dim=1)
        stats[s:e, 0] = m.squeeze(1) + torch.log(sumexp)
        del z
    return stats


def reference_shard_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    local_tgt: torch.Tensor,
    lse: torch.Tensor,
    ent: Optional[torch.Tensor],
    grad_logp: torch.Tensor,
    grad_ent: Optional[torch.Tensor],
    need_hidden: bool = True,
    need_weight: bool = True,
    chunk_size: Optional[int] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(partial hidden grad, weight grad) by recomputing each chunk's logits.

    dz = a * (onehot(t) - p) + b * p * ((lse - z) - H), then dh = dz @ W, dW = dz^T @ h.
    """
    cd = compute_dtype(hidden, weight)
    w = weight.to(cd)
    n, shard = hidden.shape[0], w.shape[0]
    grad_h = torch.empty(n, w.shape[1], dtype=cd, device=hidden.device) if need_hidden else None
    grad_w = torch.zeros_like(w) if need_weight else None
    if not (need_hidden or need_weight):
        return grad_h, grad_w
    lse = lse.to(cd).unsqueeze(1)
    a = grad_logp.to(cd).unsqueeze(1)
    b = grad_ent.to(cd).unsqueeze(1) if grad_ent is not None else None
    ent = ent.to(cd).unsqueeze(1) if b is not None else None
    safe_t = local_tgt.clamp(min=0).unsqueeze(1)
    tgt_grad = torch.where(local_tgt.unsqueeze(1) >= 0, a, torch.zeros((), dtype=cd, device=a.device))
    step = rows_per_chunk(shard, chunk_size)
    for s in range(0, n, step):
        e = min(n, s + step)
        h = hidden[s:e].to(cd)
        z = torch.mm(h, w.t())
        z.sub_(lse[s:e])  # log p over the full vocabulary
        if b is not None:
            p = torch.exp(z)
            # p * (b * (-log p - H) - a), in place in the logits buffer
            z.add_(ent[s:e]).mul_(b[s:e].neg()).sub_(a[s:e]).mul_(p)
            del p
        else:
            z.exp_().mul_(a[s:e].neg())
        z.scatter_add_(1, safe_t[s:e], tgt_grad[s:e])
        if need_hidden:
            torch.mm(z, w, out=grad_h[s:e])
        if need_weight:
            grad_w.addmm_(z.t(), h)
        del z
    return grad_h, grad_w


class ReferenceBackend:
    """Torch chunked implementation of the :class:`vocab_parallel.Backend` protocol."""

    name = "reference"

    def __init__(self, chunk_size: Optional[int] = None):
        self.chunk_size = chunk_size

    def shard_stats(self, hidden, weight, local_tgt, entropy):
        return reference_shard_stats(hidden, weight, local_tgt, entropy, self.chunk_size)

    def shard_grads(self, hidden, weight, local_tgt, lse, ent, grad_logp, grad_ent, need_h, need_w):
        return reference_shard_grads(
            hidden, weight, local_tgt, lse, ent, grad_logp, grad_ent, need_h, need_w, self.chunk_size
        )


def reference_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    tp_group=None,
    entropy: bool = False,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    chunk_size: Optional[int] = None,
    reduce_hidden_grad: bool = True,
):
    """Torch reference of :func:`megatron_rlp.kernels.linear_logprob` (same arguments, plus
    ``chunk_size`` = token rows per logits block; default ``2**20 // V_r``)."""
    return apply_linear_logprob(
        ReferenceBackend(chunk_size),
        hidden,
        weight,
        targets,
        tp_group,
        entropy,
        ignore_index,
        reduce_hidden_grad,
    )


def reference_information_gain(
    h_think: torch.Tensor,
    w_policy: torch.Tensor,
    h_nothink: torch.Tensor,
    w_ema: torch.Tensor,
    targets: torch.Tensor,
    tp_group=None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Torch reference of :func:`megatron_rlp.kernels.information_gain`."""
    return apply_information_gain(
        ReferenceBackend(chunk_size), h_think, w_policy, h_nothink, w_ema, targets, tp_group, ignore_index
    )
