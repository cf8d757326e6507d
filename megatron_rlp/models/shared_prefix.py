"""Shared-prefix attention: a context once, its G thought branches after it, in one packed row.

The RLP update scores G thoughts of one context x_<t.  One row per thought recomputes the context G
times; the shared layout packs it once::

    [ x_0 … x_{t-1} | open c_1 … close | open c_2 … close | … | open c_G … close | pad ]
      context (t)     branch 1            branch 2                branch G

A context token attends causally to the context; a branch token attends to the whole context and
causally to its own branch, never to another branch.  Every branch's positions continue from t (the
open marker sits at position t in every branch), so a branch sees exactly what the row
(x_<t, open, c_i, close) of the one-row-per-thought layout sees.

Mask-free form (no [S, S] mask is built): each branch's queries attend twice,

* to the context's keys/values, unmasked (computed once per row and shared by all G branches: the
  [t] keys are broadcast over the G branches, so the context's gradient is the sum over branches),
* to the branch's own keys/values, causally (a standard causal attention of length 1 + |c_i|),

and the two partial outputs are merged through their log-sum-exps (Hydragen / cascade attention):
``lse = logaddexp(lse_ctx, lse_own)``, ``out = e^(lse_ctx − lse) out_ctx + e^(lse_own − lse) out_own``
— exactly softmax attention over the concatenated keys.  (The torch path below takes that softmax
directly over the two score blocks side by side, [context keys | own keys]; a fused GPU form would
run the two parts as two kernels and merge them as above.)

Mamba layers (hybrid models, :func:`shared_prefix_ssm`, called by ``HybridMambaMixer``): the
context runs as a sequence of its own; every branch starts from what the row layout has at t —
the last d_conv−1 convolution inputs of the context (prepended to the branch's convolution input)
and the SSM state after x_<t (the scan's ``initial_states``, broadcast over the G branches, so the
context's state gets the gradient of all of them).  megatron's ``MambaMixer`` takes no initial
state in training; the mixer's own attributes (in_proj, conv1d, A_log, D, dt_bias, gated norm,
out_proj) are used unchanged.

Kernels.  Attention: one implementation, in plain torch (fp32, cast back to the activation dtype),
on CPU and on a GPU alike: the contexts through ``torch.nn.functional.scaled_dot_product_attention``
(causal; PyTorch picks the kernel), the branches as score blocks and one softmax.  It is a megatron-core core-attention module
(:func:`shared_prefix_core_attention` subclasses the layer spec's own core attention —
megatron's ``DotProductAttention`` or Transformer Engine's ``TEDotProductAttention`` — and takes
over only when the forward carries a :class:`SharedPrefixLayout`; every other call, sampling and
scoring included, goes to the original kernel).  Not done: a fused GPU form.  The two attentions
map one-to-one onto kernels that return their log-sum-exp (flash-attention's ``flash_attn_func(...,
return_attn_probs=True)``, FlexAttention with ``return_lse``); their backward must then be taken
with the *merged* output and lse (flash-attention's ``_flash_attn_backward(dout, q, k_part,
v_part, out, lse)`` per part gives the exact gradient of the concatenated attention) — not wired
here, not run on a GPU.  The torch path materialises the branches' [G, heads, 1+L, t + 1+L]
scores per row and layer (what megatron's local ``DotProductAttention`` does for a whole row).
Scan: the mixer module's ``mamba_chunk_scan_combined`` — mamba-ssm's Triton kernel on a GPU
(its ``initial_states`` is differentiable), :mod:`megatron_rlp.models.mamba_torch` on CPU; the
convolution is the mixer's ``torch.nn.Conv1d`` (not causal-conv1d's kernel) on both.

Positions: megatron's RoPE ignores ``position_ids``; :func:`packed_rope_table` builds the per-slot
angle table [S, B, 1, dim] (one column per packed row: rows have different t) that
``megatron_rlp.sampling.pipeline.rope_positions`` installs for the forward — on every pipeline
stage, since every stage's forward step computes its own rotary table.

Checked, on CPU only, in fp32: this attention against a dense block mask, forward and backward
(tests/unit/test_shared_prefix.py); one RLP iteration in the shared layout against the
one-row-per-thought layout — loss, every ``rlp/*`` metric, every gradient within 1e-5, NTP term
on — at TP=1 (GPT with the KL term too, and tiny-hybrid), TP=2 with and without sequence
parallelism, PP=2 and tiny-hybrid at TP=2 (tests/distributed/test_rlp_parallel.py); the existing
reference-parity tests now run the shared layout by default.  Nothing here ran in bf16 or on a
GPU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class SharedPrefixLayout(PackedSeqParams):
    """Where the context and the branches lie in each packed row of a micro-batch (host lists, so
    the attention's bookkeeping never waits on the device).

    ``context_lens[b]``: t of row b (the context fills slots 0 … t−1).  ``branch_lens[b][j]``: input
    tokens of branch j (open marker, thought, close marker); branch j follows branch j−1 directly.
    megatron passes ``packed_seq_params`` untouched to the core attention; with ``qkv_format``
    'sbhd' nothing else in megatron-core reads it.
    """

    qkv_format: str = "sbhd"
    context_lens: list = field(default_factory=list)
    branch_lens: list = field(default_factory=list)
    _index: dict = field(default_factory=dict, repr=False, compare=False)  # per (width, device)

    def row_length(self, b: int) -> int:
        return self.context_lens[b] + sum(self.branch_lens[b])

    def positions(self, width: int) -> torch.Tensor:
        """RoPE position of every slot [B, width]: the context 0 … t−1, each branch t, t+1, …;
        padding 0."""
        rows = torch.zeros(len(self.context_lens), width, dtype=torch.int64)
        for b, (t, lens) in enumerate(zip(self.context_lens, self.branch_lens)):
            rows[b, :t] = torch.arange(t)
            start = t
            for n in lens:
                rows[b, start : start + n] = torch.arange(t, t + n)
                start += n
        return rows


@dataclass
class _PackedIndex:
    """Index tensors of a layout in a [B, S] micro-batch (built once, shared by every layer)."""

    context_width: int  # T: the longest context
    context_mask: torch.Tensor  # [B, T] slot < t_b
    row: torch.Tensor  # [B, 1, 1] batch index for gathers
    branch_slots: torch.Tensor  # [B, G, Lb] slot of branch token u (clamped inside the row)
    source: torch.Tensor  # [B, S] for every slot, its entry in cat(context out, branch out, zero)


def _packed_index(layout: SharedPrefixLayout, s: int, device) -> _PackedIndex:
    key = (s, str(device))
    if key in layout._index:
        return layout._index[key]
    nb, g = len(layout.context_lens), len(layout.branch_lens[0])
    for b in range(nb):
        if layout.context_lens[b] < 1 or layout.row_length(b) > s or len(layout.branch_lens[b]) != g:
            raise ValueError(f"packed row {b}: context {layout.context_lens[b]} + branches "
                             f"{layout.branch_lens[b]} do not fit {s} slots (t >= 1 and {g} branches needed)")
    width = max(layout.context_lens)
    longest = max(max(lens) for lens in layout.branch_lens)
    ctx = torch.tensor(layout.context_lens)
    branch_slots = torch.zeros(nb, g, longest, dtype=torch.int64)
    zero_entry = nb * width + nb * g * longest
    source = torch.full((nb, s), zero_entry, dtype=torch.int64)
    for b, (t, lens) in enumerate(zip(layout.context_lens, layout.branch_lens)):
        source[b, :t] = b * width + torch.arange(t)
        slot = t
        for j, n in enumerate(lens):
            branch_slots[b, j] = (slot + torch.arange(longest)).clamp(max=s - 1)
            source[b, slot : slot + n] = nb * width + (b * g + j) * longest + torch.arange(n)
            slot += n
    index = _PackedIndex(
        context_width=width,
        context_mask=(torch.arange(width)[None] < ctx[:, None]).to(device),
        row=torch.arange(nb).view(nb, 1, 1).to(device),
        branch_slots=branch_slots.to(device),
        source=source.to(device),
    )
    layout._index[key] = index
    return index


def _branch_mask(layout: SharedPrefixLayout, index: _PackedIndex, longest: int, device) -> torch.Tensor:
    """[B, 1, 1, 1, Lb, T + Lb]: the keys a branch token may see — its row's context (slot < t) and
    its own branch up to itself (built once per layout, shared by every layer)."""
    key = ("branch_mask", longest, str(device))
    if key not in layout._index:
        nb, width = index.context_mask.shape
        own = torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
        allowed = torch.cat([index.context_mask[:, None, :].expand(nb, longest, width),
                             own.expand(nb, longest, longest)], dim=-1)
        layout._index[key] = allowed[:, None, None, None]
    return layout._index[key]


def shared_prefix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            layout: SharedPrefixLayout, scale: float) -> torch.Tensor:
    """Core attention of packed rows (see module docstring), all rows of the micro-batch at once.

    query [S, B, hq, d], key/value [S, B, hk, d] (grouped-query: hq a multiple of hk), as
    megatron's core attention receives them (RoPE applied).  Returns [S, B, hq*d]; padding slots
    are zero.  Computed in fp32.  The contexts: causal ``scaled_dot_product_attention`` (a
    context's outputs past its t are never used, so keys past t need no mask).  The branches
    [B, G, Lb] (padded to the longest: padding queries sit after a branch's real tokens, so the
    causal part keeps them out of every real query's keys): scores against the row's context keys
    (computed once, read by all G branches: their gradients add up in the context) and against
    the branch's own keys, one softmax over both — the LSE merge of the module docstring, done
    exactly.  Query heads are grouped over their KV head, never copying K/V per query head.
    """
    import torch.nn.functional as F

    s, nb, hq, d = query.shape
    if len(layout.context_lens) != nb:
        raise ValueError(f"shared-prefix layout describes {len(layout.context_lens)} rows, the batch has {nb}")
    index = _packed_index(layout, s, query.device)
    hk = key.shape[2]
    rep = hq // hk
    q = query.transpose(0, 1).float() * scale  # [B, S, h, d]
    k, v = key.transpose(0, 1).float(), value.transpose(0, 1).float()
    width = index.context_width
    ctx_k, ctx_v = k[:, :width], v[:, :width]  # [B, T, hk, d]
    ctx_out = F.scaled_dot_product_attention(
        q[:, :width].transpose(1, 2), ctx_k.transpose(1, 2), ctx_v.transpose(1, 2),
        is_causal=True, scale=1.0, enable_gqa=rep > 1,
    ).transpose(1, 2)  # [B, T, hq, d]
    g, longest = index.branch_slots.shape[1:]
    qb = q[index.row, index.branch_slots].view(nb, g, longest, hk, rep, d)  # head h = kv head h // rep
    kb, vb = (x[index.row, index.branch_slots] for x in (k, v))  # [B, G, Lb, hk, d]
    scores = torch.cat([torch.einsum("bglkrd,btkd->bkrglt", qb, ctx_k),
                        torch.einsum("bglkrd,bgmkd->bkrglm", qb, kb)], dim=-1)
    scores = scores.masked_fill(~_branch_mask(layout, index, longest, query.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    branch_out = (torch.einsum("bkrglt,btkd->bglkrd", probs[..., :width], ctx_v)
                  + torch.einsum("bkrglm,bgmkd->bglkrd", probs[..., width:], vb))
    entries = torch.cat([ctx_out.reshape(-1, hq, d), branch_out.reshape(-1, hq, d), ctx_out.new_zeros(1, hq, d)])
    out = entries[index.source]  # [B, S, h, d]
    return out.transpose(0, 1).to(query.dtype).reshape(s, nb, hq * d)


def shared_prefix_core_attention(base):
    """The layer spec's core attention ``base`` that also runs packed shared-prefix rows (a
    subclass: parameters and state-dict keys stay those of ``base``).  A ``base`` that is not a
    class is returned as it is: megatron puts a placeholder for Transformer Engine's attention in
    its TE specs when TE does not import (such a spec cannot be built anyway)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(base, ModuleSpec):
        import dataclasses

        return dataclasses.replace(base, module=shared_prefix_core_attention(base.module))
    if not isinstance(base, type):
        return base
    return _shared_prefix_subclass(base)


@functools.cache
def _shared_prefix_subclass(base: type) -> type:
    class SharedPrefixCoreAttention(base):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None, **kwargs):
            if hasattr(packed_seq_params, "decode_attention"):  # sampling.cascade decode step
                return packed_seq_params.decode_attention(self, query, key, value)
            if isinstance(packed_seq_params, SharedPrefixLayout):
                scale = self.config.softmax_scale or 1.0 / math.sqrt(query.shape[-1])
                return shared_prefix_attention(query, key, value, packed_seq_params, scale)
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params, **kwargs)

    SharedPrefixCoreAttention.__name__ = f"SharedPrefix{base.__name__}"
    SharedPrefixCoreAttention.__qualname__ = SharedPrefixCoreAttention.__name__
    return SharedPrefixCoreAttention


