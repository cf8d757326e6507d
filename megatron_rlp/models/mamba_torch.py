"""Mamba-2 in plain PyTorch: the chunked SSD scan, the gated RMSNorm, and the sequential recurrence.

megatron-core's ``MambaMixer`` imports three things from ``mamba_ssm`` (Triton kernels that need
CUDA): ``mamba_chunk_scan_combined`` (the SSD scan), ``RMSNorm`` from ``layernorm_gated`` (the norm
of ``y * silu(z)``) and ``selective_state_update`` (one decode step; the mixer already has a torch
fallback for that one).  This module provides the first two with the same call signatures and
semantics, written from the SSD algorithm of the Mamba-2 paper (Dao & Gu, 2024), plus the plain
recurrence they are tested against.

The model (per batch row, per head ``h`` with ``P`` channels and state size ``N``)::

    a_t = dt_t * A_h                                   (A_h < 0: log of the per-step decay)
    h_t = exp(a_t) * h_{t-1} + dt_t * x_t B_t^T         h_t: [P, N]
    y_t = h_t C_t + D_h * x_t        (then y_t * silu(z_t) when z is given)

Heads share B and C within a group: head ``h`` reads group ``h // (H // G)``.

The chunked scan splits the sequence into chunks of ``chunk_size`` and computes, in parallel:

1. inside each chunk, the quadratic (attention-like) form
   ``y_i = sum_{j<=i} (C_i . B_j) exp(a_{j+1} + ... + a_i) dt_j x_j``;
2. each chunk's contribution to the state at its end, ``S_c``;
3. the states between chunks, ``H_c = exp(sum of a over chunk c) H_{c-1} + S_c`` — done here as
   one masked "decay matrix" product over chunks rather than a loop (chunk counts are small);
4. the contribution of the state entering each chunk, ``exp(a_1 + ... + a_i) C_i . H_{c-1}``.

Everything is computed in float32 (as the Triton kernels do); the output has ``x.dtype`` and the
states are float32.  Gradients come from autograd.  Memory is O(L * chunk_size * H) for the
intra-chunk decay, so this is a reference and CPU fallback, not a replacement for the fused
kernels on a GPU.

Differences from mamba_ssm worth knowing: ``seq_idx`` (packed sequences) must be non-decreasing
along the sequence, and ``initial_states`` belongs to sequence id 0 (rows whose first sequence id
is not 0 ignore it).  ``return_varlen_states`` returns, for each sequence of ``cu_seqlens``, the
exact state after its last token under the same resets.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "mamba_chunk_scan_combined",
    "ssm_recurrence_reference",
    "rms_norm_gated",
    "GatedRMSNorm",
]

_NO_DT_LIMIT = (0.0, float("inf"))


def _prepare_dt(
    dt: Tensor,
    dt_bias: Optional[Tensor],
    dt_softplus: bool,
    dt_limit: Sequence[float],
) -> Tensor:
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)  # threshold 20, like the kernels
    if tuple(dt_limit) != _NO_DT_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _skip_and_gate(y: Tensor, x: Tensor, D: Optional[Tensor], z: Optional[Tensor]) -> Tensor:
    """y + D x, then * silu(z). y, x: [..., H, P] float32."""
    if D is not None:
        D = D.float()
        y = y + (D[:, None] if D.dim() == 1 else D) * x
    if z is not None:
        y = y * F.silu(z.float())
    return y


def mamba_chunk_scan_combined(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    seq_idx: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Sequence[float] = _NO_DT_LIMIT,
    return_final_states: bool = False,
    return_varlen_states: bool = False,
) -> Union[Tensor, Tuple[Tensor, ...]]:
    """Chunked SSD scan with ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined``'s API.

    Args:
        x: [batch, seqlen, nheads, headdim]
        dt: [batch, seqlen, nheads] (raw; ``dt_bias`` / softplus / ``dt_limit`` applied here)
        A: [nheads] (negative)
        B, C: [batch, seqlen, ngroups, dstate]
        chunk_size: chunk length of the SSD decomposition (any length works; the sequence is
            padded internally)
        D: [nheads] or [nheads, headdim] skip connection, optional
        z: [batch, seqlen, nheads, headdim] gate, optional: out = (y + D x) * silu(z)
        dt_bias: [nheads], optional
        initial_states: [batch, nheads, headdim, dstate], optional
        seq_idx: [batch, seqlen] int, non-decreasing sequence ids of packed sequences; the state is
            reset where the id changes
        cu_seqlens: [num_sequences + 1] cumulative lengths; only for ``return_varlen_states``
            (batch must be 1)
        dt_softplus: apply softplus to ``dt + dt_bias``
        dt_limit: clamp of dt after softplus
        return_final_states: also return the state after the last position
        return_varlen_states: also return the state after the last token of each sequence of
            ``cu_seqlens``: [num_sequences, nheads, headdim, dstate]

    Returns:
        ``out`` [batch, seqlen, nheads, headdim] in ``x.dtype``; ``(out, final_states)``,
        ``(out, varlen_states)`` or ``(out, final_states, varlen_states)`` as requested
        (states in float32).
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    if dt.shape != (batch, seqlen, nheads):
        raise ValueError(f"dt must be {(batch, seqlen, nheads)}, got {tuple(dt.shape)}")
    if B.shape != (batch, seqlen, ngroups, dstate) or C.shape != B.shape:
        raise ValueError(f"B and C must be [batch, seqlen, ngroups, dstate]: {B.shape} {C.shape}")
    if nheads % ngroups:
        raise ValueError(f"nheads ({nheads}) must be a multiple of ngroups ({ngroups})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if return_varlen_states and (cu_seqlens is None or batch != 1):
        raise ValueError("return_varlen_states needs cu_seqlens and batch size 1")
    out_dtype = x.dtype
    rep = nheads // ngroups  # heads per group
    Q = chunk_size
    nchunks = max(1, math.ceil(seqlen / Q))
    pad = nchunks * Q - seqlen

    dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit)
    xf, Bf, Cf, Af = x.float(), B.float(), C.float(), A.float()
    if pad:
        # Padded steps have dt = 0: no decay and no input, so the states are unchanged.
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    if seq_idx is not None:
        seq_idx = seq_idx.to(torch.long)
        if pad:
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(batch, pad)], dim=1)
        seq_idx = seq_idx.view(batch, nchunks, Q)

    # Chunked views; heads split as (group, head-in-group) so B and C need no expansion.
    xc = xf.view(batch, nchunks, Q, ngroups, rep, headdim)
    dtc = dt.view(batch, nchunks, Q, nheads)
    Bc = Bf.view(batch, nchunks, Q, ngroups, dstate)
    Cc = Cf.view(batch, nchunks, Q, ngroups, dstate)

    a_cum = torch.cumsum(dtc * Af, dim=2)  # [b, c, Q, H]: a_1 + ... + a_i within the chunk

    # 1. Intra-chunk quadratic form.  decay[i, j] = exp(a_cum[i] - a_cum[j]) for j <= i.
    valid = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    valid = valid.view(1, 1, Q, Q)
    if seq_idx is not None:
        valid = valid & (seq_idx[:, :, :, None] == seq_idx[:, :, None, :])
    seg = a_cum[:, :, :, None, :] - a_cum[:, :, None, :, :]  # [b, c, i, j, H]
    decay = torch.exp(seg.masked_fill(~valid[..., None], float("-inf")))
    decay = decay.view(batch, nchunks, Q, Q, ngroups, rep)
    CB = torch.einsum("bcign,bcjgn->bcijg", Cc, Bc)
    dtx = dtc.view(batch, nchunks, Q, ngroups, rep)[..., None] * xc  # dt_j x_j
    y = torch.einsum("bcijg,bcijgr,bcjgrp->bcigrp", CB, decay, dtx)

    # 2. Each chunk's own contribution to the state at its end.
    to_end = torch.exp(a_cum[:, :, -1:, :] - a_cum)  # [b, c, Q, H]
    if seq_idx is not None:
        to_end = to_end * (seq_idx == seq_idx[:, :, -1:])[..., None]
    to_end = to_end.view(batch, nchunks, Q, ngroups, rep)
    chunk_states = torch.einsum("bcjgn,bcjgr,bcjgrp->bcgrpn", Bc, to_end, dtx)

    # 3. States between chunks.  states_in[0] is the initial state, states_in[k] (k >= 1) the
    # contribution of chunk k-1; H[m] (state after chunk m-1, H[0] = initial) is
    # sum_{k <= m} exp(acc[m] - acc[k]) states_in[k] with acc the running chunk decay.
    if initial_states is None:
        init = xf.new_zeros(batch, 1, ngroups, rep, headdim, dstate)
    else:
        init = initial_states.float().reshape(batch, 1, ngroups, rep, headdim, dstate)
    states_in = torch.cat([init, chunk_states], dim=1)  # [b, c+1, g, r, p, n]
    acc = F.pad(torch.cumsum(a_cum[:, :, -1, :], dim=1), (0, 0, 1, 0))  # [b, c+1, H]
    w_valid = torch.ones(nchunks + 1, nchunks + 1, dtype=torch.bool, device=x.device).tril()
    w_valid = w_valid.view(1, nchunks + 1, nchunks + 1)
    if seq_idx is not None:
        # Owner of states_in[k]: sequence id 0 for the initial state, else the id at the end of
        # chunk k-1.  A state carries over only within one sequence (ids are non-decreasing).
        owner = F.pad(seq_idx[:, :, -1], (1, 0), value=0)  # [b, c+1]
        w_valid = w_valid & (owner[:, :, None] == owner[:, None, :])
    w = torch.exp(
        (acc[:, :, None, :] - acc[:, None, :, :]).masked_fill(~w_valid[..., None], float("-inf"))
    )  # [b, m, k, H]
    w = w.view(batch, nchunks + 1, nchunks + 1, ngroups, rep)
    states = torch.einsum("bmkgr,bkgrpn->bmgrpn", w, states_in)  # [b, c+1, g, r, p, n]

    # 4. The state entering each chunk, read out by C with the decay since the chunk start.
    from_start = torch.exp(a_cum)  # [b, c, Q, H]
    if seq_idx is not None:
        from_start = from_start * (seq_idx == owner[:, :-1, None])[..., None]
    from_start = from_start.view(batch, nchunks, Q, ngroups, rep)
    y = y + torch.einsum("bcign,bcgrpn,bcigr->bcigrp", Cc, states[:, :-1], from_start)

    y = y.reshape(batch, nchunks * Q, nheads, headdim)[:, :seqlen]
    y = _skip_and_gate(y, x.float(), D, z)
    out = y.to(out_dtype)

    results = [out]
    if return_final_states:
        results.append(states[:, -1].reshape(batch, nheads, headdim, dstate))
    if return_varlen_states:
        ends = cu_seqlens[1:].to(device=x.device, dtype=torch.long) - 1  # last token per sequence
        c_e, i_e = ends // Q, ends % Q
        # Intra-chunk part: the decay row of the end position (already masked by causality and
        # sequence id), applied to that chunk's inputs.
        w_e = decay[0, c_e, i_e]  # [S, Q(j), g, r]
        intra = torch.einsum("sjgr,sjgn,sjgrp->sgrpn", w_e, Bc[0, c_e], dtx[0, c_e])
        carry = torch.exp(a_cum[0, c_e, i_e])  # [S, H]
        if seq_idx is not None:
            carry = carry * (seq_idx[0, c_e, i_e] == owner[0, c_e])[:, None]
        carry = carry.view(-1, ngroups, rep)[..., None, None] * states[0, c_e]
        results.append((intra + carry).reshape(-1, nheads, headdim, dstate))
    return results[0] if len(results) == 1 else tuple(results)


