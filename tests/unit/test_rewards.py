"""The pluggable reward's pieces by hand: RPT's prefix-match reward and the entropy position filter."""

import pytest
import torch

from megatron_rlp.rlp.objective import group_advantages
from megatron_rlp.rlp.rewards import (
    entropy_filtered_candidates, entropy_kept_count, matched_prefix_length, prefix_match_reward,
)


def test_prefix_match_one_token():
    # Two contexts with next tokens 7 and 4; G = 3 predictions each.
    predicted = torch.tensor([[[7], [3], [7]], [[5], [6], [4]]])
    continuation = torch.tensor([[7], [4]])
    rewards = prefix_match_reward(predicted, continuation)
    assert rewards.dtype == torch.float32
    assert rewards.tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    # Group advantages as for the information gain: G/(G−1)(r − r̄).
    assert group_advantages(rewards).flatten().tolist() == pytest.approx([0.5, -1.0, 0.5, -0.5, -0.5, 1.0])


def test_prefix_match_three_tokens_needs_the_whole_prefix():
    continuation = torch.tensor([[10, 11, 12]])
    predicted = torch.tensor([[
        [10, 11, 12],  # all three: 1
        [10, 11, 99],  # last token wrong: 0 (two leading tokens matched)
        [99, 11, 12],  # first wrong, the rest right: 0 (nothing leading matched)
        [10, 99, 12],  # middle wrong: 0
    ]])
    assert prefix_match_reward(predicted, continuation).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert matched_prefix_length(predicted, continuation).tolist() == [[3, 2, 0, 1]]


def test_prefix_match_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"predicted \[B, G, N\] and continuation \[B, N\]"):
        prefix_match_reward(torch.zeros(2, 3, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))


def test_entropy_filter_keeps_the_top_fraction():
    candidates = [3, 4, 5, 6, 7, 8, 9, 10]
    entropy = [0.1, 2.0, 0.5, 3.0, 0.2, 1.0, 2.5, 0.3]
    # F = 0.25 of 8 candidates: the 2 of highest entropy (t = 6: 3.0, t = 9: 2.5).
    assert entropy_filtered_candidates(candidates, entropy, 0.25, k=1) == [6, 9]
    # F = 0.5: 4 kept (3.0, 2.5, 2.0, 1.0), sorted by position.
    assert entropy_filtered_candidates(candidates, entropy, 0.5, k=2) == [4, 6, 8, 9]
    # ceil: 0.3 x 8 = 2.4 -> 3 kept.
    assert entropy_filtered_candidates(candidates, entropy, 0.3, k=1) == [4, 6, 9]
    # Fewer than k kept: the k most uncertain (a short window keeps enough to draw k from).
    assert entropy_filtered_candidates(candidates, entropy, 0.125, k=3) == [4, 6, 9]
    assert entropy_filtered_candidates(candidates, entropy, 1.0, k=1) == candidates
    # A window with fewer candidates than k keeps them all.
    assert entropy_filtered_candidates([5, 6], [0.0, 1.0], 0.5, k=4) == [5, 6]
    # Ties keep the earlier position (the choice is a function of the numbers).
    assert entropy_filtered_candidates([1, 2, 3], [1.0, 1.0, 1.0], 0.34, k=1) == [1, 2]


def test_entropy_filter_bad_input():
    for frac in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"--rlp-entropy-top-frac must lie in \(0, 1\]"):
            entropy_kept_count(10, frac, 1)
    with pytest.raises(ValueError, match="3 candidates but 2 entropies"):
        entropy_filtered_candidates([1, 2, 3], [0.0, 1.0], 0.5, 1)
