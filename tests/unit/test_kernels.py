"""Fused linear log-prob: Triton kernel (CPU interpreter) and torch reference vs plain autograd.

Shapes are tiny on purpose: the Triton interpreter runs every program instance in numpy.
"""
import pytest
import torch

from megatron_rlp.kernels import (
    IMPL_ENV,
    information_gain,
    linear_logprob,
    reference_information_gain,
    reference_linear_logprob,
    resolve_impl,
)
from megatron_rlp.kernels import vocab_parallel as vp
from megatron_rlp.kernels.reference import ReferenceBackend, reference_shard_stats
from megatron_rlp.kernels import triton_linear_logprob as tk
from megatron_rlp.kernels.triton_linear_logprob import (
    TritonBackend,
    triton_shard_grads,
    triton_shard_stats,
)

IGNORE = -100
SMALL_BLOCKS = {"BLOCK_N": 16, "BLOCK_V": 16, "BLOCK_D": 16}


def _inputs(n, d, v, dtype=torch.float32, scale=1.0, seed=0, ignore_rows=()):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g) * scale
    w = torch.randn(v, d, generator=g) / d**0.5
    t = torch.randint(0, v, (n,), generator=g)
    for r in ignore_rows:
        t[r] = IGNORE
    return h.to(dtype), w.to(dtype), t


def _naive(h, w, t, entropy=False, dtype=torch.float64):
    """log_softmax + gather on the materialised logits (the oracle), in ``dtype``."""
    logits = h.to(dtype) @ w.to(dtype).t()
    logp_all = torch.log_softmax(logits, dim=-1)
    keep = t != IGNORE
    lp = torch.where(keep, logp_all.gather(1, t.clamp(min=0)[:, None]).squeeze(1), 0.0)
    if not entropy:
        return lp
    ent = torch.where(keep, -(logp_all.exp() * logp_all).sum(-1), 0.0)
    return lp, ent


def _naive_grads(h, w, t, ga, gb=None):
    hh = h.detach().double().requires_grad_()
    ww = w.detach().double().requires_grad_()
    if gb is None:
        loss = (_naive(hh, ww, t) * ga.double()).sum()
    else:
        lp, ent = _naive(hh, ww, t, entropy=True)
        loss = (lp * ga.double() + ent * gb.double()).sum()
    loss.backward()
    return hh.grad, ww.grad


def _our_grads(fn, h, w, t, ga, gb=None, **kw):
    hh = h.detach().clone().requires_grad_()
    ww = w.detach().clone().requires_grad_()
    if gb is None:
        out = fn(hh, ww, t, **kw)
        (out * ga).sum().backward()
        return out.detach(), None, hh.grad, ww.grad
    lp, ent = fn(hh, ww, t, entropy=True, **kw)
    (lp * ga + ent * gb).sum().backward()
    return lp.detach(), ent.detach(), hh.grad, ww.grad


def _triton(h, w, t, entropy=False, blocks=SMALL_BLOCKS, chunk_bytes=None, splits=None):
    return vp.apply_linear_logprob(
        TritonBackend(blocks=blocks, chunk_bytes=chunk_bytes, splits=splits), h, w, t, None, entropy
    )


def _close(actual, expected, atol, rtol=1e-4):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------- forward


@pytest.mark.parametrize(
    "n,d,v",
    [(37, 40, 101), (1, 16, 33), (16, 32, 64)],
    ids=["ragged-blocks", "one-token", "exact-blocks"],
)
def test_triton_forward_matches_log_softmax(n, d, v):
    h, w, t = _inputs(n, d, v)
    lp, ent = _triton(h, w, t, entropy=True)
    elp, eent = _naive(h, w, t, entropy=True)
    assert lp.dtype == torch.float32 and lp.shape == (n,)
    _close(lp, elp, atol=2e-5)
    _close(ent, eent, atol=2e-5)
    _close(_triton(h, w, t), elp, atol=2e-5)


def test_triton_default_blocks_match_reference():
    h, w, t = _inputs(40, 48, 150, ignore_rows=(5,))
    lp = linear_logprob(h, w, t, impl="triton")
    _close(lp, reference_linear_logprob(h, w, t), atol=1e-5)


