"""The RLP objective as tensor math (RLP_SPEC.md, "Reward", "Group-relative advantage", "Update").

Everything here takes tensors and returns tensors: no global arguments, no process groups, no
megatron imports.  The step code gathers the log-probabilities (on the last pipeline stage, after
the vocab-parallel reduction) and hands them over; these functions are checked against the
independent plain-PyTorch implementation in ``tests/reference/rlp_reference.py``.

Shapes.  A *thought* is one sampled chain of thought c^(i) for one context.  Token-level tensors
have shape ``[*T, L]`` and thought-level tensors ``[*T]`` where ``*T`` indexes thoughts and ``L`` is
the (padded) thought length.  The caller may use ``*T = (B, G)`` or the flattened ``*T = (B*G,)``;
only :func:`group_advantages` needs the group axis explicitly (``[B, G]``).

Token mask convention: 1 for a *sampled* thought token (the close marker included when the model
sampled it), 0 for padding and for a close marker forced at the length cap (a forced token was not
drawn from π_θold, so it carries no policy gradient).  The open marker is part of the prompt and is
never in the mask.

The thought tokens' log-probabilities are those of the policy that sampled them (the step takes
them under softmax(logits / T)); S_pred is the data token's at T = 1.

The RPT-style alternative reward (--rlp-reward prefix-match) and the entropy position filter are
in :mod:`megatron_rlp.rlp.rewards`; the reward has the information gain's shapes and feeds the same
group advantages and surrogate.

How this differs from the paper: nothing in the default path.  ``kl_weight`` and ``ntp_weight``
(both 0 by default) add terms the paper does not use (the spec notes that a KL term was ablated
and hurt); they exist for experiments only.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = [
    "information_gain_reward",
    "group_advantages",
    "masked_thought_mean",
    "clipped_surrogate",
    "kl_penalty",
    "next_token_loss",
    "rlp_loss",
]


def information_gain_reward(s_pred: torch.Tensor, s_ema: torch.Tensor) -> torch.Tensor:
    """r(c_t) = S_pred(c_t) − S_ema  (RLP_SPEC.md "Reward").

    Args:
        s_pred: [B, G] log p_θ(x_t | x_<t, c^(i)) for each of the G thoughts of each context.
        s_ema:  [B]    log p̄_φ(x_t | x_<t) from the EMA teacher, no thought.

    Returns:
        [B, G] fp32 rewards, detached: the reward is a constant for the update.
    """
    if s_pred.dim() != 2 or s_ema.dim() != 1 or s_ema.shape[0] != s_pred.shape[0]:
        raise ValueError(
            f"information_gain_reward expects s_pred [B, G] and s_ema [B]; got "
            f"{tuple(s_pred.shape)} and {tuple(s_ema.shape)}"
        )
    return (s_pred.detach().float() - s_ema.detach().float()[:, None]).detach()


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A(i) = G/(G−1) · (r(c^(i)) − r̄),  r̄ = (1/G) Σ_j r(c^(j))  (RLP_SPEC.md "Group-relative advantage").

    The mean is inclusive and the G/(G−1) factor corrects it (equivalently A(i) = r(i) − mean of the
    *other* G−1 rewards).  The rewards are detached, so no gradient flows through r̄.

    Args:
        rewards: [B, G], the group axis last.

    Returns:
        [B, G] fp32 advantages; each row sums to zero.
    """
    if rewards.dim() != 2:
        raise ValueError(f"group_advantages expects rewards [B, G]; got {tuple(rewards.shape)}")
    g = rewards.shape[-1]
    if g < 2:
        raise ValueError(
            f"group_advantages needs at least 2 thoughts per context (G={g}); the group-relative "
            "advantage of a single thought is undefined (--rlp-num-thoughts >= 2)"
        )
    r = rewards.detach().float()
    return (g / (g - 1)) * (r - r.mean(dim=-1, keepdim=True))


