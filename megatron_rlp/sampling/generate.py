"""Text continuation with the thought sampler, for evaluation (tools/eval_benchmark.py).

The sampler continues a context after one token it feeds itself (``open_id``, the thought's open
marker in RLP).  A continuation of prompt p is therefore a "thought" sampled with context
p[:-1] and p's last token fed at step 0: prompts are grouped by their last token, one sampler call
per group.  Rows end at EOD, at the budget, or when their last tokens form one of
``stop_sequences`` — and, when ``close_id`` is given, at that marker (a thought).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_rlp.sampling.sampler import sample_thoughts


def generate(model, prompts: Sequence[torch.Tensor], num_samples: int, max_new_tokens: int, *,
             temperature: float, seed: int, max_sequence_length: int, eod_id: Optional[int],
             open_id: Optional[int] = None, close_id: Optional[int] = None,
             stop_sequences: Sequence[Sequence[int]] = (), vocab_size: Optional[int] = None,
             micro_batch_size: Optional[int] = None) -> list[list[list[int]]]:
    """``num_samples`` continuations of every prompt: [prompt][sample] -> the sampled token ids
    (a sampled close marker, EOD or stop sequence included as the last ids).

    With ``open_id`` (a thought): the open marker follows the whole prompt and the sampling stops
    at ``close_id``.  Without: the continuation follows the prompt directly (its last token is fed
    at step 0) and stops at EOD, a stop sequence or ``max_new_tokens``.  Every rank of the
    model-parallel group gets the same lists.
    """
    if open_id is not None and close_id is None:
        raise ValueError("a thought (open_id) needs its close_id")
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        if p.dim() != 1 or p.numel() < (1 if open_id is not None else 2):
            raise ValueError(f"prompt {i} must be a 1-D tensor of at least "
                             f"{1 if open_id is not None else 2} token ids")
        groups.setdefault(open_id if open_id is not None else int(p[-1]), []).append(i)
    out: list = [None] * len(prompts)
    for k, (first, members) in enumerate(sorted(groups.items())):
        # The sampler's "document" is the context plus one target slot it never reads.
        docs, positions = [], []
        for i in members:
            ctx = prompts[i] if open_id is not None else prompts[i][:-1]
            docs.append(torch.cat([ctx, ctx[-1:]]))
            positions.append([ctx.numel()])
        # Without a thought EOD takes the close marker's place as the sampler's end token.
        end_id = close_id if close_id is not None else eod_id
        if end_id is None or end_id == first:
            raise ValueError("generation without a thought ends at EOD: the tokenizer needs an EOD id, and a "
                             "prompt must not end with it")
        batch = sample_thoughts(
            model, docs, positions, num_samples, max_new_tokens, first, end_id, eod_id,
            temperature, seed + 7919 * k, max_sequence_length, micro_batch_size=micro_batch_size,
            vocab_size=vocab_size, stop_sequences=stop_sequences,
        )
        tokens, lengths = batch.tokens.cpu(), batch.lengths.cpu()
        for row, i in enumerate(members):
            out[i] = [tokens[row, s, : int(lengths[row, s])].tolist() for s in range(num_samples)]
    return out

