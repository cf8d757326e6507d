"""Vocabulary-parallel plumbing shared by every linear log-prob backend.

A backend turns a local weight shard into per-row *shard statistics*; this module owns the rest:
which rows of the vocabulary the shard holds, the one packed collective that merges the shard
statistics of all tensor-parallel ranks, and the autograd Function that ties a backend's forward
and blocked-recompute backward together.

Shard statistics (fp32, one row per token, columns in this order):

* ``lse_r``  log-sum-exp of the shard's logits,
* ``tgt_r``  the target's logit when the target lies in the shard, else exactly 0,
* ``ent_r``  (only with entropy) entropy of the softmax restricted to the shard.

Merging ``R`` shards (``w_r = exp(lse_r - lse)``)::

    lse = logsumexp_r lse_r          log p(target) = sum_r tgt_r - lse
    H   = sum_r w_r * (ent_r + lse - lse_r)

Every term of ``H`` is non-negative, so the entropy keeps full relative precision even for very
large logits (no ``lse - E[z]`` cancellation).  The merge runs in the same order on every rank,
so all ranks hold bit-identical results.

Gradients (``p = softmax(z)`` over the full vocabulary, ``a`` = d loss / d log p(target),
``b`` = d loss / d H, ``t`` the target)::

    dL/dz_j = a * (1[j = t] - p_j) + b * p_j * ((lse - z_j) - H)

The hidden gradient of one shard, ``dz_shard @ W_shard``, is a partial sum over that shard's
vocabulary; it is all-reduced over the tensor-parallel group, as megatron's column-parallel
output layer reduces its input gradient (``copy_to_tensor_model_parallel_region``).  The caller
must therefore pass the hidden states *before* any such copy region.  Sequence parallelism
(hidden scattered along the sequence) is not handled here: gather the sequence first and reduce-
scatter its gradient yourself, with ``reduce_hidden_grad=False``.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.distributed as dist

from megatron_rlp import collectives

DEFAULT_IGNORE_INDEX = -100


def tp_rank_and_size(tp_group) -> tuple[int, int]:
    """(rank, world size) of this process in ``tp_group``; (0, 1) without a group."""
    if tp_group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def local_targets(
    targets: torch.Tensor, vocab_start: int, shard_size: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target index inside this shard (-1 when another shard holds it or it is ignored), and
    the mask of ignored rows."""
    ignored = targets == ignore_index
    local = targets - vocab_start
    outside = (local < 0) | (local >= shard_size) | ignored
    local = torch.where(outside, torch.full_like(local, -1), local)
    return local.contiguous(), ignored


def _all_gather_packed(stats: torch.Tensor, tp_group, world_size: int) -> torch.Tensor:
    """[N, k] per rank -> [world, N, k]: the single collective of the forward pass."""
    n, k = stats.shape
    return collectives.all_gather_into_tensor(stats, group=tp_group).view(world_size, n, k)


def gather_shard_stats(stats: torch.Tensor, tp_group) -> torch.Tensor:
    """Collect every rank's shard statistics: [N, k] -> [world, N, k] (no collective at TP=1)."""
    _, world = tp_rank_and_size(tp_group)
    if world == 1:
        return stats.unsqueeze(0)
    return _all_gather_packed(stats, tp_group, world)


