"""Torch reference for the fused linear log-prob: blocked over tokens and vocabulary.

Same signatures and semantics as :func:`megatron_rlp.kernels.linear_logprob` /
:func:`megatron_rlp.kernels.information_gain`; it is the test oracle for the Triton kernel and
the fallback wherever Triton cannot run (CPU).  It walks the token rows in chunks of
``chunk_size`` and, inside a chunk, the shard's vocabulary in blocks of ``vocab_chunk`` columns,
so at most one ``chunk_size x vocab_chunk`` logits block (<= ``chunk x V_r``) is alive: the
forward folds each block into an online log-sum-exp, the backward (a custom autograd Function,
see :mod:`megatron_rlp.kernels.vocab_parallel`) recomputes each block instead of keeping logits
or probabilities from the forward.  Peak memory is about one block (two with the entropy
gradient) plus the gradients themselves.  It is the same algorithm as the Triton kernel, with
torch matmuls on blocks instead of register tiles.

Numerics: fp32 (fp64 for fp64 inputs) throughout.  Low-precision weights are upcast once per
call (a ``V_r x D`` fp32 copy) so that logits are accumulated and kept in fp32, like the Triton
kernel; the hidden chunk is upcast per chunk.  The target logit is the row dot product
``h_i . w_t`` (no gather from a logits block).  Vocabulary-parallel semantics match
megatron-core's ``vocab_parallel_cross_entropy`` (rank ``r`` holds vocabulary rows
``[r * V_r, (r + 1) * V_r)``; log p(target) = -cross entropy), with one packed all-gather in
place of its three all-reduces.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_rlp.kernels.vocab_parallel import (
    DEFAULT_IGNORE_INDEX,
    apply_information_gain,
    apply_linear_logprob,
)

# Block of logits the reference keeps alive: ``chunk_size`` token rows x ``vocab_chunk`` vocabulary
# columns, by default as many columns as fit DEFAULT_BLOCK_ELEMENTS (32 MiB of fp32; 2048 x 4096
# on the CPU target shape N=4096, D=256, V=32000).  Tuned with tools/bench_logprob.py on a
# 2-core CPU, where the matmuls are ~90% of the time: 1024-2048 rows x 4096 columns ran the
# block matmuls fastest (4096-row blocks were ~25% slower), and fewer, larger blocks also mean
# fewer multi-threaded ops to wait on when other processes share the cores.  Peak memory stays
# far below 1/5 of the materialised logits either way.
DEFAULT_CHUNK_SIZE = 2048
DEFAULT_BLOCK_ELEMENTS = 1 << 23
MIN_VOCAB_CHUNK = 256


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 when any input is fp64, else fp32 (accumulation and statistics dtype)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _block(value: Optional[int], default: int, what: str) -> int:
    if value is None:
        return default
    if value < 1:
        raise ValueError(f"{what} must be >= 1, got {value}")
    return int(value)


def block_shape(
    n: int, shard: int, chunk_size: Optional[int], vocab_chunk: Optional[int]
) -> tuple[int, int]:
    """(token rows, vocabulary columns) of one logits block."""
    rows = _block(chunk_size, DEFAULT_CHUNK_SIZE, "chunk_size")
    default_cols = max(MIN_VOCAB_CHUNK, DEFAULT_BLOCK_ELEMENTS // max(1, min(n, rows)))
    cols = _block(vocab_chunk, default_cols, "vocab_chunk")
    return rows, cols


def _target_rows(local_tgt_c: torch.Tensor):
    """(rows whose target is in this shard, their local target ids)."""
    rows = (local_tgt_c >= 0).nonzero().squeeze(1)
    return rows, local_tgt_c.index_select(0, rows)


class _BlockBuffer:
    """One reusable logits block: every [rows, cols] request is a contiguous view of it."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
        self._flat = torch.empty(rows * cols, dtype=dtype, device=device)

    def __call__(self, rows: int, cols: int) -> torch.Tensor:
        return self._flat[: rows * cols].view(rows, cols)


# Without the entropy the forward keeps its exp() reference point m lagging behind the running
# max: logits above m by less than ~88 cannot overflow exp in fp32, and a scale change does not
# cost relative precision.  m moves (a vector op) once the running sum passes _REBASE_ABOVE; a
# block that would overflow is redone with its exact max (rare: a jump of > 88 nats).
_REBASE_ABOVE = 1e30


