"""One RLP iteration (RLP_SPEC.md, Algorithm 1), as the training loop's objective hook.

Before the pipeline schedule (:meth:`RLPObjective.microbatches`):
  1. windows of documents from the stream; k positions t per window with
     --rlp-min-context <= t <= --seq-length − --rlp-thought-len − 2 (or from --rlp-positions-file),
     so that every row (x_<t, <think>, c, </think> | x_t) has at most --seq-length input tokens
     (prefix-match with N tokens: N − 1 fewer, and x_t..x_{t+N−1} inside the window);
  2. the no-think baseline S_ema = log p̄_φ(x_t | x_<t): one EMA-teacher forward per window,
     teacher-forced, every --rlp-baseline-interval batches (monitoring only, see below); with
     --rlp-position-filter entropy every batch, before step 1's draw, scoring every candidate's
     next-token entropy so the k positions come from the top --rlp-entropy-top-frac;
  3. G thoughts per position from the current policy (θ_old = θ) with the KV-cache sampler;
  4. update sequences: by default (--rlp-update-layout shared) one packed row per context, x_<t once
     and its G branches (<think>, c_i, </think>) after it, attended as G paths (x_<t, <think>, c_i,
     </think>) that share the context's keys/values and Mamba state (megatron_rlp.models.shared_prefix);
     with --rlp-update-layout rows one row (x_<t, <think>, c_i, </think>, x_t) per thought.  Either
     way all G branches of a context sit in the same micro-batch, and each micro-batch is padded to
     its own widest row (to the step's under pipeline parallelism: one activation shape).
  5. --rlp-reward prefix-match: the policy's predictions of the next N tokens after each thought
     (:meth:`RLPObjective.sample_predictions`, or an injected prediction source).
Inside the schedule (:meth:`forward_step` / :func:`rlp_loss_func`, last pipeline stage):
  6. one forward gives, through the fused linear log-prob kernel, S_pred = log p_θ(x_t | …, c_i)
     (detached, T = 1) and the log-probs of the sampled thought tokens (with grad) under the
     policy that drew them, softmax(logits / T) (T = 1 with --rlp-untempered-ratio);
  7. rewards r = S_pred − S_ema (info-gain) or 1/0 for a matching prediction (prefix-match,
     megatron_rlp.rlp.rewards), advantages A = G/(G−1)(r − r̄), the clipped surrogate over the
     sampled thought tokens only (a forced close gets no gradient).
After the optimizer step (:meth:`after_optimizer_step`):
  8. EMA: φ ← τφ + (1 − τ)θ.

S_ema is the same for all G thoughts of a context, so it cancels from r − r̄: the advantages are
computed from S_pred alone, which makes the update bitwise independent of the teacher; the
teacher forward only feeds the reported reward (and, under the entropy filter, which positions
are drawn).  With --rlp-updates-per-batch U > 1 one sampled
batch serves U optimizer steps: the first pass fixes log π_θold and the advantages.
"""

from __future__ import annotations

import json
import math
from functools import partial
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rlp import collectives, platform
from megatron_rlp.data.documents import Cursor, DataError, Window
from megatron_rlp.kernels import linear_logprob
from megatron_rlp.rlp.config import (
    RLPConfig, longest_context, policy_inverse_temperature, resolve_markers, resolve_update_layout,
    target_tokens_of, validate_position_filter, validate_rlp_config, validate_rlp_lengths,
)
from megatron_rlp.rlp.ema import EMATeacher
from megatron_rlp.rlp.objective import group_advantages, rlp_loss
from megatron_rlp.rlp.rewards import entropy_filtered_candidates, matched_prefix_length, prefix_match_reward
from megatron_rlp import platform
from megatron_rlp.training.checkpoint import unwrap_model
from megatron_rlp.training.cost_model import IterationCost, PhaseCost, rlp_batch_cost
from megatron_rlp.training.timers import Timers

IGNORE = -100


