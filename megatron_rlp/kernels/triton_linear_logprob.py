"""Triton kernels for the fused ``hidden @ W_shard.T`` -> log-softmax statistics, and the
backward by recompute; cuBLAS (through torch) does the gradient matmuls.

GPU design
----------
Forward (``_fwd_kernel``, grid ``(row blocks, vocabulary splits)``).  Each program owns
``BLOCK_N`` token rows and one contiguous range of the shard's vocabulary; it walks that range in
``BLOCK_V`` columns, builds each logits tile ``[BLOCK_N, BLOCK_V]`` as a blocked matmul over ``D``
(``BLOCK_D`` at a time, fp32 accumulator) and folds it straight into an online log-sum-exp (running
max, rescaled sum), the target logit and, for the entropy, ``sum exp(z - m) * (z - m)``.  Nothing
of size ``N x V`` is written.  The training shapes (thousands of rows) fill the GPU with row
blocks alone and run one split; RLP's scoring calls (hundreds of rows: the information-gain
reward, the teacher) would keep 2-4 of 132 SMs busy, so :func:`vocab_splits` gives them up to
``2 * SMs / row blocks`` splits (each at least ``MIN_SPLIT_COLS`` columns).  The split partials
``[splits, N, 2|3]`` are the same statistics a tensor-parallel shard produces, and are merged by
the same exact log-sum-exp rule (:func:`vocab_parallel.merge_shard_stats`, a few torch ops on
``splits x N`` numbers) before the shards are merged over the TP group.

Backward, at ``8 N D V`` for forward + backward (one recompute).  The logits are cut into chunks
along one axis - the rows when ``N > V_r``, else the vocabulary - and each chunk's
``d_logits = a * (onehot - p) + b * p * ((lse - z) - H)`` is written by one Triton pass
(``_dlogits_kernel``, grid over the chunk's ``BLOCK_N x BLOCK_V`` tiles: recompute the logits
tile from the saved ``lse`` (and ``H``), apply the formula, store) in the GEMM dtype (bf16/fp16
for low-precision inputs, as a bf16 autograd backward has it; fp32 for fp32 or mixed inputs).
Two cuBLAS GEMMs (torch) consume it: ``d_h = d_logits @ W`` and ``d_W = d_logits^T @ h``.  The
gradient indexed by the chunked axis is written once, straight into its slice (``d_W`` rows, in
the weight dtype, for vocabulary chunks; ``d_h`` rows for row chunks); the other one is summed
over the chunks in an fp32 buffer.  Cutting the longer axis keeps that summed operand the
smaller one and each chunk's GEMM long in its inner dimension.  For low-precision inputs each
chunk's partial comes out of cuBLAS in bf16 and is added in fp32: about ``6 F / (B * chunk)`` of
the summing GEMM's time (F flop/s, B bytes/s; ~20 % of that one GEMM at the 8192-column chunks of
N = 16384, V = 151936 on an H100).  Extra memory: the ``d_logits`` chunk, at most
``chunk_bytes`` (default ``DEFAULT_CHUNK_BYTES`` = 256 MiB, at least one row or column), plus that
partial.  Deterministic: every output element comes from one program or one GEMM call, chunks
are summed in a fixed order, no atomics (the atomic variant is gone: it no longer saved FLOPs).
Not batch-invariant: the split count and the autotuned blocks depend on N, so a row's last bits
can change with the number of rows in the call.

Precision: inputs bf16/fp16/fp32, logits and all statistics fp32.  On a GPU, bf16 tiles go to
``tl.dot`` as they are; fp32 inputs use TF32 only when ``torch.backends.cuda.matmul.allow_tf32``
is set (the same switch governs the torch GEMMs).  Mixed dtypes (bf16 hidden, fp32 EMA weight)
are upcast: tiles in the kernels, operands once for the GEMMs.

CPU (``TRITON_INTERPRET=1``, tests): the same kernels run in Triton's interpreter and the same
torch GEMMs on the CPU.  ``tl.dot`` on bf16 is silently wrong in the interpreter, so tiles are
upcast to fp32 there (``UPCAST``); its fp32 -> bf16 cast truncates where a GPU rounds to nearest
even, so ``d_logits`` is rounded on the bits first there (``ROUND_BF16``) and stored in bf16: the
GEMMs see the numbers they see on a GPU.  Block sizes are fixed on CPU (the interpreter cannot
autotune); ``triton.autotune`` runs on CUDA, keyed on power-of-two buckets of the row count (and of the
chunk for the backward), the vocabulary and ``D``.  Checked on CPU only (no GPU during this
work): forward, splits (boundaries inside TP shards, empty splits, ignored rows), both chunk
axes with ragged chunks and the byte bound, entropy gradients, bf16 chunks equal to the exact
d_logits rounded to nearest bf16, fp32 summation, TP=2 over gloo, all against fp64 autograd and
the torch reference.  Not checked here: compiled kernels, autotuning, speed (tests/gpu and
tools/bench_logprob.py do that on a GPU).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from megatron_rlp.kernels.vocab_parallel import merge_shard_stats

LOW_PRECISION = (torch.bfloat16, torch.float16)
SUPPORTED_DTYPES = (torch.float32,) + LOW_PRECISION

# Interpreter block sizes: large, since the interpreter's cost is per tl op, not per element
# (it runs every program instance in numpy); tests pass smaller blocks to cover ragged edges.
# tl.dot wants every dimension >= 16 on a GPU; the same rule holds for any blocks given here.
CPU_BLOCKS = {"BLOCK_N": 256, "BLOCK_V": 512, "BLOCK_D": 128}

# Backward: bytes of one d_logits chunk (bf16: 128 Mi elements; 883 rows of a 151936 vocabulary).
DEFAULT_CHUNK_BYTES = 256 << 20

# Forward vocabulary splits: aim at two programs per SM, each split at least this many columns
# (two of the largest BLOCK_V), and assume an H100's SM count where there is no GPU.
SPLIT_ROW_BLOCK = 64
MIN_SPLIT_COLS = 512
DEFAULT_SMS = 132


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _bucket(n: int) -> int:
    """Power-of-two bucket of a size: the autotuning key (one tuning per bucket, not per N)."""
    return 1 << max(0, int(n) - 1).bit_length()


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
def _fwd_kernel(
    h_ptr, w_ptr, lt_ptr, out_ptr,
    N, V, D, SPLITS, N_BUCKET,
    s_hn, s_hd, s_wv, s_wd, s_os, s_on,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ENTROPY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Rows of block ``pid_n`` over vocabulary split ``pid_s``: out[pid_s, row] = (lse, target
    logit or 0, entropy) of the softmax restricted to the split (-inf, 0, 0 for an empty one).
    N_BUCKET is only an autotuning key."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    # whole BLOCK_V tiles per split, so a split boundary never cuts a tile
    per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), SPLITS) * BLOCK_V
    v_begin = pid_s * per_split
    v_end = tl.minimum(V, v_begin + per_split)
    lt = tl.load(lt_ptr + offs_n, mask=mask_n, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    e = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(z - m) * (z - m)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < v_end
        z = _logits_tile(
            h_ptr, w_ptr, offs_n, offs_v, mask_n, mask_v, D, s_hn, s_hd, s_wv, s_wd,
            BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION,
        )
        t += tl.sum(tl.where((offs_v[None, :] == lt[:, None]) & mask_v[None, :], z, 0.0), axis=1)
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
    base = out_ptr + pid_s * s_os + offs_n * s_on
    tl.store(base, m + log_s, mask=mask_n)
    tl.store(base + 1, t, mask=mask_n)
    if ENTROPY:
        # an empty split (s = 0) has weight 0 in the merge; store 0, not 0/0
        tl.store(base + 2, tl.where(s > 0, log_s - e / s, 0.0), mask=mask_n)


@triton.jit
def _dlogits_kernel(
    h_ptr, w_ptr, lt_ptr, lse_ptr, ent_ptr, a_ptr, b_ptr, dz_ptr,
    row0, row_end, col0, col_end, D, ROWS_BUCKET, COLS_BUCKET,
    s_hn, s_hd, s_wv, s_wd, s_zn,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ENTROPY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    """One tile of the chunk rows [row0, row_end) x columns [col0, col_end):
    dz[row - row0, col - col0] = a * (onehot - p) + b * p * ((lse - z) - H), in dz's dtype.
    ROWS_BUCKET / COLS_BUCKET are only autotuning keys."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = (row0 + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_v = (col0 + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    mask_n = offs_n < row_end
    mask_v = offs_v < col_end
    lt = tl.load(lt_ptr + offs_n, mask=mask_n, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    a = tl.load(a_ptr + offs_n, mask=mask_n, other=0.0)
    z = _logits_tile(
        h_ptr, w_ptr, offs_n, offs_v, mask_n, mask_v, D, s_hn, s_hd, s_wv, s_wd,
        BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION,
    )
    logp = z - lse[:, None]
    p = tl.exp(logp)
    if ENTROPY:
        ent = tl.load(ent_ptr + offs_n, mask=mask_n, other=0.0)
        b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)
        dz = p * (b[:, None] * (-logp - ent[:, None]) - a[:, None])
    else:
        dz = -p * a[:, None]
    dz += tl.where(offs_v[None, :] == lt[:, None], a[:, None], 0.0)
    dz = tl.where(mask_n[:, None] & mask_v[None, :], dz, 0.0)
    if ROUND_BF16:
        # the interpreter's fp32 -> bf16 cast truncates; a GPU rounds to nearest even: round
        # here (on the bits), so that the cast below is exact and CPU matches GPU
        bits = dz.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        dz = bits.to(tl.float32, bitcast=True)
    ptrs = dz_ptr + (offs_n - row0)[:, None] * s_zn + (offs_v - col0)[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])


