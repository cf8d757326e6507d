"""The "cascade" decode layout: prefix sharing at decode without an attention mask.

Per decode step every branch row attends to two key sets, and the two partial attentions are
merged exactly through their log-sum-exps (Hydragen / FlashInfer cascade attention; the math of
``merge_attention``, written as one ``lerp`` with the weight
sigmoid(lse_ctx - lse_own) = e^lse_ctx / (e^lse_ctx + e^lse_own)):

* its context x_<t: the context's cache [C, T, groups, dim] is read once for all the branch rows
  of that context — the G queries of a context form one batched product against it
  (grouped-query heads fold into the query axis, so no GQA copy of the keys is made).  Contexts of
  different lengths share the micro-batch: each context has a length, used as the key-length
  limit (torch path) or as ``cache_seqlens`` (flash-attention on a GPU) — never as an arbitrary
  mask handed to a core attention;
* its own tokens (open marker, thought tokens so far): a small per-row cache [R, L, groups, dim],
  all rows at the same step, so every row has the same number of keys.

Nothing here relies on megatron's core attention honouring a mask: the forward runs without an
inference context and hands a :class:`CascadeDecodeLayout` down as ``packed_seq_params``; the
core attention (``shared_prefix_core_attention`` subclasses whatever the layer spec builds —
megatron's ``DotProductAttention`` or Transformer Engine's ``TEDotProductAttention``) passes such
calls to :meth:`CascadeThoughtJob.attend`, and ``HybridMambaMixer`` passes its calls to
:meth:`CascadeThoughtJob.mamba_step` (one decode step on the row's own conv/SSM states: the
context's Mamba states are forked per branch).  A call count checks that every attention layer
really took this path.

RoPE: the model's rotary embedding is switched off for the forward; keys are rotated once, when
stored (the context at fork time by positions 0..t-1, each new key by its own position t + u) and
queries by their position — what flash decoding does; megatron's static path instead re-rotates
the whole cached prefix at every step.

GPU: with ``flash_attn`` importable and fp16/bf16 tensors, both partial attentions are
``flash_attn_with_kvcache(..., cache_seqlens=..., return_softmax_lse=True)`` calls (per-context
lengths for the context part, step + 1 for the own part; :func:`partial_attention`).  Otherwise
the torch path (:meth:`CascadeThoughtJob.attend`): keys stored transposed so each part is two
batched matmuls over the cache as stored, the lengths as an additive 0/-inf bias, softmax in
fp32 (scores in the activation dtype, as megatron's local attention).  The flash path has not
run here (no GPU, no flash_attn): ``tests/gpu`` compares it with the torch form.  The decode
step has static shapes and
no host sync (the step number lives in a device tensor; the own-key window is the whole
[L] cache with a ``slot <= step`` limit when captured), so :class:`CascadeThoughtJob` captures it
as a CUDA graph per micro-batch shape when CUDA is present and runs the same function eagerly
otherwise.

Finished rows leave the batch: after a step, when at most half of the rows are still running,
the caches, Mamba states and row tables are compacted to the running rows (one extra host sync,
at most log2(R) times per micro-batch).  Compacting only at halvings keeps the number of distinct
shapes — CUDA graphs captured — logarithmic; between compactions finished rows ride along (their
tokens are ignored).  Results stay indexed by the micro-batch's original rows.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from megatron.core.packed_seq_params import PackedSeqParams

from megatron_rlp.sampling.pipeline import StageInfo, StepInput, vocab_shard_logits


def attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
            key_mask: torch.Tensor | None = None):
    """Softmax attention in fp32 over [..., Lq, h, d] queries and [..., Lk, h, d] keys/values
    (leading dims broadcast); ``key_mask`` [..., Lk] marks the keys that exist.  Returns the output
    [..., Lq, h, d] and the log-sum-exp [..., h, Lq]."""
    scores = torch.einsum("...qhd,...khd->...hqk", q.float(), k.float()) * scale
    if causal:
        lq, lk = scores.shape[-2], scores.shape[-1]
        future = torch.ones(lq, lk, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[..., None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    return torch.einsum("...hqk,...khd->...qhd", probs, v.float()), lse


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Softmax attention over keys A ∪ B from the attentions over A and over B (outputs
    [..., L, h, d], log-sum-exps [..., h, L])."""
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).transpose(-1, -2).unsqueeze(-1)  # [..., L, h, 1]
    w_b = torch.exp(lse_b - lse).transpose(-1, -2).unsqueeze(-1)
    return w_a * out_a + w_b * out_b


