"""Fused vocabulary-parallel linear log-prob (Triton) and its torch reference.

Public API
----------
``linear_logprob(hidden, weight, targets, tp_group=None, entropy=False, *, ignore_index=-100,
impl="auto", reduce_hidden_grad=True, chunk_size=None, vocab_chunk=None, vocab_size=None,
grad_chunk_bytes=None)``
    ``log softmax(hidden @ weight.T)[target]`` for ``hidden`` [N, D] (or [..., D]) and this
    rank's output-layer shard ``weight`` [V_r, D] (rows ``[r * V_r, (r + 1) * V_r)`` of the full
    vocabulary, as megatron's ColumnParallelLinear output layer holds them), without ever
    building the ``N x V`` logits.  Returns fp32 log p [N] (and the full-vocabulary entropy [N]
    with ``entropy=True``).  Shards are merged with ONE packed all-gather of per-row
    (lse, target logit[, shard entropy]); no collective when ``tp_group`` is None or has one
    rank.  Differentiable in ``hidden`` and ``weight`` (blocked recompute, no stored logits;
    the hidden gradient is all-reduced over ``tp_group`` like a column-parallel input
    gradient).  Targets equal to ``ignore_index`` give 0 and no gradient.  Deterministic (no
    atomics): the same inputs give bitwise the same outputs and gradients.

``information_gain(h_think, w_policy, h_nothink, w_ema, targets, tp_group=None, ...)``
    RLP's reward ``log p_policy(x | h_think) - log p_ema(x | h_nothink)``, fp32, no grad, one
    packed all-gather for both models.

``reference_linear_logprob`` / ``reference_information_gain``
    Torch reference with the same arguments: token chunks of ``chunk_size`` rows, each walked in
    vocabulary blocks of ``vocab_chunk`` columns (at most one such logits block, <= ``chunk x V_r``,
    alive), block-wise recompute in backward.  Test oracle and CPU fallback.

Choosing the implementation: ``impl="triton"|"reference"`` forces one; ``impl="auto"`` reads
``MEGATRON_RLP_LOGPROB_IMPL`` (``auto``/``triton``/``reference``) and otherwise takes Triton on
CUDA tensors, the reference on CPU - unless ``TRITON_INTERPRET=1`` is set, which selects the
Triton interpreter on CPU (tests/conftest.py sets it for the whole test suite).  The interpreter
is a correctness tool, several times slower than the reference (CPU time for forward+backward
with entropy: ~0.1 s at 256 tokens x 512 vocab x 64 hidden, ~0.6 s at 1024 x 1024 x 128), so a
CPU test that only needs the numbers can pass ``impl="reference"`` or set
``MEGATRON_RLP_LOGPROB_IMPL=reference``.  fp64 inputs always use the reference.

Differences from megatron-core's ``vocab_parallel_cross_entropy``: it materialises the logits
and uses three all-reduces (max, target logit, sum-exp); here the logits are never stored, the
ranks exchange one packed tensor, ``ignore_index`` is honoured, and the entropy is available.
Sequence parallelism is not handled inside: gather the sequence before calling and pass
``reduce_hidden_grad=False`` if your gather's backward already reduce-scatters the gradient.
"""

from megatron_rlp.kernels.api import (
    IMPL_ENV,
    IMPLS,
    information_gain,
    linear_logprob,
    resolve_impl,
    triton_available,
)
from megatron_rlp.kernels.reference import (
    DEFAULT_BLOCK_ELEMENTS,
    DEFAULT_CHUNK_SIZE,
    reference_information_gain,
    reference_linear_logprob,
)
from megatron_rlp.kernels.vocab_parallel import DEFAULT_IGNORE_INDEX

__all__ = [
    "DEFAULT_BLOCK_ELEMENTS",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_IGNORE_INDEX",
    "IMPL_ENV",
    "IMPLS",
    "information_gain",
    "linear_logprob",
    "reference_information_gain",
    "reference_linear_logprob",
    "resolve_impl",
    "triton_available",
]
