"""How far the training forward's log-probs are from the sampler's (π_train / π_sample).

With θ_old = θ the RLP ratio ρ = exp(log π_θ − log π_θold) should be exactly 1 before the first
update; anything else is numerical disagreement between the cached, batched decode and the
training forward (kernels, batch shapes, bf16).  The RLP step logs these numbers.
"""

from __future__ import annotations

from typing import Optional

import torch


def log_ratio_stats(
    train_logprobs: torch.Tensor,
    sample_logprobs: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
) -> dict:
    """Statistics of log π_train − log π_sample over the tokens in ``mask`` (all when None):
    ``abs_log_ratio_mean``, ``abs_log_ratio_max``, ``log_ratio_mean``, ``ratio_max`` (max of
    exp(|Δ|)), and ``tokens``, the number of tokens (for [sum, count]-style averaging:
    ``abs_log_ratio_sum`` is included).  Zeros when the mask is empty."""
    if train_logprobs.shape != sample_logprobs.shape:
        raise ValueError(
            f"log-prob shapes differ: train {tuple(train_logprobs.shape)} vs sample "
            f"{tuple(sample_logprobs.shape)}"
        )
    diff = train_logprobs.detach().double() - sample_logprobs.detach().double()
    if mask is not None:
        if mask.shape != diff.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != log-prob shape {tuple(diff.shape)}")
        diff = diff[mask.bool()]
    else:
        diff = diff.flatten()
    n = diff.numel()
    if n == 0:
        return {
            "abs_log_ratio_mean": 0.0, "abs_log_ratio_max": 0.0, "abs_log_ratio_sum": 0.0,
            "log_ratio_mean": 0.0, "ratio_max": 1.0, "tokens": 0,
        }
    absd = diff.abs()
    return {
        "abs_log_ratio_mean": float(absd.mean()),
        "abs_log_ratio_max": float(absd.max()),
        "abs_log_ratio_sum": float(absd.sum()),
        "log_ratio_mean": float(diff.mean()),
        "ratio_max": float(torch.exp(absd.max())),
        "tokens": n,
    }


def thought_ratio_stats(train_logprobs: torch.Tensor, batch) -> dict:
    """:func:`log_ratio_stats` of training log-probs [N, G, L] of a ThoughtBatch's sampled tokens
    against its recorded (untempered) behaviour log-probs."""
    return log_ratio_stats(train_logprobs, batch.logprobs.to(train_logprobs.device),
                           batch.mask.to(train_logprobs.device))
