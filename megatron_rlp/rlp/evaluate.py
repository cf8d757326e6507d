"""Does thinking help?  The think-vs-no-think gain on held-out text (RLP_SPEC.md, Prop. 3).

For each held-out document and position t, G thoughts are sampled from the model; then

    gain      = log p_θ(x_t | x_<t, c) − log p_θ(x_t | x_<t)     (same model, with vs without)
    acc_think = [argmax p_θ(· | x_<t, c) == x_t],   acc_plain = [argmax p_θ(· | x_<t) == x_t]

averaged over thoughts and positions within a document, then over documents.  A document longer
than the budget is read in windows as RLP training reads it (``max_sequence_length`` holds the
context, the markers and a whole thought; consecutive windows overlap by ``min_context`` tokens),
and each position is scored in the one window that holds it.  Standard errors
are over documents (the unit that is resampled), so before/after comparisons can be paired per
document.  Runs on one model-parallel group (the sampler and the forwards are TP/PP-aware, but the
scoring here gathers full-vocabulary fp32 logits of the scored slots, which is fine for held-out
evaluation sizes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import numpy as np
import torch

from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_rlp import platform
from megatron_rlp.data.documents import window_start_of
from megatron_rlp.rlp.config import longest_context
from megatron_rlp.models.builder import without_sequence_parallel
from megatron_rlp.rlp.step import build_update_sequences
from megatron_rlp.sampling.pipeline import final_hidden_states, vocab_shard_logits


@dataclass
class ThinkingEval:
    gain: np.ndarray  # [docs] mean over positions and thoughts
    acc_think: np.ndarray
    acc_plain: np.ndarray
    logp_plain: np.ndarray
    thought_len: float
    closed_by_model: float  # share of thoughts whose close marker was sampled
    # [context][thought] sampled token ids without the close marker; contexts in document order
    # (within a document, window by window, each window's positions in the order given)
    thought_ids: list = field(default_factory=list)

    def summary(self) -> dict:
        def se(x):
            return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")

        return {
            "docs": int(len(self.gain)),
            "info_gain": float(self.gain.mean()), "info_gain_se": se(self.gain),
            "acc_think": float(self.acc_think.mean()), "acc_think_se": se(self.acc_think),
            "acc_plain": float(self.acc_plain.mean()), "acc_plain_se": se(self.acc_plain),
            "thought_len_mean": self.thought_len, "closed_by_model_frac": self.closed_by_model,
        }


def paired_change(before: np.ndarray, after: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the per-document change after − before."""
    diff = np.asarray(after) - np.asarray(before)
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))


@torch.no_grad()
def _score(model, tokens: torch.Tensor, slots: torch.Tensor, targets: torch.Tensor, batch_size: int,
           vocab_size: Optional[int] = None):
    """log p(target) and argmax-correctness at the given label slots, forward-only under megatron's
    pipeline schedule (every stage calls it with the same rows; lists of per-micro-batch results on
    the last stage, empty lists elsewhere).  The logits are the fp32 projection of the final hidden
    states that the sampler and the trainer use (a bf16 output layer is ~0.2 nats off at |logit| ~
    60).  ``vocab_size`` leaves the output layer's padded ids out of the softmax and the argmax."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    n = tokens.shape[0]
    size = min(batch_size, n)
    device = platform.device()
    batches = []
    for start in range(0, n, size):
        rows = torch.arange(start, start + size).clamp(max=n - 1)  # the schedule needs equal shapes
        batches.append({"tokens": tokens[rows], "slots": slots[rows], "targets": targets[rows],
                        "real": min(size, n - start)})

    def loss_func(batch, hidden):
        slot = batch["slots"].to(device)
        picked = hidden.transpose(0, 1)[torch.arange(size, device=device)[:, None], slot]  # [B, K, H]
        shard = vocab_shard_logits(model, picked.reshape(-1, picked.shape[-1]))
        logits = gather_from_tensor_model_parallel_region(shard).view(*slot.shape, -1)
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        logp = torch.log_softmax(logits, dim=-1)
        real = batch["real"]
        tgt = batch["targets"].to(device)
        return logp.new_zeros(()), {"logp": logp.gather(-1, tgt[..., None])[..., 0][:real],
                                    "ok": (logits.argmax(-1) == tgt).float()[:real]}

    def forward_step(data_iterator, stage_model):
        batch = next(data_iterator)
        tok = batch["tokens"].to(device)
        return stage_model(tok, torch.arange(tok.shape[1], device=device).expand_as(tok), None), partial(loss_func, batch)

    with final_hidden_states(model):
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
            num_microbatches=len(batches), seq_length=tokens.shape[1], micro_batch_size=size, forward_only=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return [], []
    return [o["logp"] for o in outputs], [o["ok"] for o in outputs]


def split_into_windows(documents: list[torch.Tensor], positions: list[list[int]], window: int, overlap: int):
    """(window tokens, positions in window coordinates) for every window of
    :func:`megatron_rlp.data.documents.window_starts` that holds one of the positions; a
    document's windows are consecutive and in order."""
    out = []
    for doc, pos in zip(documents, positions):
        by_start: dict[int, list[int]] = {}
        for p in pos:
            by_start.setdefault(window_start_of(int(p), window, overlap), []).append(int(p))
        for start in sorted(by_start):
            out.append((doc[start : start + window], [p - start for p in by_start[start]]))
    return out


