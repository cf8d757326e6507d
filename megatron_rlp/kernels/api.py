"""Public entry points: pick an implementation, then run the shared vocab-parallel Function."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional

import torch

from megatron_rlp.kernels.reference import ReferenceBackend
from megatron_rlp.kernels.vocab_parallel import (
    DEFAULT_IGNORE_INDEX,
    apply_information_gain,
    apply_linear_logprob,
)

IMPL_ENV = "MEGATRON_RLP_LOGPROB_IMPL"
IMPLS = ("auto", "triton", "reference")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when triton (and so :mod:`triton_linear_logprob`) imports."""
    try:
        import megatron_rlp.kernels.triton_linear_logprob  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: Optional[str], *tensors: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"`` for these inputs.

    An explicit ``impl="triton"|"reference"`` wins; ``"auto"`` (or None) defers to the
    ``MEGATRON_RLP_LOGPROB_IMPL`` environment variable, and when that is unset or ``auto``:
    Triton for CUDA tensors, and on CPU only when ``TRITON_INTERPRET=1`` asks for the Triton
    interpreter (tests); the reference otherwise, and always for fp64 inputs or without triton.
    """
    choice = (impl or "auto").strip().lower()
    if choice not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if choice == "auto":
        choice = os.environ.get(IMPL_ENV, "auto").strip().lower() or "auto"
        if choice not in IMPLS:
            raise ValueError(f"{IMPL_ENV} must be one of {IMPLS}, got {choice!r}")
    if choice != "auto":
        return choice
    if not triton_available() or any(t.dtype not in _TRITON_DTYPES for t in tensors):
        return "reference"
    if all(t.device.type == "cuda" for t in tensors):
        return "triton"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "triton"
    return "reference"


def _backend(
    impl: str, chunk_size: Optional[int], vocab_chunk: Optional[int], grad_chunk_bytes: Optional[int] = None
):
    if impl == "triton":
        from megatron_rlp.kernels.triton_linear_logprob import TritonBackend

        return TritonBackend(chunk_bytes=grad_chunk_bytes)
    return ReferenceBackend(chunk_size, vocab_chunk)


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    tp_group=None,
    entropy: bool = False,
    *,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    impl: str = "auto",
    reduce_hidden_grad: bool = True,
    chunk_size: Optional[int] = None,
    vocab_chunk: Optional[int] = None,
    vocab_size: Optional[int] = None,
    grad_chunk_bytes: Optional[int] = None,
):
    """log p(target) of ``softmax(hidden @ weight.T)`` over a vocab-parallel weight shard.

    Args:
        hidden: [N, D] (or [..., D]) final hidden states, replicated across the TP group.
        weight: [V_r, D] this rank's rows ``[r * V_r, (r + 1) * V_r)`` of the output layer.
        targets: [N] (or [...]) token ids in the full vocabulary; ``ignore_index`` rows give 0
            (log-prob and entropy) and no gradient.
        tp_group: tensor-parallel group over which the vocabulary is split (None: no split).
        entropy: also return the full-vocabulary entropy of each row (differentiable).
        impl: "auto" | "triton" | "reference" (see :func:`resolve_impl`).
        reduce_hidden_grad: all-reduce the hidden gradient over ``tp_group`` (as megatron's
            column-parallel output layer does); turn off only if the caller reduces it.
        chunk_size, vocab_chunk: the reference's logits block, token rows x vocabulary columns
            (defaults: 2048 rows, as many columns as fit 2**23 elements, at least 256);
            ignored by Triton.
        vocab_size: the tokenizer's vocabulary; ids past it (megatron's padding of the output
            layer) are left out of the softmax and get no gradient.  None: every row counts.
        grad_chunk_bytes: Triton backward, bytes of the d_logits chunk it keeps alive (default
            256 MiB, at least one row or column); ignored by the reference.

    Returns:
        log p [N] fp32, or (log p [N], entropy [N]) with ``entropy=True``.
    """
    chosen = resolve_impl(impl, hidden, weight)
    return apply_linear_logprob(
        _backend(chosen, chunk_size, vocab_chunk, grad_chunk_bytes),
        hidden,
        weight,
        targets,
        tp_group,
        entropy,
        ignore_index,
        reduce_hidden_grad,
        vocab_size,
    )


def information_gain(
    h_think: torch.Tensor,
    w_policy: torch.Tensor,
    h_nothink: torch.Tensor,
    w_ema: torch.Tensor,
    targets: torch.Tensor,
    tp_group=None,
    *,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    impl: str = "auto",
    chunk_size: Optional[int] = None,
    vocab_chunk: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """RLP's reward ``log p_policy(x | h_think) - log p_ema(x | h_nothink)`` (fp32, no grad).

    ``h_think`` are the policy's hidden states at the target slot after a thought, ``h_nothink``
    the EMA teacher's without one; the two weights are the same vocab shard of each model.
    One packed all-gather carries both models' statistics.  Ignored targets give 0.
    ``vocab_size`` leaves the padded ids out of both softmaxes, as in :func:`linear_logprob`.
    """
    chosen = resolve_impl(impl, h_think, w_policy, h_nothink, w_ema)
    return apply_information_gain(
        _backend(chosen, chunk_size, vocab_chunk),
        h_think,
        w_policy,
        h_nothink,
        w_ema,
        targets,
        tp_group,
        ignore_index,
        vocab_size,
    )
