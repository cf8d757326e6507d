"""Thought sampling with the training model itself: one prefill per document, G branches at each
of k positions, tensor- and pipeline-parallel, inside megatron-core.

What happens in :func:`sample_thoughts` (every rank of the model-parallel group calls it with the
same inputs):

1. **Prefill** (:class:`~megatron_rlp.sampling.thoughts.PrefillJob`): each document is run once,
   up to its largest sampled position, with megatron's ``StaticInferenceContext`` KV cache.  The
   cache of x_<t for any position t of that document is then its first t slots — no prefix is
   recomputed per position or per thought.  Hybrid models: one prefill job per document whose
   calls end at its sampled positions (k forwards for k positions, multi-token chunks continued
   from the Mamba states), the Mamba states snapshotted at every position (see ``PrefillJob``).
2. **Fork**: the contexts (and their branches) are grouped into micro-batches; each micro-batch
   gets its own caches, built from the prefill caches when its wave of ``pp`` micro-batches
   starts and freed when the wave ends (so the micro-batch size bounds the decode memory;
   ``stats["decode_cache_bytes_peak"]`` is the sampler's own count): attention K/V of x_<t copied
   into the last t slots before the micro-batch's alignment slot A (keys are cached before RoPE,
   so a uniform shift keeps every query-key distance), Mamba conv/SSM states copied from the
   snapshot at t.
3. **Decode**, in one of three cache layouts (``layout=``; "auto": "tree" or "rows" by
   :func:`decode_cost` where "tree" can run, "cascade" where it cannot):

   * "tree" (:class:`~megatron_rlp.sampling.thoughts.TreeThoughtJob`, attention-only models):
     one cache row per *context*.  The open marker is one token at slot A; each later step feeds
     the G branches' tokens as G query tokens of that row, with a mask that lets a branch see only
     its context, the marker and its own tokens, and a RoPE table that gives each slot its
     position in its branch.  The prefix K/V are stored, rotated and read once per context
     instead of G times — the decode-time half of prefix sharing.
   * "cascade" (:class:`~megatron_rlp.sampling.cascade.CascadeThoughtJob`, any model, Mamba
     and Transformer Engine included): the context's cache once per context, each branch's own
     tokens in a small cache of its own; the G branch queries of a context are one batched
     product against the context cache, merged with the branch part through log-sum-exps — no
     attention mask, per-context lengths.  Mamba states are forked per branch.  Finished rows
     leave the batch; the step can be captured as a CUDA graph.
   * "rows" (:class:`~megatron_rlp.sampling.thoughts.ThoughtJob`): megatron's static cache;
     megatron_rlp.models.hybrid.fork_inference_state fans each context out into G cache rows;
     one token per row per step; a per-row mask hides the slots before a row's context.

   A branch stops at the close marker or EOD (both sampled thought tokens); at
   ``max_thought_len`` sampled tokens the close is forced (not a sampled token).  Sampling is the
   vocab-parallel Gumbel-max of :mod:`megatron_rlp.sampling.vocab_parallel`: logits stay
   vocabulary-sharded, noise is keyed by (seed, step, global row id, global vocabulary id), one
   all-gather of five numbers per row.
4. **Pipeline** (:mod:`megatron_rlp.sampling.pipeline`): stages pass [s, b, h] hidden states
   forward with point-to-point sends; only token ids and a "still running" flag return from the
   last stage; micro-batches keep the stages busy concurrently; the result (ids, log-probs,
   lengths, flags) is broadcast from the last stage to every stage at the end.

megatron-core pieces used, and where this differs (0.16.1):

* ``StaticInferenceContext`` is the KV cache: megatron's attention allocates the
  [max_seq, max_batch, groups, dim] buffers and writes rows ``batch_size_offset : +b`` at slots
  ``sequence_len_offset : +s``; we build the forked contexts' buffers ourselves (same layout) and
  keep ``batch_size_offset`` at 0.  At ``sequence_len_offset > 0`` megatron switches the attention
  to ``no_mask``; megatron's local ``DotProductAttention`` still applies an explicit
  ``attention_mask``, which is how rows with shorter contexts mask their leading slots.  A core
  attention that ignores the mask at decode (Transformer Engine's, with ``no_mask``) is detected;
  then "auto" takes the "cascade" layout (which installs its own attention and needs no mask),
  and a "rows" micro-batch only holds rows of equal context length (no padding, no mask
  needed).  The local attention with megatron's fused causal softmax (``masked_softmax_fusion``
  in bf16/fp16, on by default with CUDA and the kernels) applies the mask for one query token
  but not for the "tree" layout's G (see :func:`fused_causal_softmax`); it is detected too.
* megatron's static path takes RoPE positions from the cache slot, not from ``position_ids``;
  the "tree" layout therefore swaps in a per-slot RoPE table while its forward runs
  (``pipeline.rope_positions``).
* ``materialize_only_last_token_logits`` is irrelevant here: the last stage returns final hidden
  states (see ``pipeline.final_hidden_states``) and the sampler applies the vocab-parallel output
  weight to the last token itself, in fp32 like the trainer's log-probs
  (``pipeline.vocab_shard_logits``), not megatron's bf16 output layer.
* Sequence parallelism: a one-token decode step cannot be split over the sequence, so
  :func:`sample_thoughts` decodes with it switched off on the same weights
  (``megatron_rlp.models.builder.sequence_parallel_off``) and switches it back on return, also on
  errors.  The trainer's update then runs sequence-parallel as configured.

Determinism: greedy thoughts are the same at every TP/PP layout for the same weights (up to
logit ties within float rounding); at any temperature all TP ranks hold identical tokens (the
winner is picked from the same gathered table on every rank).  Pass a different ``seed`` per
data-parallel rank (and per iteration); the noise does not depend on the layout.
"""

