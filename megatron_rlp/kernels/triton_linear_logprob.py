"""Triton kernels: fused ``hidden @ W_shard.T`` -> log-softmax statistics, and its backward.

Forward (``_fwd_kernel``, one program per block of ``BLOCK_N`` token rows): loop over the
shard's vocabulary in ``BLOCK_V`` columns; each logits tile ``[BLOCK_N, BLOCK_V]`` is a blocked
matmul over ``D`` (``BLOCK_D`` at a time, fp32 accumulator) and is folded straight into an
online log-sum-exp (running max ``m``, rescaled sum ``s``), the target logit, and for the
entropy the running ``sum exp(z - m) * (z - m)``.  Nothing of size ``N x V`` is written.

Backward, by blocked recompute (no logits stored by the forward).  With the merged ``lse`` and
entropy ``H`` of every row, each tile's ``dz = a * (onehot - p) + b * p * ((lse - z) - H)`` is
rebuilt from a recomputed logits tile, then

* deterministic (default): two kernels.  ``_bwd_dh_kernel`` owns a block of rows and walks the
  vocabulary, ``_bwd_dw_kernel`` owns a block of vocabulary rows and walks the tokens; each adds
  ``dz @ W`` / ``dz^T @ h`` into the fp32 rows it alone owns (read-modify-write, ``BLOCK_D`` at a
  time, so any ``D`` fits), always in the same order -> bitwise reproducible.  FLOPs: 2 recomputes,
  i.e. ``10 N D V`` for forward + backward.
* ``deterministic=False``: one kernel over (row block, vocab block) tiles that recomputes once and
  ``tl.atomic_add``s fp32 partials into both gradients (``8 N D V`` in all); summation order, and
  so the last bits, vary from run to run.

Precision: inputs bf16/fp16/fp32, accumulation and all statistics fp32.  On a GPU, bf16 tiles go
to ``tl.dot`` as they are (``dz`` is rounded to the input dtype for the gradient matmuls, as in a
bf16 autograd backward); fp32 inputs use TF32 only when ``torch.backends.cuda.matmul.allow_tf32``
is set.  In the Triton interpreter (``TRITON_INTERPRET=1``, CPU) ``tl.dot`` on bf16 is wrong and
``tl.atomic_add`` on bf16 fails, so tiles are upcast to fp32 there (``UPCAST``) and every
atomic target is an fp32 buffer.  Mixed dtypes (e.g. bf16 hidden, fp32 EMA weight) are upcast too.

Block sizes: fixed on CPU (the interpreter cannot autotune); ``triton.autotune`` over a few
configs on CUDA (keyed on ``V``, ``D``), with the accumulated buffers reset between trials.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

LOW_PRECISION = (torch.bfloat16, torch.float16)
SUPPORTED_DTYPES = (torch.float32,) + LOW_PRECISION

# Interpreter block sizes: large, since the interpreter's cost is per tl op, not per element
# (it runs every program instance in numpy); tests pass smaller blocks to cover ragged edges.
# tl.dot wants every dimension >= 16 on a GPU; the same rule holds for any blocks given here.
CPU_BLOCKS = {"BLOCK_N": 256, "BLOCK_V": 512, "BLOCK_D": 128}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# device code


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, offs_n, offs_v, mask_n, mask_v, D,
    s_hn, s_hd, s_wv, s_wd,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """fp32 [BLOCK_N, BLOCK_V] tile of hidden @ W.T (masked rows / columns read as 0)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(
            h_ptr + offs_n[:, None] * s_hn + offs_d[None, :] * s_hd,
            mask=mask_n[:, None] & mask_d[None, :], other=0.0,
        )
        w = tl.load(
            w_ptr + offs_d[:, None] * s_wd + offs_v[None, :] * s_wv,
            mask=mask_d[:, None] & mask_v[None, :], other=0.0,
        )
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _dlogits_tile(
    z, offs_v, mask_n, mask_v, lt, lse, ent, a, b, ENTROPY: tl.constexpr,
):
    """d loss / d logits for one tile: a * (onehot - p) + b * p * ((lse - z) - H)."""
    logp = z - lse[:, None]
    p = tl.exp(logp)
    if ENTROPY:
        dz = p * (b[:, None] * (-logp - ent[:, None]) - a[:, None])
    else:
        dz = -p * a[:, None]
    dz += tl.where(offs_v[None, :] == lt[:, None], a[:, None], 0.0)
    return tl.where(mask_n[:, None] & mask_v[None, :], dz, 0.0)