def output_weight(model) -> torch.Tensor:
    """This rank's vocabulary shard of the output layer (the embedding when tied)."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


# ---------------------------------------------------------------------------------------------
# Positions and sequences
# ---------------------------------------------------------------------------------------------
def position_candidates(length: int, min_context: int, allowed: Optional[list[int]] = None, *, max_context: int,
                        target_tokens: int = 1) -> list[int]:
    """The positions t with min_context <= t <= max_context (the row has room for the thought)
    whose targets x_t..x_{t+target_tokens−1} lie in the ``length``-token window, from ``allowed``
    when given; sorted."""
    last = min(length - target_tokens, max_context)
    return [t for t in (allowed if allowed is not None else range(min_context, last + 1)) if min_context <= t <= last]


def draw_positions(candidates: list[int], k: int, rng: np.random.Generator) -> list[int]:
    """k of the candidates, uniformly (with replacement only when there are fewer than k); sorted.
    No candidates: [] without touching ``rng``."""
    if not candidates:
        return []
    replace = len(candidates) < k
    return sorted(int(t) for t in rng.choice(candidates, size=k, replace=replace))


def sample_positions(
    length: int, k: int, min_context: int, rng: np.random.Generator, allowed: Optional[list[int]] = None,
    *, max_context: int, target_tokens: int = 1,
) -> list[int]:
    """k positions t with min_context <= t <= max_context (the row has room for the thought) and
    t + target_tokens <= length (the targets exist), from ``allowed`` when given; sorted."""
    candidates = position_candidates(length, min_context, allowed, max_context=max_context,
                                     target_tokens=target_tokens)
    return draw_positions(candidates, k, rng)


def build_update_sequences(
    documents: list[torch.Tensor],
    doc_index: torch.Tensor,
    position: torch.Tensor,
    closed_tokens: torch.Tensor,
    closed_lengths: torch.Tensor,
    forced: torch.Tensor,
    open_id: int,
    pad_id: int,
    width: Optional[int] = None,
) -> dict:
    """Right-padded (x_<t, open, c, close, x_t) sequences for N contexts x G thoughts.

    Returns tokens/labels [N*G, S] and index tensors locating, per sequence, the x_t label slot
    and the labels of the thought tokens ([N*G, L+1], -1 where absent).  ``thought_mask`` marks
    sampled thought tokens (the close marker counts unless it was forced).  ``width`` pads every
    micro-batch of a step to one length (pipeline stages exchange fixed-shape activations).
    """
    n, g, lmax = closed_tokens.shape
    # Built on the host, row by row (the caller moves the finished batch to the device).
    doc_index, position, closed_tokens, closed_lengths, forced = (
        x.cpu() for x in (doc_index, position, closed_tokens, closed_lengths, forced))
    rows = []
    for i in range(n):
        doc = documents[int(doc_index[i])]
        t = int(position[i])
        for j in range(g):
            m = int(closed_lengths[i, j])
            seq = torch.cat([doc[:t], torch.tensor([open_id]), closed_tokens[i, j, :m], doc[t : t + 1]])
            rows.append((seq, t, m, bool(forced[i, j])))
    width = max(width or 0, max(len(s) for s, *_ in rows) - 1)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.int64)
    thought_slot = torch.full((len(rows), lmax), -1, dtype=torch.int64)
    thought_mask = torch.zeros((len(rows), lmax), dtype=torch.bool)
    target_slot = torch.zeros(len(rows), dtype=torch.int64)
    context_len = torch.zeros(len(rows), dtype=torch.int64)
    for r, (seq, t, m, was_forced) in enumerate(rows):
        tokens[r, : len(seq) - 1] = seq[:-1]
        labels[r, : len(seq) - 1] = seq[1:]
        # Label index of thought token u (0-based) is t + u: input at t + u is the token before it.
        thought_slot[r, :m] = torch.arange(t, t + m)
        thought_mask[r, :m] = True
        if was_forced:
            thought_mask[r, m - 1] = False
        target_slot[r] = t + m  # predicts x_t after the close marker
        context_len[r] = t
    return {
        "tokens": tokens,
        "labels": labels,
        "position_ids": torch.arange(width).unsqueeze(0).expand(len(rows), width).contiguous(),
        "thought_slot": thought_slot,
        "thought_mask": thought_mask,
        "target_slot": target_slot,
        "context_len": context_len,
    }


def build_shared_sequences(
    documents: list[torch.Tensor],
    doc_index: torch.Tensor,
    position: torch.Tensor,
    closed_tokens: torch.Tensor,
    closed_lengths: torch.Tensor,
    forced: torch.Tensor,
    open_id: int,
    pad_id: int,
    width: Optional[int] = None,
) -> dict:
    """One packed row per context: x_<t once, then its G branches (open, c_i, close), each
    branch's last input labelled x_t (the layout of :mod:`megatron_rlp.models.shared_prefix`).

    Returns tokens/labels/position_ids [N, S] (``width`` pads to at least that many slots), the
    attention ``layout``, and per branch (N*G of them, context-major as in the rows layout)
    ``branch_row`` (its packed row), ``thought_slot``/``thought_mask``/``target_slot`` (slots in
    that row).  ``context_len`` is per packed row.  Labels of the context are those of the rows
    layout (slot t−1 predicts the open marker).
    """
    from megatron_rlp.models.shared_prefix import SharedPrefixLayout

    n, g, lmax = closed_tokens.shape
    lengths = closed_lengths.tolist()
    starts = [int(t) for t in position.tolist()]
    needed = max(t + sum(1 + m for m in row) for t, row in zip(starts, lengths))
    width = max(width or 0, needed)
    tokens = torch.full((n, width), pad_id, dtype=torch.int64)
    labels = torch.full((n, width), IGNORE, dtype=torch.int64)
    thought_slot = torch.full((n * g, lmax), -1, dtype=torch.int64)
    thought_mask = torch.zeros((n * g, lmax), dtype=torch.bool)
    target_slot = torch.zeros(n * g, dtype=torch.int64)
    for i in range(n):
        doc, t = documents[int(doc_index[i])], starts[i]
        tokens[i, :t] = doc[:t]
        labels[i, : t - 1] = doc[1:t]
        labels[i, t - 1] = open_id
        slot = t  # where branch j's open marker sits
        for j, m in enumerate(lengths[i]):
            r = i * g + j
            thought = closed_tokens[i, j, :m]
            tokens[i, slot] = open_id
            tokens[i, slot + 1 : slot + 1 + m] = thought
            labels[i, slot : slot + m] = thought
            labels[i, slot + m] = doc[t]  # after the close marker: x_t
            thought_slot[r, :m] = torch.arange(slot, slot + m)
            thought_mask[r, :m] = True
            if bool(forced[i, j]):
                thought_mask[r, m - 1] = False
            target_slot[r] = slot + m
            slot += 1 + m
    # max_seqlen_*: megatron sizes its rotary table from them (our per-slot table replaces it).
    layout = SharedPrefixLayout(context_lens=starts, branch_lens=[[1 + m for m in row] for row in lengths],
                                max_seqlen_q=width, max_seqlen_kv=width)
    return {
        "tokens": tokens,
        "labels": labels,
        "position_ids": layout.positions(width),
        "layout": layout,
        "branch_row": torch.arange(n).repeat_interleave(g),
        "thought_slot": thought_slot,
        "thought_mask": thought_mask,
        "target_slot": target_slot,
        "context_len": torch.tensor(starts, dtype=torch.int64),
    }


def _branch_rows(batch: dict, num_rows: int) -> torch.Tensor:
    """The row of the model's output each thought's slots index: its packed row in the shared
    layout, its own row in the rows layout."""
    rows = batch.get("branch_row")
    return torch.arange(num_rows) if rows is None else rows


def _gather_slots(hidden_bsh: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, H], rows [N], slots [N, K] (-1 = none, gathers slot 0) -> [N, K, H]."""
    rows, slots = rows.to(hidden_bsh.device), slots.to(hidden_bsh.device)
    return hidden_bsh[rows[:, None], slots.clamp(min=0)]


