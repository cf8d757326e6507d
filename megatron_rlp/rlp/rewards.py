"""The RPT-style pieces of RLP's pluggable reward and position choice, as pure functions.

``--rlp-reward prefix-match`` (:func:`prefix_match_reward`): after its thought the model samples
its prediction of the next N tokens (``--rlp-reward-match-tokens``); the thought's reward is 1
when the sampled prefix equals the text's continuation x_t..x_{t+N−1}, else 0 (RPT's sparse
reward).  Same shapes as :func:`megatron_rlp.rlp.objective.information_gain_reward`: [B, G] in,
[B, G] fp32 out, so group advantages and the update are unchanged.

``--rlp-position-filter entropy`` (:func:`entropy_filtered_candidates`): the positions of a window
are drawn only among the candidates whose EMA teacher's next-token entropy is in the top
fraction F (``--rlp-entropy-top-frac``) of that window's candidates (RPT's filter).

No process groups, no global state: the step (megatron_rlp.rlp.step) gathers the numbers.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["REWARDS", "POSITION_FILTERS", "prefix_match_reward", "matched_prefix_length",
           "entropy_kept_count", "entropy_filtered_candidates"]

REWARDS = ("info-gain", "prefix-match")
POSITION_FILTERS = ("none", "entropy")


def _check_prediction_shapes(predicted: torch.Tensor, continuation: torch.Tensor) -> None:
    if predicted.dim() != 3 or continuation.dim() != 2 or predicted.shape[0] != continuation.shape[0] \
            or predicted.shape[2] != continuation.shape[1]:
        raise ValueError(
            f"prefix-match expects predicted [B, G, N] and continuation [B, N]; got "
            f"{tuple(predicted.shape)} and {tuple(continuation.shape)}"
        )


def matched_prefix_length(predicted: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """[B, G] int64: how many leading predicted tokens equal the continuation (0..N).

    Args:
        predicted:    [B, G, N] the tokens sampled after each of the G thoughts of each context.
        continuation: [B, N]    the text's x_t..x_{t+N−1} of each context.
    """
    _check_prediction_shapes(predicted, continuation)
    equal = predicted.to(continuation.device) == continuation[:, None, :]
    return equal.long().cumprod(dim=-1).sum(dim=-1)


def prefix_match_reward(predicted: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """r(c) = 1 if the N tokens predicted after thought c equal x_t..x_{t+N−1}, else 0.

    Args:
        predicted:    [B, G, N] int tokens sampled after each thought (and its close marker).
        continuation: [B, N]    int tokens of the text.

    Returns:
        [B, G] fp32 rewards in {0, 1} (a constant for the update, like the information gain).
    """
    n = continuation.shape[-1] if continuation.dim() == 2 else 0
    return (matched_prefix_length(predicted, continuation) == n).float()


def entropy_kept_count(num_candidates: int, top_frac: float, k: int) -> int:
    """How many of a window's ``num_candidates`` positions the entropy filter keeps: the top
    ceil(F · n), but at least k (or all n when a short window has fewer than k), so a window
    the filter leaves with too few positions falls back to its k most uncertain ones."""
    if not 0.0 < top_frac <= 1.0:
        raise ValueError(f"--rlp-entropy-top-frac must lie in (0, 1]; got {top_frac}")
    return min(num_candidates, max(math.ceil(top_frac * num_candidates - 1e-9), k))


def entropy_filtered_candidates(candidates: Sequence[int], entropy: Sequence[float], top_frac: float,
                                k: int) -> list[int]:
    """The candidates whose teacher entropy is in the top fraction ``top_frac`` (see
    :func:`entropy_kept_count` for the count), sorted by position.  Ties in entropy keep the
    earlier position, so the choice is a function of the numbers alone (deterministic).

    Args:
        candidates: positions t of one window.
        entropy:    the EMA teacher's next-token entropy H(p̄_φ(· | x_<t)) at each candidate.
        top_frac:   F in (0, 1].
        k:          positions to be drawn from the kept ones (--rlp-positions-per-doc).
    """
    if len(candidates) != len(entropy):
        raise ValueError(f"{len(candidates)} candidates but {len(entropy)} entropies")
    keep = entropy_kept_count(len(candidates), top_frac, k)
    order = sorted(range(len(candidates)), key=lambda i: (-float(entropy[i]), int(candidates[i])))
    return sorted(int(candidates[i]) for i in order[:keep])