@torch.no_grad()
@without_sequence_parallel  # rows of any length; scored as the sampler decodes
def evaluate_thinking(
    model,
    documents: list[torch.Tensor],
    positions: list[list[int]],
    sample_thoughts,
    num_thoughts: int,
    thought_len: int,
    temperature: float,
    open_id: int,
    close_id: int,
    eod_id: int,
    seed: int,
    max_sequence_length: int,
    batch_size: int = 256,
    vocab_size: Optional[int] = None,
    min_context: int = 1,
    sampler_micro_batch_size: Optional[int] = None,
) -> Optional[ThinkingEval]:
    """``max_sequence_length``: the input tokens a row may have (context, markers, thought), the
    run's --seq-length; ``min_context``: the overlap of consecutive windows of a long document.
    Every rank of the model-parallel group calls it; the result is on the last pipeline stage
    (None on the others)."""
    window = longest_context(max_sequence_length, thought_len) + 1  # context + target
    if window <= min_context:
        raise ValueError(
            f"max_sequence_length {max_sequence_length} has no room for a context of {min_context} tokens, "
            f"the markers and a thought of {thought_len} tokens"
        )
    windows = split_into_windows(documents, positions, window, overlap=min_context)
    window_docs = [w for w, _ in windows]
    window_positions = [p for _, p in windows]
    was_training = model.training
    model.eval()
    return_hidden = getattr(model, "return_hidden", False)
    model.return_hidden = False
    try:
        thoughts = sample_thoughts(
            model, window_docs, window_positions, num_thoughts=num_thoughts, max_thought_len=thought_len,
            open_id=open_id, close_id=close_id, eod_id=eod_id, temperature=temperature, seed=seed,
            max_sequence_length=max_sequence_length, vocab_size=vocab_size,
            **({"micro_batch_size": sampler_micro_batch_size} if sampler_micro_batch_size else {}),
        )
        closed, closed_len = thoughts.closed_tokens(eod_id)
        seqs = build_update_sequences(window_docs, thoughts.doc_index, thoughts.position, closed, closed_len,
                                      thoughts.forced, open_id, eod_id)
        think_targets = seqs["labels"].gather(1, seqs["target_slot"][:, None])
        lp_think, ok_think = _score(model, seqs["tokens"], seqs["target_slot"][:, None], think_targets, batch_size,
                                    vocab_size)

        # Without a thought: one forward per window, all its positions at once.
        width = max(len(d) for d in window_docs) - 1
        k = max(len(p) for p in window_positions)
        tokens = torch.full((len(window_docs), width), eod_id, dtype=torch.int64)
        slots = torch.zeros((len(window_docs), k), dtype=torch.int64)
        targets = torch.zeros((len(window_docs), k), dtype=torch.int64)
        for i, (doc, pos) in enumerate(zip(window_docs, window_positions)):
            tokens[i, : len(doc) - 1] = doc[:-1]
            p = torch.tensor(pos + [pos[-1]] * (k - len(pos)))
            slots[i], targets[i] = p - 1, doc[p]
        lp_plain, ok_plain = _score(model, tokens, slots, targets, batch_size, vocab_size)
    finally:
        model.return_hidden = return_hidden
        model.train(was_training)
    if not parallel_state.is_pipeline_last_stage():
        return None

    g = num_thoughts
    lp_think = torch.cat(lp_think).view(-1, g)  # [contexts, G]
    ok_think = torch.cat(ok_think).view(-1, g)
    lp_plain, ok_plain = torch.cat(lp_plain), torch.cat(ok_plain)  # [windows, k]
    # Per context, in the order of the thought rows (a document's windows are consecutive).
    lp_plain = torch.cat([lp_plain[j, : len(p)] for j, p in enumerate(window_positions)])
    ok_plain = torch.cat([ok_plain[j, : len(p)] for j, p in enumerate(window_positions)])
    gains, acc_t, acc_p, lpp = [], [], [], []
    ctx = 0
    for i, pos in enumerate(positions):
        n = len(pos)
        lt, ot = lp_think[ctx : ctx + n], ok_think[ctx : ctx + n]
        lp, op = lp_plain[ctx : ctx + n], ok_plain[ctx : ctx + n]
        ctx += n
        gains.append(float((lt - lp[:, None]).mean()))
        acc_t.append(float(ot.mean()))
        acc_p.append(float(op.mean()))
        lpp.append(float(lp.mean()))
    return ThinkingEval(
        gain=np.array(gains), acc_think=np.array(acc_t), acc_plain=np.array(acc_p), logp_plain=np.array(lpp),
        thought_len=float(closed_len.float().mean()),
        closed_by_model=float((~thoughts.forced).float().mean()),
        thought_ids=[[row[:n] for row, n in zip(rows, lens)]
                     for rows, lens in zip(thoughts.tokens.tolist(), thoughts.lengths.tolist())],
    )