def _take_slots(labels: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return labels[rows[:, None], slots.clamp(min=0)]


def _real_logprobs(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, tp_group, entropy: bool = False,
                   **kwargs):
    """The fused kernel on the rows whose target is not IGNORE only (log-prob and entropy 0 for the
    others): padded thought slots and non-context slots never reach the output layer, so its work
    is that of the real slots, which is what the cost model counts."""
    keep = (targets != IGNORE).nonzero().squeeze(1)
    out = linear_logprob(rows.index_select(0, keep), weight, targets.index_select(0, keep), tp_group,
                         entropy=entropy, **kwargs)
    full = [o.new_zeros(targets.shape).index_put((keep,), o) for o in (out if entropy else (out,))]
    return tuple(full) if entropy else full[0]


def _gather_rows(hidden_bsh: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, H], slots [B, K] (-1 = none, gathers slot 0) -> [B, K, H]."""
    idx = slots.clamp(min=0).unsqueeze(-1).expand(-1, -1, hidden_bsh.shape[-1])
    return torch.gather(hidden_bsh, 1, idx)


def _final_hidden(output_tensor: torch.Tensor, model) -> tuple[torch.Tensor, bool]:
    """The last stage's final hidden states as [B, S, H] over the whole sequence, and whether the
    log-prob kernel must all-reduce its hidden gradient over TP.

    Under sequence parallelism each TP rank holds [S/TP, B, H]: gather the sequence (as megatron's
    output layer does).  The gather's backward is a reduce-scatter, which already sums the
    kernel's partial hidden gradients (one per vocabulary shard) over TP — so the kernel must not
    all-reduce them as well, or they would count TP times.
    """
    if model.config.sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        full = gather_from_sequence_parallel_region(output_tensor, tensor_parallel_output_grad=True)
        return full.transpose(0, 1), False
    return output_tensor.transpose(0, 1), True


def _sequence_multiple(model) -> int:
    """Update and scoring rows are padded to a multiple of this: the TP size under sequence
    parallelism (each rank takes an equal slice of the sequence), else 1."""
    if model.config.sequence_parallel:
        return parallel_state.get_tensor_model_parallel_world_size()
    return 1


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------------------------
# The loss on the last pipeline stage
# ---------------------------------------------------------------------------------------------
def _score_at_policy_temperature(rows: torch.Tensor, config: RLPConfig) -> torch.Tensor:
    """Thought rows [B, L+1, H] and the x_t row [B, 1, H] (last) -> the hidden states whose log-probs
    are those of the right distribution: the thought tokens' under softmax(logits / T), the policy
    that sampled them (log π_θ of ρ, its gradient, the entropy); x_t's (S_pred) at T = 1.

    logits / T = (h / T)·W, so the fused kernel needs no temperature; autograd carries the 1/T
    into the hidden gradient, and the weight gradient is taken against h / T as it should be.
    """
    inverse_t = policy_inverse_temperature(config)
    if inverse_t == 1.0:
        return rows
    # Scale in fp32: a bf16 1/T (1/0.7 -> 1.4297) would be a systematic error in T; rounding the
    # scaled product instead is a per-element error that averages out in h·W.
    scale = torch.full((rows.shape[1], 1), inverse_t, dtype=torch.float32, device=rows.device)
    scale[-1] = 1.0
    return (rows.float() * scale).to(rows.dtype)


def rlp_loss_func(batch: dict, model, config: RLPConfig, output_tensor: torch.Tensor,
                  vocab_size: Optional[int] = None):
    """Rewards, advantages and the clipped surrogate of one micro-batch (G branches per context).

    ``output_tensor`` is the model's final hidden states [S, B, H] (the model returns them
    instead of logits in RLP mode, so log-probs come from the fused kernel; [S/TP, B, H] under
    sequence parallelism, gathered here).  ``vocab_size``: the tokenizer's vocabulary — the
    policy is the softmax over real ids, the one thoughts are drawn from, so megatron's padded
    output rows get neither probability nor gradient.
    """
    g = config.rlp_num_thoughts
    hidden, reduce_grad = _final_hidden(output_tensor, model)  # [B, S, H]
    weight = output_weight(model)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    branch_row = _branch_rows(batch, hidden.shape[0])  # shared layout: G thoughts per packed row
    b = branch_row.numel()  # thoughts in this micro-batch

    # One kernel call: the thought tokens (with grad) and the x_t slot after the thought.
    slots = torch.cat([batch["thought_slot"], batch["target_slot"][:, None]], dim=1)  # [B, L+2]
    valid = torch.cat([batch["thought_slot"] >= 0, torch.ones(b, 1, dtype=torch.bool, device=hidden.device)], dim=1)
    targets = torch.where(valid, _take_slots(batch["labels"], branch_row, slots), torch.full_like(slots, IGNORE))
    rows = _score_at_policy_temperature(_gather_slots(hidden, branch_row, slots), config).reshape(-1, hidden.shape[-1])
    logp, entropy = _real_logprobs(rows, weight, targets.reshape(-1), tp_group, entropy=True,
                                   vocab_size=vocab_size, reduce_hidden_grad=reduce_grad)
    logp = logp.view(b, -1)
    entropy = entropy.view(b, -1)
    logp_thought, s_pred = logp[:, :-1], logp[:, -1].detach()
    if "s_pred_scored" in batch:  # the straightforward baseline: S_pred from its own scoring pass
        s_pred = batch["s_pred_scored"]

    mask = batch["thought_mask"]
    n_ctx = b // g
    match_rewards = None
    if config.rlp_reward == "prefix-match":
        predicted = batch["predicted"].view(n_ctx, g, -1)
        match_rewards = prefix_match_reward(predicted, batch["continuation"])
    if "advantages" not in batch:  # first pass over this sample batch fixes θ_old and A
        # info-gain: S_ema is the same for the G thoughts of a context and cancels from r − r̄.
        rewards = match_rewards if match_rewards is not None else s_pred.view(n_ctx, g).float()
        batch["advantages"] = group_advantages(rewards).reshape(b)
        batch["logp_old"] = logp_thought.detach()
        batch["s_pred"] = s_pred
    advantages = batch["advantages"]

    ntp_kwargs = {}
    if config.rlp_ntp_weight > 0:
        ctx_slots = torch.arange(batch["labels"].shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        ctx_mask = ctx_slots < batch["context_len"][:, None]
        ctx_targets = torch.where(ctx_mask, batch["labels"], torch.full_like(batch["labels"], IGNORE))
        ctx_logp = _real_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, ctx_targets.reshape(-1), tp_group,
                                  vocab_size=vocab_size, reduce_hidden_grad=reduce_grad)
        # Per thought, as the rows layout counts it (a shared context counts once per thought).
        ctx_logp = ctx_logp.view(hidden.shape[0], -1)[branch_row.to(ctx_logp.device)]
        ntp_kwargs = dict(ntp_weight=config.rlp_ntp_weight, ntp_logp=ctx_logp, ntp_mask=ctx_mask[branch_row])
    if config.rlp_kl_beta > 0:
        ntp_kwargs.update(kl_weight=config.rlp_kl_beta, logp_ref=batch["logp_ref"])

    loss, stats = rlp_loss(
        logp_thought, batch["logp_old"], advantages, mask, config.rlp_clip_low, config.rlp_clip_high,
        **ntp_kwargs,
    )

    maskf = mask.float()
    n_tok = maskf.sum()
    ones = loss.new_tensor(float(b))  # report values live on the loss's device (NCCL all-reduce)
    report = {
        "rlp loss": torch.stack([loss.detach() * b, ones]),
        "rlp/clip_frac": torch.stack([stats["clip_frac"] * n_tok, n_tok]),
        "rlp/ratio_mean": torch.stack([stats["ratio_mean"] * n_tok, n_tok]),
        "rlp/policy_entropy": torch.stack([(entropy[:, :-1].detach() * maskf).sum(), n_tok]),
        "rlp/thought_len_mean": torch.stack([batch["closed_len"].float().sum(), ones]),
        "rlp/forced_close_frac": torch.stack([batch["forced"].float().sum(), ones]),
        "rlp/advantage_std": torch.stack([advantages.float().view(n_ctx, g).std(dim=1, unbiased=False).sum(), loss.new_tensor(float(n_ctx))]),
        "rlp/s_pred": torch.stack([s_pred.float().sum(), ones]),
        "rlp/sample_logprob_drift": torch.stack([((logp_thought.detach() - batch["logp_sample"]).abs() * maskf).sum(), n_tok]),
    }
    if "ntp" in stats:
        report["rlp/ntp"] = torch.stack([stats["ntp"] * b, ones])
    if "kl" in stats:
        report["rlp/kl"] = torch.stack([stats["kl"] * b, ones])
    if match_rewards is not None:  # needs no teacher
        report["rlp/reward_mean"] = torch.stack([match_rewards.sum(), ones])
        matched = matched_prefix_length(predicted, batch["continuation"]).float()
        report["rlp/matched_prefix_len"] = torch.stack([matched.sum(), ones])
        batch["rewards"] = match_rewards.reshape(b)
    if "s_ema" in batch:  # the teacher ran on this batch
        if match_rewards is None:
            reward = s_pred.float().view(n_ctx, g) - batch["s_ema"].view(n_ctx, 1)
            report["rlp/reward_mean"] = torch.stack([reward.sum(), ones])
            batch["rewards"] = reward.reshape(b)
        # info_gain: the gain of the thought-averaged predictor, log mean_i p(x_t | c_i) − S_ema.
        mixture = torch.logsumexp(s_pred.float().view(n_ctx, g), dim=1) - math.log(g)
        report["rlp/info_gain"] = torch.stack([(mixture - batch["s_ema"]).sum(), loss.new_tensor(float(n_ctx))])
        report["rlp/s_ema"] = torch.stack([batch["s_ema"].sum(), loss.new_tensor(float(n_ctx))])
    return loss, report


# ---------------------------------------------------------------------------------------------
# The objective hook
# ---------------------------------------------------------------------------------------------
ThoughtSource = Callable[..., "object"]  # same signature as megatron_rlp.sampling.sample_thoughts
# (documents, doc_index [n], position [n], closed_tokens [n, G, L+1], closed_lengths [n, G],
#  num_tokens N, temperature, seed) -> [n, G, N] predicted tokens (read on the last pipeline stage):
# the default is RLPObjective.sample_predictions.
PredictionSource = Callable[..., Optional[torch.Tensor]]


def straightforward_thought_source(model, documents, positions, micro_batch_size=None, **kwargs):
    """The straightforward baseline's sampler: each thought re-prefilled on its own
    (:func:`megatron_rlp.sampling.sample_thoughts_naive`, one context at a time; no micro-batches)."""
    from megatron_rlp.sampling import sample_thoughts_naive

    return sample_thoughts_naive(model, documents, positions, **kwargs)


class RLPObjective:
    """``straightforward=True`` runs the benchmark's baseline (tools/bench_rlp.py) instead of the
    project's iteration: thoughts from :func:`straightforward_thought_source` (unless a
    ``thought_source`` is given), S_pred from a separate no-grad forward over the update rows (the
    rewards and advantages come from it), then the one-row-per-thought update (needs
    ``rlp_update_layout='rows'``).  Same loss, rewards and gradients as the rows layout."""

    name = "rlp"

    def __init__(self, config: RLPConfig, state, tokenizer, stream, thought_source: Optional[ThoughtSource] = None,
                 prediction_source: Optional[PredictionSource] = None, straightforward: bool = False):
        validate_rlp_config(config)
        # --seq-length is the budget of every row: context + open + thought + close inputs
        # (+ N − 1 continuation tokens for prefix-match, whose x_t..x_{t+N−1} must be in the window).
        self.max_sequence_length = state.run.training.seq_length
        self.target_tokens = target_tokens_of(config)
        validate_rlp_lengths(self.max_sequence_length, state.preset.max_position_embeddings,
                             config.rlp_thought_len, config.rlp_min_context, target_tokens=self.target_tokens)
        self.max_context = longest_context(self.max_sequence_length, config.rlp_thought_len, self.target_tokens)
        validate_position_filter(config, self.max_context)
        self.update_layout = resolve_update_layout(config.rlp_update_layout, state.preset.family)
        self.straightforward = straightforward
        if straightforward and config.rlp_reward != "info-gain":
            raise ValueError("the straightforward baseline scores S_pred for the information-gain reward; "
                             "run it with --rlp-reward info-gain")
        if straightforward and self.update_layout != "rows":
            raise ValueError("the straightforward baseline updates one row per thought: set rlp_update_layout='rows' "
                             "(--rlp-update-layout rows)")
        self.config = config
        self.state = state
        self.stream = stream
        self.open_id, self.close_id = resolve_markers(config, tokenizer)
        self.eod_id = tokenizer.eod
        # The policy is the softmax over the tokenizer's ids: megatron's padding of the output
        # layer is never sampled, and the update gives it neither probability nor gradient.
        self.vocab_size = tokenizer.vocab_size
        self.pad_id = tokenizer.eod
        self.micro_batch_size = state.run.training.micro_batch_size
        self.seed = state.run.training.seed
        self.teacher = EMATeacher()
        self.reference: Optional[EMATeacher] = None  # frozen θ_0 for the optional KL term
        self._load_batch = False  # the checkpoint being loaded holds this rank's batch in progress
        self.allowed_positions = _read_positions_file(config.rlp_positions_file)
        if self.allowed_positions is not None and len(self.allowed_positions) < stream.num_documents:
            raise ValueError(
                f"--rlp-positions-file {config.rlp_positions_file!r} lists {len(self.allowed_positions)} "
                f"documents, fewer than the {stream.num_documents} of --data-path; give one list per document"
            )
        if thought_source is None and straightforward:
            thought_source = straightforward_thought_source
        elif thought_source is None:
            from megatron_rlp.sampling import sample_thoughts

            thought_source = sample_thoughts
        self.thought_source = thought_source
        self.prediction_source = prediction_source or self.sample_predictions
        self.sample_batches = 0
        self._cached: list[dict] = []
        self._teacher_windows: Optional[list[int]] = None  # this iteration's sampling, for iteration_cost()
        self._teacher_rows: list[int] = []  # x_t rows the teacher scored per window (iteration_cost())
        self._prefill_lens: list[int] = []  # tokens of each document's sampler prefill (its largest t)
        self.timers = Timers()  # the loop's phase timers replace this inactive one
        for chunk in self.models:
            chunk.return_hidden = True

    @property
    def models(self) -> list:
        return [unwrap_model(c) for c in self.state.model]

    # -- 1. windows and positions ----------------------------------------------------------------
    def _next_contexts(self, count: int) -> tuple[list[Window], list[list[int]]]:
        """The next ``count`` windows that have a position, and k positions in each (window
        coordinates), drawn uniformly among the window's candidates (no position filter)."""
        windows, candidates, rng = self._next_candidates(count)
        return windows, [draw_positions(c, self.config.rlp_positions_per_doc, rng) for c in candidates]

    def _next_candidates(self, count: int) -> tuple[list[Window], list[list[int]], np.random.Generator]:
        """The next ``count`` windows that have a candidate position, their candidates (window
        coordinates), and the generator the positions are drawn with.  A window holds a context of
        at most ``max_context`` tokens and its N targets; consecutive windows of a document overlap
        by --rlp-min-context + N − 1 tokens, so every position >= --rlp-min-context of a long
        document is a candidate in exactly one window (N = 1 but for prefix-match)."""
        cursor = self.stream.cursor
        # Keyed by where the stream stands (the offset only mid-document, which keeps the draws
        # of whole documents as they were), so a resumed run draws the same positions.
        key = [self.seed, cursor.epoch, cursor.order_index] + ([cursor.token_offset] if cursor.token_offset else [])
        rng = np.random.default_rng(key + [7])
        windows, candidates = [], []
        dry_since_epoch = None
        n = self.target_tokens
        while len(windows) < count:
            (window,) = self.stream.next_windows(1, self.max_context + n, overlap=self.config.rlp_min_context + n - 1)
            allowed = None
            if self.allowed_positions is not None:  # document coordinates -> window coordinates
                allowed = [p - window.offset for p in self.allowed_positions[window.document]]
            cands = position_candidates(len(window.tokens), self.config.rlp_min_context, allowed,
                                        max_context=self.max_context, target_tokens=n)
            if cands:
                windows.append(window)
                candidates.append(cands)
                dry_since_epoch = None
            elif dry_since_epoch is None:
                dry_since_epoch = self.stream.cursor.epoch
            elif self.stream.cursor.epoch > dry_since_epoch + 1:  # a whole epoch without a position
                raise DataError(
                    f"{self.stream.name}: no document has a position t >= --rlp-min-context "
                    f"{self.config.rlp_min_context}"
                    + (f" listed in --rlp-positions-file {self.config.rlp_positions_file!r}"
                       if self.allowed_positions is not None else "")
                )
        return windows, candidates, rng

    def _choose_contexts(self, count: int) -> tuple[list[Window], list[list[int]], Optional[torch.Tensor]]:
        """This rank's next ``count`` windows, their k positions and, when the teacher ran (every
        --rlp-baseline-interval batches, every batch under the entropy filter), S_ema at those
        positions (on the last pipeline stage; empty on the others).

        With --rlp-position-filter entropy the teacher scores every candidate first and the k
        positions are drawn among the top --rlp-entropy-top-frac by its entropy: a function of
        the stream's cursor, the seed and the teacher, all of which a checkpoint restores."""
        c = self.config
        # Every DP rank reads its own documents: skip the other ranks' share of the stream.
        dp_rank = parallel_state.get_data_parallel_rank()
        shares = [self._next_candidates(count) for _ in range(parallel_state.get_data_parallel_world_size())]
        windows, candidates, rng = shares[dp_rank]
        docs = [torch.from_numpy(w.tokens) for w in windows]
        k = c.rlp_positions_per_doc
        self._teacher_rows = []
        if c.rlp_position_filter == "entropy":
            with self.timers("rlp-teacher"):
                logp, entropy = self._score_documents(docs, candidates, with_entropy=True)
            self._teacher_rows = [len(x) for x in candidates]
            positions, chosen = [], []
            start = 0
            for cands in candidates:
                ent = entropy[start : start + len(cands)].tolist()
                pos = draw_positions(entropy_filtered_candidates(cands, ent, c.rlp_entropy_top_frac, k), k, rng)
                positions.append(pos)
                chosen += [start + cands.index(t) for t in pos]
                start += len(cands)
            s_ema = logp[torch.tensor(chosen, dtype=torch.int64, device=logp.device)] if logp.numel() else logp
            return windows, positions, s_ema
        positions = [draw_positions(x, k, rng) for x in candidates]
        if (self.sample_batches % c.rlp_baseline_interval) != 0:
            return windows, positions, None
        with self.timers("rlp-teacher"):
            s_ema, _ = self._score_documents(docs, positions)
        self._teacher_rows = [len(p) for p in positions]
        return windows, positions, s_ema

    # -- 2. the no-think baseline ---------------------------------------------------------------
    def _score_documents(self, docs: list[torch.Tensor], positions: list[list[int]],
                         with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """log p̄_φ(x_t | x_<t) at every position (window by window, flat), from one
        teacher-forced forward per window: on the last pipeline stage, empty on the others.  With
        ``with_entropy`` also the teacher's next-token entropy there, on every stage (broadcast
        from the last: the position choice it feeds must be the same on all of them)."""
        width = _round_up(max(len(d) for d in docs) - 1, _sequence_multiple(self.models[0]))
        most = max(len(p) for p in positions)
        batches = []
        for start in range(0, len(docs), self.micro_batch_size):
            chunk = list(range(start, min(start + self.micro_batch_size, len(docs))))
            tokens = torch.full((len(chunk), width), self.pad_id, dtype=torch.int64)
            slots = torch.zeros((len(chunk), most), dtype=torch.int64)
            targets = torch.full((len(chunk), most), IGNORE, dtype=torch.int64)
            for r, i in enumerate(chunk):
                tokens[r, : len(docs[i]) - 1] = docs[i][:-1]
                n = len(positions[i])
                slots[r, :n] = torch.tensor(positions[i]) - 1
                targets[r, :n] = docs[i][torch.tensor(positions[i])]
            batches.append(platform.to_device({
                "tokens": tokens, "position_ids": torch.arange(width).expand(len(chunk), -1),
                "slots": slots, "targets": targets}))
        with self.teacher.swap_into(self.models), torch.no_grad():
            outputs = self._forward_only(batches, partial(_score_slots_loss, vocab_size=self.vocab_size,
                                                          entropy=with_entropy))
        counts = [len(p) for p in positions]
        entropy = torch.zeros(sum(counts), dtype=torch.float32, device=platform.device()) if with_entropy else None
        logp = torch.zeros(0)
        if parallel_state.is_pipeline_last_stage():
            def valid(key):
                rows = torch.cat([o[key] for o in outputs])  # [windows, most]
                return torch.cat([row[:n] for row, n in zip(rows, counts)])
            logp = valid("logp")
            if with_entropy:
                entropy = valid("entropy").float().to(entropy.device)
        if with_entropy and parallel_state.get_pipeline_model_parallel_world_size() > 1:
            collectives.broadcast(entropy, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                  group=parallel_state.get_pipeline_model_parallel_group())
        return logp, (entropy.cpu() if with_entropy else None)

    def _forward_only(self, batches: list[dict], loss_fn) -> list[dict]:
        def step(data_iterator, model):
            batch = next(data_iterator)
            return _run_model(model, batch), partial(loss_fn, batch, unwrap_model(model))

        was_training = [m.training for m in self.state.model]
        for m in self.state.model:
            m.eval()
        try:
            return get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter(batches), model=self.state.model,
                num_microbatches=len(batches), seq_length=batches[0]["tokens"].shape[1],
                micro_batch_size=batches[0]["tokens"].shape[0], forward_only=True,
            )
        finally:
            for m, mode in zip(self.state.model, was_training):
                m.train(mode)

    # -- the hook the loop calls before the schedule --------------------------------------------
    def microbatches(self, iteration: int, num_microbatches: int, model_chunks) -> list[dict]:
        if self.teacher.maybe_initialize(self.models) and self.config.rlp_kl_beta > 0:
            self.reference = EMATeacher()
            self.reference.maybe_initialize(self.models)
        self._teacher_windows = None  # stays None when this iteration reuses its sample batch
        if iteration % self.config.rlp_updates_per_batch and self._cached:
            return self._cached  # same θ_old, advantages fixed on the first pass
        self._cached = self._sample_batch(num_microbatches)
        self.sample_batches += 1
        return self._cached

    def _sample_batch(self, num_microbatches: int) -> list[dict]:
        c = self.config
        g = c.rlp_num_thoughts
        n_docs = num_microbatches * self.micro_batch_size
        dp_rank = parallel_state.get_data_parallel_rank()
        self.state.sync_parameters()  # θ_old must be the gathered θ (a no-op after the EMA's sync)
        windows, positions, s_ema = self._choose_contexts(n_docs)
        docs = [torch.from_numpy(w.tokens) for w in windows]

        with self.timers("rlp-sampling"):
            thoughts = self.thought_source(
                self.models[0], docs, positions, num_thoughts=g, max_thought_len=c.rlp_thought_len,
                open_id=self.open_id, close_id=self.close_id, eod_id=self.eod_id,
                temperature=c.rlp_temperature, seed=_sample_seed(self.seed, self.sample_batches, dp_rank),
                max_sequence_length=self.max_sequence_length,
                micro_batch_size=c.rlp_sampler_micro_batch_size, vocab_size=self.vocab_size,
            )
        self.timers.add("rlp-sampling-prefill", thoughts.stats.get("prefill_s"))
        self.timers.add("rlp-sampling-decode", thoughts.stats.get("decode_s"))
        closed, closed_len = thoughts.closed_tokens(self.pad_id)
        self._teacher_windows = [len(d) - 1 for d in docs] if s_ema is not None else []
        self._prefill_lens = [max(p) for p in positions]
        shared = self.update_layout == "shared"
        # Inputs of a row: rows layout x_<t, open, thought + close (x_t is the last label);
        # shared layout x_<t and every branch (open, thought + close).
        if shared:
            row_len = thoughts.position + (closed_len + 1).sum(dim=1)
        else:
            row_len = thoughts.position + closed_len.max(dim=1).values + 1
        multiple = _sequence_multiple(self.models[0])
        # Each micro-batch is padded to its own widest row, except under pipeline parallelism:
        # the stages exchange activations of one shape for the whole schedule.
        one_shape = parallel_state.get_pipeline_model_parallel_world_size() > 1
        build = build_shared_sequences if shared else build_update_sequences
        per_mb = self.micro_batch_size * c.rlp_positions_per_doc  # contexts per micro-batch
        # The sampler's record of the policy the update scores (rlp/sample_logprob_drift).
        recorded_lp = thoughts.logprobs if c.rlp_untempered_ratio else thoughts.tempered_logprobs
        microbatches = []
        for m in range(num_microbatches):
            ctx = slice(m * per_mb, (m + 1) * per_mb)
            width = _round_up(int((row_len if one_shape else row_len[ctx]).max()), multiple)
            mb = build(
                docs, thoughts.doc_index[ctx], thoughts.position[ctx], closed[ctx], closed_len[ctx],
                thoughts.forced[ctx], self.open_id, self.pad_id, width,
            )
            mb["closed_len"] = closed_len[ctx].reshape(-1)
            mb["context_positions"] = thoughts.position[ctx].clone()  # t per context (FLOP count)
            mb["forced"] = thoughts.forced[ctx].reshape(-1)
            sample_lp = torch.zeros_like(mb["thought_mask"], dtype=torch.float32)
            sample_lp[:, : recorded_lp.shape[-1]] = recorded_lp[ctx].reshape(-1, recorded_lp.shape[-1])
            mb["logp_sample"] = sample_lp
            if s_ema is not None and s_ema.numel():
                mb["s_ema"] = s_ema[ctx].float()
            mb = platform.to_device(mb)
            microbatches.append(mb)
        if c.rlp_reward == "prefix-match":
            n = self.target_tokens
            continuation = torch.stack([docs[int(b)][int(t) : int(t) + n]
                                        for b, t in zip(thoughts.doc_index.tolist(), thoughts.position.tolist())])
            with self.timers("rlp-prediction"):
                predicted = self.prediction_source(
                    docs, thoughts.doc_index, thoughts.position, closed, closed_len, num_tokens=n,
                    temperature=c.rlp_temperature, seed=_sample_seed(self.seed + 2, self.sample_batches, dp_rank))
            for m, mb in enumerate(microbatches):
                ctx = slice(m * per_mb, (m + 1) * per_mb)
                extra = {"continuation": continuation[ctx].clone()}
                if predicted is not None:  # the last pipeline stage (or an injected source)
                    extra["predicted"] = predicted[ctx].reshape(-1, n).clone()
                mb.update(platform.to_device(extra))
        if self.straightforward:
            with self.timers("rlp-scoring"):
                self._score_predictions(microbatches)
        if self.reference is not None:
            self._score_reference(microbatches)
        return microbatches

    # -- prefix-match: the policy's prediction after each thought --------------------------------
    def sample_predictions(self, documents: list[torch.Tensor], doc_index: torch.Tensor, position: torch.Tensor,
                           closed_tokens: torch.Tensor, closed_lengths: torch.Tensor, num_tokens: int,
                           temperature: float, seed: int) -> Optional[torch.Tensor]:
        """The tokens the current policy (θ_old, the model that sampled the thoughts) predicts
        after each thought: [n, G, N] on the last pipeline stage, None on the others.

        One forward-only pass over the rows (x_<t, open, c_i, close, x_t..x_{t+N−2}) in the
        update's layout; the tokens are drawn at the N slots after the close marker at
        ``temperature`` with the sampler's vocabulary-parallel Gumbel-max
        (:func:`megatron_rlp.sampling.sample_vocab_parallel`, noise keyed by (seed, j, branch)).
        Prediction j is drawn given the text's x_t..x_{t+j−1}, not the policy's own earlier
        predictions: up to the first mismatch the two are the same tokens (same noise, same
        prefix), and after it the reward is 0 either way, so the reward is exactly that of
        autoregressive decoding — at the cost of one prefill and no decode steps.
        """
        c = self.config
        g, n = c.rlp_num_thoughts, num_tokens
        # Rows are built on the host (the sampler's tensors may be on the GPU: one copy, not one
        # synchronizing read per thought).
        doc_index, position, closed_tokens, closed_lengths = (
            x.cpu() for x in (doc_index, position, closed_tokens, closed_lengths))
        contexts, _, width_l = closed_tokens.shape
        fed = torch.full((contexts, g, width_l + n - 1), self.pad_id, dtype=torch.int64)
        fed[..., :width_l] = closed_tokens
        fed_len = closed_lengths + (n - 1)
        for i in range(contexts):
            doc, t = documents[int(doc_index[i])], int(position[i])
            for j in range(g):
                m = int(closed_lengths[i, j])
                fed[i, j, m : m + n - 1] = doc[t : t + n - 1]
        shared = self.update_layout == "shared"
        build = build_shared_sequences if shared else build_update_sequences
        row_len = position + ((fed_len + 1).sum(dim=1) if shared else fed_len.max(dim=1).values + 1)
        multiple = _sequence_multiple(self.models[0])
        one_shape = parallel_state.get_pipeline_model_parallel_world_size() > 1
        per_mb = self.micro_batch_size * c.rlp_positions_per_doc
        no_force = torch.zeros(contexts, g, dtype=torch.bool)
        batches = []
        for start in range(0, contexts, per_mb):
            ctx = slice(start, min(start + per_mb, contexts))
            width = _round_up(int((row_len if one_shape else row_len[ctx]).max()), multiple)
            mb = build(documents, doc_index[ctx], position[ctx], fed[ctx], fed_len[ctx], no_force[ctx],
                       self.open_id, self.pad_id, width)
            # The last fed slot predicts x_{t+N−1}; the N slots from the close marker on predict x_t...
            slots = mb["target_slot"][:, None] - (n - 1) + torch.arange(n)
            batch = {k: mb[k] for k in ("tokens", "position_ids", "layout", "branch_row") if k in mb}
            batch["predict_slots"] = slots
            batch["branch_key"] = torch.arange(start * g, ctx.stop * g)  # global branch ids: the noise rows
            batches.append(platform.to_device(batch))
        outputs = self._forward_only(batches, partial(
            _predict_loss, num_tokens=n, temperature=temperature, seed=seed, vocab_size=self.vocab_size))
        if not parallel_state.is_pipeline_last_stage():
            return None
        return torch.cat([o["predicted"] for o in outputs]).view(contexts, g, n).cpu()

    def _score_predictions(self, microbatches: list[dict]) -> None:
        """The straightforward baseline's scoring pass: S_pred of every thought from a no-grad
        forward over the update rows (rlp_loss_func takes it instead of the update's own)."""
        with torch.no_grad():
            outputs = self._forward_only(microbatches, partial(_score_target_loss, vocab_size=self.vocab_size))
        if parallel_state.is_pipeline_last_stage():
            for mb, out in zip(microbatches, outputs):
                mb["s_pred_scored"] = out["logp"]

    def _score_reference(self, microbatches: list[dict]) -> None:
        """log π_ref of the thought tokens (frozen initial model), for the optional KL term."""
        with self.reference.swap_into(self.models), torch.no_grad():
            outputs = self._forward_only(microbatches, partial(
                _score_thoughts_loss, vocab_size=self.vocab_size,
                inverse_temperature=policy_inverse_temperature(self.config)))
        if parallel_state.is_pipeline_last_stage():
            for mb, out in zip(microbatches, outputs):
                mb["logp_ref"] = out["logp"]

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        output = _run_model(model, batch)
        return output, partial(rlp_loss_func, batch, unwrap_model(model), self.config,
                               vocab_size=self.vocab_size)

    # -- the hook the loop calls after the optimizer step ---------------------------------------
    def after_optimizer_step(self, model_chunks, iteration: int) -> dict:
        with self.timers("rlp-ema"):
            self.state.sync_parameters()  # --overlap-param-gather: the step left θ partly stale
            self.teacher.update(self.models, self.config.rlp_ema_decay)
            gap = self.teacher.gap(
                self.models, group=parallel_state.get_model_parallel_group(),
                include_replicated=parallel_state.get_tensor_model_parallel_rank() == 0,
            )
        return {"rlp/ema_gap": gap}

    # -- FLOPs of the iteration (the log line's TFLOP/s) ------------------------------------------
    @property
    def cost_variant(self) -> str:
        """The iteration's variant in cost_model.VARIANTS terms."""
        if self.straightforward:
            return "straightforward"
        return "shared_prefix" if self.update_layout == "shared" else "rows"

    def iteration_cost(self, preset, global_batch_size: int, recompute: str = "none") -> IterationCost:
        """The cost model's FLOPs of the iteration just run, whole job: this rank's actual batch
        (each context at its t, each thought at its own length, no padding; teacher and sampling
        only when they ran) summed over the data-parallel ranks.  The optimizer and EMA phases
        are per model, not per rank."""
        context_lens = torch.cat([mb["context_positions"] for mb in self._cached])
        # A thought's length before its close marker (closed_len counts the close).
        thought_lens = torch.cat([mb["closed_len"] for mb in self._cached]) - 1
        sampled = self._teacher_windows is not None
        cost = rlp_batch_cost(
            preset, context_lens.tolist(), thought_lens.view(len(context_lens), -1).tolist(), self.cost_variant,
            recompute, teacher_windows=self._teacher_windows or [],
            positions_per_doc=self.config.rlp_positions_per_doc, sampled=sampled,
            teacher_rows=self._teacher_rows if self._teacher_windows else None,
            prediction_tokens=self.target_tokens if self.config.rlp_reward == "prefix-match" else 0,
            prefill_lens=self._prefill_lens if sampled else None, ntp=self.config.rlp_ntp_weight > 0,
            kl_reference=self.reference is not None,
        )
        per_rank = [k for k in cost.phases if k not in ("optimizer", "ema")]
        if parallel_state.get_data_parallel_world_size() > 1:
            values = torch.tensor([[cost.phases[k].model_flops, cost.phases[k].hardware_flops, cost.phases[k].tokens]
                                   for k in per_rank], dtype=torch.float64, device=platform.device())
            collectives.all_reduce(values, group=parallel_state.get_data_parallel_group())
            for k, (model_flops, hardware_flops, tokens) in zip(per_rank, values.tolist()):
                cost.phases[k] = PhaseCost(model_flops, hardware_flops, tokens)
        return cost

    # -- evaluation while training (--eval-interval) -------------------------------------------
    def prepare_evaluation(self, validation) -> None:
        """The held-out documents.  Their allowed positions: --rlp-positions-file under --split
        (the validation documents are documents of --data-path, indexed as there),
        --rlp-valid-positions-file with --valid-data-path, else every position >= --rlp-min-context."""
        c = self.config
        if validation.dataset is self.stream.dataset:
            flag, allowed = "--rlp-positions-file", self.allowed_positions
        else:
            flag = "--rlp-valid-positions-file"
            allowed = _read_positions_file(c.rlp_valid_positions_file, flag)
        if allowed is not None and len(allowed) < len(validation.lengths):
            raise ValueError(
                f"{flag} lists {len(allowed)} documents, fewer than the {len(validation.lengths)} of the "
                f"validation data ({validation.name}); give one list per document"
            )
        self.validation, self.validation_positions = validation, allowed
        if not self._validation_contexts(1)[0]:
            raise DataError(
                f"{validation.name}: no validation document has a position t >= --rlp-min-context "
                f"{c.rlp_min_context}" + (f" listed in {flag}" if allowed is not None else "")
            )

    def _validation_contexts(self, count: int) -> tuple[list[Window], list[list[int]]]:
        """The first ``count`` windows of the validation data that have a position (at most one
        pass over it), each with up to --rlp-positions-per-doc positions drawn from its allowed ones
        by a generator keyed by the window alone: the same contexts at every evaluation and layout."""
        c = self.config
        stream = self.validation
        stream.cursor = Cursor()
        windows, positions = [], []
        while len(windows) < count and stream.cursor.epoch == 0:
            (window,) = stream.next_windows(1, self.max_context + 1, overlap=c.rlp_min_context)
            last = min(len(window.tokens) - 1, self.max_context)
            if self.validation_positions is None:
                candidates = list(range(c.rlp_min_context, last + 1))
            else:  # document coordinates -> window coordinates
                candidates = [p - window.offset for p in self.validation_positions[window.document]]
                candidates = sorted({t for t in candidates if c.rlp_min_context <= t <= last})
            if len(candidates) > c.rlp_positions_per_doc:
                rng = np.random.default_rng([self.seed, 11, window.document, window.offset])
                candidates = sorted(int(t) for t in rng.choice(candidates, c.rlp_positions_per_doc, replace=False))
            if candidates:
                windows.append(window)
                positions.append(candidates)
        return windows, positions

    def evaluate(self, model_chunks, num_iterations: int) -> dict[str, float]:
        """The held-out think-vs-no-think measure of megatron_rlp.rlp.evaluate (tools/eval_info_gain.py)
        on ``num_iterations`` x --global-batch-size validation windows, with this run's G, thought
        length, temperature and --seq-length rows: information gain log p(x_t | x_<t, c) −
        log p(x_t | x_<t) and next-token accuracy with and without a thought, mean and standard
        error over windows.  Each data-parallel rank evaluates its share; valid on the last stage."""
        from megatron_rlp.rlp.evaluate import evaluate_thinking

        c = self.config
        windows, positions = self._validation_contexts(num_iterations * self.state.run.training.global_batch_size)
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        mine = range(dp_rank, len(windows), dp_size)
        sums = torch.zeros(10, dtype=torch.float64)
        if len(mine):
            docs = [torch.from_numpy(windows[i].tokens) for i in mine]
            result = evaluate_thinking(
                self.models[0], docs, [positions[i] for i in mine], self.thought_source, c.rlp_num_thoughts,
                c.rlp_thought_len, c.rlp_temperature, self.open_id, self.close_id, self.eod_id,
                seed=_sample_seed(self.seed + 1, 0, dp_rank), max_sequence_length=self.max_sequence_length,
                batch_size=self.micro_batch_size * c.rlp_positions_per_doc * c.rlp_num_thoughts,
                vocab_size=self.vocab_size, min_context=c.rlp_min_context,
                sampler_micro_batch_size=c.rlp_sampler_micro_batch_size,
            )
            if result is not None:  # the last pipeline stage
                thoughts = sum(len(positions[i]) for i in mine) * c.rlp_num_thoughts
                per_window = [result.gain, result.acc_think, result.acc_plain]
                sums = torch.tensor(
                    [v for x in per_window for v in (x.sum(), (x ** 2).sum())]
                    + [len(result.gain), result.thought_len * thoughts, result.closed_by_model * thoughts, thoughts],
                    dtype=torch.float64,
                )
        if not parallel_state.is_pipeline_last_stage():
            return {}
        from megatron_rlp import platform

        sums = sums.to(platform.device())
        collectives.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        sums = sums.tolist()
        n = sums[6]
        values = {}
        for j, name in enumerate(("info_gain", "acc_think", "acc_plain")):
            mean = sums[2 * j] / n
            var = max(sums[2 * j + 1] / n - mean * mean, 0.0) * n / max(n - 1, 1)
            values[f"rlp/eval_{name}"] = mean
            values[f"rlp/eval_{name}_se"] = math.sqrt(var / n)
        values["rlp/eval_thought_len_mean"] = sums[7] / sums[9]
        values["rlp/eval_closed_by_model_frac"] = sums[8] / sums[9]
        values["rlp/eval_windows"] = n
        return values

    # -- checkpoints ----------------------------------------------------------------------------
    # A checkpoint can be written between two updates of one sample batch (--rlp-updates-per-batch
    # > 1: a preemption warning cannot wait for the batch's end).  The batch in progress — its
    # sequences, θ_old log-probs and advantages — is saved per rank, so the resumed run finishes
    # it exactly instead of drawing a new one.
    def _batch_in_progress(self) -> bool:
        return self.config.rlp_updates_per_batch > 1 and bool(self._cached)

    def state_dict(self) -> dict:
        return {"cursor": self.stream.state_dict(), "sample_batches": self.sample_batches,
                "ema_initialized": self.teacher.initialized,
                "kl_reference_initialized": self.reference is not None and self.reference.initialized,
                "batch_in_progress_layout": _rank_layout()[0] if self._batch_in_progress() else None}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["cursor"])
        self.sample_batches = int(state.get("sample_batches", 0))
        self._cached = []
        if state.get("ema_initialized") and not self.teacher.initialized:
            self.teacher.maybe_initialize(self.models)  # shadows to load into
        if state.get("kl_reference_initialized") and self.reference is None:
            self.reference = EMATeacher()
            self.reference.maybe_initialize(self.models)  # the frozen θ_0 is loaded into it
        saved_layout = state.get("batch_in_progress_layout")
        self._load_batch = saved_layout is not None and tuple(saved_layout) == _rank_layout()[0]
        if saved_layout is not None and not self._load_batch and dist.get_rank() == 0:
            print(f"note: the checkpoint stopped inside a sample batch (--rlp-updates-per-batch "
                  f"{self.config.rlp_updates_per_batch}) at layout (pp, tp, dp) {tuple(saved_layout)}; "
                  f"this run's is {_rank_layout()[0]}, so a new batch is drawn — resume at the same "
                  "layout to finish it exactly", flush=True)

    def sharded_state_dict(self, model_sharded_state_dict) -> dict:
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        out = {}
        if self.teacher.initialized:
            out.update(_shadow_sharded_state_dict(self.teacher, self.models, model_sharded_state_dict, prefix="ema."))
        if self.reference is not None and self.reference.initialized:
            out.update(_shadow_sharded_state_dict(self.reference, self.models, model_sharded_state_dict,
                                                  prefix="kl_reference."))
        if self._batch_in_progress() or self._load_batch:
            shape, offset = _rank_layout()
            out["batch_in_progress"] = ShardedObject("rlp.batch_in_progress", self._cached, shape, offset,
                                                     replica_id=0)
        return out

    def load_sharded_state_dict(self, loaded: dict) -> None:
        # EMA and KL-reference tensors were loaded in place into the shadows.
        if self._load_batch:
            self._cached = loaded["batch_in_progress"]
            self._load_batch = False


