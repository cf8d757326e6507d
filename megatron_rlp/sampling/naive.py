"""The baselines the prefix-sharing sampler is measured against (tools/bench_sampler.py).

:func:`sample_thoughts_batched` ("fair"): every row (context x branch) re-prefills its own prefix,
but batched like the shared sampler — all rows in one masked prefill (prefixes left-padded to the
longest, a causal + padding mask), then one batched cached decode forward per step (the "rows"
cache layout).  It needs a core attention that applies an explicit mask (megatron's local
``DotProductAttention`` without the fused causal softmax; the benchmark's CPU setting).

:func:`sample_thoughts_naive`: what it does, exactly: a loop over the (document, position) contexts; for each, a fresh
megatron ``StaticInferenceContext`` and one prefill of the G rows ``x_<t + open marker`` (the
same prefix recomputed for each of the G branches, nothing shared across positions or
branches), then one-token decode steps for those G rows until they all stop.  Sampling, stopping
and the returned :class:`ThoughtBatch` are the same as :func:`sample_thoughts` (same noise keys:
(seed, step, global row id, vocabulary id)), so both samplers draw the same thoughts up to float
rounding of the logits — the benchmark checks that too.  ``stats["prefill_s"]`` is the time of the
re-prefills (step 0 of every context), ``stats["decode_s"]`` the rest of the steps.  It runs on any TP/PP layout (at PP > 1 one
context at a time, so the pipeline is mostly idle: that is part of being naive).
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch

from megatron.core.inference.contexts import StaticInferenceContext

from megatron_rlp.sampling.pipeline import StageInfo, run_pipelined
from megatron_rlp.sampling.sampler import _check_model, assemble_batch, summary_stats
from megatron_rlp.sampling.thoughts import ThoughtJob, sampling_vocab_size, validate_request
from megatron_rlp.training.timers import device_synchronize


class _TimedPrefillJob(ThoughtJob):
    """A naive job that times its step 0, the re-prefill of x_<t + open marker (this stage's
    forward, device synchronized), so the benchmark can split prefill from decode."""

    prefill_s = 0.0

    def step_input(self, step: int):
        if step == 0:
            device_synchronize()
            self._prefill_start = time.perf_counter()
        return super().step_input(step)

    def after_forward(self, step: int) -> None:
        if step == 0:
            device_synchronize()
            self.prefill_s = time.perf_counter() - self._prefill_start


def sample_thoughts_naive(
    model,
    documents: Sequence[torch.Tensor],
    positions: Sequence[Sequence[int]],
    num_thoughts: int,
    max_thought_len: int,
    open_id: int,
    close_id: int,
    eod_id: Optional[int],
    temperature: float,
    seed: int,
    max_sequence_length: int,
    vocab_size: Optional[int] = None,
):
    """Same arguments and result as :func:`megatron_rlp.sampling.sample_thoughts`, computed
    without prefix sharing (see module docstring)."""
    _check_model(model)
    vocab_size = sampling_vocab_size(model, vocab_size)
    contexts = validate_request(
        documents, positions, num_thoughts, max_thought_len, temperature, max_sequence_length,
        {"open_id": open_id, "close_id": close_id, "eod_id": eod_id}, vocab_size,
    )
    stage = StageInfo.current()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    t_start = time.perf_counter()
    jobs, prefill_tokens, forward_calls, prefill_s, pipelined_s = [], 0, 0, 0.0, 0.0
    try:
        with torch.no_grad():
            for n, (b, t) in enumerate(contexts):
                g = num_thoughts
                rows = torch.arange(n * g, (n + 1) * g)
                prefix = documents[b][:t].to(torch.int64).to(device)[None].expand(g, -1)
                ctx = StaticInferenceContext(max_batch_size=g, max_sequence_length=t + max_thought_len)
                ctx.materialize_only_last_token_logits = False
                job = _TimedPrefillJob(
                    model, stage, rows, torch.full((g,), t), ctx, t, max_thought_len,
                    open_id, close_id, eod_id, float(temperature), int(seed), device,
                    prefix=prefix, vocab_size=vocab_size,
                )
                phase = run_pipelined(model, stage, [job], feedback=True)
                job.context = None  # free the cache; the records stay
                prefill_s += job.prefill_s
                pipelined_s += phase.seconds
                jobs.append(job)
                prefill_tokens += g * (t + 1)
                forward_calls += len(phase.items)
            batch = assemble_batch(
                jobs, contexts, num_thoughts, max_thought_len, stage, device,
                open_id=open_id, close_id=close_id, eod_id=eod_id,
                temperature=float(temperature), seed=int(seed),
            )
    finally:
        model.train(was_training)
    total_s = time.perf_counter() - t_start
    stats = summary_stats(batch)
    stats.update(
        {
            "contexts": len(contexts),
            "rows": len(contexts) * num_thoughts,
            "prefill_tokens": prefill_tokens,
            "forward_calls": forward_calls,
            "prefill_s": prefill_s,
            "decode_s": pipelined_s - prefill_s,
            "total_s": total_s,
            "tokens_per_s": stats["thought_tokens"] / max(total_s, 1e-9),
        }
    )
    batch.stats = stats
    return batch


def sample_thoughts_batched(
    model,
    documents: Sequence[torch.Tensor],
    positions: Sequence[Sequence[int]],
    num_thoughts: int,
    max_thought_len: int,
    open_id: int,
    close_id: int,
    eod_id: Optional[int],
    temperature: float,
    seed: int,
    max_sequence_length: int,
    vocab_size: Optional[int] = None,
):
    """Same arguments and result as :func:`megatron_rlp.sampling.sample_thoughts`: every row
    re-prefills x_<t, all rows batched (see module docstring)."""
    _check_model(model)
    vocab_size = sampling_vocab_size(model, vocab_size)
    contexts = validate_request(
        documents, positions, num_thoughts, max_thought_len, temperature, max_sequence_length,
        {"open_id": open_id, "close_id": close_id, "eod_id": eod_id}, vocab_size,
    )
    stage = StageInfo.current()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    t_start = time.perf_counter()
    g = num_thoughts
    lengths = torch.tensor([t for _, t in contexts]).repeat_interleave(g)
    align = int(lengths.max())
    prefix = torch.zeros(lengths.numel(), align, dtype=torch.int64)
    for n, (b, t) in enumerate(contexts):
        prefix[n * g : (n + 1) * g, align - t :] = documents[b][:t].to(torch.int64).cpu()
    try:
        with torch.no_grad():
            ctx = StaticInferenceContext(max_batch_size=lengths.numel(),
                                         max_sequence_length=align + max_thought_len)
            ctx.materialize_only_last_token_logits = False
            job = ThoughtJob(
                model, stage, torch.arange(lengths.numel()), lengths, ctx, align, max_thought_len,
                open_id, close_id, eod_id, float(temperature), int(seed), device,
                prefix=prefix.to(device), vocab_size=vocab_size,
            )
            phase = run_pipelined(model, stage, [job], feedback=True)
            job.context = None
            batch = assemble_batch(
                [job], contexts, num_thoughts, max_thought_len, stage, device,
                open_id=open_id, close_id=close_id, eod_id=eod_id,
                temperature=float(temperature), seed=int(seed),
            )
    finally:
        model.train(was_training)
    total_s = time.perf_counter() - t_start
    stats = summary_stats(batch)
    stats.update(
        {
            "contexts": len(contexts),
            "rows": len(contexts) * num_thoughts,
            "prefill_tokens": lengths.numel() * (align + 1),
            "forward_calls": len(phase.items),
            "decode_steps": len(phase.items),
            "kv_slot_reads": job.kv_slot_reads,
            "total_s": total_s,
            "tokens_per_s": stats["thought_tokens"] / max(total_s, 1e-9),
        }
    )
    batch.stats = stats
    return batch