@dataclass(eq=False)
class CascadeDecodeLayout(PackedSeqParams):
    """Handed to every layer as ``packed_seq_params`` during a cascade decode step; the core
    attention and the Mamba mixer dispatch to the job (``qkv_format`` 'sbhd': nothing in
    megatron-core reads it otherwise)."""

    qkv_format: str = "sbhd"
    max_seqlen_q: int = 1  # read by megatron's rotary-length helper (RoPE is off here anyway)
    max_seqlen_kv: int = 1
    job: Optional["CascadeThoughtJob"] = None

    def decode_attention(self, core, query, key, value):
        return self.job.attend(core, query, key, value)

    def mamba_decode(self, mixer, hidden_states):
        return self.job.mamba_step(mixer, hidden_states)


@contextlib.contextmanager
def rope_off(model):
    """While active, the model's rotary embedding returns None (the cascade step rotates queries
    and keys itself, per row)."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None:
        yield
        return
    rope.forward = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del rope.forward


def _flash_kvcache():
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    return flash_attn_with_kvcache


def _use_flash(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _flash_kvcache() is not None


def partial_attention(q, k, v, lengths, scale):
    """Attention of queries q [B, Q, hq, d] over the first ``lengths[b]`` keys of k/v
    [B, K, hk, d] (hq a multiple of hk; ``lengths`` [B] int64 or a [K] bool key limit shared by
    all b).  Returns the output [B, Q, hq, d] (fp32 on the torch path) and the log-sum-exp
    [B, hq, Q] (fp32)."""
    b, nq, hq, d = q.shape
    hk = k.shape[2]
    rep = hq // hk
    if _use_flash(q):
        if lengths.dtype == torch.bool:  # the own part: every row has the same number of keys
            lengths = lengths.sum().to(torch.int32).expand(b).contiguous()
        out, lse = _flash_kvcache()(
            q, k, v, cache_seqlens=lengths.to(torch.int32), softmax_scale=scale, causal=False,
            return_softmax_lse=True,
        )
        return out, lse
    # Query head i belongs to key group i // rep: fold the rep heads of a group into the query
    # axis, so every key group is read once for all its query heads.
    qf = q.reshape(b, nq, hk, rep, d).transpose(2, 3).reshape(b, nq * rep, hk, d)
    if lengths.dtype == torch.bool:
        key_mask = lengths
    else:
        key_mask = torch.arange(k.shape[1], device=k.device)[None, :] < lengths[:, None]
    out, lse = attend_with_lse(qf, k, v, scale, causal=False, key_mask=key_mask)
    out = out.reshape(b, nq, rep, hk, d).transpose(2, 3).reshape(b, nq, hq, d)
    lse = lse.reshape(b, hk, nq, rep).transpose(1, 2).reshape(b, nq, hq).transpose(1, 2)
    return out, lse


def _rotate(t: torch.Tensor, freqs: Optional[torch.Tensor], config) -> torch.Tensor:
    """megatron's (unfused) RoPE of ``t`` with angles ``freqs`` (broadcastable, last dim the
    rotary dim); identity without RoPE."""
    if freqs is None:
        return t
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.transformer.attention import _yarn_get_concentration_factor_from_config

    return _apply_rotary_pos_emb_bshd(
        t, freqs, rotary_interleaved=config.rotary_interleaved,
        multi_latent_attention=config.multi_latent_attention,
        mscale=_yarn_get_concentration_factor_from_config(config),
    )


def _rope_angles(model, length: int, device) -> Optional[torch.Tensor]:
    """megatron's RoPE angles [length, dim] of positions 0..length-1 (None without RoPE)."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None or getattr(model, "position_embedding_type", None) != "rope":
        return None
    return rope.get_emb(length)[:, 0, 0].to(device)


