"""The pure-torch Mamba-2 chunked scan and gated RMSNorm against the plain sequential recurrence."""

import pytest
import torch
import torch.nn.functional as F

from megatron_rlp.models.mamba_torch import (
    GatedRMSNorm,
    mamba_chunk_scan_combined,
    rms_norm_gated,
    ssm_recurrence_reference,
)

TOL = dict(atol=1e-5, rtol=1e-5)


def _inputs(batch=2, seqlen=21, nheads=4, headdim=3, ngroups=2, dstate=5, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    return dict(
        x=rnd(batch, seqlen, nheads, headdim),
        dt=rnd(batch, seqlen, nheads),
        A=-(torch.rand(nheads, generator=g) * 4 + 0.5),
        B=rnd(batch, seqlen, ngroups, dstate),
        C=rnd(batch, seqlen, ngroups, dstate),
        D=torch.randn(nheads, generator=g),
        z=rnd(batch, seqlen, nheads, headdim),
        dt_bias=torch.randn(nheads, generator=g) * 0.5,
        initial_states=torch.randn(batch, nheads, headdim, dstate, generator=g),
    )


@pytest.mark.parametrize(
    "seqlen,chunk_size",
    [(16, 8), (21, 8), (5, 16), (1, 4), (33, 1), (40, 128)],
)
def test_scan_matches_recurrence_with_states(seqlen, chunk_size):
    t = _inputs(seqlen=seqlen)
    out, final = mamba_chunk_scan_combined(
        t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size,
        D=t["D"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True,
        initial_states=t["initial_states"], return_final_states=True,
    )
    ref, ref_final = ssm_recurrence_reference(
        t["x"], t["dt"], t["A"], t["B"], t["C"],
        D=t["D"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True,
        initial_states=t["initial_states"],
    )
    assert out.shape == t["x"].shape and out.dtype == torch.float32
    assert final.shape == (2, 4, 3, 5) and final.dtype == torch.float32
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(final, ref_final, **TOL)


@pytest.mark.parametrize("ngroups", [1, 4])
def test_scan_group_sharing_and_plain_outputs(ngroups):
    """No D / z / bias / initial state; one group shared by all heads, or one group per head."""
    t = _inputs(seqlen=19, ngroups=ngroups)
    dt = F.softplus(t["dt"])  # already positive: no softplus inside
    out = mamba_chunk_scan_combined(t["x"], dt, t["A"], t["B"], t["C"], 4)
    assert isinstance(out, torch.Tensor)
    ref, _ = ssm_recurrence_reference(t["x"], dt, t["A"], t["B"], t["C"])
    torch.testing.assert_close(out, ref, **TOL)


def test_scan_state_handoff_equals_one_pass():
    """Scanning a prefix, then the rest from the prefix's final state, equals one scan."""
    t = _inputs(seqlen=30)
    kw = dict(D=t["D"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True)
    full, full_final = mamba_chunk_scan_combined(
        t["x"], t["dt"], t["A"], t["B"], t["C"], 8, return_final_states=True, **kw
    )
    cut = 13
    head = {k: t[k][:, :cut] for k in ("x", "dt", "B", "C")}
    tail = {k: t[k][:, cut:] for k in ("x", "dt", "B", "C")}
    y1, s1 = mamba_chunk_scan_combined(
        head["x"], head["dt"], t["A"], head["B"], head["C"], 8,
        return_final_states=True, **{**kw, "z": t["z"][:, :cut]},
    )
    y2, s2 = mamba_chunk_scan_combined(
        tail["x"], tail["dt"], t["A"], tail["B"], tail["C"], 8, initial_states=s1,
        return_final_states=True, **{**kw, "z": t["z"][:, cut:]},
    )
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), full, **TOL)
    torch.testing.assert_close(s2, full_final, **TOL)


def test_scan_per_channel_D_and_dt_limit():
    t = _inputs(seqlen=17)
    D = torch.randn(4, 3)
    kw = dict(D=D, dt_bias=t["dt_bias"], dt_softplus=True, dt_limit=(0.05, 0.4))
    out = mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, **kw)
    ref, _ = ssm_recurrence_reference(t["x"], t["dt"], t["A"], t["B"], t["C"], **kw)
    torch.testing.assert_close(out, ref, **TOL)
    unclamped = mamba_chunk_scan_combined(
        t["x"], t["dt"], t["A"], t["B"], t["C"], 8, D=D, dt_bias=t["dt_bias"], dt_softplus=True
    )
    assert (unclamped - out).abs().max() > 1e-2  # the limit is applied, not ignored


def test_scan_gradients_match_recurrence():
    t = _inputs(seqlen=19)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
    g = torch.Generator().manual_seed(1)
    w_out = torch.randn(2, 19, 4, 3, generator=g)
    w_state = torch.randn(2, 4, 3, 5, generator=g)

    def grads(fn):
        leaves = {k: t[k].clone().requires_grad_(True) for k in names}
        out, final = fn(leaves)
        ((out * w_out).sum() + (final * w_state).sum()).backward()
        return {k: v.grad for k, v in leaves.items()}

    def chunked(v):
        return mamba_chunk_scan_combined(
            v["x"], v["dt"], v["A"], v["B"], v["C"], 8, D=v["D"], z=v["z"],
            dt_bias=v["dt_bias"], dt_softplus=True, initial_states=v["initial_states"],
            return_final_states=True,
        )

    def recurrent(v):
        return ssm_recurrence_reference(
            v["x"], v["dt"], v["A"], v["B"], v["C"], D=v["D"], z=v["z"],
            dt_bias=v["dt_bias"], dt_softplus=True, initial_states=v["initial_states"],
        )

    got, want = grads(chunked), grads(recurrent)
    for k in names:
        assert torch.isfinite(got[k]).all(), k
        assert want[k].abs().max() > 0, k
        torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=1e-4, msg=k)