def ssm_recurrence_reference(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    seq_idx: Optional[Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Sequence[float] = _NO_DT_LIMIT,
) -> Tuple[Tensor, Tensor]:
    """The Mamba-2 SSM one step at a time: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,
    y_t = h_t C_t + D x_t (times silu(z_t) when z is given).

    Same arguments and shapes as :func:`mamba_chunk_scan_combined` (no chunking).  Where
    ``seq_idx`` differs from the previous position's id (the id before position 0 is 0) the state is
    reset to zero first.  Returns ``(out, final_state)``: out in ``x.dtype``, the state
    [batch, nheads, headdim, dstate] in float32.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    rep = nheads // ngroups
    dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit)
    xf, Af = x.float(), A.float()
    Bh = B.float().repeat_interleave(rep, dim=2)  # [b, l, H, N]
    Ch = C.float().repeat_interleave(rep, dim=2)
    if initial_states is None:
        h = xf.new_zeros(batch, nheads, headdim, dstate)
    else:
        h = initial_states.float()
    prev_id = None
    if seq_idx is not None:
        prev_id = torch.zeros(batch, dtype=torch.long, device=x.device)
    ys = []
    for t in range(seqlen):
        if seq_idx is not None:
            keep = (seq_idx[:, t].long() == prev_id).view(batch, 1, 1, 1)
            h = torch.where(keep, h, torch.zeros_like(h))
            prev_id = seq_idx[:, t].long()
        decay = torch.exp(dt[:, t] * Af)  # [b, H]
        inp = (dt[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]  # [b, H, P, N]
        h = decay[..., None, None] * h + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(batch, 0, nheads, headdim)
    y = _skip_and_gate(y, xf, D, z)
    return y.to(x.dtype), h


def rms_norm_gated(
    x: Tensor,
    weight: Tensor,
    z: Optional[Tensor] = None,
    eps: float = 1e-5,
    group_size: Optional[int] = None,
    norm_before_gate: bool = True,
) -> Tensor:
    """RMSNorm with a SiLU gate, per group of ``group_size`` channels (``mamba_ssm``'s
    ``layernorm_gated.rmsnorm_fn`` semantics, no bias).

    ``norm_before_gate=False`` (what megatron's MambaMixer uses): ``norm(x * silu(z)) * weight``;
    ``True``: ``norm(x) * weight * silu(z)``.  Computed in float32, returned in ``x.dtype``.
    """
    dim = x.shape[-1]
    group = dim if group_size is None else group_size
    if dim % group:
        raise ValueError(f"group_size {group} does not divide the last dimension {dim}")
    xf = x.float()
    gate = F.silu(z.float()) if z is not None else None
    if gate is not None and not norm_before_gate:
        xf = xf * gate
    xg = xf.reshape(*xf.shape[:-1], dim // group, group)
    xg = xg * torch.rsqrt(xg.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = xg.reshape(xf.shape) * weight.float()
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Module form of :func:`rms_norm_gated`, constructed like ``mamba_ssm``'s gated ``RMSNorm``:
    ``GatedRMSNorm(hidden_size, eps, group_size, norm_before_gate, device, dtype)``, called as
    ``norm(x, z=None)``.  The weight starts at ones."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        group_size: Optional[int] = None,
        norm_before_gate: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        return rms_norm_gated(
            x,
            self.weight,
            z=z,
            eps=self.eps,
            group_size=self.group_size,
            norm_before_gate=self.norm_before_gate,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, "
            f"norm_before_gate={self.norm_before_gate}"
        )