@pytest.mark.parametrize("chunk,vocab_chunk", [(1, 5), (7, 16), (1000, 1000)])
def test_reference_forward_fp64_exact(chunk, vocab_chunk):
    h, w, t = _inputs(23, 12, 57, dtype=torch.float64, ignore_rows=(0, 9))
    lp, ent = reference_linear_logprob(
        h, w, t, entropy=True, chunk_size=chunk, vocab_chunk=vocab_chunk
    )
    elp, eent = _naive(h, w, t, entropy=True)
    _close(lp, elp, atol=1e-12)
    _close(ent, eent, atol=1e-12)
    lp_only = reference_linear_logprob(h, w, t, chunk_size=chunk, vocab_chunk=vocab_chunk)
    _close(lp_only, elp, atol=1e-12)


def test_reference_lagging_shift_rebases_and_redoes_overflowing_blocks():
    """Logits that jump by ~75 nats (rebase) and then by > 88 nats (exp overflow -> exact redo)."""
    v = 12
    w = torch.zeros(v, 1)
    w[4:8, 0] = 75.0
    w[8:, 0] = 300.0
    w[9, 0] = 301.5
    h = torch.tensor([[1.0], [0.5], [-1.0]])
    t = torch.tensor([9, 5, 0])
    stats = reference_shard_stats(h, w, t, False, vocab_chunk=4)
    z = (h.double() @ w.double().t())
    _close(stats[:, 0], torch.logsumexp(z, dim=1), atol=1e-4, rtol=1e-6)
    _close(stats[:, 1], z.gather(1, t[:, None]).squeeze(1), atol=1e-4, rtol=1e-6)
    lp = reference_linear_logprob(h, w, t, vocab_chunk=4)
    _close(lp, torch.log_softmax(z, 1).gather(1, t[:, None]).squeeze(1), atol=1e-4)