def _fold_block_exact(z, m, ssum, plogp, entropy):
    """Online log-sum-exp update with the block's exact max; z is raw logits (overwritten)."""
    m_new = z.amax(dim=1)
    if m is not None:
        torch.maximum(m, m_new, out=m_new)
    z.sub_(m_new.unsqueeze(1))  # z - m_new <= 0
    block_plogp = None
    if entropy:
        p = torch.exp(z)
        block_sum = p.sum(dim=1)
        block_plogp = p.mul_(z).sum(dim=1)
        del p
    else:
        block_sum = z.exp_().sum(dim=1)
    if m is None:
        return m_new, block_sum, block_plogp
    shift = m - m_new  # <= 0
    alpha = torch.exp(shift)
    if entropy:
        # re-base sum exp(z - m)(z - m) from m to m_new, then add this block
        plogp = plogp.add_(shift * ssum).mul_(alpha).add_(block_plogp)
    ssum = ssum.mul_(alpha).add_(block_sum)
    return m_new, ssum, plogp


def reference_shard_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    local_tgt: torch.Tensor,
    entropy: bool,
    chunk_size: Optional[int] = None,
    vocab_chunk: Optional[int] = None,
) -> torch.Tensor:
    """Shard statistics [N, 2|3] = (lse_r, target logit or 0, shard entropy).

    Token rows in chunks of ``chunk_size``; inside a chunk the vocabulary in blocks of
    ``vocab_chunk`` columns folded into an online log-sum-exp (reference point ``m``, sum ``s`` of
    ``exp(z - m)`` and, for the entropy, ``e = sum exp(z - m) * (z - m)``).
    """
    cd = compute_dtype(hidden, weight)
    w = weight.to(cd)
    n, shard = hidden.shape[0], w.shape[0]
    stats = torch.zeros(n, 3 if entropy else 2, dtype=cd, device=hidden.device)
    rows_step, vocab_step = block_shape(n, shard, chunk_size, vocab_chunk)
    block = _BlockBuffer(min(n, rows_step), min(shard, vocab_step), cd, hidden.device)
    for s in range(0, n, rows_step):
        e = min(n, s + rows_step)
        h = hidden[s:e].to(cd)
        # target logit: one row of W per token, no logits block needed
        rows, cols = _target_rows(local_tgt[s:e])
        stats[s + rows, 1] = (h.index_select(0, rows) * w.index_select(0, cols)).sum(1)
        m = ssum = plogp = None
        for vs in range(0, shard, vocab_step):
            wc = w[vs:vs + vocab_step]
            z = block(e - s, wc.shape[0])
            if entropy or m is None:
                torch.mm(h, wc.t(), out=z)
                m, ssum, plogp = _fold_block_exact(z, m, ssum, plogp, entropy)
                continue
            # fast path: shift by the lagging reference inside the matmul, then exp and sum
            torch.addmm(m.neg().unsqueeze(1), h, wc.t(), out=z)
            total = z.exp_().sum(dim=1).add_(ssum)
            if not bool(torch.isfinite(total).all()):
                torch.mm(h, wc.t(), out=z)
                m, ssum, plogp = _fold_block_exact(z, m, ssum, plogp, False)
                continue
            ssum = total
            big = ssum > _REBASE_ABOVE
            if bool(big.any()):
                log_s = torch.log(ssum)
                m = torch.where(big, m + log_s, m)
                ssum = torch.where(big, torch.ones_like(ssum), ssum)
        log_s = torch.log(ssum)
        stats[s:e, 0] = m + log_s
        if entropy:
            stats[s:e, 2] = log_s - plogp / ssum
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
    vocab_chunk: Optional[int] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(partial hidden grad, weight grad) by recomputing every logits block.

    dz = a * (onehot(t) - p) + b * p * ((lse - z) - H); dh = dz @ W, dW = dz^T @ h.
    Without the entropy term ``dz = -a * p + a * onehot`` is never formed: the row scale ``-a``
    is applied to ``p @ W`` once per chunk and folded into ``h`` for ``dW``, and the one-hot
    part is a gather / index_add of single rows.
    """
    cd = compute_dtype(hidden, weight)
    w = weight.to(cd)
    n, shard = hidden.shape[0], w.shape[0]
    dev = hidden.device
    grad_h = torch.zeros(n, w.shape[1], dtype=cd, device=dev) if need_hidden else None
    grad_w = torch.zeros_like(w) if need_weight else None
    if not (need_hidden or need_weight):
        return grad_h, grad_w
    rows_step, vocab_step = block_shape(n, shard, chunk_size, vocab_chunk)
    with_ent = grad_ent is not None
    block = _BlockBuffer(min(n, rows_step), min(shard, vocab_step), cd, dev)
    probs = _BlockBuffer(min(n, rows_step), min(shard, vocab_step), cd, dev) if with_ent else None
    for s in range(0, n, rows_step):
        e = min(n, s + rows_step)
        h = hidden[s:e].to(cd)
        neg_lse = lse[s:e].to(cd).neg().unsqueeze(1)
        a = grad_logp[s:e].to(cd)
        if with_ent:
            b = grad_ent[s:e].to(cd).unsqueeze(1)
            neg_b = b.neg()
            offset = (b * ent[s:e].to(cd).unsqueeze(1)).add_(a.unsqueeze(1))  # b * H + a
            h_scaled = h
        else:
            h_scaled = h * a.neg().unsqueeze(1)  # dW = p^T @ (-a * h)
        acc_h = grad_h[s:e] if need_hidden else None
        for vs in range(0, shard, vocab_step):
            ve = min(shard, vs + vocab_step)
            wc = w[vs:ve]
            z = block(e - s, ve - vs)
            torch.addmm(neg_lse, h, wc.t(), out=z)  # log p over the full vocabulary
            if with_ent:
                p = torch.exp(z, out=probs(e - s, ve - vs))
                # p * (-b * log p - (b * H + a)), in place in the logits block
                z.mul_(neg_b).sub_(offset).mul_(p)
            else:
                z.exp_()  # p; the row scale -a is applied after the loop
            if need_hidden:
                acc_h.addmm_(z, wc)
            if need_weight:
                grad_w[vs:ve].addmm_(z.t(), h_scaled)
        # the one-hot part a * onehot(t): rows whose target lies in this shard
        rows, cols = _target_rows(local_tgt[s:e])
        a_rows = a.index_select(0, rows).unsqueeze(1)
        if need_hidden:
            if not with_ent:
                acc_h.mul_(a.neg().unsqueeze(1))
            acc_h.index_add_(0, rows, w.index_select(0, cols) * a_rows)
        if need_weight:
            # Sum repeated targets first (index_add_ into a small [unique, D] tensor is serial,
            # hence deterministic), then write each vocabulary row once: index_put_ with
            # accumulate on repeated indices uses float atomics on multi-threaded CPUs, whose
            # order varies from run to run.  Both are far faster than index_add_ into V_r x D.
            uniq, inverse = torch.unique(cols, return_inverse=True)
            per_target = torch.zeros(uniq.numel(), h.shape[1], dtype=cd, device=dev)
            per_target.index_add_(0, inverse, h.index_select(0, rows) * a_rows)
            grad_w.index_put_((uniq,), per_target, accumulate=True)
    return grad_h, grad_w


class ReferenceBackend:
    """Torch chunked implementation of the :class:`vocab_parallel.Backend` protocol."""

    name = "reference"

    def __init__(self, chunk_size: Optional[int] = None, vocab_chunk: Optional[int] = None):
        self.chunk_size = chunk_size
        self.vocab_chunk = vocab_chunk

    def shard_stats(self, hidden, weight, local_tgt, entropy):
        return reference_shard_stats(
            hidden, weight, local_tgt, entropy, self.chunk_size, self.vocab_chunk
        )

    def shard_grads(self, hidden, weight, local_tgt, lse, ent, grad_logp, grad_ent, need_h, need_w):
        return reference_shard_grads(
            hidden, weight, local_tgt, lse, ent, grad_logp, grad_ent, need_h, need_w,
            self.chunk_size, self.vocab_chunk,
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
    vocab_chunk: Optional[int] = None,
):
    """Torch reference of :func:`megatron_rlp.kernels.linear_logprob` (same arguments, plus the
    logits block: ``chunk_size`` token rows x ``vocab_chunk`` vocabulary columns)."""
    return apply_linear_logprob(
        ReferenceBackend(chunk_size, vocab_chunk),
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
    vocab_chunk: Optional[int] = None,
) -> torch.Tensor:
    """Torch reference of :func:`megatron_rlp.kernels.information_gain`."""
    return apply_information_gain(
        ReferenceBackend(chunk_size, vocab_chunk),
        h_think,
        w_policy,
        h_nothink,
        w_ema,
        targets,
        tp_group,
        ignore_index,
    )