def masked_thought_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-thought mean over masked-in tokens: (1/|c|) Σ_u mask_u · values_u.

    Args:
        values: [*T, L].
        mask:   [*T, L], nonzero where a token counts.

    Returns:
        [*T]; a thought with no masked-in token gives 0 (never NaN).
    """
    m = mask.to(torch.bool)
    total = torch.where(m, values, torch.zeros_like(values)).sum(dim=-1)
    count = m.sum(dim=-1).clamp(min=1).to(total.dtype)
    return total / count


def _check_token_shapes(logp_new: torch.Tensor, other: torch.Tensor, mask: torch.Tensor, name: str):
    if logp_new.shape != other.shape or logp_new.shape != mask.shape:
        raise ValueError(
            f"logp_new {tuple(logp_new.shape)}, {name} {tuple(other.shape)} and mask "
            f"{tuple(mask.shape)} must have the same shape [*T, L]"
        )


def clipped_surrogate(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate over thought tokens (RLP_SPEC.md "Update").

        ρ_u       = exp(log π_θ(ℓ_u | prefix) − log π_θold(ℓ_u | prefix))
        L_clip(i) = −(1/|c^(i)|) Σ_u min(ρ_u A(i), clip(ρ_u, 1 − ε_low, 1 + ε_high) A(i))
        L(θ)      = (1/(B·G)) Σ_b Σ_i L_clip(b, i)

    Args:
        logp_new:   [*T, L] log π_θ of the thought tokens (carries the gradient).
        logp_old:   [*T, L] log π_θold of the same tokens (behaviour log-probs; treated as constant).
        advantages: [*T] one advantage per thought (treated as constant).
        mask:       [*T, L] 1 for sampled thought tokens, 0 for padding and forced close markers.
        clip_low:   ε_low  (ratio clipped below at 1 − ε_low).
        clip_high:  ε_high (ratio clipped above at 1 + ε_high).

    Returns:
        (loss, stats): the scalar fp32 loss, the mean of L_clip over all thoughts in ``*T`` (a thought
        with no masked-in token contributes 0 but still counts in the mean, as in the 1/(B·G)
        normalisation), and detached statistics:

        - ``clip_frac``: share of masked tokens where the clipped branch is the minimum (strictly),
          i.e. where the token's gradient is cut; ``clip_frac_low`` / ``clip_frac_high`` split it by
          side (A < 0 and ρ < 1 − ε_low / A > 0 and ρ > 1 + ε_high).
        - ``ratio_mean``, ``ratio_min``, ``ratio_max``: of ρ over masked tokens.
        - ``thought_loss``: [*T] per-thought L_clip.
        - ``num_tokens``, ``num_thoughts``: the counts behind the means.
    """
    _check_token_shapes(logp_new, logp_old, mask, "logp_old")
    if advantages.shape != logp_new.shape[:-1]:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} must have the thought shape "
            f"{tuple(logp_new.shape[:-1])} of logp_new {tuple(logp_new.shape)}"
        )
    if clip_low < 0 or clip_high < 0 or clip_low >= 1:
        raise ValueError(
            f"clip range must satisfy 0 <= clip_low < 1 and clip_high >= 0; got "
            f"clip_low={clip_low}, clip_high={clip_high} (--rlp-clip-low / --rlp-clip-high)"
        )
    m = mask.to(torch.bool)
    new = logp_new.float()
    old = logp_old.detach().float()
    adv = advantages.detach().float()[..., None]

    # Padding may hold arbitrary values (-inf, garbage): zero the log-ratio there before exp.
    log_ratio = torch.where(m, new - old, torch.zeros_like(new))
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    thought_loss = masked_thought_mean(per_token, m)
    loss = thought_loss.mean()

    with torch.no_grad():
        n_tok = m.sum()
        denom = n_tok.clamp(min=1).float()
        clip_active = m & (clipped < unclipped)
        clip_low_active = clip_active & (adv < 0)
        clip_high_active = clip_active & (adv > 0)
        r_masked = ratio.detach()[m]
        if r_masked.numel():
            r_min, r_max = r_masked.min(), r_masked.max()
        else:
            r_min = r_max = torch.ones((), dtype=torch.float32, device=ratio.device)
        stats = {
            "clip_frac": clip_active.sum().float() / denom,
            "clip_frac_low": clip_low_active.sum().float() / denom,
            "clip_frac_high": clip_high_active.sum().float() / denom,
            "ratio_mean": r_masked.sum() / denom if r_masked.numel() else r_min.clone(),
            "ratio_min": r_min,
            "ratio_max": r_max,
            "thought_loss": thought_loss.detach(),
            "num_tokens": n_tok.detach(),
            "num_thoughts": torch.tensor(thought_loss.numel(), device=ratio.device),
        }
    return loss, stats