def test_reference_never_materialises_more_than_one_block():
    """Every tensor the reference creates stays within one logits block (or a gradient)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MaxNumel(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.max = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    self.max = max(self.max, o.numel())
            return out

    n, d, v = 96, 4, 300  # N x V = 28800 logits; one block is 16 x 32 = 512
    h, w, t = _inputs(n, d, v)
    h.requires_grad_()
    w.requires_grad_()
    with MaxNumel() as mode:
        lp, ent = reference_linear_logprob(h, w, t, entropy=True, chunk_size=16, vocab_chunk=32)
        (lp + ent).sum().backward()
    assert mode.max <= max(16 * 32, v * d, n * d), mode.max
    with MaxNumel() as naive_mode:
        _naive(h.detach(), w.detach(), t, dtype=torch.float32)
    assert naive_mode.max >= n * v


def test_bf16_inputs_accumulate_in_fp32():
    h, w, t = _inputs(24, 48, 90, dtype=torch.bfloat16)
    # the oracle sees the same bf16-rounded numbers, computed in fp64
    elp, eent = _naive(h, w, t, entropy=True)
    lp, ent = _triton(h, w, t, entropy=True)
    rlp, rent = reference_linear_logprob(h, w, t, entropy=True)
    for a, b in ((lp, elp), (ent, eent), (rlp, elp), (rent, eent)):
        assert a.dtype == torch.float32
        _close(a, b, atol=5e-5)
    # a bf16 logits matmul would be off by far more than that
    bf16_logits = torch.log_softmax((h @ w.t()).double(), -1).gather(1, t[:, None]).squeeze(1)
    assert (bf16_logits - elp).abs().max() > 1e-3


def test_very_large_logits_do_not_overflow():
    h, w, t = _inputs(20, 16, 70, scale=3e3)  # logits of order 1e4
    logits = h.double() @ w.double().t()
    assert logits.abs().max() > 5e3
    lp, ent = _triton(h, w, t, entropy=True)
    rlp, rent = reference_linear_logprob(h, w, t, entropy=True, vocab_chunk=16)
    elp, eent = _naive(h, w, t, entropy=True)
    _close(reference_linear_logprob(h, w, t, vocab_chunk=16), elp, atol=2e-2, rtol=1e-5)
    for a in (lp, ent, rlp, rent):
        assert torch.isfinite(a).all()
    _close(lp, elp, atol=2e-2, rtol=1e-5)
    _close(rlp, elp, atol=2e-2, rtol=1e-5)
    # entropies near 0: every term of the merged entropy is non-negative, no cancellation
    _close(ent, eent, atol=1e-3)
    _close(rent, eent, atol=1e-3)
    assert (ent >= 0).all() and (rent >= 0).all()
    # gradients stay finite too
    ga = torch.ones(20)
    _, _, gh, gw = _our_grads(_triton, h, w, t, ga, ga)
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()


# ---------------------------------------------------------------------------- backward


@pytest.mark.parametrize(
    "n,v,chunk_bytes",
    [(37, 101, None), (37, 101, 37 * 4 * 24), (61, 29, 4 * 29 * 9)],
    ids=["one-chunk", "vocab-chunks", "row-chunks"],
)
@pytest.mark.parametrize("with_entropy", [False, True], ids=["logp", "logp+entropy"])
def test_triton_backward_matches_autograd(n, v, chunk_bytes, with_entropy):
    d = 40
    h, w, t = _inputs(n, d, v, ignore_rows=(2, 30))
    g = torch.Generator().manual_seed(1)
    ga = torch.randn(n, generator=g)
    gb = torch.randn(n, generator=g) if with_entropy else None
    def fn(hh, ww, tt, **kw):
        return _triton(hh, ww, tt, chunk_bytes=chunk_bytes, **kw)

    _, _, gh, gw = _our_grads(fn, h, w, t, ga, gb)
    eh, ew = _naive_grads(h, w, t, ga, gb)
    _close(gh, eh, atol=2e-5)
    _close(gw, ew, atol=2e-5)
    # ignored rows get no hidden gradient at all
    assert torch.count_nonzero(gh[2]) == 0 and torch.count_nonzero(gh[30]) == 0


@pytest.mark.parametrize("with_entropy", [False, True], ids=["logp", "logp+entropy"])
def test_reference_backward_matches_autograd(with_entropy):
    n, d, v = 29, 24, 77
    h, w, t = _inputs(n, d, v, ignore_rows=(4,))
    g = torch.Generator().manual_seed(2)
    ga = torch.randn(n, generator=g)
    gb = torch.randn(n, generator=g) if with_entropy else None
    fn = lambda hh, ww, tt, **kw: reference_linear_logprob(  # noqa: E731
        hh, ww, tt, chunk_size=6, vocab_chunk=10, **kw
    )
    lp, ent, gh, gw = _our_grads(fn, h, w, t, ga, gb)
    eh, ew = _naive_grads(h, w, t, ga, gb)
    _close(gh, eh, atol=1e-5)
    _close(gw, ew, atol=1e-5)


def test_reference_gradcheck_fp64():
    h, w, t = _inputs(6, 5, 11, dtype=torch.float64, ignore_rows=(1,))
    h.requires_grad_()
    w.requires_grad_()

    def f(hh, ww):
        lp, ent = reference_linear_logprob(hh, ww, t, entropy=True, chunk_size=4, vocab_chunk=3)
        return lp, ent

    assert torch.autograd.gradcheck(f, (h, w))


def test_bf16_backward_against_fp32_autograd():
    n, d, v = 20, 32, 70
    h, w, t = _inputs(n, d, v, dtype=torch.bfloat16)
    ga = torch.ones(n)
    eh, ew = _naive_grads(h, w, t, ga, ga)
    for fn in (_triton, reference_linear_logprob):
        lp, ent, gh, gw = _our_grads(fn, h, w, t, ga, ga)
        assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
        # the only error is the final rounding of the gradient to bf16
        _close(gh, eh, atol=1e-2, rtol=1e-2)
        _close(gw, ew, atol=1e-2, rtol=1e-2)


def test_deterministic_backward_is_bitwise_reproducible():
    h, w, t = _inputs(33, 24, 50)
    ga = torch.randn(33, generator=torch.Generator().manual_seed(3))
    t[:8] = 3  # repeated targets: their weight-gradient rows are sums
    for fn in (_triton, reference_linear_logprob):
        runs = [_our_grads(fn, h, w, t, ga, ga) for _ in range(2)]
        for a, b in zip(runs[0], runs[1]):
            assert torch.equal(a, b)


def test_reference_backward_is_reproducible_with_threads_and_many_repeats():
    # Large enough that torch parallelises the scatter of repeated targets (2 threads): float
    # atomics there (index_put_ with accumulate) gave a different weight gradient on every call,
    # which made RLP runs diverge from run to run.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        n, d, v = 2048, 64, 12
        h, w, t = _inputs(n, d, v, seed=5)
        ga = torch.randn(n, generator=torch.Generator().manual_seed(6))
        grads = set()
        for _ in range(6):
            ww = w.clone().requires_grad_()
            lp = reference_linear_logprob(h, ww, t, chunk_size=n, vocab_chunk=v)
            (lp * ga).sum().backward()
            grads.add(ww.grad.numpy().tobytes())
        assert len(grads) == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_padded_vocabulary_is_left_out(impl):
    # megatron pads the output layer past the tokenizer; padded rows are not part of the softmax
    n, d, v, real = 21, 16, 40, 27
    h, w, t = _inputs(n, d, v, seed=8, ignore_rows=(3,))
    t = torch.where(t == IGNORE, t, t % real)
    with torch.no_grad():
        w[real:] *= 30  # would dominate the normaliser if counted
    ga = torch.linspace(-1.0, 1.0, n)
    gb = torch.linspace(0.3, -0.7, n)
    backend = TritonBackend(blocks=SMALL_BLOCKS) if impl == "triton" else ReferenceBackend()
    lp, ent, gh, gw = _our_grads(
        lambda hh, ww, tt, entropy=False: vp.apply_linear_logprob(
            backend, hh, ww, tt, None, entropy, vocab_size=real),
        h, w, t, ga, gb,
    )
    elp, eent = _naive(h, w[:real], t, entropy=True)
    eh, ew = _naive_grads(h, w[:real], t, ga, gb)
    _close(lp, elp, atol=2e-5)
    _close(ent, eent, atol=2e-5)
    _close(gh, eh, atol=2e-5)
    _close(gw[:real], ew, atol=2e-5)
    assert torch.count_nonzero(gw[real:]) == 0
    gain = information_gain(h, w, h * 0.5, w, t, vocab_size=real, impl=impl)
    _close(gain, elp - _naive(h * 0.5, w[:real], t), atol=3e-5)
    with pytest.raises(ValueError, match="not below vocab_size=27"):
        linear_logprob(h, w, torch.full((n,), 30), vocab_size=real, impl=impl)


def test_only_requested_gradients_are_computed():
    h, w, t = _inputs(18, 16, 40)
    hh = h.clone().requires_grad_()
    for fn in (_triton, reference_linear_logprob):
        hh.grad = None
        fn(hh, w, t).sum().backward()
        eh, _ = _naive_grads(h, w, t, torch.ones(18))
        _close(hh.grad, eh, atol=1e-5)
    # and the backend skips the weight kernel entirely
    lse = torch.zeros(18)
    gh, gw = triton_shard_grads(h, w, t, lse, None, torch.ones(18), None, True, False)
    assert gw is None and gh.shape == h.shape


def test_entropy_gradient_alone():
    h, w, t = _inputs(12, 16, 45)
    hh = h.clone().requires_grad_()
    ww = w.clone().requires_grad_()
    _, ent = _triton(hh, ww, t, entropy=True)
    ent.sum().backward()
    eh_ = h.double().requires_grad_()
    ew_ = w.double().requires_grad_()
    _naive(eh_, ew_, t, entropy=True)[1].sum().backward()
    _close(hh.grad, eh_.grad, atol=1e-5)
    _close(ww.grad, ew_.grad, atol=1e-5)


def test_ignored_targets_give_zero_and_no_gradient():
    h, w, t = _inputs(10, 16, 30)
    t[:] = IGNORE
    for fn in (_triton, reference_linear_logprob):
        hh = h.clone().requires_grad_()
        ww = w.clone().requires_grad_()
        lp, ent = fn(hh, ww, t, entropy=True)
        assert torch.count_nonzero(lp) == 0 and torch.count_nonzero(ent) == 0
        (lp + ent).sum().backward()
        assert torch.count_nonzero(hh.grad) == 0 and torch.count_nonzero(ww.grad) == 0


def test_custom_ignore_index_and_leading_dims():
    h, w, t = _inputs(12, 16, 30)
    t[3] = 7
    lp = linear_logprob(h.view(3, 4, 16), w, t.view(3, 4), ignore_index=7, impl="reference")
    assert lp.shape == (3, 4) and lp.view(-1)[3] == 0
    ref = _naive(h, w, t)
    ref[3] = 0
    _close(lp.view(-1), ref, atol=1e-5)


# ---------------------------------------------------------------------------- vocab-parallel merge


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_shard_stats_merge_equals_full_vocabulary(impl):
    """Two shards merged by the packed-statistics rule == the unsplit vocabulary."""
    n, d, v, world = 21, 16, 64, 2
    h, w, t = _inputs(n, d, v, ignore_rows=(3,))
    stats_fn = triton_shard_stats if impl == "triton" else reference_shard_stats
    shard = v // world
    stats = []
    for r in range(world):
        lt, ignored = vp.local_targets(t, r * shard, shard, IGNORE)
        stats.append(stats_fn(h, w[r * shard:(r + 1) * shard], lt, True))
    lse, tgt, ent = vp.merge_shard_stats(torch.stack(stats), entropy=True)
    elp, eent = _naive(h, w, t, entropy=True)
    keep = t != IGNORE
    _close((tgt - lse)[keep], elp[keep], atol=2e-5)
    _close(ent[keep], eent[keep], atol=2e-5)
    # exactly one shard reports each target's logit, the other reports exact zero
    in0 = (t >= 0) & (t < shard)
    assert torch.all(stats[1][in0, 1] == 0) and torch.all(stats[0][~in0, 1] == 0)


# ---------------------------------------------------------------------------- vocabulary splits


def _split_edges(v, splits, block_v=16):
    """First column of every non-empty split (the kernel's rule: whole BLOCK_V tiles)."""
    tiles = -(-v // block_v)
    per = -(-tiles // splits) * block_v
    return list(range(0, v, per))


@pytest.mark.parametrize("splits", [2, 3, 9], ids=["2", "3", "9-with-empty-splits"])
def test_vocab_split_forward_matches_unsplit(splits):
    """Forward over vocabulary splits (scoring calls) merged by log-sum-exp == one pass, with
    targets on both sides of every split boundary and ignored rows."""
    n, d, v = 11, 24, 101  # 7 tiles of 16 columns: 9 splits leave two of them empty
    h, w, t = _inputs(n, d, v, seed=11, ignore_rows=(4,))
    edges = _split_edges(v, splits)
    assert len(edges) == min(splits, 7) and len(edges) > 1
    boundary = [c for e in edges[1:] for c in (e - 1, e)]
    t[: len(boundary)] = torch.tensor(boundary[:n])
    t[4] = IGNORE
    one = triton_shard_stats(h, w, vp.local_targets(t, 0, v, IGNORE)[0], True, SMALL_BLOCKS, splits=1)
    split = triton_shard_stats(h, w, vp.local_targets(t, 0, v, IGNORE)[0], True, SMALL_BLOCKS, splits=splits)
    assert split.shape == (n, 3) and torch.isfinite(split).all()
    _close(split, one, atol=1e-5)
    lp, ent = _triton(h, w, t, entropy=True, splits=splits)
    elp, eent = _naive(h, w, t, entropy=True)
    _close(lp, elp, atol=2e-5)
    _close(ent, eent, atol=2e-5)
    assert lp[4] == 0 and ent[4] == 0


def test_vocab_splits_inside_tensor_parallel_shards():
    """Two TP shards, each split in three with a boundary inside it, merged twice (splits, then
    shards) == the full vocabulary; the split partial of the target is reported exactly once."""
    n, d, v, world = 9, 16, 86, 2  # shard of 43 columns: tiles at 0, 16, 32 of each shard
    h, w, t = _inputs(n, d, v, seed=12, ignore_rows=(0,))
    shard = v // world
    t[1:7] = torch.tensor([15, 16, 42, 43, 43 + 31, 43 + 32])  # both sides of split / shard edges
    stats = []
    for r in range(world):
        lt, _ = vp.local_targets(t, r * shard, shard, IGNORE)
        stats.append(triton_shard_stats(h, w[r * shard:(r + 1) * shard], lt, True, SMALL_BLOCKS, splits=3))
    lse, tgt, ent = vp.merge_shard_stats(torch.stack(stats), entropy=True)
    elp, eent = _naive(h, w, t, entropy=True)
    keep = t != IGNORE
    _close((tgt - lse)[keep], elp[keep], atol=2e-5)
    _close(ent[keep], eent[keep], atol=2e-5)
    logits = h.double() @ w.double().t()
    _close(tgt[keep], logits[keep].gather(1, t[keep, None]).squeeze(1), atol=1e-5)


def test_default_split_choice_fills_the_gpu_for_scoring_calls():
    # RLP scoring shapes: hundreds of rows over a 151936 vocabulary (TP 1 and 8)
    for n, v in ((256, 151936), (512, 151936 // 8), (100, 151936 // 4)):
        splits = tk.vocab_splits(n, v, sms=132)
        assert splits > 1 and -(-n // tk.SPLIT_ROW_BLOCK) * splits >= 132
        assert v // splits >= tk.MIN_SPLIT_COLS
    assert tk.vocab_splits(65536, 151936, sms=132) == 1  # training shapes: rows fill the GPU
    assert tk.vocab_splits(8, 600, sms=132) == 1  # too few columns to split
    # and the default path takes it: 3 interpreter tiles of 512 columns in 2 splits
    n, d, v = 5, 16, 1100
    assert tk.vocab_splits(n, v) == 2
    h, w, t = _inputs(n, d, v, seed=13)
    t[0], t[1] = 1023, 1024  # last column of split 0, first of split 1
    lp, ent = linear_logprob(h, w, t, entropy=True, impl="triton")
    elp, eent = _naive(h, w, t, entropy=True)
    _close(lp, elp, atol=2e-5)
    _close(ent, eent, atol=2e-5)


# ---------------------------------------------------------------------------- chunked backward


def _spy_chunks(monkeypatch):
    """Record (shape, dtype, bytes) of every d_logits chunk the backward writes."""
    seen = []
    real = tk.dlogits_chunk

    def spy(*args, **kwargs):
        dz = real(*args, **kwargs)
        seen.append((tuple(dz.shape), dz.dtype, dz.numel() * dz.element_size()))
        return dz

    monkeypatch.setattr(tk, "dlogits_chunk", spy)
    return seen


@pytest.mark.parametrize(
    "n,v,budget_elems,axis_chunks",
    [(45, 20, 7 * 20, ("rows", 7)), (13, 50, 13 * 12, ("vocab", 5))],
    ids=["row-chunks", "vocab-chunks"],
)
def test_chunked_backward_bounds_the_chunk_and_matches_autograd(monkeypatch, n, v, budget_elems, axis_chunks):
    """Several chunks, the last one ragged; each within the byte budget; logp + entropy grads."""
    d = 16
    h, w, t = _inputs(n, d, v, seed=14, ignore_rows=(1, n - 1))
    g = torch.Generator().manual_seed(15)
    ga, gb = torch.randn(n, generator=g), torch.randn(n, generator=g)
    seen = _spy_chunks(monkeypatch)
    budget = budget_elems * 4 + 3  # fp32; not a multiple of a row or column
    fn = lambda hh, ww, tt, **kw: _triton(hh, ww, tt, chunk_bytes=budget, **kw)  # noqa: E731
    _, _, gh, gw = _our_grads(fn, h, w, t, ga, gb)
    eh, ew = _naive_grads(h, w, t, ga, gb)
    _close(gh, eh, atol=2e-5)
    _close(gw, ew, atol=2e-5)
    axis, chunks = axis_chunks
    assert len(seen) == chunks
    assert all(nbytes <= budget and dtype == torch.float32 for _, dtype, nbytes in seen)
    spans = [s[0] if axis == "rows" else s[1] for s, _, _ in seen]
    assert sum(spans) == (n if axis == "rows" else v) and spans[-1] < spans[0]
    # a budget below one row still makes progress, one row (or column) at a time
    seen.clear()
    tk.triton_shard_grads(h, w, t.clamp(min=0), torch.zeros(n), None, ga, None, blocks=SMALL_BLOCKS, chunk_bytes=1)
    assert len(seen) == max(n, v) and all(s[0] * s[1] == min(n, v) for s, _, _ in seen)


def _exact_dlogits(h, w, t, ga, gb):
    """fp64 d loss / d logits of (ga . log p + gb . H) on the given (bf16-rounded) numbers."""
    z = (h.double() @ w.double().t()).requires_grad_()
    logp_all = torch.log_softmax(z, -1)
    lp = logp_all.gather(1, t[:, None]).squeeze(1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    (lp * ga.double() + ent * gb.double()).sum().backward()
    return z.grad


@pytest.mark.parametrize("n,v", [(48, 20), (12, 70)], ids=["row-chunks", "vocab-chunks"])
def test_bf16_dlogits_chunks_and_fp32_accumulation(monkeypatch, n, v):
    """bf16 inputs: each d_logits chunk is the exact d_logits rounded to nearest bf16 (what cuBLAS
    gets on a GPU; logits rounded to bf16, a truncating cast or an fp32 chunk all fail this), and
    the gradient summed over the chunks (here one row / column each) is accumulated in fp32: its
    error against the same sum in fp64 stays at bf16 rounding, where a bf16 running sum (cuBLAS
    beta=1 into a bf16 gradient) is twice as far off."""
    d = 32
    h, w, t = _inputs(n, d, v, dtype=torch.bfloat16, scale=4.0, seed=16)  # logits of order 4
    ga = torch.linspace(-1.0, 1.0, n)
    gb = torch.linspace(0.5, -0.3, n)
    seen = []
    real = tk.dlogits_chunk

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(tk, "dlogits_chunk", spy)
    fn = lambda hh, ww, tt, **kw: _triton(hh, ww, tt, chunk_bytes=2 * min(n, v), **kw)  # noqa: E731
    _, _, gh, gw = _our_grads(fn, h, w, t, ga, gb)
    assert len(seen) == max(n, v) and all(c.dtype == torch.bfloat16 for c in seen)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    exact = _exact_dlogits(h, w, t, ga, gb)
    dz = torch.cat(seen, dim=0 if n > v else 1)
    rounded = exact.to(torch.bfloat16)
    # fp32 vs fp64 arithmetic may flip a rounding tie-break now and then, never more than 1 ulp
    ulp = rounded.double().abs() * 2.0**-7
    assert ((dz.double() - rounded.double()).abs() <= ulp).all()
    assert (dz != rounded).float().mean() < 0.01
    # gradients against the fp64 products of the rounded d_logits
    dzr = rounded.double()
    want_h, want_w = dzr @ w.double(), dzr.t() @ h.double()

    def rel_err(x, ref):
        return float((x.double() - ref).norm() / ref.norm())

    bound = 3.5e-3  # measured: 1.6e-3 .. 2.7e-3 for this path (final bf16 rounding included)
    assert rel_err(gh, want_h) < bound and rel_err(gw, want_w) < bound
    summed, terms = (want_w, [dzr[r:r + 1].t() @ h[r:r + 1].double() for r in range(n)]) if n > v else (
        want_h, [dzr[:, c:c + 1] @ w[c:c + 1].double() for c in range(v)])
    running = torch.zeros_like(summed).to(torch.bfloat16)
    for term in terms:
        running = (running.double() + term).to(torch.bfloat16)
    assert rel_err(running, summed) > bound  # the bound does tell the two apart
    # and against the fp64 autograd gradient itself (d_logits rounding included)
    eh, ew = _naive_grads(h, w, t, ga, gb)
    assert rel_err(gh, eh) < 5e-3 and rel_err(gw, ew) < 5e-3


# ---------------------------------------------------------------------------- information gain


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_information_gain(impl):
    n, d, v = 14, 16, 40
    h1, w1, t = _inputs(n, d, v, seed=4, ignore_rows=(6,))
    h2, _, _ = _inputs(n, d, v, seed=5)
    w2 = (w1.double() + 0.05 * torch.randn(v, d, dtype=torch.float64)).float()
    h1.requires_grad_()
    gain = information_gain(h1, w1, h2, w2, t, impl=impl)
    assert gain.dtype == torch.float32 and not gain.requires_grad
    expected = _naive(h1.detach(), w1, t) - _naive(h2, w2, t)
    _close(gain, expected, atol=2e-5)
    assert gain[6] == 0
    _close(reference_information_gain(h1.detach(), w1, h2, w2, t), expected, atol=2e-5)


def test_information_gain_bf16_policy_fp32_ema():
    """bf16 policy states against an fp32 EMA teacher (kept in fp32, see DESIGN.md)."""
    n, d, v = 10, 16, 36
    h1, w1, t = _inputs(n, d, v, dtype=torch.bfloat16, seed=6)
    h2, w2, _ = _inputs(n, d, v, seed=7)
    expected = _naive(h1, w1, t) - _naive(h2, w2, t)
    for impl in ("triton", "reference"):
        _close(information_gain(h1, w1, h2, w2, t, impl=impl), expected, atol=5e-5)


def test_benchmark_counts_8ndv_and_knows_the_bf16_peaks():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "bench_logprob.py")
    spec = importlib.util.spec_from_file_location("bench_logprob", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.COUNTED_FLOPS == {"fwd": 2, "fwd+bwd": 8, "score": 2}
    for name, peak in [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
                       ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0)]:
        assert bench.bf16_peak(name)[0] == peak, name
    assert bench.bf16_peak("cpu")[0] is None and bench.bf16_peak("Some GPU")[0] is None
    assert bench.bf16_peak("Some GPU", 500.0)[0] == 500.0


# ---------------------------------------------------------------------------- dispatch


def test_impl_switch(monkeypatch):
    cpu = torch.zeros(2, 2)
    monkeypatch.delenv(IMPL_ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("auto", cpu) == "triton"
    assert resolve_impl("reference", cpu) == "reference"
    assert resolve_impl("auto", cpu.double()) == "reference"
    monkeypatch.setenv(IMPL_ENV, "reference")
    assert resolve_impl("auto", cpu) == "reference"
    assert resolve_impl("triton", cpu) == "triton"  # an explicit argument wins over the env
    monkeypatch.delenv(IMPL_ENV)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_impl(None, cpu) == "reference"
    with pytest.raises(ValueError):
        resolve_impl("cuda", cpu)
    monkeypatch.setenv(IMPL_ENV, "fast")
    with pytest.raises(ValueError):
        resolve_impl("auto", cpu)


def test_env_var_routes_public_call(monkeypatch):
    """MEGATRON_RLP_LOGPROB_IMPL picks the backend actually used by linear_logprob."""
    used = []
    orig = vp.LinearLogprobFunction.apply

    def spy(*args):
        used.append(args[6].name)
        return orig(*args)

    monkeypatch.setattr(vp.LinearLogprobFunction, "apply", spy)
    h, w, t = _inputs(4, 16, 20)
    for env in ("reference", "triton"):
        monkeypatch.setenv(IMPL_ENV, env)
        linear_logprob(h, w, t)
    assert used == ["reference", "triton"]


def test_rejects_bad_blocks():
    h, w, t = _inputs(4, 16, 20)
    too_small = {"BLOCK_N": 8, "BLOCK_V": 16, "BLOCK_D": 16}
    not_pow2 = {"BLOCK_N": 16, "BLOCK_V": 48, "BLOCK_D": 16}
    for bad in (too_small, not_pow2):
        with pytest.raises(ValueError):
            _triton(h, w, t, blocks=bad)


def test_rejects_bad_shapes():
    h, w, t = _inputs(4, 16, 20)
    with pytest.raises(ValueError):
        linear_logprob(h, w[:, :8], t, impl="reference")
    with pytest.raises(ValueError):
        linear_logprob(h, w, t[:3], impl="reference")
    with pytest.raises(TypeError):
        linear_logprob(h, w, t.float(), impl="reference")