def _run_model(model, batch: dict):
    """The model's forward on one micro-batch; a shared-prefix batch carries its attention layout
    (to the core attention of every layer) and its per-slot RoPE positions (installed on this
    pipeline stage's rotary embedding for the call)."""
    layout = batch.get("layout")
    if layout is None:
        return model(batch["tokens"], batch["position_ids"], None)
    from megatron_rlp.models.shared_prefix import packed_rope_table
    from megatron_rlp.sampling.pipeline import rope_positions

    inner = unwrap_model(model)
    with rope_positions(inner, packed_rope_table(inner, batch["position_ids"])):
        return model(batch["tokens"], batch["position_ids"], None, packed_seq_params=layout)


def _score_slots_loss(batch: dict, model, output_tensor: torch.Tensor, vocab_size: Optional[int] = None,
                      entropy: bool = False):
    """log p of the targets at the slots ([rows, K]; IGNORE targets give 0), and with ``entropy``
    the next-token entropy there (the fused kernel's, over the tokenizer's ids)."""
    hidden, _ = _final_hidden(output_tensor, model)
    slots = batch["slots"]
    rows = _gather_rows(hidden, slots).reshape(-1, hidden.shape[-1])
    out = linear_logprob(rows, output_weight(model), batch["targets"].reshape(-1),
                         parallel_state.get_tensor_model_parallel_group(), entropy=entropy, vocab_size=vocab_size)
    logp, ent = out if entropy else (out, None)
    result = {"logp": logp.detach().view(slots.shape)}
    if entropy:
        result["entropy"] = ent.detach().view(slots.shape)
    return logp.new_zeros(()), result