from __future__ import annotations

import math
import time
from typing import Optional, Sequence

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_rlp import collectives
from megatron_rlp.models.builder import without_sequence_parallel
from megatron_rlp.models.hybrid import fork_inference_state, inference_state_layout
from megatron_rlp.sampling.cascade import CascadeThoughtJob
from megatron_rlp.sampling.pipeline import StageInfo, run_pipelined
from megatron_rlp.sampling.thoughts import (
    STOP_CLOSE,
    STOP_EOD,
    STOP_LENGTH,
    PrefillJob,
    ThoughtBatch,
    ThoughtJob,
    TreeThoughtJob,
    sampling_vocab_size,
    validate_request,
)

__all__ = ["sample_thoughts", "model_traits", "assemble_batch", "LAYOUTS"]

LAYOUTS = ("auto", "tree", "rows", "cascade")


def model_traits(model, stage: StageInfo) -> tuple[bool, bool, bool]:
    """(attention honours an explicit mask at one-token decode, the model has Mamba layers,
    attention honours an explicit mask for several query tokens per row — what the "tree" layout
    needs), agreed over the pipeline group so every stage plans the same micro-batches."""
    from megatron.core.ssm.mamba_mixer import MambaMixer
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    cores = [m.core_attention for m in model.modules() if isinstance(m, Attention)]
    masks_ignored = any(not isinstance(c, DotProductAttention) for c in cores)
    fused_causal = any(
        isinstance(c, DotProductAttention) and fused_causal_softmax(c.scale_mask_softmax)
        for c in cores
    )
    has_mamba = any(isinstance(m, MambaMixer) for m in model.modules())
    flags = torch.tensor([int(masks_ignored), int(has_mamba), int(fused_causal)], dtype=torch.int64)
    if stage.pp_size > 1:
        flags = flags.to(next(model.parameters()).device)  # the PP group is NCCL on GPUs
        collectives.all_reduce(flags, op=collectives.ReduceOp.MAX, group=stage.pp_group)
    return not bool(flags[0]), bool(flags[1]), not bool(flags[0] or flags[2])


def fused_causal_softmax(softmax) -> bool:
    """Whether megatron's ``FusedScaleMaskSoftmax`` may take its fused causal CUDA kernel.

    It does (fused_softmax.py ``is_kernel_available``) with ``masked_softmax_fusion`` on,
    fp16/bf16 scores, 16 < keys <= 4096 and queries, keys and batch x heads multiples of 4; for a
    causal layer the kernel is ``ScaledUpperTriangMaskedSoftmax``, which ignores the explicit mask
    and asserts queries == keys.  A one-token decode step (1 query) never qualifies, a prefill
    (queries == keys, causal) is computed correctly, but the "tree" layout's G query tokens
    against a longer cache hit the assertion — or, under ``python -O``, attend across branches.
    """
    from megatron.core.transformer.enums import AttnMaskType

    return bool(
        softmax.scaled_masked_softmax_fusion
        and softmax.input_in_float16
        and softmax.attn_mask_type == AttnMaskType.causal
    )