@triton.jit
def _fwd_kernel(
    h_ptr, w_ptr, lt_ptr, out_ptr,
    N, V, D,
    s_hn, s_hd, s_wv, s_wd, s_on,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ENTROPY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    lt = tl.load(lt_ptr + offs_n, mask=mask_n, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    e = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(z - m) * (z - m)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < V
        z = _logits_tile(
            h_ptr, w_ptr, offs_n, offs_v, mask_n, mask_v, D, s_hn, s_hd, s_wv, s_wd,
            BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION,
        )
        t += tl.sum(tl.where(offs_v[None, :] == lt[:, None], z, 0.0), axis=1)
        zm = tl.where(mask_v[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(zm - m_new[:, None])
        if ENTROPY:
            shifted = tl.where(mask_v[None, :], z - m_new[:, None], 0.0)
            # re-base the running sum from m to m_new (nothing to carry before the first tile)
            shift = tl.where(s > 0, m - m_new, 0.0)
            e = alpha * (e + shift * s) + tl.sum(p * shifted, axis=1)
        s = s * alpha + tl.sum(p, axis=1)
        m = m_new
    log_s = tl.log(s)
    tl.store(out_ptr + offs_n * s_on, m + log_s, mask=mask_n)
    tl.store(out_ptr + offs_n * s_on + 1, t, mask=mask_n)
    if ENTROPY:
        tl.store(out_ptr + offs_n * s_on + 2, log_s - e / s, mask=mask_n)


@triton.jit
def _bwd_dh_kernel(
    h_ptr, w_ptr, lt_ptr, lse_ptr, ent_ptr, a_ptr, b_ptr, gh_ptr,
    N, V, D,
    s_hn, s_hd, s_wv, s_wd, s_ghn,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ENTROPY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Rows [pid * BLOCK_N, ...): gh += dz @ W over the whole shard (gh fp32, zero-initialised)."""
    pid = tl.program_id(0)
    offs_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    lt = tl.load(lt_ptr + offs_n, mask=mask_n, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    a = tl.load(a_ptr + offs_n, mask=mask_n, other=0.0)
    if ENTROPY:
        ent = tl.load(ent_ptr + offs_n, mask=mask_n, other=0.0)
        b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)
    else:
        ent = a
        b = a
    for v0 in range(0, V, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < V
        z = _logits_tile(
            h_ptr, w_ptr, offs_n, offs_v, mask_n, mask_v, D, s_hn, s_hd, s_wv, s_wd,
            BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION,
        )
        dz = _dlogits_tile(z, offs_v, mask_n, mask_v, lt, lse, ent, a, b, ENTROPY)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            w = tl.load(
                w_ptr + offs_v[:, None] * s_wv + offs_d[None, :] * s_wd,
                mask=mask_v[:, None] & mask_d[None, :], other=0.0,
            )
            if UPCAST:
                w = w.to(tl.float32)
            gh_ptrs = gh_ptr + offs_n[:, None] * s_ghn + offs_d[None, :]
            gmask = mask_n[:, None] & mask_d[None, :]
            acc = tl.load(gh_ptrs, mask=gmask, other=0.0)
            acc = tl.dot(dz.to(w.dtype), w, acc, input_precision=PRECISION)
            tl.store(gh_ptrs, acc, mask=gmask)
            # the next read of these rows may come from other threads of this program
            tl.debug_barrier()


@triton.jit
def _bwd_dw_kernel(
    h_ptr, w_ptr, lt_ptr, lse_ptr, ent_ptr, a_ptr, b_ptr, gw_ptr,
    N, V, D,
    s_hn, s_hd, s_wv, s_wd, s_gwv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ENTROPY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Vocab rows [pid * BLOCK_V, ...): gw += dz^T @ h over all tokens (gw fp32, zeroed)."""
    pid = tl.program_id(0)
    offs_v = (pid * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    mask_v = offs_v < V
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = offs_n < N
        lt = tl.load(lt_ptr + offs_n, mask=mask_n, other=-1)
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        a = tl.load(a_ptr + offs_n, mask=mask_n, other=0.0)
        if ENTROPY:
            ent = tl.load(ent_ptr + offs_n, mask=mask_n, other=0.0)
            b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)
        else:
            ent = a
            b = a
        z = _logits_tile(
            h_ptr, w_ptr, offs_n, offs_v, mask_n, mask_v, D, s_hn, s_hd, s_wv, s_wd,
            BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION,
        )
        dz = _dlogits_tile(z, offs_v, mask_n, mask_v, lt, lse, ent, a, b, ENTROPY)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            h = tl.load(
                h_ptr + offs_n[:, None] * s_hn + offs_d[None, :] * s_hd,
                mask=mask_n[:, None] & mask_d[None, :], other=0.0,
            )
            if UPCAST:
                h = h.to(tl.float32)
            gw_ptrs = gw_ptr + offs_v[:, None] * s_gwv + offs_d[None, :]
            gmask = mask_v[:, None] & mask_d[None, :]
            acc = tl.load(gw_ptrs, mask=gmask, other=0.0)
            acc = tl.dot(tl.trans(dz.to(h.dtype)), h, acc, input_precision=PRECISION)
            tl.store(gw_ptrs, acc, mask=gmask)
            tl.debug_barrier()


@triton.jit
def _bwd_atomic_kernel(
    h_ptr, w_ptr, lt_ptr, lse_ptr, ent_ptr, a_ptr, b_ptr, gh_ptr, gw_ptr,
    N, V, D,
    s_hn, s_hd, s_wv, s_wd, s_ghn, s_gwv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ENTROPY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    NEED_H: tl.constexpr, NEED_W: tl.constexpr,
):
    """One (row block, vocab block) tile: recompute once, atomically add both partials (fp32)."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    mask_n = offs_n < N
    mask_v = offs_v < V
    lt = tl.load(lt_ptr + offs_n, mask=mask_n, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    a = tl.load(a_ptr + offs_n, mask=mask_n, other=0.0)
    if ENTROPY:
        ent = tl.load(ent_ptr + offs_n, mask=mask_n, other=0.0)
        b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)
    else:
        ent = a
        b = a
    z = _logits_tile(
        h_ptr, w_ptr, offs_n, offs_v, mask_n, mask_v, D, s_hn, s_hd, s_wv, s_wd,
        BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION,
    )
    dz = _dlogits_tile(z, offs_v, mask_n, mask_v, lt, lse, ent, a, b, ENTROPY)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        if NEED_H:
            w = tl.load(
                w_ptr + offs_v[:, None] * s_wv + offs_d[None, :] * s_wd,
                mask=mask_v[:, None] & mask_d[None, :], other=0.0,
            )
            if UPCAST:
                w = w.to(tl.float32)
            part_h = tl.dot(dz.to(w.dtype), w, input_precision=PRECISION)
            tl.atomic_add(
                gh_ptr + offs_n[:, None] * s_ghn + offs_d[None, :], part_h,
                mask=mask_n[:, None] & mask_d[None, :],
            )
        if NEED_W:
            h = tl.load(
                h_ptr + offs_n[:, None] * s_hn + offs_d[None, :] * s_hd,
                mask=mask_n[:, None] & mask_d[None, :], other=0.0,
            )
            if UPCAST:
                h = h.to(tl.float32)
            part_w = tl.dot(tl.trans(dz.to(h.dtype)), h, input_precision=PRECISION)
            tl.atomic_add(
                gw_ptr + offs_v[:, None] * s_gwv + offs_d[None, :], part_w,
                mask=mask_v[:, None] & mask_d[None, :],
            )


# --------------------------------------------------------------------------------------------
# autotuning (CUDA only: the interpreter cannot benchmark)

_GPU_CONFIGS = [
    (64, 128, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (64, 256, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (128, 256, 32, 8, 3),
]


def _configs():
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bn, bv, bd, w, s in _GPU_CONFIGS
    ]


_TUNED: dict = {}


def _tuned(name: str):
    if name not in _TUNED:
        kernel, reset = {
            "fwd": (_fwd_kernel, None),
            "dh": (_bwd_dh_kernel, ["gh_ptr"]),
            "dw": (_bwd_dw_kernel, ["gw_ptr"]),
            "atomic": (_bwd_atomic_kernel, ["gh_ptr", "gw_ptr"]),
        }[name]
        tuner = triton.autotune(configs=_configs(), key=["V", "D"], reset_to_zero=reset)
        _TUNED[name] = tuner(kernel)
    return _TUNED[name]


# --------------------------------------------------------------------------------------------
# host side


def _launch_options(hidden: torch.Tensor, weight: torch.Tensor, blocks: Optional[dict]):
    """(kernel getter, block kwargs, UPCAST, PRECISION)."""
    for t in (hidden, weight):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"triton linear_logprob supports {SUPPORTED_DTYPES}, got {t.dtype}")
    interp = interpreting()
    if hidden.device.type != "cuda" and not interp:
        raise RuntimeError(
            "the Triton linear_logprob needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            "triton is imported (CPU interpreter, tests only)"
        )
    upcast = hidden.dtype != weight.dtype or (interp and hidden.dtype in LOW_PRECISION)
    if interp:
        precision = "ieee"
    elif hidden.dtype != weight.dtype:
        precision = "tf32"  # mixed low-precision x fp32: TF32 keeps more bits than the bf16 side
    elif hidden.dtype == torch.float32:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    else:
        precision = "ieee"  # only read for fp32 operands; bf16/fp16 tiles use tensor cores
    if blocks is not None:
        blocks = {k.upper(): int(v) for k, v in blocks.items()}
        if set(blocks) != set(CPU_BLOCKS) or any(
            v < 16 or v & (v - 1) for v in blocks.values()
        ):
            raise ValueError(f"blocks must give BLOCK_N/V/D, powers of two >= 16: {blocks}")
        return (lambda name: _KERNELS[name]), blocks, upcast, precision
    if interp:
        return (lambda name: _KERNELS[name]), dict(CPU_BLOCKS), upcast, precision
    return _tuned, {}, upcast, precision


_KERNELS = {
    "fwd": _fwd_kernel, "dh": _bwd_dh_kernel, "dw": _bwd_dw_kernel, "atomic": _bwd_atomic_kernel
}


def triton_shard_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    local_tgt: torch.Tensor,
    entropy: bool,
    blocks: Optional[dict] = None,
) -> torch.Tensor:
    """[N, 2|3] fp32 shard statistics (lse_r, target logit or 0, shard entropy)."""
    get, blk, upcast, precision = _launch_options(hidden, weight, blocks)
    n, d = hidden.shape
    v = weight.shape[0]
    out = torch.empty(n, 3 if entropy else 2, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return out
    lt = local_tgt.contiguous()
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    get("fwd")[grid](
        hidden, weight, lt, out, n, v, d,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
        ENTROPY=entropy, UPCAST=upcast, PRECISION=precision, **blk,
    )
    return out


def triton_shard_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    local_tgt: torch.Tensor,
    lse: torch.Tensor,
    ent: Optional[torch.Tensor],
    grad_logp: torch.Tensor,
    grad_ent: Optional[torch.Tensor],
    need_hidden: bool = True,
    need_weight: bool = True,
    deterministic: bool = True,
    blocks: Optional[dict] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(partial hidden grad [N, D], weight grad [V_r, D]), fp32, by blocked recompute."""
    get, blk, upcast, precision = _launch_options(hidden, weight, blocks)
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    grad_h = torch.zeros(n, d, dtype=torch.float32, device=dev) if need_hidden else None
    grad_w = torch.zeros(v, d, dtype=torch.float32, device=dev) if need_weight else None
    if n == 0 or not (need_hidden or need_weight):
        return grad_h, grad_w
    use_ent = grad_ent is not None
    lt = local_tgt.contiguous()
    lse = lse.float().contiguous()
    a = grad_logp.float().contiguous()
    ent_t = ent.float().contiguous() if use_ent else lse
    b = grad_ent.float().contiguous() if use_ent else a
    common = (hidden, weight, lt, lse, ent_t, a, b)
    strides = (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1))
    flags = dict(ENTROPY=use_ent, UPCAST=upcast, PRECISION=precision, **blk)
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    if not deterministic:
        gh = grad_h if need_hidden else dummy
        gw = grad_w if need_weight else dummy
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(v, meta["BLOCK_V"])
        )
        get("atomic")[grid](
            *common, gh, gw, n, v, d, *strides,
            gh.stride(0) if need_hidden else 0, gw.stride(0) if need_weight else 0,
            NEED_H=need_hidden, NEED_W=need_weight, **flags,
        )
        return grad_h, grad_w
    if need_hidden:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        get("dh")[grid](*common, grad_h, n, v, d, *strides, grad_h.stride(0), **flags)
    if need_weight:
        grid = lambda meta: (triton.cdiv(v, meta["BLOCK_V"]),)  # noqa: E731
        get("dw")[grid](*common, grad_w, n, v, d, *strides, grad_w.stride(0), **flags)
    return grad_h, grad_w


class TritonBackend:
    """Triton implementation of the :class:`vocab_parallel.Backend` protocol."""

    name = "triton"

    def __init__(self, deterministic: bool = True, blocks: Optional[dict] = None):
        self.deterministic = deterministic
        self.blocks = blocks

    def shard_stats(self, hidden, weight, local_tgt, entropy):
        return triton_shard_stats(hidden, weight, local_tgt, entropy, self.blocks)

    def shard_grads(self, hidden, weight, local_tgt, lse, ent, grad_logp, grad_ent, need_h, need_w):
        return triton_shard_grads(
            hidden, weight, local_tgt, lse, ent, grad_logp, grad_ent, need_h, need_w,
            self.deterministic, self.blocks,
        )