def _score_target_loss(batch: dict, model, output_tensor: torch.Tensor, vocab_size: Optional[int] = None):
    """S_pred = log p_θ(x_t | x_<t, open, c_i, close) at T = 1 of every thought, no gradient (the
    straightforward baseline's separate scoring pass)."""
    hidden, _ = _final_hidden(output_tensor, model)
    rows = _branch_rows(batch, hidden.shape[0])
    slots = batch["target_slot"][:, None]
    logp = linear_logprob(_gather_slots(hidden, rows, slots).reshape(-1, hidden.shape[-1]), output_weight(model),
                          _take_slots(batch["labels"], rows, slots).reshape(-1),
                          parallel_state.get_tensor_model_parallel_group(), vocab_size=vocab_size)
    return logp.new_zeros(()), {"logp": logp.detach()}


def _score_thoughts_loss(batch: dict, model, output_tensor: torch.Tensor, vocab_size: Optional[int] = None,
                         inverse_temperature: float = 1.0):
    """log π_ref of the thought tokens, under the same temperature as the policy's log-probs (the
    k3 KL estimate is unbiased for tokens drawn from the policy it compares, the tempered one)."""
    hidden, _ = _final_hidden(output_tensor, model)
    slots = batch["thought_slot"]
    branch_row = _branch_rows(batch, hidden.shape[0])
    targets = torch.where(slots >= 0, _take_slots(batch["labels"], branch_row, slots), torch.full_like(slots, IGNORE))
    rows = _gather_slots(hidden, branch_row, slots)
    rows = (rows.float() * inverse_temperature).to(rows.dtype).reshape(-1, hidden.shape[-1])
    logp = _real_logprobs(rows, output_weight(model), targets.reshape(-1),
                          parallel_state.get_tensor_model_parallel_group(), vocab_size=vocab_size)
    return logp.new_zeros(()), {"logp": logp.detach().view(slots.shape)}