def _check_model(model) -> None:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("sample_thoughts needs the bare megatron model of this stage (unwrap DDP)")
    if config.sequence_parallel:
        raise ValueError(
            "decoding cannot run sequence-parallel (a one-token step cannot be split along the "
            "sequence); run it inside megatron_rlp.models.builder.sequence_parallel_off(model), as "
            "sample_thoughts does"
        )


def _chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _plan_prefill(contexts, stage: StageInfo, segmented: bool = False) -> list[list[int]]:
    """Documents (those with positions), longest last, in ``pp_size`` groups at PP > 1; with
    ``segmented`` (hybrid models) one document per group, so that each document's prefill calls
    end at its own sampled positions (k forwards for k positions; rows of one static context
    share the call boundaries)."""
    longest: dict[int, int] = {}
    for b, t in contexts:
        longest[b] = max(longest.get(b, 0), t)
    docs = sorted(longest, key=lambda b: (longest[b], b))
    if segmented:
        return [[b] for b in docs]
    per = len(docs) if stage.pp_size == 1 else math.ceil(len(docs) / stage.pp_size)
    return [[docs[i] for i in r] for r in _chunks(len(docs), per)]


def _plan_contexts(contexts, per_batch: int, uniform_t: bool) -> list[list[int]]:
    """Micro-batches of context ids, ordered by position so a micro-batch pads little; with
    ``uniform_t`` a micro-batch never mixes context lengths."""
    order = sorted(range(len(contexts)), key=lambda n: (contexts[n][1], n))
    plans, current = [], []
    for n in order:
        t = contexts[n][1]
        if current and (len(current) == per_batch or (uniform_t and contexts[current[-1]][1] != t)):
            plans.append(current)
            current = []
        current.append(n)
    if current:
        plans.append(current)
    return plans


