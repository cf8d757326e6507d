"""Vocab-parallel linear log-prob at TP=2 over gloo, against megatron-core and the full vocabulary.

Run: torchrun --nproc_per_node 2 -m pytest -q tests/distributed/test_kernels_tp.py
"""
import pytest
import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)

from megatron_rlp.kernels import information_gain, linear_logprob
from megatron_rlp.kernels.triton_linear_logprob import TritonBackend
from megatron_rlp.kernels.vocab_parallel import apply_linear_logprob

IGNORE = -100
N, D, V = 19, 24, 86  # V_r = 43: ragged against every block size
SMALL_BLOCKS = {"BLOCK_N": 16, "BLOCK_V": 16, "BLOCK_D": 16}


def _setup(model_parallel, dtype=torch.float32, seed=0):
    model_parallel(tp=2, pp=1)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(seed)  # identical on both ranks
    h = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) / D**0.5).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    shard = V // 2
    rows = slice(rank * shard, (rank + 1) * shard)
    # make sure both shards own some targets
    t[0], t[1] = 3, V - 2
    return group, rank, rows, h, w, t


def _full(h, w, t):
    logp_all = torch.log_softmax(h.double() @ w.double().t(), dim=-1)
    keep = t != IGNORE
    lp = torch.where(keep, logp_all.gather(1, t.clamp(min=0)[:, None]).squeeze(1), 0.0)
    ent = torch.where(keep, -(logp_all.exp() * logp_all).sum(-1), 0.0)
    return lp, ent


def _close(a, b, atol):
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=1e-4)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_tp2_matches_megatron_vocab_parallel_cross_entropy(model_parallel, impl):
    group, rank, rows, h, w, t = _setup(model_parallel)
    shard = w[rows]
    # megatron-core: logits of the shard, CE over the TP group, input grad via the copy region
    mh = h.clone().requires_grad_()
    mw = shard.clone().requires_grad_()
    logits = copy_to_tensor_model_parallel_region(mh) @ mw.t()
    ce = vocab_parallel_cross_entropy(logits, t)
    g = torch.linspace(-1.0, 1.0, N)
    (-ce * g).sum().backward()
    # ours
    oh = h.clone().requires_grad_()
    ow = shard.clone().requires_grad_()
    lp = linear_logprob(oh, ow, t, group, impl=impl)
    (lp * g).sum().backward()
    _close(lp, -ce.detach(), atol=2e-5)
    _close(oh.grad, mh.grad, atol=2e-5)
    _close(ow.grad, mw.grad, atol=2e-5)


@pytest.mark.parametrize(
    "impl,dtype,chunked",
    [
        ("triton", torch.float32, False),
        ("triton", torch.float32, True),
        ("triton", torch.bfloat16, True),
        ("reference", torch.float32, False),
    ],
    ids=["triton-fp32", "triton-fp32-splits-chunks", "triton-bf16-splits-chunks", "reference-fp32"],
)
def test_tp2_matches_full_vocabulary(model_parallel, impl, dtype, chunked):
    group, rank, rows, h, w, t = _setup(model_parallel, dtype=dtype, seed=1)
    t[5] = IGNORE
    t[11] = IGNORE
    ga = torch.linspace(-1.0, 2.0, N)
    gb = torch.linspace(0.5, -0.5, N)
    # full vocabulary, single process, fp64 on the same (possibly bf16-rounded) numbers
    fh = h.double().requires_grad_()
    fw = w.double().requires_grad_()
    flp, fent = _full(fh, fw, t)
    (flp * ga + fent * gb).sum().backward()
    # vocab-parallel
    oh = h.clone().requires_grad_()
    ow = w[rows].clone().requires_grad_()
    if chunked:  # each 43-column shard in three vocabulary splits; backward in 11-column chunks
        backend = TritonBackend(blocks=SMALL_BLOCKS, splits=3, chunk_bytes=11 * N * h.element_size())
        lp, ent = apply_linear_logprob(backend, oh, ow, t, group, entropy=True)
    else:
        lp, ent = linear_logprob(oh, ow, t, group, entropy=True, impl=impl)
    (lp * ga + ent * gb).sum().backward()
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    _close(lp, flp.detach(), atol=2e-5)
    _close(ent, fent.detach(), atol=2e-5)
    _close(oh.grad, fh.grad, atol=tol)
    _close(ow.grad, fw.grad[rows], atol=tol)
    assert torch.count_nonzero(oh.grad[5]) == 0 and torch.count_nonzero(oh.grad[11]) == 0
    # every rank holds the same merged result and the same (all-reduced) hidden gradient
    both = [torch.empty_like(lp) for _ in range(2)]
    dist.all_gather(both, lp, group=group)
    assert torch.equal(both[0], both[1])
    grads = [torch.empty_like(oh.grad) for _ in range(2)]
    dist.all_gather(grads, oh.grad.contiguous(), group=group)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("real", [60, 30], ids=["rank1-partly-padding", "rank1-all-padding"])