# --------------------------------------------------------------------------------------------
# autotuning (CUDA only: the interpreter cannot benchmark)

_GPU_CONFIGS = [  # BLOCK_N, BLOCK_V, BLOCK_D, warps, stages
    (32, 128, 64, 4, 3),  # few rows (scoring calls)
    (64, 128, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (64, 256, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (128, 256, 32, 8, 3),
]

_KERNELS = {"fwd": _fwd_kernel, "dlogits": _dlogits_kernel}
_KEYS = {"fwd": ["N_BUCKET", "SPLITS", "V", "D"], "dlogits": ["ROWS_BUCKET", "COLS_BUCKET", "D"]}
_TUNED: dict = {}


def _tuned(name: str):
    """Autotuned kernel; both kernels only write their outputs, so trials need no reset."""
    if name not in _TUNED:
        configs = [
            triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for bn, bv, bd, w, s in _GPU_CONFIGS
        ]
        _TUNED[name] = triton.autotune(configs=configs, key=_KEYS[name])(_KERNELS[name])
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


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def vocab_splits(n: int, v: int, sms: int = DEFAULT_SMS) -> int:
    """Vocabulary splits of the forward for ``n`` rows and ``v`` shard columns: enough programs
    for two per SM when the row blocks alone are too few, each split >= MIN_SPLIT_COLS columns."""
    row_blocks = max(1, triton.cdiv(n, SPLIT_ROW_BLOCK))
    wanted = triton.cdiv(2 * sms, row_blocks)
    return max(1, min(wanted, v // MIN_SPLIT_COLS))


def triton_shard_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    local_tgt: torch.Tensor,
    entropy: bool,
    blocks: Optional[dict] = None,
    splits: Optional[int] = None,
) -> torch.Tensor:
    """[N, 2|3] fp32 shard statistics (lse_r, target logit or 0, shard entropy).

    ``splits`` (default :func:`vocab_splits`) vocabulary ranges run as separate programs and are
    merged by log-sum-exp."""
    get, blk, upcast, precision = _launch_options(hidden, weight, blocks)
    n, d = hidden.shape
    v = weight.shape[0]
    k = 3 if entropy else 2
    if splits is None:
        splits = vocab_splits(n, v, _sm_count(hidden.device))
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    parts = torch.empty(splits, n, k, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return parts[0]
    lt = local_tgt.contiguous()
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
    get("fwd")[grid](
        hidden, weight, lt, parts, n, v, d, splits, _bucket(n),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        parts.stride(0), parts.stride(1),
        ENTROPY=entropy, UPCAST=upcast, PRECISION=precision, **blk,
    )
    if splits == 1:
        return parts[0]
    lse, tgt, ent = merge_shard_stats(parts, entropy)
    return torch.stack([lse, tgt, ent] if entropy else [lse, tgt], dim=1)


def _chunk_plan(n: int, v: int, elem_bytes: int, chunk_bytes: int) -> tuple[str, int]:
    """("rows" | "vocab", chunk extent): cut the longer axis, so each chunk spans the whole of
    the shorter one and stays within ``chunk_bytes`` (at least one row / column)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if n > v:
        return "rows", max(1, min(n, chunk_bytes // (v * elem_bytes)))
    return "vocab", max(1, min(v, chunk_bytes // (n * elem_bytes)))


def dlogits_chunk(
    hidden, weight, lt, lse, ent, a, b, rows: slice, cols: slice, dtype, get, blk, flags
) -> torch.Tensor:
    """d loss / d logits of hidden[rows] @ weight[cols].T, recomputed from lse (and H): one
    Triton pass, the result [rows, cols] in ``dtype``."""
    nr, nc = rows.stop - rows.start, cols.stop - cols.start
    dz = torch.empty(nr, nc, dtype=dtype, device=hidden.device)
    grid = lambda meta: (triton.cdiv(nr, meta["BLOCK_N"]), triton.cdiv(nc, meta["BLOCK_V"]))  # noqa: E731
    get("dlogits")[grid](
        hidden, weight, lt, lse, ent, a, b, dz,
        rows.start, rows.stop, cols.start, cols.stop, hidden.shape[1], _bucket(nr), _bucket(nc),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), dz.stride(0),
        **flags, **blk,
    )
    return dz


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
    blocks: Optional[dict] = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(partial hidden grad [N, D] fp32, weight grad [V_r, D]: fp32 when accumulated over row
    chunks, else the GEMM dtype), by one recompute: a d_logits chunk per Triton pass, then
    ``d_logits @ W`` and ``d_logits^T @ h`` as torch GEMMs."""
    get, blk, upcast, precision = _launch_options(hidden, weight, blocks)
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    # GEMM dtype: the inputs' own; fp32 when they differ (torch matmuls need one dtype)
    gemm_dtype = hidden.dtype if hidden.dtype == weight.dtype else torch.float32
    axis, step = _chunk_plan(max(n, 1), v, torch.finfo(gemm_dtype).bits // 8, chunk_bytes)
    grad_h = torch.zeros(n, d, dtype=torch.float32, device=dev) if need_hidden else None
    w_dtype = torch.float32 if axis == "rows" else gemm_dtype
    grad_w = torch.zeros(v, d, dtype=w_dtype, device=dev) if need_weight else None
    if n == 0 or not (need_hidden or need_weight):
        return grad_h, grad_w
    use_ent = grad_ent is not None
    lt = local_tgt.contiguous()
    lse = lse.float().contiguous()
    a = grad_logp.float().contiguous()
    ent_t = ent.float().contiguous() if use_ent else lse
    b = grad_ent.float().contiguous() if use_ent else a
    round_bf16 = interpreting() and gemm_dtype == torch.bfloat16
    flags = dict(ENTROPY=use_ent, UPCAST=upcast, PRECISION=precision, ROUND_BF16=round_bf16)
    h_g, w_g = hidden.to(gemm_dtype), weight.to(gemm_dtype)

    def dz_of(rows: slice, cols: slice) -> torch.Tensor:
        return dlogits_chunk(
            hidden, weight, lt, lse, ent_t, a, b, rows, cols, gemm_dtype, get, blk, flags
        )

    def accumulate(acc: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        if acc.dtype == x.dtype:
            acc.addmm_(x, y)
        else:  # low precision: cuBLAS output in bf16, summed over chunks in fp32
            acc.add_(torch.mm(x, y))

    if axis == "rows":  # d_h rows written once, d_W accumulated
        for r0 in range(0, n, step):
            rows = slice(r0, min(n, r0 + step))
            dz = dz_of(rows, slice(0, v))
            if need_hidden:
                grad_h[rows] = torch.mm(dz, w_g)
            if need_weight:
                accumulate(grad_w, dz.t(), h_g[rows])
    else:  # d_W rows written once, d_h accumulated
        for c0 in range(0, v, step):
            cols = slice(c0, min(v, c0 + step))
            dz = dz_of(slice(0, n), cols)
            if need_weight:
                torch.mm(dz.t(), h_g, out=grad_w[cols])
            if need_hidden:
                accumulate(grad_h, dz, w_g[cols])
    return grad_h, grad_w


class TritonBackend:
    """Triton implementation of the :class:`vocab_parallel.Backend` protocol.

    ``chunk_bytes`` bounds the backward's d_logits chunk; ``splits`` fixes the forward's
    vocabulary splits (default: chosen from N, see :func:`vocab_splits`)."""

    name = "triton"

    def __init__(
        self,
        blocks: Optional[dict] = None,
        chunk_bytes: Optional[int] = None,
        splits: Optional[int] = None,
    ):
        self.blocks = blocks
        self.chunk_bytes = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
        self.splits = splits

    def shard_stats(self, hidden, weight, local_tgt, entropy):
        return triton_shard_stats(hidden, weight, local_tgt, entropy, self.blocks, self.splits)

    def shard_grads(self, hidden, weight, local_tgt, lse, ent, grad_logp, grad_ent, need_h, need_w):
        return triton_shard_grads(
            hidden, weight, local_tgt, lse, ent, grad_logp, grad_ent, need_h, need_w,
            self.blocks, self.chunk_bytes,
        )