def _plan_rows(contexts, num_thoughts: int, micro_batch_size: int, uniform_t: bool):
    """Micro-batches of rows (n * G + g), contexts ordered by position; a context's branches may
    be split over micro-batches when ``micro_batch_size`` is not a multiple of G."""
    order = [n for plan in _plan_contexts(contexts, len(contexts), uniform_t) for n in plan]
    rows = [n * num_thoughts + g for n in order for g in range(num_thoughts)]
    plans, current = [], []
    for r in rows:
        t = contexts[r // num_thoughts][1]
        if current and (
            len(current) == micro_batch_size
            or (uniform_t and contexts[current[-1] // num_thoughts][1] != t)
        ):
            plans.append(current)
            current = []
        current.append(r)
    if current:
        plans.append(current)
    return plans


def _branch_context(model, state_kinds, roots, branch_root, prefill_of, align, max_len, device):
    """An inference context built from the prefill caches (see module docstring, step 2): one row
    per context in ``roots``, then (when ``branch_root`` is given) one row per branch."""
    ctx = StaticInferenceContext(max_batch_size=len(roots), max_sequence_length=max_len)
    ctx.materialize_only_last_token_logits = False
    for layer, kind in state_kinds.items():
        if kind == "attention":
            job0 = prefill_of[roots[0]][0]
            k0, _ = job0.context.key_value_memory_dict[layer]
            key = torch.zeros(max_len, len(roots), *k0.shape[2:], dtype=k0.dtype, device=device)
            value = torch.zeros_like(key)
            for i, n in enumerate(roots):
                job, row, t = prefill_of[n]
                src_k, src_v = job.context.key_value_memory_dict[layer]
                key[align - t : align, i] = src_k[:t, row]
                value[align - t : align, i] = src_v[:t, row]
            ctx.key_value_memory_dict[layer] = (key, value)
        else:
            conv = torch.stack([prefill_of[n][0].snapshots[n][layer][0] for n in roots])
            ssm = torch.stack([prefill_of[n][0].snapshots[n][layer][1] for n in roots])
            ctx.key_value_memory_dict[layer] = (conv, ssm)
    ctx.sequence_len_offset = align
    if branch_root is not None and state_kinds:
        fork_inference_state(model, ctx, branch_root)
        ctx.max_batch_size = len(branch_root)
    return ctx


def assemble_batch(
    jobs: list,
    contexts: list[tuple[int, int]],
    num_thoughts: int,
    max_thought_len: int,
    stage: StageInfo,
    device: torch.device,
    **meta,
) -> ThoughtBatch:
    """Collect the last stage's per-job records into a ThoughtBatch and broadcast it to all
    pipeline stages (one fp64 broadcast)."""
    n, g, length = len(contexts), num_thoughts, max_thought_len
    rows = n * g
    packed = torch.zeros(rows, 3 * length + 2, dtype=torch.float64, device=device)
    if stage.is_last:
        for job in jobs:
            rec = job.recorder
            idx = rec.rows
            packed[idx, :length] = rec.tokens.double()
            packed[idx, length : 2 * length] = rec.logprobs.double()
            packed[idx, 2 * length : 3 * length] = rec.tempered.double()
            packed[idx, 3 * length] = rec.lengths.double()
            packed[idx, 3 * length + 1] = rec.stop.double()
    if stage.pp_size > 1:
        collectives.broadcast(packed, src=stage.last_rank, group=stage.pp_group)
    tokens = packed[:, :length].round().long().view(n, g, length)
    stop = packed[:, 3 * length + 1].round().long().view(n, g)
    return ThoughtBatch(
        tokens=tokens,
        logprobs=packed[:, length : 2 * length].float().view(n, g, length),
        tempered_logprobs=packed[:, 2 * length : 3 * length].float().view(n, g, length),
        lengths=packed[:, 3 * length].round().long().view(n, g),
        forced=stop != STOP_CLOSE,
        stop_reason=stop,
        doc_index=torch.tensor([b for b, _ in contexts], dtype=torch.int64, device=device),
        position=torch.tensor([t for _, t in contexts], dtype=torch.int64, device=device),
        **meta,
    )


def summary_stats(batch: ThoughtBatch) -> dict:
    lengths = batch.lengths.double()
    return {
        "thought_tokens": int(batch.lengths.sum()),
        "mean_thought_len": float(lengths.mean()),
        "forced_close_frac": float(batch.forced.double().mean()),
        "eod_frac": float((batch.stop_reason == STOP_EOD).double().mean()),
        "length_cap_frac": float((batch.stop_reason == STOP_LENGTH).double().mean()),
    }


class CacheAccounting:
    """The sampler's own count of the cache bytes it holds (torch reports no memory statistics
    on CPU): prefill caches and decode caches, current and peak."""

    def __init__(self):
        self.current = self.peak = self.decode_current = self.decode_peak = 0

    def allocate(self, nbytes: int, decode: bool = False) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        if decode:
            self.decode_current += nbytes
            self.decode_peak = max(self.decode_peak, self.decode_current)

    def free(self, nbytes: int, decode: bool = False) -> None:
        self.current -= nbytes
        if decode:
            self.decode_current -= nbytes


def inference_cache_bytes(ctx) -> int:
    """Bytes of the tensors of a static inference context's ``key_value_memory_dict``."""
    if ctx is None:
        return 0
    return sum(t.numel() * t.element_size() for pair in ctx.key_value_memory_dict.values() for t in pair)


def prefill_cache_bytes(job) -> int:
    snaps = sum(t.numel() * t.element_size() for per in job.snapshots.values()
                for pair in per.values() for t in pair)
    return inference_cache_bytes(job.context) + snaps


def _release(job) -> None:
    """Free a decode job's caches (its records stay)."""
    if hasattr(job, "release"):
        job.release()
    else:
        job.context = None


def merge_phases(phases):
    """One PhaseStats for pipeline phases run one after the other."""
    from megatron_rlp.sampling.pipeline import PhaseStats

    out = PhaseStats()
    for p in phases:
        out.items.extend(p.items)
        out.seconds += p.seconds
        out.recv_wait_s += p.recv_wait_s
        out.ticks += p.ticks
    out.bubble = _combined_bubble(*phases)
    return out


def _decode_builders(model, stage, chosen, contexts, num_thoughts, micro_batch_size, mbs, masks_ok,
                     state_kinds, prefill_of, common, recorder_options, cuda_graphs, device) -> list:
    """One callable per decode micro-batch that builds its job (caches copied from the prefill)
    when its wave starts."""
    builders = []
    if chosen == "tree":
        per = (
            max(1, micro_batch_size // num_thoughts)
            if micro_batch_size
            else math.ceil(len(contexts) / stage.pp_size)
        )

        def tree_job(plan):
            lengths = torch.tensor([contexts[n][1] for n in plan])
            align = int(lengths.max())
            max_len = TreeThoughtJob.cache_length(align, num_thoughts, common[0])
            ctx = _branch_context(model, state_kinds, plan, None, prefill_of, align, max_len, device)
            job = TreeThoughtJob(model, stage, plan, lengths, ctx, align, num_thoughts, *common,
                                 **recorder_options)
            job.cache_bytes = inference_cache_bytes(ctx)
            return job

        for plan in _plan_contexts(contexts, per, uniform_t=False):
            builders.append(lambda plan=plan: tree_job(plan))
        return builders

    def rows_job(plan):
        roots = list(dict.fromkeys(r // num_thoughts for r in plan))
        where = {n: i for i, n in enumerate(roots)}
        branch_root = torch.tensor([where[r // num_thoughts] for r in plan], device=device)
        lengths = torch.tensor([contexts[r // num_thoughts][1] for r in plan])
        align = int(lengths.max())
        ctx = _branch_context(model, state_kinds, roots, branch_root, prefill_of, align,
                              align + common[0], device)
        job = ThoughtJob(model, stage, torch.tensor(plan), lengths, ctx, align, *common,
                         **recorder_options)
        job.cache_bytes = inference_cache_bytes(ctx)
        return job

    def cascade_job(plan):
        roots = list(dict.fromkeys(r // num_thoughts for r in plan))
        where = {n: i for i, n in enumerate(roots)}
        job = CascadeThoughtJob(
            model, stage, torch.tensor(plan), [where[r // num_thoughts] for r in plan], roots,
            [contexts[n][1] for n in roots], *common, cuda_graphs=cuda_graphs, **recorder_options,
        )
        job.build(prefill_of, state_kinds)
        return job

    make = cascade_job if chosen == "cascade" else rows_job
    # The cascade layout needs no mask: rows of any context length share a micro-batch.
    uniform_t = chosen == "rows" and not masks_ok
    for plan in _plan_rows(contexts, num_thoughts, mbs, uniform_t=uniform_t):
        builders.append(lambda plan=plan: make(plan))
    return builders


@without_sequence_parallel
def sample_thoughts(
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
    micro_batch_size: Optional[int] = None,
    layout: str = "auto",
    vocab_size: Optional[int] = None,
    cuda_graphs: Optional[bool] = None,
    stop_sequences: Sequence[Sequence[int]] = (),
) -> ThoughtBatch:
    """Sample ``num_thoughts`` (G) thoughts at every position of every document.

    ``model``: the bare megatron GPTModel / MambaModel of this pipeline stage (put in eval mode
    here, its train/eval mode restored after; decoded with sequence parallelism switched off).
    ``documents[b]``: 1-D token ids; ``positions[b]``: the positions t of that document (context
    x_<t = document[:t], the thought is inserted before x_t; 1 <= t <= len - 1).
    ``max_thought_len`` (L) caps the sampled tokens of a thought.  ``temperature`` 0 is greedy.
    ``max_sequence_length``: x_<t + open + L + close must fit (x_t is a label).
    ``micro_batch_size``: rows (branches) per decode micro-batch; default all rows at PP=1 and
    ``ceil(rows / pp)`` at PP > 1 (the "tree" layout takes ``micro_batch_size // G`` contexts, by
    default ``ceil(contexts / pp)``).
    ``layout``: "tree" (one cache row per context, branches as query tokens: prefix shared in
    decode; GPT models whose attention honours the mask), "cascade" (the context's cache read
    once for its branches, merged with each branch's own cache through log-sum-exps: prefix
    shared in decode with any core attention, Transformer Engine's included, and with Mamba
    layers; :mod:`megatron_rlp.sampling.cascade`), "rows" (one cache row per branch) or "auto"
    (the cheaper of "tree" and "rows" by :func:`decode_cost` where "tree" can run, else
    "cascade").  Decode caches are built per micro-batch, ``pp`` micro-batches at a time, so
    ``micro_batch_size`` bounds the decode cache memory (``stats["decode_cache_bytes_peak"]``).
    ``cuda_graphs``: capture the cascade decode step as a CUDA graph per micro-batch shape
    (default: when the model is on a GPU).
    ``vocab_size``: the tokenizer's vocabulary; ids past it (the padding of the model's
    embedding) are never sampled.  Default: the model's whole vocabulary.
    ``stop_sequences``: token sequences that also end a row once its last sampled tokens equal
    one (stop reason STOP_SEQUENCE; generation's stop strings, e.g. tools/eval_benchmark.py).
    Returns the same :class:`ThoughtBatch` on every rank of the
    model-parallel group; ``.stats`` holds timings, token counts and the pipeline bubble.
    """
    _check_model(model)
    vocab_size = sampling_vocab_size(model, vocab_size)
    contexts = validate_request(
        documents,
        positions,
        num_thoughts,
        max_thought_len,
        temperature,
        max_sequence_length,
        {"open_id": open_id, "close_id": close_id, "eod_id": eod_id},
        vocab_size,
    )
    for seq in stop_sequences:
        if not len(seq) or any(not isinstance(i, int) or i < 0 or (vocab_size is not None and i >= vocab_size)
                               for i in seq):
            raise ValueError(f"stop sequence {list(seq)!r} must be a non-empty list of token ids of the "
                             f"{vocab_size}-token vocabulary")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    if micro_batch_size is not None and (not isinstance(micro_batch_size, int) or micro_batch_size < 1):
        raise ValueError(f"micro_batch_size must be an integer >= 1, got {micro_batch_size!r}")
    stage = StageInfo.current()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    t_start = time.perf_counter()
    try:
        with torch.no_grad():
            masks_ok, has_mamba, tree_masks_ok = model_traits(model, stage)
            state_kinds = inference_state_layout(model)
            mamba_layers = [layer for layer, kind in state_kinds.items() if kind == "mamba"]
            contexts_of_doc: dict[int, list[tuple[int, int]]] = {}
            for n, (b, t) in enumerate(contexts):
                contexts_of_doc.setdefault(b, []).append((n, t))

            prefill_jobs = [
                PrefillJob(docs, documents, contexts_of_doc, has_mamba, mamba_layers, device)
                for docs in _plan_prefill(contexts, stage, segmented=has_mamba)
            ]
            prefill = run_pipelined(model, stage, prefill_jobs, feedback=False)
            prefill_of = {}
            for job in prefill_jobs:
                for b in job.docs:
                    for n, t in contexts_of_doc[b]:
                        prefill_of[n] = (job, job.row_of_doc[b], t)

            rows_total = len(contexts) * num_thoughts
            mbs = micro_batch_size or (
                rows_total if stage.pp_size == 1 else math.ceil(rows_total / stage.pp_size)
            )
            chosen = _choose_layout(
                layout, tree_masks_ok, has_mamba, contexts, num_thoughts, max_thought_len
            )
            common = (max_thought_len, open_id, close_id, eod_id, float(temperature), int(seed), device)
            builders = _decode_builders(
                model, stage, chosen, contexts, num_thoughts, micro_batch_size, mbs, masks_ok,
                state_kinds, prefill_of, common,
                dict(vocab_size=vocab_size, stop_sequences=stop_sequences), cuda_graphs, device,
            )
            memory = CacheAccounting()
            memory.allocate(sum(prefill_cache_bytes(job) for job in prefill_jobs))
            # Decode in waves of pp_size micro-batches (enough to keep the stages busy): each
            # wave's caches are built from the prefill, decoded and freed before the next, so
            # the decode caches held at once are bounded by the micro-batch size.
            decode_jobs, phases, fork_s = [], [], 0.0
            for first in range(0, len(builders), stage.pp_size):
                t_fork = time.perf_counter()
                wave = [build() for build in builders[first : first + stage.pp_size]]
                fork_s += time.perf_counter() - t_fork
                wave_bytes = sum(job.cache_bytes for job in wave)
                memory.allocate(wave_bytes, decode=True)
                phases.append(run_pipelined(model, stage, wave, feedback=True))
                for job in wave:
                    _release(job)
                memory.free(wave_bytes, decode=True)
                decode_jobs.extend(wave)
            for job in prefill_jobs:  # free the prefill caches
                job.context = None
                job.snapshots = {}
            decode = merge_phases(phases)
            batch = assemble_batch(
                decode_jobs, contexts, num_thoughts, max_thought_len, stage, device,
                open_id=open_id, close_id=close_id, eod_id=eod_id,
                temperature=float(temperature), seed=int(seed),
            )
    finally:
        model.train(was_training)
    total_s = time.perf_counter() - t_start
    stats = summary_stats(batch)
    padded_slots = sum(int(job.pad_start.sum()) for job in decode_jobs)
    stats.update(
        {
            "contexts": len(contexts),
            "rows": len(contexts) * num_thoughts,
            "prefill_tokens": sum(job.tokens_fed for job in prefill_jobs),
            "prefill_microbatches": len(prefill_jobs),
            "prefill_forwards": len(prefill.items),
            "decode_microbatches": len(decode_jobs),
            "decode_steps": len(decode.items),
            "padded_context_slots": padded_slots,
            "kv_slot_reads": sum(job.kv_slot_reads for job in decode_jobs),
            "decode_row_steps": sum(job.row_steps for job in decode_jobs),
            "masked_decode": masks_ok,
            "layout": chosen,
            "cache_bytes_peak": memory.peak,
            "decode_cache_bytes_peak": memory.decode_peak,
            "cuda_graph_replays": sum(getattr(job, "graph_replays", 0) for job in decode_jobs),
            "prefill_s": prefill.seconds,
            "fork_s": fork_s,
            "decode_s": decode.seconds,
            "total_s": total_s,
            "tokens_per_s": stats["thought_tokens"] / max(total_s, 1e-9),
            "pipeline_stages": stage.pp_size,
            "prefill_bubble": prefill.bubble,
            "decode_bubble": decode.bubble,
            "bubble": _combined_bubble(prefill, decode),
            "recv_wait_s": prefill.recv_wait_s + decode.recv_wait_s,
        }
    )
    batch.stats = stats
    return batch


def _choose_layout(layout: str, tree_masks_ok: bool, has_mamba: bool, contexts, g: int, length: int) -> str:
    """The decode layout: "tree" needs an attention-only model whose attention applies the mask
    to several query tokens per row (``model_traits``); "rows" and "cascade" run with any model.
    "auto" picks the one of "tree" and "rows" with the smaller estimated attention work
    (:func:`decode_cost`) where "tree" can run, and "cascade" where it cannot (Transformer
    Engine's or a fused-softmax attention, Mamba layers)."""
    tree_ok = tree_masks_ok and not has_mamba
    if layout == "tree" and not tree_ok:
        raise ValueError(
            "the 'tree' decode layout needs an attention-only model whose core attention applies "
            "an explicit mask to several query tokens (megatron's local DotProductAttention "
            "without the fused causal softmax: masked_softmax_fusion=False, or fp32); use "
            "'cascade' (prefix shared without a mask) or 'rows'"
        )
    if layout != "auto":
        return layout
    if not tree_ok:
        return "cascade"
    ts = [t for _, t in contexts]
    return "tree" if decode_cost("tree", ts, g, length) <= decode_cost("rows", ts, g, length) else "rows"


def decode_cost(layout: str, context_lengths, g: int, length: int) -> float:
    """Estimated attention work of decoding (arbitrary units), summed over steps and contexts.

    Per step, megatron's static attention rotates, GQA-expands and reads the whole cached K/V of
    each cache row (about four passes over the slots) and forms one score per query and slot.
    rows: G cache rows of t + u slots, one query each -> 5 G (t + u).
    tree: one cache row of t + uG slots, G queries -> (4 + G)(t + uG).
    Summed over u < L: rows 5G (tL + L^2/2), tree (4+G)(tL + G L^2/2).  Tree wins for long
    contexts and short thoughts (the benchmark's setting); rows for thoughts much longer than the
    context (the suffix of all G branches is read by every branch in the tree layout).
    """
    lsq = length * length / 2.0
    if layout == "rows":
        return sum(5.0 * g * (t * length + lsq) for t in context_lengths)
    return sum((4.0 + g) * (t * length + g * lsq) for t in context_lengths)


def _combined_bubble(*phases) -> float:
    """Idle fraction of the stage-steps of several phases run one after the other."""
    ticks = sum(p.ticks for p in phases)
    if ticks == 0:
        return 0.0
    return 1.0 - sum(len(p.items) for p in phases) / ticks