def kl_penalty(logp_new: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(π_θ ‖ π_ref) on the sampled thought tokens, averaged like the surrogate.

    Per token, with d = log π_ref − log π_θ:  k3 = exp(d) − d − 1  (≥ 0, unbiased for tokens drawn
    from π_θ).  Per-thought mean over masked-in tokens, then the mean over thoughts.
    Not part of the paper's recipe (spec: ablated at β = 1e-4 / 1e-3 and it hurt).

    Args:
        logp_new: [*T, L] (carries the gradient).
        logp_ref: [*T, L] log-probs of a fixed reference policy (constant).
        mask:     [*T, L].

    Returns:
        Scalar fp32.
    """
    _check_token_shapes(logp_new, logp_ref, mask, "logp_ref")
    m = mask.to(torch.bool)
    new = logp_new.float()
    d = torch.where(m, logp_ref.detach().float() - new, torch.zeros_like(new))
    k3 = torch.exp(d) - d - 1.0
    return masked_thought_mean(k3, m).mean()


def next_token_loss(logp_targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: −Σ mask·log p / Σ mask (token-level mean over the batch).

    Not part of the paper's recipe; an optional auxiliary term (DESIGN.md prototype notes).

    Args:
        logp_targets: [..., S] log p_θ(x_s | x_<s) of the true next tokens.
        mask:         [..., S] nonzero for positions that count.

    Returns:
        Scalar fp32; 0 when the mask is empty.
    """
    if logp_targets.shape != mask.shape:
        raise ValueError(
            f"logp_targets {tuple(logp_targets.shape)} and mask {tuple(mask.shape)} must match"
        )
    m = mask.to(torch.bool)
    lp = logp_targets.float()
    total = torch.where(m, lp, torch.zeros_like(lp)).sum()
    return -total / m.sum().clamp(min=1).float()


def rlp_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    *,
    kl_weight: float = 0.0,
    logp_ref: Optional[torch.Tensor] = None,
    ntp_weight: float = 0.0,
    ntp_logp: Optional[torch.Tensor] = None,
    ntp_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = L_clip + β·KL + λ·NTP  (paper: β = λ = 0, i.e. just :func:`clipped_surrogate`).

    Args:
        logp_new, logp_old, advantages, mask, clip_low, clip_high: as in :func:`clipped_surrogate`.
        kl_weight:  β; needs ``logp_ref`` when > 0.  When ``logp_ref`` is given the KL is reported
                    even at β = 0.
        logp_ref:   [*T, L] reference-policy log-probs of the thought tokens.
        ntp_weight: λ; needs ``ntp_logp`` and ``ntp_mask`` when > 0 (reported whenever given).
        ntp_logp:   [..., S] log p_θ of true next tokens (any shape, matching ``ntp_mask``).
        ntp_mask:   [..., S].

    Returns:
        (loss, stats): scalar fp32 loss and detached statistics — those of
        :func:`clipped_surrogate` plus ``surrogate`` and, where computed, ``kl`` and ``ntp``.
    """
    if kl_weight < 0 or ntp_weight < 0:
        raise ValueError(
            f"loss weights must be >= 0; got kl_weight={kl_weight}, ntp_weight={ntp_weight}"
        )
    if kl_weight > 0 and logp_ref is None:
        raise ValueError("kl_weight > 0 needs logp_ref (reference-policy log-probs)")
    if ntp_weight > 0 and (ntp_logp is None or ntp_mask is None):
        raise ValueError("ntp_weight > 0 needs ntp_logp and ntp_mask")

    surrogate, stats = clipped_surrogate(logp_new, logp_old, advantages, mask, clip_low, clip_high)
    loss = surrogate
    stats["surrogate"] = surrogate.detach()
    if logp_ref is not None:
        kl = kl_penalty(logp_new, logp_ref, mask)
        stats["kl"] = kl.detach()
        if kl_weight > 0:
            loss = loss + kl_weight * kl
    if ntp_logp is not None and ntp_mask is not None:
        ntp = next_token_loss(ntp_logp, ntp_mask)
        stats["ntp"] = ntp.detach()
        if ntp_weight > 0:
            loss = loss + ntp_weight * ntp
    stats["loss"] = loss.detach()
    return loss, stats