def packed_rope_table(model, position_ids: torch.Tensor):
    """megatron's RoPE angle table [S, B, 1, dim] for per-slot positions [B, S] (None for a model
    without RoPE); install it with ``sampling.pipeline.rope_positions`` around the forward."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None or getattr(model, "position_embedding_type", None) != "rope":
        return None
    emb = rope.get_emb(int(position_ids.max()) + 1)  # [L, 1, 1, dim]
    return emb[:, 0, 0][position_ids.t().to(emb.device)].unsqueeze(2)


def _ssm_index(layout: SharedPrefixLayout, s: int, device) -> dict:
    """Index tensors for :func:`shared_prefix_ssm`: contexts right-aligned in [B, T] (left padding
    keeps a zero state: no input before x_0), branches as in :func:`_packed_index`."""
    key = ("ssm", s, str(device))
    if key not in layout._index:
        base = _packed_index(layout, s, device)
        nb, width = len(layout.context_lens), base.context_width
        ctx = torch.tensor(layout.context_lens)
        pad = width - ctx  # [B]
        slots = torch.arange(width)[None] - pad[:, None]  # slot of context column c (negative: padding)
        source = base.source.clone().cpu()
        for b, t in enumerate(layout.context_lens):
            source[b, :t] = b * width + int(pad[b]) + torch.arange(t)
        layout._index[key] = {
            "context_slots": slots.clamp(min=0).to(device),
            "context_valid": (slots >= 0).to(device),
            "source": source.to(device),
            "base": base,
        }
    return layout._index[key]


def shared_prefix_ssm(mixer, zxBCdt: torch.Tensor, layout: SharedPrefixLayout) -> torch.Tensor:
    """A Mamba-2 mixer's convolution + scan + gated norm over packed shared-prefix rows, all rows
    of the micro-batch at once.

    ``mixer``: megatron's ``MambaMixer`` (its weights and settings; context parallelism off);
    ``zxBCdt`` [S, B, D]: its input projection.  Returns y [S, B, d_inner] for ``out_proj``.

    The contexts run as sequences of their own (right-aligned, zero inputs before x_0, so the
    state stays zero there) and hand each branch what the rows layout has at t: the last d_conv−1
    convolution inputs (prepended to every branch's convolution input; zeros where the context is
    shorter) and the SSM state after x_<t (every branch's ``initial_states``, broadcast over the
    G branches, so its gradient is their sum).
    """
    from einops import rearrange
    from megatron.core.ssm import mamba_mixer as mixer_module

    if not mixer.rmsnorm:
        raise NotImplementedError("shared-prefix Mamba needs the mixer's gated RMSNorm (rmsnorm=True)")
    if mixer.cp.cp_size != 1:
        raise NotImplementedError("shared-prefix Mamba does not support context parallelism")
    scan = mixer_module.mamba_chunk_scan_combined
    s, nb, _ = zxBCdt.shape
    index = _ssm_index(layout, s, zxBCdt.device)
    base = index["base"]
    d_inner, ngroups, nheads = mixer.cp.d_inner_local_tpcp, mixer.cp.ngroups_local_tpcp, mixer.cp.nheads_local_tpcp
    xbc_dim = d_inner + 2 * ngroups * mixer.d_state
    width = mixer.d_conv - 1
    A = -torch.exp(mixer.cp.get_A_log().float())
    D = rearrange(mixer.cp.get_D().float(), "(h p) -> h p", p=mixer.headdim) if mixer.D_has_hdim else mixer.cp.get_D()
    dt_bias = mixer.cp.get_dt_bias().float()

    def conv(xbc):  # [n, L, xbc_dim] with `width` leading inputs of history -> [n, L - width, ...]
        out = mixer.cp.conv1d(xbc.transpose(1, 2))[..., width : xbc.shape[1]]
        return mixer.act(out).transpose(1, 2)

    def run_scan(xbc, dt, initial_states=None, final=False):
        x, B, C = torch.split(xbc, [d_inner, ngroups * mixer.d_state, ngroups * mixer.d_state], dim=-1)
        return scan(
            rearrange(x, "b l (h p) -> b l h p", p=mixer.headdim).contiguous(), dt.contiguous(), A,
            rearrange(B, "b l (g n) -> b l g n", n=mixer.d_state).contiguous(),
            rearrange(C, "b l (g n) -> b l g n", n=mixer.d_state).contiguous(),
            mixer.chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True,
            initial_states=initial_states, return_final_states=final,
        )

    z, xbc, dt = torch.split(zxBCdt.transpose(0, 1), [d_inner, xbc_dim, nheads], dim=-1)  # [B, S, ...]
    row2 = base.row[:, :, 0]  # [B, 1]
    valid = index["context_valid"].unsqueeze(-1)
    ctx_in = xbc[row2, index["context_slots"]] * valid  # [B, T, xbc_dim], zeros before x_0
    history = torch.nn.functional.pad(ctx_in, (0, 0, width, 0))
    ctx_y, ctx_state = run_scan(conv(history) * valid, dt[row2, index["context_slots"]], final=True)
    g, longest = base.branch_slots.shape[1:]
    tail = history[:, history.shape[1] - width :].unsqueeze(1).expand(nb, g, width, xbc_dim)
    branch_in = torch.cat([tail, xbc[base.row, base.branch_slots]], dim=2).reshape(nb * g, width + longest, xbc_dim)
    initial = ctx_state.unsqueeze(1).expand(nb, g, *ctx_state.shape[1:]).reshape(nb * g, *ctx_state.shape[1:])
    branch_y = run_scan(conv(branch_in), dt[base.row, base.branch_slots].reshape(nb * g, longest, nheads),
                        initial_states=initial)
    entries = torch.cat([ctx_y.reshape(-1, d_inner), branch_y.reshape(-1, d_inner), ctx_y.new_zeros(1, d_inner)])
    y = entries[index["source"]].transpose(0, 1).to(zxBCdt.dtype)  # [S, B, d_inner]
    return mixer.norm(y, z.transpose(0, 1))