def merge_shard_stats(
    gathered: torch.Tensor, entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """[world, N, k] shard statistics -> (lse, target logit, entropy or None), each [N]."""
    lse_r, tgt_r = gathered[..., 0], gathered[..., 1]
    if gathered.shape[0] == 1:
        lse, tgt = lse_r[0], tgt_r[0]
        ent = gathered[0, :, 2] if entropy else None
        return lse, tgt, ent
    lse = torch.logsumexp(lse_r, dim=0)
    tgt = tgt_r.sum(dim=0)
    ent = None
    if entropy:
        weight = torch.exp(lse_r - lse)
        # a shard that is all padding (lse_r = -inf, see shard_rows) has weight 0: skip its inf
        part = torch.where(weight > 0, weight * (gathered[..., 2] + (lse - lse_r)), torch.zeros_like(weight))
        ent = part.sum(dim=0)
    return lse, tgt, ent


def shard_rows(shard: int, rank: int, vocab_size: Optional[int]) -> int:
    """How many of this rank's ``shard`` vocabulary rows are real tokens: megatron pads the
    output layer past the tokenizer's ``vocab_size``, and padded ids are not part of the
    distribution (None: every row is)."""
    if vocab_size is None:
        return shard
    return max(0, min(shard, vocab_size - rank * shard))


def _shard_stats(backend, hidden, weight, local_tgt, entropy: bool, rows: int) -> torch.Tensor:
    """Backend statistics over the first ``rows`` rows of the shard; a shard with no real rows
    contributes log-sum-exp -inf, target logit 0 and entropy 0."""
    if rows == weight.shape[0]:
        return backend.shard_stats(hidden, weight, local_tgt, entropy)
    if rows > 0:
        return backend.shard_stats(hidden, weight[:rows], local_tgt, entropy)
    stats = torch.zeros(hidden.shape[0], 3 if entropy else 2, dtype=torch.float32, device=hidden.device)
    stats[:, 0] = float("-inf")
    return stats


class Backend(Protocol):
    """What an implementation provides; the autograd Function does the rest."""

    name: str

    def shard_stats(
        self, hidden: torch.Tensor, weight: torch.Tensor, local_tgt: torch.Tensor, entropy: bool
    ) -> torch.Tensor:
        """[N, 2] (or [N, 3] with entropy) fp32 shard statistics, see the module docstring."""

    def shard_grads(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        local_tgt: torch.Tensor,
        lse: torch.Tensor,
        ent: Optional[torch.Tensor],
        grad_logp: torch.Tensor,
        grad_ent: Optional[torch.Tensor],
        need_hidden: bool,
        need_weight: bool,
    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(partial hidden grad [N, D], weight grad [V_r, D]), fp32 (or fp64 for fp64 inputs; the
        weight grad may also come in the weight's dtype), by blocked recompute; a gradient that
        is not needed is returned as None."""


class LinearLogprobFunction(torch.autograd.Function):
    """log p(target) (and entropy) of ``hidden @ weight.T`` over a vocab-parallel weight shard."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        tp_group,
        entropy: bool,
        ignore_index: int,
        backend: Backend,
        reduce_hidden_grad: bool,
        vocab_size: Optional[int],
    ):
        ctx.set_materialize_grads(False)
        rank, _ = tp_rank_and_size(tp_group)
        shard = weight.shape[0]
        rows = shard_rows(shard, rank, vocab_size)
        local_tgt, ignored = local_targets(targets, rank * shard, shard, ignore_index)
        stats = _shard_stats(backend, hidden, weight, local_tgt, entropy, rows)
        lse, tgt, ent = merge_shard_stats(gather_shard_stats(stats, tp_group), entropy)
        zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
        logp = torch.where(ignored, zero, tgt - lse)
        ctx.backend, ctx.tp_group, ctx.entropy = backend, tp_group, entropy
        ctx.reduce_hidden_grad = reduce_hidden_grad
        ctx.rows = rows
        if entropy:
            ent = torch.where(ignored, zero, ent)
            ctx.save_for_backward(hidden, weight, local_tgt, ignored, lse, ent)
            return logp, ent
        ctx.save_for_backward(hidden, weight, local_tgt, ignored, lse)
        return logp

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        if ctx.entropy:
            hidden, weight, local_tgt, ignored, lse, ent = ctx.saved_tensors
        else:
            hidden, weight, local_tgt, ignored, lse = ctx.saved_tensors
            ent = None
        if grad_logp is None and grad_ent is None:
            return (None,) * 9
        zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        grad_logp = torch.where(ignored, zero, grad_logp.to(lse.dtype))
        if grad_ent is not None:
            grad_ent = torch.where(ignored, zero, grad_ent.to(lse.dtype))
        needs_h, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = ctx.rows
        if rows > 0:
            grad_h, grad_w = ctx.backend.shard_grads(
                hidden, weight[:rows], local_tgt, lse, ent, grad_logp, grad_ent, needs_h, needs_w
            )
        else:  # all padding: no logit here is part of the distribution
            grad_h = torch.zeros(hidden.shape, dtype=lse.dtype, device=hidden.device) if needs_h else None
            grad_w = None
        if needs_w and rows < weight.shape[0]:  # padded rows get no gradient
            full = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
            if grad_w is not None:
                full[:rows] = grad_w
            grad_w = full
        _, world = tp_rank_and_size(ctx.tp_group)
        if needs_h and world > 1 and ctx.reduce_hidden_grad:
            collectives.all_reduce(grad_h, group=ctx.tp_group)
        return (
            grad_h.to(hidden.dtype) if needs_h else None,
            grad_w.to(weight.dtype) if needs_w else None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _check_vocab_size(vocab_size: Optional[int], targets: torch.Tensor, ignore_index: int) -> None:
    if vocab_size is None:
        return
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be an integer >= 1 (the tokenizer's), got {vocab_size!r}")
    real = targets[targets != ignore_index]
    if real.numel() and int(real.max()) >= vocab_size:
        raise ValueError(
            f"target id {int(real.max())} is not below vocab_size={vocab_size}: padded vocabulary ids "
            "are not tokens; check the tokenizer passed as vocab_size"
        )


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight shard must be [V_r, D], got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden size {hidden.shape[-1]} does not match weight shard {tuple(weight.shape)}"
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets {tuple(targets.shape)} must match hidden {tuple(hidden.shape)} "
            "minus its last dim"
        )
    if targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"targets must be integer token ids, got {targets.dtype}")


def apply_linear_logprob(
    backend: Backend,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    tp_group=None,
    entropy: bool = False,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    reduce_hidden_grad: bool = True,
    vocab_size: Optional[int] = None,
):
    """Run :class:`LinearLogprobFunction` with ``backend``; accepts hidden [..., D], targets [...]
    and returns outputs shaped like ``targets``."""
    _check_inputs(hidden, weight, targets)
    _check_vocab_size(vocab_size, targets, ignore_index)
    shape = targets.shape
    out = LinearLogprobFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        targets.reshape(-1).long(),
        tp_group,
        bool(entropy),
        int(ignore_index),
        backend,
        bool(reduce_hidden_grad),
        vocab_size,
    )
    if entropy:
        return out[0].view(shape), out[1].view(shape)
    return out.view(shape)


@torch.no_grad()
def apply_information_gain(
    backend: Backend,
    h_think: torch.Tensor,
    w_policy: torch.Tensor,
    h_nothink: torch.Tensor,
    w_ema: torch.Tensor,
    targets: torch.Tensor,
    tp_group=None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """log p_policy(target | h_think) - log p_ema(target | h_nothink), fp32, no grad.

    Both models' shard statistics travel in one packed all-gather; ignored targets give 0.
    """
    _check_inputs(h_think, w_policy, targets)
    _check_inputs(h_nothink, w_ema, targets)
    if w_policy.shape[0] != w_ema.shape[0]:
        raise ValueError("policy and EMA weight shards must cover the same vocabulary rows")
    shape = targets.shape
    flat_t = targets.reshape(-1).long()
    rank, _ = tp_rank_and_size(tp_group)
    shard = w_policy.shape[0]
    _check_vocab_size(vocab_size, flat_t, ignore_index)
    rows = shard_rows(shard, rank, vocab_size)
    local_tgt, ignored = local_targets(flat_t, rank * shard, shard, ignore_index)
    s_pol = _shard_stats(backend, h_think.reshape(-1, h_think.shape[-1]), w_policy, local_tgt, False, rows)
    s_ema = _shard_stats(backend, h_nothink.reshape(-1, h_nothink.shape[-1]), w_ema, local_tgt, False, rows)
    gathered = gather_shard_stats(torch.cat([s_pol, s_ema], dim=1), tp_group)
    lse_p, tgt_p, _ = merge_shard_stats(gathered[..., :2], False)
    lse_e, tgt_e, _ = merge_shard_stats(gathered[..., 2:], False)
    gain = (tgt_p - lse_p) - (tgt_e - lse_e)
    gain = torch.where(ignored, torch.zeros((), dtype=gain.dtype, device=gain.device), gain)
    return gain.float().view(shape)
