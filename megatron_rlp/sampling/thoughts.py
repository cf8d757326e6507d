"""The thought batch, input validation, and the two kinds of micro-batch jobs the sampler runs.

See :mod:`megatron_rlp.sampling.sampler` for how they fit together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from megatron.core.inference.contexts import StaticInferenceContext

from megatron_rlp.sampling.pipeline import StageInfo, StepInput, rope_table, vocab_shard_logits
from megatron_rlp.sampling.vocab_parallel import sample_vocab_parallel

STOP_CLOSE = 0  # the close marker was sampled (it is the last thought token and gets gradient)
STOP_EOD = 1  # end-of-document was sampled (last thought token); the close is appended by force
STOP_LENGTH = 2  # the length cap was reached; the close is appended by force
STOP_SEQUENCE = 3  # the row's last tokens are one of the request's stop sequences (generation)
PAD_ID = -1  # padding of ThoughtBatch.tokens beyond a thought's length


@dataclass
class ThoughtBatch:
    """G thoughts for each of N (document, position) contexts; rows are ordered as the caller's
    ``positions`` (document by document, then position by position).

    Token and log-prob tensors are [N, G, L] (L = ``max_thought_len``), left-aligned; entries past
    ``lengths`` are padding (``PAD_ID`` tokens, 0 log-probs).
    """

    tokens: torch.Tensor
    """[N, G, L] int64: the *sampled* thought tokens.  A sampled close marker (or EOD) is the last
    of them and counts as a thought token; a forced close is not stored here."""
    logprobs: torch.Tensor
    """[N, G, L] fp32: log p_θ(token | x_<t, open, earlier thought tokens) — the model's untempered
    log-probability (logits / 1); the RLP step's sampling-time record with --rlp-untempered-ratio."""
    tempered_logprobs: torch.Tensor
    """[N, G, L] fp32: log-probability under softmax(logits / T), the distribution actually
    sampled from (0 when greedy: a point mass); the policy the RLP ratio scores by default."""
    lengths: torch.Tensor
    """[N, G] int64: number of sampled thought tokens, 1..L."""
    forced: torch.Tensor
    """[N, G] bool: the close marker was not sampled (length cap or EOD) and must be appended by
    force; the forced close is not a sampled token (no log-prob, no gradient)."""
    stop_reason: torch.Tensor
    """[N, G] int64: STOP_CLOSE, STOP_EOD or STOP_LENGTH."""
    doc_index: torch.Tensor
    """[N] int64: the document of each context."""
    position: torch.Tensor
    """[N] int64: the position t of each context (context x_<t = document[:t], target document[t])."""
    open_id: int
    close_id: int
    eod_id: Optional[int]
    temperature: float
    seed: int
    stats: dict = field(default_factory=dict)

    @property
    def num_contexts(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_thoughts(self) -> int:
        return self.tokens.shape[1]

    @property
    def max_thought_len(self) -> int:
        return self.tokens.shape[2]

    @property
    def mask(self) -> torch.Tensor:
        """[N, G, L] bool: which entries are sampled thought tokens."""
        steps = torch.arange(self.max_thought_len, device=self.lengths.device)
        return steps < self.lengths[..., None]

    def closed_tokens(self, pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
        """([N, G, L+1] tokens, [N, G] lengths): every thought ending with a close marker — the
        sampled one, or the forced one appended after the sampled tokens — padded with
        ``pad_id``.  This is the part between the open marker and x_t of an update sequence."""
        n, g, length = self.tokens.shape
        out = torch.full((n, g, length + 1), pad_id, dtype=torch.int64, device=self.tokens.device)
        out[..., :length] = torch.where(self.mask, self.tokens, torch.full_like(self.tokens, pad_id))
        forced_at = self.lengths.clamp(max=length)
        closing = torch.full_like(self.lengths, self.close_id)
        current = out.gather(-1, forced_at[..., None])[..., 0]
        out.scatter_(-1, forced_at[..., None], torch.where(self.forced, closing, current)[..., None])
        return out, self.lengths + self.forced.long()


def sampling_vocab_size(model, vocab_size: Optional[int]) -> Optional[int]:
    """The ids a sampler may draw: ``0 .. vocab_size-1`` (the tokenizer's vocabulary), never the
    padding of the model's embedding past it.  ``None`` means the model's whole vocabulary."""
    model_vocab = getattr(model, "vocab_size", None)
    if vocab_size is None:
        return model_vocab
    if model_vocab is not None and isinstance(vocab_size, int) and vocab_size > model_vocab:
        raise ValueError(
            f"vocab_size {vocab_size} exceeds the model's vocabulary ({model_vocab}); the tokenizer "
            "has more ids than the embedding: raise --model-vocab-size or pick a smaller tokenizer"
        )
    return vocab_size


def validate_request(
    documents: Sequence[torch.Tensor],
    positions: Sequence[Sequence[int]],
    num_thoughts: int,
    max_thought_len: int,
    temperature: float,
    max_sequence_length: int,
    token_ids: dict,
    vocab_size: Optional[int],
) -> list[tuple[int, int]]:
    """Check a sampling request; returns the (document, position) contexts in order."""
    if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size < 1):
        raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
    if not isinstance(num_thoughts, int) or num_thoughts < 1:
        raise ValueError(f"num_thoughts (G) must be an integer >= 1, got {num_thoughts!r}")
    if not isinstance(max_thought_len, int) or max_thought_len < 1:
        raise ValueError(f"max_thought_len must be an integer >= 1, got {max_thought_len!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if len(positions) != len(documents):
        raise ValueError(
            f"positions has {len(positions)} lists for {len(documents)} documents; give one list "
            "of positions per document"
        )
    for name, value in token_ids.items():
        if value is None:
            continue
        if not isinstance(value, int) or value < 0 or (vocab_size is not None and value >= vocab_size):
            raise ValueError(f"{name} {value!r} is not a token id of the {vocab_size}-token vocabulary")
    contexts = []
    for b, (doc, pos) in enumerate(zip(documents, positions)):
        if not torch.is_tensor(doc) or doc.dim() != 1:
            raise ValueError(f"document {b} must be a 1-D tensor of token ids")
        n = doc.numel()
        for t in pos:
            t = int(t)
            if t < 1 or t > n - 1:
                raise ValueError(
                    f"position {t} of document {b} is outside the document: a position t needs "
                    f"a non-empty context x_<t and a target x_t, so 1 <= t <= {n - 1} for this "
                    f"{n}-token document"
                )
            # The row's inputs: x_<t, open, up to L thought tokens, close (x_t is the last label).
            need = t + max_thought_len + 2
            if need > max_sequence_length:
                raise ValueError(
                    f"document {b}, position {t}: a prefix of {t} tokens plus a thought of up to "
                    f"max_thought_len={max_thought_len} tokens (with the open and close markers: "
                    f"{need} input tokens) is longer than the maximum sequence length "
                    f"{max_sequence_length}"
                )
            contexts.append((b, t))
    if not contexts:
        raise ValueError("no positions given: nothing to sample")
    return contexts


class PrefillJob:
    """Prefill a micro-batch of documents once.

    GPT: one call over document[:P] (P = the largest position of these documents; shorter
    documents are padded on the right, which causal attention never reads back).  Afterwards the
    KV cache of x_<t of every context is the first t slots of its document's row.

    Hybrid (Mamba layers, ``segmented``): a Mamba layer keeps only the state after the last token
    it consumed, so the calls end at the sampled positions t_1 < t_2 < ... < t_k (distinct
    positions of these documents): step 0 covers document[:t_1], step i document[t_i : t_{i+1}]
    — k forwards, each a multi-token chunk (a one-token chunk where two positions are adjacent)
    that the Mamba layers continue from their conv/SSM states and the attention layers append to
    their KV cache causally (``megatron_rlp.models.hybrid``: ``HybridMambaMixer.ssm_continue``,
    ``HybridSelfAttention``).  After the step ending at t the Mamba states of every context at
    position t are copied out (on every stage, for its layers).  ``ends`` lists the last slot + 1
    of every step; ``forwards`` counts the executed steps.
    """

    def __init__(
        self,
        docs: list[int],
        documents: Sequence[torch.Tensor],
        contexts_of_doc: dict[int, list[tuple[int, int]]],
        segmented: bool,
        mamba_layers: list[int],
        device: torch.device,
    ):
        self.docs = docs
        ts = [t for b in docs for _, t in contexts_of_doc[b]]
        self.length = max(ts)
        self.ends = sorted(set(ts)) if segmented else [self.length]
        tokens = torch.zeros(len(docs), self.length, dtype=torch.int64)
        for i, b in enumerate(docs):
            n = min(documents[b].numel(), self.length)
            tokens[i, :n] = documents[b][:n].to(torch.int64)
        self.tokens = tokens.to(device)
        self.batch_size = len(docs)
        self.feedback_size = 0  # teacher-forced: nothing comes back from the last stage
        self.num_steps = len(self.ends)
        self.forwards = 0
        self.active = True
        self.context = StaticInferenceContext(self.batch_size, self.length)
        self.context.materialize_only_last_token_logits = False
        self.mamba_layers = mamba_layers
        self.row_of_doc = {b: i for i, b in enumerate(docs)}
        self.snap_at: dict[int, list[tuple[int, int]]] = {}
        for b in docs:
            for n, t in contexts_of_doc[b]:
                self.snap_at.setdefault(t, []).append((n, self.row_of_doc[b]))
        self.snapshots: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.device = device

    @property
    def tokens_fed(self) -> int:
        return self.batch_size * self.length

    def step_input(self, step: int) -> StepInput:
        start = self.ends[step - 1] if step else 0
        end = self.ends[step]
        pos = torch.arange(start, end, device=self.device).expand(self.batch_size, -1)
        return StepInput(self.tokens[:, start:end], pos, None, end - start)

    def after_forward(self, step: int) -> None:
        self.forwards += 1
        for n, row in self.snap_at.get(self.ends[step], []):
            states = self.snapshots.setdefault(n, {})
            for layer in self.mamba_layers:
                conv, ssm = self.context.key_value_memory_dict[layer]
                states[layer] = (conv[row].clone(), ssm[row].clone())

    def on_output(self, step: int, hidden: torch.Tensor):
        return None

    def on_feedback(self, step: int, ids: torch.Tensor, active: bool) -> None:
        raise AssertionError("prefill jobs take no feedback")


class ThoughtRecorder:
    """Samples the next token of every row of a decode micro-batch and records the thoughts
    (meaningful on the last pipeline stage, where the logits are)."""

    def __init__(self, model, stage: StageInfo, rows: torch.Tensor, max_thought_len: int,
                 close_id: int, eod_id: Optional[int], temperature: float, seed: int,
                 device: torch.device, vocab_size: Optional[int] = None,
                 stop_sequences: Sequence[Sequence[int]] = ()):
        self.model, self.stage = model, stage
        # Token sequences that end a row once sampled (generation's stop strings); matched on the
        # device against the row's last tokens: static shapes, no host sync.
        self.stop_sequences = [torch.tensor(list(q), dtype=torch.int64, device=device) for q in stop_sequences if len(q)]
        self.rows = rows.to(device)
        self.close_id, self.eod_id = close_id, eod_id
        self.temperature, self.seed = temperature, seed
        self.num_steps = max_thought_len
        b, length = rows.numel(), max_thought_len
        self.tokens = torch.full((b, length), PAD_ID, dtype=torch.int64, device=device)
        self.logprobs = torch.zeros(b, length, dtype=torch.float32, device=device)
        self.tempered = torch.zeros(b, length, dtype=torch.float32, device=device)
        self.lengths = torch.zeros(b, dtype=torch.int64, device=device)
        self.stop = torch.full((b,), -1, dtype=torch.int64, device=device)
        self.done = torch.zeros(b, dtype=torch.bool, device=device)
        # Ids >= vocab_size (the output layer's padding past the tokenizer) are never sampled:
        # they are not text, and a policy that learns to emit them games the reward.  The
        # samplers resolve it with sampling_vocab_size; None draws from every row.
        self.vocab_size = vocab_size

    def record(self, step: int, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [rows, h] of ``step`` -> sampled tokens [rows]."""
        return self.record_logits(step, vocab_shard_logits(self.model, hidden))

    def record_logits(self, step: int, logits: torch.Tensor) -> torch.Tensor:
        """This TP rank's vocabulary shard of the logits [rows, V/tp] -> sampled tokens [rows]."""
        return self.record_live(step, logits, None)

    def record_live(self, step: int, logits: torch.Tensor, live: Optional[torch.Tensor]) -> torch.Tensor:
        """Like :meth:`record_logits` for the rows ``live`` (indices into this recorder's rows;
        None: all rows) only: ``logits`` [len(live), V/tp].  No host sync: rows that finished
        earlier keep their records (``torch.where``, no boolean indexing)."""
        rows = self.rows if live is None else self.rows[live]
        s = sample_vocab_parallel(
            logits, self.temperature, self.seed, step, rows,
            tp_group=self.stage.tp_group, vocab_size=self.vocab_size,
        )
        at = slice(None) if live is None else live
        done = self.done[at]
        running = ~done
        self.tokens[at, step] = torch.where(running, s.tokens, self.tokens[at, step])
        self.logprobs[at, step] = torch.where(running, s.logprobs, self.logprobs[at, step])
        self.tempered[at, step] = torch.where(running, s.tempered_logprobs, self.tempered[at, step])
        self.lengths[at] += running.long()
        closed = running & (s.tokens == self.close_id)
        ended = running & ~closed
        if self.eod_id is not None:
            ended &= s.tokens == self.eod_id
        else:
            ended &= torch.zeros_like(ended)
        stop = torch.where(closed, STOP_CLOSE, torch.where(ended, STOP_EOD, self.stop[at]))
        for seq in self.stop_sequences:
            m = seq.numel()
            if step + 1 >= m:
                hit = running & ~closed & ~ended & (self.tokens[at, step + 1 - m: step + 1] == seq).all(dim=-1)
                stop = torch.where(hit, STOP_SEQUENCE, stop)
                ended = ended | hit
        done = done | closed | ended
        if step == self.num_steps - 1:
            stop = torch.where(done, stop, STOP_LENGTH)
            done = torch.ones_like(done)
        self.stop[at] = stop
        self.done[at] = done
        return s.tokens

    @property
    def all_done(self) -> bool:
        return bool(self.done.all())


class ThoughtJob:
    """Decode a micro-batch with one cache row per branch ("rows" layout).

    All rows share one cache offset: a row whose context has t tokens holds them right-aligned in
    slots [A-t, A) (A = the longest context of the micro-batch), the open marker goes to slot A,
    thought token u to slot A+u.  Slots before A-t are masked per row.  megatron keeps keys in the
    cache before RoPE and rotates the whole cached prefix by slot at every step, so a uniform shift
    of a row keeps every query-key distance, i.e. the same attention as without the shift.

    With ``prefix`` [rows, A] (the naive samplers; left-padded to A, masked) step 0 is instead
    a fresh prefill of x_<t + open marker.
    """

    def __init__(
        self,
        model,
        stage: StageInfo,
        rows: torch.Tensor,
        context_lengths: torch.Tensor,
        context: StaticInferenceContext,
        align: int,
        max_thought_len: int,
        open_id: int,
        close_id: int,
        eod_id: Optional[int],
        temperature: float,
        seed: int,
        device: torch.device,
        prefix: Optional[torch.Tensor] = None,
        vocab_size: Optional[int] = None,
        stop_sequences: Sequence[Sequence[int]] = (),
    ):
        self.recorder = ThoughtRecorder(
            model, stage, rows, max_thought_len, close_id, eod_id, temperature, seed, device,
            vocab_size=vocab_size, stop_sequences=stop_sequences,
        )
        self.batch_size = self.feedback_size = rows.numel()
        self.context = context
        self.align = align
        self.num_steps = max_thought_len
        self.open_id = open_id
        self.device = device
        self.prefix = prefix
        self.active = True
        self.pad_start = (align - context_lengths.to(device)).to(torch.int64)
        self.need_mask = bool((self.pad_start > 0).any())
        self.next_ids: Optional[torch.Tensor] = None
        self.kv_slot_reads = 0  # sum over executed steps of cache rows x slots attended
        self.row_steps = 0  # sum over executed steps of the branch rows computed
        self.rope_table = None  # slot j = position j (up to each row's uniform shift)

    def step_input(self, step: int) -> StepInput:
        b = self.batch_size
        slot = self.align + step
        self.kv_slot_reads += b * (slot + 1)
        self.row_steps += b
        if step == 0 and self.prefix is not None:
            opener = torch.full((b, 1), self.open_id, dtype=torch.int64, device=self.device)
            ids = torch.cat([self.prefix.to(self.device), opener], dim=1)
            pos = torch.arange(slot + 1, device=self.device).expand(b, -1)
            mask = None
            if self.need_mask:  # left-padded prefixes: causal, and no query sees the padding
                keys = torch.arange(slot + 1, device=self.device)
                causal = keys[None, :] > keys[:, None]
                mask = (causal[None] | (keys[None, None, :] < self.pad_start[:, None, None]))[:, None]
            return StepInput(ids, pos, mask, slot + 1)
        if step == 0:
            ids = torch.full((b, 1), self.open_id, dtype=torch.int64, device=self.device)
        else:
            ids = self.next_ids[:, None]
        pos = torch.full((b, 1), slot, dtype=torch.int64, device=self.device)
        mask = None
        if self.need_mask:
            keys = torch.arange(slot + 1, device=self.device)
            mask = (keys[None, :] < self.pad_start[:, None])[:, None, None, :]
        return StepInput(ids, pos, mask, 1)

    def after_forward(self, step: int) -> None:
        return None

    def on_output(self, step: int, hidden: torch.Tensor) -> torch.Tensor:
        tokens = self.recorder.record(step, hidden[-1])
        self.active = not self.recorder.all_done
        self.next_ids = tokens
        return tokens

    def on_feedback(self, step: int, ids: torch.Tensor, active: bool) -> None:
        self.next_ids = ids.clone()
        self.active = bool(active)


class TreeThoughtJob:
    """Decode a micro-batch with one cache row per *context* ("tree" layout, prefix shared).

    Row n of the cache holds x_<t right-aligned in slots [A-t, A) and the open marker at slot A,
    once for all G branches; decode step u >= 1 feeds the G branches' token u together as G query
    tokens at slots A+1+(u-1)G .. A+uG.  The attention mask lets branch g see its context, the
    open marker and its own earlier tokens only; a RoPE table maps each slot to its position in
    the branch's own sequence (slot A+1+(u-1)G+g -> position A+u), so every query-key distance is
    the one of the plain sequence (x_<t, open, c_1..c_u).  The prefix keys/values are stored,
    rotated and read once per context instead of once per branch, and step 0 (the open marker)
    runs once per context: the first thought token of the G branches is drawn G times from the
    same distribution, with different noise.
    """

    def __init__(
        self,
        model,
        stage: StageInfo,
        contexts: list[int],
        context_lengths: torch.Tensor,
        context: StaticInferenceContext,
        align: int,
        num_thoughts: int,
        max_thought_len: int,
        open_id: int,
        close_id: int,
        eod_id: Optional[int],
        temperature: float,
        seed: int,
        device: torch.device,
        vocab_size: Optional[int] = None,
        stop_sequences: Sequence[Sequence[int]] = (),
    ):
        g = num_thoughts
        rows = torch.tensor([n * g + j for n in contexts for j in range(g)], dtype=torch.int64)
        self.recorder = ThoughtRecorder(
            model, stage, rows, max_thought_len, close_id, eod_id, temperature, seed, device,
            vocab_size=vocab_size, stop_sequences=stop_sequences,
        )
        self.num_thoughts = g
        self.batch_size = len(contexts)
        self.feedback_size = rows.numel()
        self.context = context
        self.align = align
        self.num_steps = max_thought_len
        self.open_id = open_id
        self.device = device
        self.active = True
        self.pad_start = (align - context_lengths.to(device)).to(torch.int64)
        self.next_ids: Optional[torch.Tensor] = None
        self.kv_slot_reads = 0
        self.row_steps = 0
        slots = torch.arange(context.max_sequence_length, device=device)
        positions = torch.where(
            slots <= align, slots, align + 1 + torch.div(slots - align - 1, g, rounding_mode="floor")
        )
        self.rope_table = rope_table(model, positions)

    @staticmethod
    def cache_length(align: int, num_thoughts: int, max_thought_len: int) -> int:
        """Slots a context needs: x_<t, the open marker, tokens 1..L-1 of G branches."""
        return align + 1 + (max_thought_len - 1) * num_thoughts

    def step_input(self, step: int) -> StepInput:
        c, g, a = self.batch_size, self.num_thoughts, self.align
        self.row_steps += c * g
        if step == 0:
            ids = torch.full((c, 1), self.open_id, dtype=torch.int64, device=self.device)
            keys = torch.arange(a + 1, device=self.device)
            mask = (keys[None, :] < self.pad_start[:, None])[:, None, None, :]
            pos = torch.full((c, 1), a, dtype=torch.int64, device=self.device)
            self.kv_slot_reads += c * (a + 1)
            return StepInput(ids, pos, mask, 1)
        base = a + 1 + (step - 1) * g
        keys = torch.arange(base + g, device=self.device)
        prefix_blocked = keys[None, :] < self.pad_start[:, None]  # [C, K]
        branch_of_key = torch.remainder(keys - a - 1, g)
        branch = torch.arange(g, device=self.device)
        other_branch = (keys[None, :] > a) & (branch_of_key[None, :] != branch[:, None])  # [G, K]
        mask = prefix_blocked[:, None, None, :] | other_branch[None, None, :, :]
        ids = self.next_ids.view(c, g)
        pos = torch.full((c, g), a + step, dtype=torch.int64, device=self.device)
        self.kv_slot_reads += c * (base + g)
        return StepInput(ids, pos, mask, g)

    def after_forward(self, step: int) -> None:
        return None

    def on_output(self, step: int, hidden: torch.Tensor) -> torch.Tensor:
        g = self.num_thoughts
        if step == 0:  # one distribution per context, drawn G times
            logits = vocab_shard_logits(self.recorder.model, hidden[-1])
            tokens = self.recorder.record_logits(step, logits.repeat_interleave(g, dim=0))
        else:  # [G, C, h] -> rows n * G + g
            tokens = self.recorder.record(step, hidden.transpose(0, 1).reshape(-1, hidden.shape[-1]))
        self.active = not self.recorder.all_done
        self.next_ids = tokens
        return tokens

    def on_feedback(self, step: int, ids: torch.Tensor, active: bool) -> None:
        self.next_ids = ids.clone()
        self.active = bool(active)