def _shard_logits(hidden: torch.Tensor, weight: torch.Tensor, block_elements: int = 1 << 24) -> torch.Tensor:
    """fp32 logits [n, V/tp] of this rank's vocabulary shard, the weight upcast a block of rows at
    a time (no fp32 copy of the whole shard: 2.7 GB at 12B, TP=1)."""
    h = hidden.float()
    rows = max(1, block_elements // max(1, weight.shape[1]))
    out = torch.empty(h.shape[0], weight.shape[0], dtype=torch.float32, device=h.device)
    for start in range(0, weight.shape[0], rows):
        out[:, start : start + rows] = h @ weight[start : start + rows].float().t()
    return out


def _predict_loss(batch: dict, model, output_tensor: torch.Tensor, *, num_tokens: int, temperature: float,
                  seed: int, vocab_size: Optional[int] = None):
    """Sample the N predicted tokens of every branch at its ``predict_slots`` (see
    RLPObjective.sample_predictions); prediction j of branch r uses the noise of decode step j,
    row r, so every TP rank draws the same tokens."""
    from megatron_rlp.sampling import sample_vocab_parallel

    hidden, _ = _final_hidden(output_tensor, model)
    slots = batch["predict_slots"]
    rows = _gather_slots(hidden, _branch_rows(batch, hidden.shape[0]), slots)  # [B, N, H]
    logits = _shard_logits(rows.reshape(-1, hidden.shape[-1]), output_weight(model)).view(*slots.shape, -1)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    keys = batch["branch_key"].to(hidden.device)
    tokens = torch.stack([
        sample_vocab_parallel(logits[:, j], temperature, seed, j, keys, tp_group=tp_group, vocab_size=vocab_size).tokens
        for j in range(num_tokens)
    ], dim=1)
    return logits.new_zeros(()), {"predicted": tokens}


def _rank_layout() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """((pp, tp, dp) sizes, this rank's (pp, tp, dp) ranks)."""
    ps = parallel_state
    return ((ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size()),
            (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
             ps.get_data_parallel_rank()))


def _sample_seed(seed: int, batch_index: int, dp_rank: int) -> int:
    return (seed * 1_000_003 + batch_index * 9_973 + dp_rank * 101) % (2**31 - 1)


def _read_positions_file(path: Optional[str], flag: str = "--rlp-positions-file"):
    if path is None:
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {path!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} {path!r} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, list) or not all(isinstance(p, list) for p in data):
        raise ValueError(f"{flag} {path!r} must hold a JSON list of position lists, one per document")
    return data


def _shadow_sharded_state_dict(teacher: EMATeacher, models, model_sd: dict, prefix: str) -> dict:
    """The teacher's fp32 shadows as ShardedTensors laid out exactly like θ (keys prefixed)."""
    import dataclasses

    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    by_param = {}
    for idx, model in enumerate(models):
        for name, param in model.named_parameters():
            by_param[param.data_ptr(), tuple(param.shape)] = teacher.shadow(f"{idx}.{name}")
    out = {}
    for i, value in enumerate(nested_values(model_sd)):
        if not isinstance(value, (ShardedTensor, ShardedTensorFactory)):
            continue
        shadow = by_param.get((value.data.data_ptr(), tuple(value.data.shape)))
        if shadow is None:
            continue
        changes = {"key": prefix + value.key, "data": shadow}
        if isinstance(value, ShardedTensor):
            changes["dtype"] = shadow.dtype
        out[f"{prefix}{i}"] = dataclasses.replace(value, **changes)
    return out