class CascadeThoughtJob:
    """Decode a micro-batch of branch rows in the cascade layout (see module docstring).

    ``rows``: global row ids (n * G + g) of the micro-batch, grouped by context; ``row_context``:
    for each row, its index into ``context_lengths`` (the contexts of this micro-batch).  The
    caches are built from the prefill by :meth:`build` (``prefill_of[n]`` = (prefill job, its
    row, t)) and freed by :meth:`release`.
    """

    def __init__(self, model, stage: StageInfo, rows: torch.Tensor, row_context: list[int],
                 context_ids: list[int], context_lengths: list[int], max_thought_len: int,
                 open_id: int, close_id: int, eod_id: Optional[int], temperature: float,
                 seed: int, device: torch.device, vocab_size: Optional[int] = None,
                 cuda_graphs: Optional[bool] = None, stop_sequences=()):
        from megatron_rlp.sampling.thoughts import ThoughtRecorder

        self.recorder = ThoughtRecorder(
            model, stage, rows, max_thought_len, close_id, eod_id, temperature, seed, device,
            vocab_size=vocab_size, stop_sequences=stop_sequences,
        )
        self.model, self.stage, self.device = model, stage, device
        self.config = model.config
        self.context = None  # megatron's inference context is not used
        self.rope_table = None
        self.num_steps = max_thought_len
        self.open_id = open_id
        self.active = True
        self.context_ids = list(context_ids)
        self.layout = CascadeDecodeLayout(job=self)
        self.graphs_enabled = (device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        if self.graphs_enabled and device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.graphs: dict = {}
        self.graph_pool = None
        self.graph_replays = 0
        # Host tables of the current (compacted) batch: original row index, context index.
        self._set_rows(list(range(rows.numel())), list(row_context), list(context_lengths))
        self.cache_bytes = 0
        self.kv_slot_reads = 0
        self.row_steps = 0
        self.pad_start = torch.zeros(0, dtype=torch.int64)  # no padded slots are attended
        self.flag = 1
        self.next_ids: Optional[torch.Tensor] = None
        self.attention_calls = self.mamba_calls = 0
        self.checked = False

    # ------------------------------------------------------------------ row tables

    def _set_rows(self, live: list[int], row_ctx: list[int], ctx_lengths: list[int]) -> None:
        """Row tables for rows ``live`` (original indices) whose contexts are ``row_ctx`` (indices
        into ``ctx_lengths``; each context's rows adjacent)."""
        slots, seen = [], {}
        for c in row_ctx:
            slots.append(seen.get(c, 0))
            seen[c] = slots[-1] + 1
        self.live_h, self.row_ctx_h, self.ctx_len_h = live, row_ctx, ctx_lengths
        self.slots = max(seen.values())
        self.full = all(n == self.slots for n in seen.values()) and row_ctx == sorted(row_ctx)
        dev = self.device
        self.live = torch.tensor(live, dtype=torch.int64, device=dev)
        self.row_ctx = torch.tensor(row_ctx, dtype=torch.int64, device=dev)
        self.row_slot = torch.tensor(slots, dtype=torch.int64, device=dev)
        self.ctx_len = torch.tensor(ctx_lengths, dtype=torch.int64, device=dev)
        self.row_len = self.ctx_len[self.row_ctx]
        self.flat_slot = self.row_ctx * self.slots + self.row_slot  # (context, slot) of each row
        self.batch_size = len(live)
        self.feedback_size = 2 * len(live)  # ids and done flags of the current rows

    # ------------------------------------------------------------------ caches

    def build(self, prefill_of: dict, state_kinds: dict) -> None:
        """Copy the prefill caches of this micro-batch's contexts into its own caches.

        Layouts: flash-attention takes [B, keys, groups, dim] caches; the torch path keeps keys
        transposed, [B, groups, dim, keys], and values [B, groups, keys, dim], so both products
        of a step are plain batched matmuls over the cache as stored (no per-step copy)."""
        c, r, length = len(self.ctx_len_h), self.batch_size, self.num_steps
        width = self.ctx_width = max(self.ctx_len_h)
        rope = _rope_angles(self.model, width + length + 1, self.device)
        rotate_keys = not getattr(self.config, "flash_decode", False)  # else cached rotated
        self.ctx_k, self.ctx_v, self.own_k, self.own_v, self.mamba = {}, {}, {}, {}, {}
        self.flash = None
        for layer, kind in state_kinds.items():
            if kind == "attention":
                job0 = prefill_of[self.context_ids[0]][0]
                k0, _ = job0.context.key_value_memory_dict[layer]
                groups, dim = k0.shape[2], k0.shape[3]
                if self.flash is None:
                    self.flash = _use_flash(k0)
                    self.dtype = k0.dtype
                    self.upcast = k0.dtype != torch.float32  # scores in fp32, as megatron's softmax
                    self.heads = (groups, self.config.num_attention_heads // self.config.num_query_groups, dim)
                key = torch.zeros(c, width, groups, dim, dtype=k0.dtype, device=self.device)
                value = torch.zeros_like(key)
                for i, n in enumerate(self.context_ids):
                    job, row, t = prefill_of[n]
                    src_k, src_v = job.context.key_value_memory_dict[layer]
                    key[i, :t] = src_k[:t, row]
                    value[i, :t] = src_v[:t, row]
                if rope is not None and rotate_keys:  # slot j is position j
                    key = _rotate(key, rope[:width, None, :], self.config)
                if self.flash:
                    self.ctx_k[layer], self.ctx_v[layer] = key, value
                    own = (r, length, groups, dim)
                    self.own_k[layer] = torch.zeros(own, dtype=k0.dtype, device=self.device)
                    self.own_v[layer] = torch.zeros(own, dtype=k0.dtype, device=self.device)
                else:
                    self.ctx_k[layer] = key.permute(0, 2, 3, 1).contiguous()  # [C, groups, dim, T]
                    self.ctx_v[layer] = value.transpose(1, 2).contiguous()  # [C, groups, T, dim]
                    self.own_k[layer] = torch.zeros(r, groups, dim, length, dtype=k0.dtype, device=self.device)
                    self.own_v[layer] = torch.zeros(r, groups, length, dim, dtype=k0.dtype, device=self.device)
            else:
                conv = torch.stack([prefill_of[n][0].snapshots[n][layer][0] for n in self.context_ids])
                ssm = torch.stack([prefill_of[n][0].snapshots[n][layer][1] for n in self.context_ids])
                self.mamba[layer] = (conv[self.row_ctx].contiguous(), ssm[self.row_ctx].contiguous())
        self.rope = rope
        if self.ctx_k:
            self.eye = torch.eye(self.heads[2], dtype=self.dtype, device=self.device)  # RoPE as matrices
            self.scale = self.config.softmax_scale or 1.0 / math.sqrt(self.heads[2])
        self._set_context_bias()
        self.cache_bytes = self.current_cache_bytes()
        self.step_t = torch.zeros((), dtype=torch.int64, device=self.device)
        self.ids_buf = torch.zeros(r, dtype=torch.int64, device=self.device)
        self.hidden_buf = None

    def _set_context_bias(self) -> None:
        """The context part's key-length limit as an additive bias [C, 1, 1, T] (0 / -inf): the
        torch path's form of per-context lengths (flash-attention takes the lengths)."""
        slots = torch.arange(self.ctx_width, device=self.device)
        limit = slots[None, :] < self.ctx_len[:, None]
        bias = torch.zeros(limit.shape, dtype=torch.float32, device=self.device)
        self.ctx_bias = bias.masked_fill(~limit, float("-inf"))[:, None, None, :]

    def current_cache_bytes(self) -> int:
        tensors = [*self.ctx_k.values(), *self.ctx_v.values(), *self.own_k.values(), *self.own_v.values()]
        tensors += [s for pair in self.mamba.values() for s in pair]
        return sum(t.numel() * t.element_size() for t in tensors)

    def release(self) -> None:
        self.ctx_k = self.ctx_v = self.own_k = self.own_v = self.mamba = {}
        self.graphs, self.graph_pool, self.hidden_buf = {}, None, None

    # ------------------------------------------------------------------ the step

    def attend(self, core, query, key, value):
        """Core attention of one decode step: query [1, R, hq, d], key/value [1, R, hk, d]
        (not rotated: RoPE is off for the forward).  Returns [1, R, hq * d].

        Few torch calls per layer (a decode step is launch-bound at 12B on a GPU, and every call
        costs on the CPU too): the per-step RoPE rotation (softmax scale folded in for queries)
        is one batched matmul per tensor, both partial attentions are matmuls over the caches as
        stored, and the merge weights are sigmoid(lse_ctx - lse_own) =
        e^lse_ctx / (e^lse_ctx + e^lse_own)."""
        layer = core.layer_number
        r = self.batch_size
        hk, rep, d = self.heads
        q = torch.matmul(query.reshape(r, hk * rep, d), self.rot_q)  # rotated and scaled
        k = key.reshape(r, hk, d)
        v = value.reshape(r, hk, d)
        if self.rot_k is not None:
            k = torch.matmul(k, self.rot_k)
        self.attention_calls += 1
        if self.flash:
            out = self._attend_flash(layer, q, k, v)
            return out.view(1, r, hk * rep * d)
        own_k, own_v = self.own_k[layer], self.own_v[layer]
        own_k.index_copy_(3, self.at, k.unsqueeze(-1))
        own_v.index_copy_(2, self.at, v.unsqueeze(2))
        # Context part: the rows of a context are one query block [C, groups, slots * rep, d].
        c, slots = len(self.ctx_len_h), self.slots
        qp = q if self.full else q.new_zeros(c * slots, hk * rep, d).index_copy_(0, self.flat_slot, q)
        qc = qp.view(c, slots, hk, rep, d).transpose(1, 2).reshape(c, hk, slots * rep, d)
        scores = torch.matmul(qc, self.ctx_k[layer])  # [C, groups, Q, T]
        if self.upcast:
            scores = scores.float()
        scores += self.ctx_bias
        lse_c = torch.logsumexp(scores, dim=-1)
        probs = scores.sub_(lse_c.unsqueeze(-1)).exp_()
        if self.upcast:
            probs = probs.to(self.dtype)
        out_c = torch.matmul(probs, self.ctx_v[layer])  # [C, groups, Q, d]
        out_c = out_c.view(c, hk, slots, rep, d).transpose(1, 2).reshape(c * slots, hk, rep, d)
        lse_c = lse_c.view(c, hk, slots, rep).transpose(1, 2).reshape(c * slots, hk, rep)
        if not self.full:
            out_c, lse_c = out_c.index_select(0, self.flat_slot), lse_c.index_select(0, self.flat_slot)
        # Own part: the open marker and thought tokens so far.
        w = self.own_width
        scores = torch.matmul(q.view(r, hk, rep, d), own_k[..., :w])  # [R, groups, rep, w]
        if self.upcast:
            scores = scores.float()
        scores += self.own_bias[:w]
        lse_o = torch.logsumexp(scores, dim=-1)
        probs = scores.sub_(lse_o.unsqueeze(-1)).exp_()
        if self.upcast:
            probs = probs.to(self.dtype)
        out_o = torch.matmul(probs, own_v[:, :, :w])  # [R, groups, rep, d]
        weight = torch.sigmoid(lse_c - lse_o).unsqueeze(-1)
        if self.upcast:
            return torch.lerp(out_o.float(), out_c.float(), weight).to(self.dtype).view(1, r, hk * rep * d)
        return torch.lerp(out_o, out_c, weight).view(1, r, hk * rep * d)

    def _attend_flash(self, layer, q, k, v):
        """flash-attention form: both parts with their log-sum-exps (scale already in q)."""
        r = self.batch_size
        hk, rep, d = self.heads
        own_k, own_v = self.own_k[layer], self.own_v[layer]
        own_k.index_copy_(1, self.at, k.unsqueeze(1))
        own_v.index_copy_(1, self.at, v.unsqueeze(1))
        c, slots = len(self.ctx_len_h), self.slots
        qc = q if self.full else q.new_zeros(c * slots, hk * rep, d).index_copy_(0, self.flat_slot, q)
        out_c, lse_c = partial_attention(qc.view(c, slots, hk * rep, d), self.ctx_k[layer],
                                         self.ctx_v[layer], self.ctx_len, 1.0)
        out_c, lse_c = out_c.reshape(c * slots, hk * rep, d), lse_c.transpose(1, 2).reshape(c * slots, hk * rep)
        if not self.full:
            out_c, lse_c = out_c.index_select(0, self.flat_slot), lse_c.index_select(0, self.flat_slot)
        out_o, lse_o = partial_attention(q.unsqueeze(1), own_k, own_v, self.own_limit, 1.0)
        weight = torch.sigmoid(lse_c - lse_o[..., 0]).unsqueeze(-1)
        return torch.lerp(out_o[:, 0].float(), out_c.float(), weight).to(q.dtype)

    def mamba_step(self, mixer, hidden_states):
        conv, ssm = self.mamba[mixer.layer_number]
        self.mamba_calls += 1
        return mixer._decode(hidden_states, conv, ssm)  # updates the row states in place

    def _step(self, model):
        """One forward over static buffers (ids_buf / hidden_buf, step_t) -> hidden [1, R, h]."""
        positions = self.row_len + self.step_t  # open marker at t, thought token u at t + 1 + u
        self.at = self.step_t.view(1)
        if self.ctx_k:
            # RoPE of this step's rows as [R, d, d] matrices: megatron's rotation applied to the
            # identity (rotary fraction, interleaving and mscale included); x @ M rotates x.
            eye = self.eye.expand(self.batch_size, -1, -1)
            rot = eye if self.rope is None else _rotate(eye, self.rope[positions][:, None, :], self.config)
            self.rot_k = None if self.rope is None else rot
            self.rot_q = rot * self.scale
            self.own_limit = torch.arange(self.num_steps, device=self.device) <= self.step_t
            bias = torch.zeros(self.num_steps, dtype=torch.float32, device=self.device)
            self.own_bias = bias.masked_fill(~self.own_limit, float("-inf"))
        ids = self.ids_buf[:, None] if self.stage.is_first else None
        if not self.stage.is_first:
            model.set_input_tensor(self.hidden_buf)
        with rope_off(model):
            return model(ids, positions[:, None], None, packed_seq_params=self.layout)

    def forward(self, model, inp: StepInput, hidden_in: Optional[torch.Tensor]) -> torch.Tensor:
        """The pipeline's forward of this job's current step (run_pipelined calls it)."""
        step = self._step_no
        self.step_t.fill_(step)
        if self.stage.is_first:
            self.ids_buf.copy_(inp.ids[:, 0])
        else:
            if self.hidden_buf is None or self.hidden_buf.shape != hidden_in.shape:
                self.hidden_buf = torch.empty_like(hidden_in)
            self.hidden_buf.copy_(hidden_in)
        key = (self.batch_size, len(self.ctx_len_h))
        graph = self.graphs.get(key)
        if graph is not None:
            graph[0].replay()
            self.graph_replays += 1
            return graph[1].clone()  # the static output is rewritten by the next replay
        # Eager: the own keys up to this step only; a captured graph reads the whole [L] window
        # (same result: later slots are outside the limit).
        self.own_width = self.num_steps if self.graphs_enabled else step + 1
        if self.graphs_enabled:  # the step before a capture runs on a side stream (warm-up)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self._step(model)
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            out = self._step(model)
        if not self.checked:
            self._check_dispatch()
        if self.graphs_enabled and step + 2 < self.num_steps:
            try:
                self._capture(model, key)
            except Exception as err:  # noqa: BLE001 - a layer that cannot be captured: stay eager
                warnings.warn(f"cascade decode: CUDA graph capture failed ({type(err).__name__}: "
                              f"{err}); this micro-batch decodes eagerly")
                self.graphs_enabled = False
        return out

    def _capture(self, model, key) -> None:
        """Capture the step for this batch shape (the eager step just ran on it: warm)."""
        graph = torch.cuda.CUDAGraph()
        if self.graph_pool is None:
            self.graph_pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph, pool=self.graph_pool):
            out = self._step(model)
        self.graphs[key] = (graph, out)

    def _check_dispatch(self) -> None:
        from megatron.core.ssm.mamba_mixer import MambaMixer
        from megatron.core.transformer.attention import Attention

        want_attn = sum(1 for m in self.model.modules() if isinstance(m, Attention))
        want_mamba = sum(1 for m in self.model.modules() if isinstance(m, MambaMixer))
        if self.attention_calls != want_attn or self.mamba_calls != want_mamba:
            raise RuntimeError(
                f"the cascade decode layout reached {self.attention_calls} of {want_attn} core "
                f"attentions and {self.mamba_calls} of {want_mamba} Mamba mixers of this stage: "
                "the layer spec must use megatron_rlp.models.shared_prefix."
                "shared_prefix_core_attention and HybridMambaMixer (use layout='rows')"
            )
        self.checked = True

    # ------------------------------------------------------------------ pipeline protocol

    def step_input(self, step: int) -> StepInput:
        self._step_no = step
        r = self.batch_size
        self.kv_slot_reads += sum(self.ctx_len_h) + r * (step + 1)
        self.row_steps += r
        if step == 0:
            ids = torch.full((r, 1), self.open_id, dtype=torch.int64, device=self.device)
        else:
            ids = self.next_ids[:, None]
        return StepInput(ids, None, None, 1)

    def after_forward(self, step: int) -> None:
        return None

    def on_output(self, step: int, hidden: torch.Tensor) -> torch.Tensor:
        logits = vocab_shard_logits(self.model, hidden[-1])
        tokens = self.recorder.record_live(step, logits, self.live)
        done = self.recorder.done[self.live]
        n_live = int((~done).sum())  # the step's one host sync
        self.flag = n_live
        self._advance(step, tokens, done, n_live)
        if self.stage.pp_size == 1:
            return tokens
        return torch.cat([tokens, done.long()])  # the other stages compact as this one does

    @property
    def feedback_flag(self) -> int:
        return self.flag

    def on_feedback(self, step: int, ids: torch.Tensor, flag) -> None:
        r = self.batch_size
        self._advance(step, ids[:r].clone(), ids[r:].bool(), int(flag))

    def _advance(self, step: int, tokens, done, n_live: int) -> None:
        self.next_ids = tokens
        self.active = n_live > 0
        if self.active and n_live <= self.batch_size // 2 and step + 1 < self.num_steps:
            self._compact(~done)

    def _compact(self, keep: torch.Tensor) -> None:
        """Keep only the running rows (and the contexts they belong to)."""
        keep_rows = keep.nonzero()[:, 0]
        kept = keep_rows.tolist()  # rare: at most log2(R) times per micro-batch
        old_ctx = [self.row_ctx_h[i] for i in kept]
        ctx_keep = sorted(set(old_ctx))
        new_index = {c: i for i, c in enumerate(ctx_keep)}
        ctx_t = torch.tensor(ctx_keep, dtype=torch.int64, device=self.device)
        for layer in list(self.ctx_k):
            self.ctx_k[layer] = self.ctx_k[layer].index_select(0, ctx_t)
            self.ctx_v[layer] = self.ctx_v[layer].index_select(0, ctx_t)
            self.own_k[layer] = self.own_k[layer].index_select(0, keep_rows)
            self.own_v[layer] = self.own_v[layer].index_select(0, keep_rows)
        for layer, (conv, ssm) in list(self.mamba.items()):
            self.mamba[layer] = (conv.index_select(0, keep_rows), ssm.index_select(0, keep_rows))
        self.next_ids = self.next_ids.index_select(0, keep_rows)
        self._set_rows(
            [self.live_h[i] for i in kept], [new_index[c] for c in old_ctx],
            [self.ctx_len_h[c] for c in ctx_keep],
        )
        self._set_context_bias()
        self.ids_buf = torch.zeros(self.batch_size, dtype=torch.int64, device=self.device)
        self.hidden_buf = None
        self.graphs = {}  # graphs of the larger shape hold the old buffers
