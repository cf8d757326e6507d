"""Running inference micro-batches through the pipeline stages, stages working concurrently.

Every rank of a pipeline group walks the same list of work items — (micro-batch m, step u),
step-major: all micro-batches' step 0, then all step 1, ... — and for each item:

* the first stage embeds the step's input ids; every other stage receives the previous stage's
  hidden state [s, b, h] (``irecv`` from the previous pipeline rank);
* it runs its layers once with the micro-batch's own inference context (KV cache);
* it sends its output hidden state to the next stage with a non-blocking ``isend`` and goes on
  to its next item at once; the last stage turns the final hidden state into the micro-batch's
  next input (sampled token ids) and sends that small message — ids plus a "still running" flag,
  never logits — back to every other stage (the first needs the ids, the middle ones the flag).

Because sends never block, stage s works on micro-batch m+1 while stage s+1 works on m; with at
least as many micro-batches as stages the loop back from the last stage to the first is hidden
(step u+1 of micro-batch m starts after step u of m left the last stage, while the other
micro-batches keep the stages busy).  :func:`schedule_bubble` replays the executed items with unit
time per stage-step and reports the idle fraction; the wall time spent waiting in receives is
measured as well.

The model's own ``forward`` is used with megatron's ``inference_context``; on the last stage the
model is told (for the duration of the call) that it has no post-process, so it returns the final
(normed) hidden states instead of gathered logits, and :func:`vocab_shard_logits` applies the
output layer's weight in fp32 (as the trainer's log-probs do) without gathering: logits stay
vocabulary-sharded.  (megatron-core 0.16.1 asserts
``runtime_gather_output`` in inference mode, i.e. it would all-gather the full vocabulary on
every TP rank; this is how the sampler avoids that.)
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from megatron_rlp import collectives


@dataclass
class StageInfo:
    """Where this rank sits in its pipeline, with global ranks for point-to-point messages."""

    pp_rank: int
    pp_size: int
    prev_rank: Optional[int]
    next_rank: Optional[int]
    last_rank: int
    group_ranks: list[int]
    pp_group: object
    tp_group: object

    @property
    def is_first(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def others(self) -> list[int]:
        """Global ranks of the other stages of this pipeline."""
        return [r for i, r in enumerate(self.group_ranks) if i != self.pp_rank]

    @classmethod
    def current(cls) -> "StageInfo":
        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError(
                "the sampler needs megatron-core's parallel state "
                "(megatron_rlp.training.parallel.init_model_parallel)"
            )
        pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        ranks = dist.get_process_group_ranks(pp_group) if pp_size > 1 else [dist.get_rank()]
        return cls(
            pp_rank=pp_rank,
            pp_size=pp_size,
            prev_rank=ranks[pp_rank - 1] if pp_rank > 0 else None,
            next_rank=ranks[pp_rank + 1] if pp_rank < pp_size - 1 else None,
            last_rank=ranks[-1],
            group_ranks=list(ranks),
            pp_group=pp_group,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
        )


@contextlib.contextmanager
def final_hidden_states(model):
    """While active, the model (on the last stage) returns its final normed hidden states [s, b, h]
    instead of logits; nothing changes on other stages."""
    had = bool(getattr(model, "post_process", False))
    if had:
        model.post_process = False
    try:
        yield
    finally:
        if had:
            model.post_process = True


def rope_table(model, positions: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """megatron's RoPE angle table [len(positions), 1, 1, dim] with row j for position
    ``positions[j]`` (None for a model without RoPE or without positions)."""
    rope = getattr(model, "rotary_pos_emb", None)
    if positions is None or rope is None or getattr(model, "position_embedding_type", None) != "rope":
        return None
    return rope.get_emb(int(positions.max()) + 1)[positions.to(rope.inv_freq.device)]


@contextlib.contextmanager
def rope_positions(model, table: Optional[torch.Tensor]):
    """While active, the model's rotary embedding returns ``table`` (see :func:`rope_table`):
    megatron's static-batching attention rotates the query at slots ``offset : offset + s`` and the
    cached keys at slots ``0 : offset + s`` with rows of this table, so cache slot j behaves as
    sequence position ``positions[j]``."""
    if table is None:
        yield
        return
    rope = model.rotary_pos_emb
    rope.forward = lambda *args, **kwargs: table
    try:
        yield
    finally:
        del rope.forward


# Vocabulary rows upcast at a time by vocab_shard_logits (a 64 MiB fp32 block at h = 4096).
LOGITS_BLOCK_ELEMENTS = 1 << 24


def vocab_shard_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """This TP rank's fp32 logits [n, V/tp] for final hidden states [n, h] (no gather).

    The same numbers the trainer's log-probs come from (``kernels.linear_logprob``: low-precision
    hidden states and weights multiplied exactly, accumulated and kept in fp32), not megatron's
    output layer, whose bf16 logits are rounded to 8 bits of mantissa (0.25 apart at |z| = 40):
    π_sample must match π_train on the same hidden states.  The weight shard is upcast in blocks
    of vocabulary rows so no fp32 copy of the whole shard is held."""
    # Tied embeddings: the output layer holds no weight on a stage that also embeds; a later
    # last stage holds megatron's tied copy.  (Not shared_embedding_or_output_weight(): it asks
    # post_process, which final_hidden_states switches off while the sampler runs.)
    weight = model.output_layer.weight
    if weight is None:
        weight = model.embedding.word_embeddings.weight
    bias = getattr(model.output_layer, "bias", None)
    h = hidden.float()
    rows = max(1, LOGITS_BLOCK_ELEMENTS // max(1, weight.shape[1]))
    if weight.shape[0] <= rows:
        logits = h @ weight.float().t()
    else:
        logits = torch.empty(h.shape[0], weight.shape[0], dtype=torch.float32, device=h.device)
        for start in range(0, weight.shape[0], rows):
            logits[:, start : start + rows] = h @ weight[start : start + rows].float().t()
    if bias is not None:
        logits += bias.float()
    return logits


@dataclass
class StepInput:
    ids: Optional[torch.Tensor]  # [b, s] token ids (read on the first stage)
    position_ids: torch.Tensor  # [b, s]
    attention_mask: Optional[torch.Tensor]  # [b, 1, s, keys] bool, True = masked; None = causal
    seq_len: int


class Job(Protocol):
    """One micro-batch with its own inference context (see module docstring)."""

    context: object
    batch_size: int  # rows of the model call (cache rows)
    feedback_size: int  # ids the last stage sends back after a step (decoding jobs)
    num_steps: int
    active: bool
    # optional ``rope_table`` attribute: RoPE angles per cache slot (see rope_positions)

    def step_input(self, step: int) -> StepInput: ...

    def after_forward(self, step: int) -> None:
        """Called on every stage after its forward of ``step`` (e.g. to snapshot states)."""

    def on_output(self, step: int, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """Last stage: final hidden states [s, b, h] -> next input ids [feedback_size] (or None);
        may clear ``active``."""

    def on_feedback(self, step: int, ids: torch.Tensor, active: int) -> None:
        """Other stages: the ids and flag (0 = finished) the last stage produced after ``step``."""


@dataclass
class PhaseStats:
    items: list = field(default_factory=list)  # executed (micro-batch, step), in order
    seconds: float = 0.0
    recv_wait_s: float = 0.0
    bubble: float = 0.0
    ticks: int = 0


def run_pipelined(model, stage: StageInfo, jobs: list, feedback: bool) -> PhaseStats:
    """Run every job's steps through the pipeline (see module docstring).

    ``feedback``: step u+1 of a job depends on the last stage's output of step u (decoding);
    without it every step's input is known in advance (teacher-forced prefill).
    """
    stats = PhaseStats()
    config = model.config
    dtype = config.pipeline_dtype or config.params_dtype
    hidden_size = config.hidden_size
    device = next(model.parameters()).device
    pending: list = []  # (work, tensor) of non-blocking sends
    t0 = time.perf_counter()
    max_steps = max((job.num_steps for job in jobs), default=0)
    with final_hidden_states(model):
        for step in range(max_steps):
            for m, job in enumerate(jobs):
                if step >= job.num_steps or not job.active:
                    continue
                if feedback and step > 0 and not stage.is_last:
                    msg = torch.empty(job.feedback_size + 1, dtype=torch.int64, device=device)
                    stats.recv_wait_s += _recv(msg, stage.last_rank)
                    job.on_feedback(step - 1, msg[:-1], int(msg[-1].item()))
                    if not job.active:
                        continue
                inp = job.step_input(step)
                if not stage.is_first:
                    hidden_in = torch.empty(
                        inp.seq_len, job.batch_size, hidden_size, dtype=dtype, device=device
                    )
                    stats.recv_wait_s += _recv(hidden_in, stage.prev_rank)
                    model.set_input_tensor(hidden_in)
                if hasattr(job, "forward"):  # a job with its own step (sampling.cascade)
                    out = job.forward(model, inp, None if stage.is_first else hidden_in)
                else:
                    with rope_positions(model, getattr(job, "rope_table", None)):
                        out = model(
                            inp.ids if stage.is_first else None,
                            inp.position_ids,
                            inp.attention_mask,
                            inference_context=job.context,
                            runtime_gather_output=True,  # megatron asserts it; no output layer runs
                        )
                    job.context.sequence_len_offset += inp.seq_len
                job.after_forward(step)
                stats.items.append((m, step))
                if not stage.is_last:
                    out = out.contiguous()
                    pending.append((collectives.isend(out, stage.next_rank), out))
                else:
                    ids = job.on_output(step, out)
                    if feedback and step + 1 < job.num_steps and stage.pp_size > 1:
                        # The flag: "still running" (a job's ``feedback_flag``, e.g. its
                        # running rows); torch.full, not torch.tensor: no host-to-device copy.
                        flag = int(getattr(job, "feedback_flag", job.active))
                        msg = torch.cat(
                            [ids.to(torch.int64), torch.full((1,), flag, dtype=torch.int64, device=ids.device)]
                        )
                        for rank in stage.others:
                            pending.append((collectives.isend(msg, rank), msg))
                if len(pending) > 64:
                    pending = _reap(pending)
    for work, _ in pending:
        work.wait()
    if not stage.is_first:
        model.set_input_tensor(None)  # drop the reference to the last received hidden state
    if device.type == "cuda":
        # The phase's time must hold its kernels, not only their launch (the prefill's tail would
        # land in the decode's first step, which waits for the sampled ids anyway: costs nothing).
        torch.cuda.synchronize(device)
    stats.seconds = time.perf_counter() - t0
    stats.ticks, stats.bubble = schedule_bubble(stats.items, stage.pp_size, feedback)
    return stats


def _recv(buffer: torch.Tensor, src: int) -> float:
    t = time.perf_counter()
    collectives.recv(buffer, src)
    return time.perf_counter() - t


def _reap(pending: list) -> list:
    alive = []
    for work, tensor in pending:
        if work.is_completed():
            work.wait()
        else:
            alive.append((work, tensor))
    return alive


def schedule_bubble(items: list, num_stages: int, feedback: bool) -> tuple[int, float]:
    """(span in stage-steps, idle fraction) of executing ``items`` [(m, u), ...] in order on
    ``num_stages`` stages, each stage-step taking one tick: an item starts on stage s once stage
    s is free and the item left stage s-1; with ``feedback``, step u of micro-batch m starts on the
    first stage only after step u-1 of m left the last stage."""
    if not items:
        return 0, 0.0
    free = [0] * num_stages
    finish: dict = {}
    for m, u in items:
        for s in range(num_stages):
            start = free[s]
            if s > 0:
                start = max(start, finish[(s - 1, m, u)])
            elif feedback and u > 0 and (num_stages - 1, m, u - 1) in finish:
                start = max(start, finish[(num_stages - 1, m, u - 1)])
            finish[(s, m, u)] = free[s] = start + 1
    span = max(free)
    return span, 1.0 - len(items) * num_stages / (num_stages * span)