def test_scan_packed_sequences_and_varlen_states():
    """seq_idx resets the state at sequence starts; varlen states are each sequence's last state."""
    t = _inputs(batch=1, seqlen=29)
    lengths = [6, 11, 12]  # boundaries fall inside chunks and on a chunk edge (6 + 11 = 17)
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None].int()
    cu = torch.tensor([0, 6, 17, 29], dtype=torch.int32)
    kw = dict(D=t["D"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True)
    out, final, varlen = mamba_chunk_scan_combined(
        t["x"], t["dt"], t["A"], t["B"], t["C"], 8, initial_states=t["initial_states"][:1],
        seq_idx=seq_idx, cu_seqlens=cu, return_final_states=True, return_varlen_states=True, **kw,
    )
    ref, ref_final = ssm_recurrence_reference(
        t["x"], t["dt"], t["A"], t["B"], t["C"], initial_states=t["initial_states"][:1],
        seq_idx=seq_idx, **kw,
    )
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(final, ref_final, **TOL)
    assert varlen.shape == (3, 4, 3, 5)
    start = 0
    for i, n in enumerate(lengths):
        # Each packed sequence alone (the first one from the initial state) gives the same output
        # and its state after the last token.
        sl = slice(start, start + n)
        alone, alone_final = ssm_recurrence_reference(
            t["x"][:, sl], t["dt"][:, sl], t["A"], t["B"][:, sl], t["C"][:, sl],
            initial_states=t["initial_states"][:1] if i == 0 else None,
            **{**kw, "z": t["z"][:, sl]},
        )
        torch.testing.assert_close(out[:, sl], alone, **TOL)
        torch.testing.assert_close(varlen[i], alone_final[0], **TOL)
        start += n
    # Without seq_idx the state flows across the boundaries: the outputs differ.
    unpacked = mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, **kw)
    assert (unpacked[:, 6:] - out[:, 6:]).abs().max() > 1e-3