def test_tp2_padded_vocabulary_is_left_out(model_parallel, impl, real):
    group, rank, rows, h, w, t = _setup(model_parallel, seed=6)
    t = t % real
    t[7] = IGNORE
    with torch.no_grad():
        w[real:] *= 30  # would dominate the normaliser if counted
    ga = torch.linspace(-1.0, 2.0, N)
    gb = torch.linspace(0.5, -0.5, N)
    fh = h.double().requires_grad_()
    fw = w[:real].double().requires_grad_()
    flp, fent = _full(fh, fw, t)
    (flp * ga + fent * gb).sum().backward()
    oh = h.clone().requires_grad_()
    ow = w[rows].clone().requires_grad_()
    lp, ent = linear_logprob(oh, ow, t, group, entropy=True, impl=impl, vocab_size=real)
    (lp * ga + ent * gb).sum().backward()
    _close(lp, flp.detach(), atol=2e-5)
    _close(ent, fent.detach(), atol=2e-5)
    _close(oh.grad, fh.grad, atol=2e-5)
    shard = V // 2
    mine = max(0, min(shard, real - rank * shard))  # this rank's real rows
    _close(ow.grad[:mine], fw.grad[rank * shard : rank * shard + mine], atol=2e-5)
    assert torch.count_nonzero(ow.grad[mine:]) == 0
    gain = information_gain(h, w[rows], h * 0.5, w[rows], t, group, impl=impl, vocab_size=real)
    _close(gain, _full(h, w[:real], t)[0] - _full(h * 0.5, w[:real], t)[0], atol=3e-5)


def test_tp2_one_packed_collective_per_pass(model_parallel, monkeypatch):
    """Forward: exactly one all-gather and no all-reduce; backward: one all-reduce (hidden)."""
    group, rank, rows, h, w, t = _setup(model_parallel, seed=2)
    calls = []
    names = ("all_reduce", "all_gather", "all_gather_into_tensor")
    real = {name: getattr(dist, name) for name in names}
    if hasattr(dist, "all_gather_single"):
        real["all_gather_single"] = dist.all_gather_single

    def counting(name):
        def fn(*args, **kwargs):
            calls.append(name)
            return real[name](*args, **kwargs)

        return fn

    for name in real:
        monkeypatch.setattr(dist, name, counting(name))
    oh = h.clone().requires_grad_()
    lp, ent = linear_logprob(oh, w[rows], t, group, entropy=True, impl="reference")
    forward_calls = list(calls)
    (lp + ent).sum().backward()
    backward_calls = calls[len(forward_calls):]
    assert len(forward_calls) == 1 and forward_calls[0] != "all_reduce"
    assert backward_calls == ["all_reduce"]
    calls.clear()
    information_gain(h, w[rows], h * 0.5, w[rows], t, group, impl="reference")
    assert len(calls) == 1 and calls[0] != "all_reduce"


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_tp2_information_gain(model_parallel, impl):
    group, rank, rows, h, w, t = _setup(model_parallel, seed=3)
    t[4] = IGNORE
    h2 = torch.randn(N, D, generator=torch.Generator().manual_seed(9))
    w2 = w + 0.05 * torch.randn(V, D, generator=torch.Generator().manual_seed(10))
    gain = information_gain(h, w[rows], h2, w2[rows], t, group, impl=impl)
    expected = _full(h, w, t)[0] - _full(h2, w2, t)[0]
    assert gain.dtype == torch.float32
    _close(gain, expected, atol=3e-5)
    assert gain[4] == 0


def test_tp2_hidden_grad_not_reduced_on_request(model_parallel):
    """reduce_hidden_grad=False leaves this shard's partial sum (for sequence-parallel callers)."""
    group, rank, rows, h, w, t = _setup(model_parallel, seed=4)
    oh = h.clone().requires_grad_()
    lp = linear_logprob(oh, w[rows], t, group, impl="reference", reduce_hidden_grad=False)
    lp.sum().backward()
    partial = oh.grad.clone()
    total = partial.clone()
    dist.all_reduce(total, group=group)
    fh = h.double().requires_grad_()
    _full(fh, w, t)[0].sum().backward()
    _close(total, fh.grad, atol=2e-5)
    assert not torch.allclose(partial, total)