def test_scan_bf16_inputs():
    t = _inputs(seqlen=20)
    lo = {k: t[k].to(torch.bfloat16) for k in ("x", "B", "C", "z")}
    out, final = mamba_chunk_scan_combined(
        lo["x"], t["dt"], t["A"], lo["B"], lo["C"], 8, D=t["D"], z=lo["z"],
        dt_bias=t["dt_bias"], dt_softplus=True, return_final_states=True,
    )
    assert out.dtype == torch.bfloat16 and final.dtype == torch.float32
    ref, ref_final = ssm_recurrence_reference(
        lo["x"].float(), t["dt"], t["A"], lo["B"].float(), lo["C"].float(), D=t["D"],
        z=lo["z"].float(), dt_bias=t["dt_bias"], dt_softplus=True,
    )
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(final, ref_final, **TOL)


def test_scan_rejects_bad_shapes():
    t = _inputs(seqlen=8)
    with pytest.raises(ValueError, match="dt must be"):
        mamba_chunk_scan_combined(t["x"], t["dt"][:, :4], t["A"], t["B"], t["C"], 4)
    with pytest.raises(ValueError, match="multiple of ngroups"):
        B3 = torch.randn(2, 8, 3, 5)
        mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], B3, B3, 4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        mamba_chunk_scan_combined(
            t["x"], t["dt"], t["A"], t["B"], t["C"], 4, return_varlen_states=True
        )


# ------------------------------------------------------------------------------ gated RMSNorm


def _gated_norm_by_hand(x, w, z, eps, group_size, norm_before_gate):
    out = torch.empty_like(x)
    gate = torch.ones_like(x) if z is None else z * torch.sigmoid(z)
    v = x if norm_before_gate else x * gate
    for start in range(0, x.shape[-1], group_size):
        part = v[..., start : start + group_size]
        rms = torch.sqrt((part * part).mean(-1, keepdim=True) + eps)
        out[..., start : start + group_size] = part / rms * w[start : start + group_size]
    return out * gate if norm_before_gate else out


@pytest.mark.parametrize("group_size,norm_before_gate", [(8, False), (24, False), (6, True)])
def test_gated_rms_norm_matches_definition(group_size, norm_before_gate):
    g = torch.Generator().manual_seed(3)
    x, z = torch.randn(3, 5, 24, generator=g), torch.randn(3, 5, 24, generator=g)
    w = torch.rand(24, generator=g) + 0.5
    got = rms_norm_gated(
        x, w, z, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate
    )
    want = _gated_norm_by_hand(x, w, z, 1e-5, group_size, norm_before_gate)
    torch.testing.assert_close(got, want, **TOL)


def test_gated_rms_norm_module_groups_shard_like_tensor_parallel():
    """Per-group normalisation means a TP shard of whole groups normalises on its own — what lets
    the mixer's norm be split over TP ranks."""
    norm = GatedRMSNorm(32, eps=1e-5, group_size=8, norm_before_gate=False)
    assert norm.weight.shape == (32,) and torch.all(norm.weight == 1) and norm.bias is None
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, z = torch.randn(4, 32), torch.randn(4, 32)
    full = norm(x, z)
    halves = [
        rms_norm_gated(x[:, s], norm.weight[s], z[:, s], eps=1e-5, group_size=8,
                       norm_before_gate=False)
        for s in (slice(0, 16), slice(16, 32))
    ]
    torch.testing.assert_close(full, torch.cat(halves, dim=-1), **TOL)
    # Without z it is a plain grouped RMSNorm; with group_size None, one group.
    plain = _gated_norm_by_hand(x, norm.weight, None, 1e-5, 8, False)
    torch.testing.assert_close(norm(x), plain, **TOL)
    whole = rms_norm_gated(x, norm.weight, z, group_size=None, norm_before_gate=False)
    assert (whole - full).abs().max() > 1e-3


def test_gated_rms_norm_keeps_input_dtype():
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    z = torch.randn(2, 16, dtype=torch.bfloat16)
    out = rms_norm_gated(x, torch.ones(16), z, group_size=8, norm_before_gate=False)
    assert out.dtype == torch.bfloat16
    ref = _gated_norm_by_hand(x.float(), torch.ones(16), z.float(), 1e-5, 8, False)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
