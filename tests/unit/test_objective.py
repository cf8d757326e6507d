"""Unit tests of megatron_rlp.rlp.objective (RLP_SPEC.md "Reward", "Group-relative advantage", "Update")."""
import math

import pytest
import torch

from megatron_rlp.rlp import objective as obj


def test_information_gain_reward_is_detached_difference():
    s_pred = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -3.5, -1.0]], requires_grad=True)
    s_ema = torch.tensor([-1.5, -2.0], requires_grad=True)
    r = obj.information_gain_reward(s_pred, s_ema)
    assert not r.requires_grad
    assert r.dtype == torch.float32
    torch.testing.assert_close(r, torch.tensor([[0.5, -0.5, 1.0], [-1.0, -1.5, 1.0]]))
    with pytest.raises(ValueError):
        obj.information_gain_reward(s_pred, s_ema[:1])


def test_group_advantages_match_leave_one_out_and_reject_single_thought():
    r = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]], requires_grad=True)
    a = obj.group_advantages(r)
    assert not a.requires_grad
    # G/(G-1)(r - mean) == r - mean of the others.
    expected = torch.tensor([[1 - 4.0, 2 - 3.5, 6 - 1.5], [0 - 1.5, 0 - 1.5, 3 - 0.0]])
    torch.testing.assert_close(a, expected)
    torch.testing.assert_close(a.sum(-1), torch.zeros(2), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="at least 2"):
        obj.group_advantages(torch.zeros(3, 1))
    with pytest.raises(ValueError):
        obj.group_advantages(torch.zeros(6))


def _two_token_thought(adv):
    logp_new = torch.log(torch.tensor([[1.5, 0.5]]))
    return logp_new, torch.zeros(1, 2), torch.tensor([adv]), torch.ones(1, 2)


@pytest.mark.parametrize(
    "adv, clip_low, clip_high, expected, frac_low, frac_high",
    [
        # A=+1, eps 0.2: min(1.5, 1.2)=1.2, min(0.5, 0.8)=0.5 -> -(1.7)/2
        (1.0, 0.2, 0.2, -0.85, 0.0, 0.5),
        # A=-1, eps 0.2: min(-1.5, -1.2)=-1.5, min(-0.5, -0.8)=-0.8 -> 2.3/2
        (-1.0, 0.2, 0.2, 1.15, 0.5, 0.0),
        # asymmetric: A=+1: min(1.5, 1.3)=1.3, min(0.5, 0.9)=0.5 -> -0.9
        (1.0, 0.1, 0.3, -0.9, 0.0, 0.5),
        # asymmetric: A=-1: min(-1.5,-1.3)=-1.5, min(-0.5,-0.9)=-0.9 -> 1.2
        (-1.0, 0.1, 0.3, 1.2, 0.5, 0.0),
    ],
)
def test_clipped_surrogate_hand_values(adv, clip_low, clip_high, expected, frac_low, frac_high):
    new, old, a, m = _two_token_thought(adv)
    loss, stats = obj.clipped_surrogate(new, old, a, m, clip_low, clip_high)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(frac_low + frac_high)
    assert stats["clip_frac_low"].item() == pytest.approx(frac_low)
    assert stats["clip_frac_high"].item() == pytest.approx(frac_high)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    assert stats["ratio_min"].item() == pytest.approx(0.5)


def test_gradient_at_theta_old_is_the_policy_gradient():
    torch.manual_seed(0)
    B, G, L = 2, 3, 5
    logp = -torch.rand(B, G, L) * 3
    logp_new = logp.clone().requires_grad_(True)
    adv = torch.randn(B, G)
    mask = torch.ones(B, G, L)
    mask[0, 1, 3:] = 0
    mask[1, 2, 1:] = 0
    loss, stats = obj.clipped_surrogate(logp_new, logp.clone(), adv, mask, 0.2, 0.2)
    loss.backward()
    # At rho = 1: dL/dlogp = -A / (|c| * B * G) on masked tokens, 0 elsewhere.
    lengths = mask.sum(-1, keepdim=True)
    expected = -adv[..., None] / lengths / (B * G) * mask
    torch.testing.assert_close(logp_new.grad, expected)
    # Value: -(1/BG) sum A, and rho == 1 so nothing is clipped.
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    assert stats["clip_frac"].item() == 0.0
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert int(stats["num_tokens"]) == int(mask.sum())
    assert int(stats["num_thoughts"]) == B * G


def test_clipped_tokens_get_no_gradient():
    logp_old = torch.zeros(1, 4)
    logp_new = torch.log(torch.tensor([[1.5, 1.1, 0.5, 0.95]])).requires_grad_(True)
    loss, _ = obj.clipped_surrogate(logp_new, logp_old, torch.tensor([2.0]), torch.ones(1, 4), 0.2, 0.2)
    loss.backward()
    g = logp_new.grad[0]
    assert g[0].item() == 0.0  # rho 1.5 > 1.2 with A > 0: clipped
    # Unclipped tokens: d/dlogp of -(1/4) rho A = -(1/4) rho A.
    for u, rho in [(1, 1.1), (2, 0.5), (3, 0.95)]:
        assert g[u].item() == pytest.approx(-0.25 * rho * 2.0, rel=1e-5)


def test_padding_garbage_and_empty_thought_do_not_produce_nan():
    B, G, L = 1, 3, 4
    logp_new = torch.full((B, G, L), -1.0)
    logp_new[0, 0, 2:] = float("-inf")
    logp_new[0, 1, 1:] = float("nan")
    logp_new.requires_grad_(True)
    logp_old = torch.full((B, G, L), -1.2)
    logp_old[0, 2, :] = float("-inf")
    mask = torch.zeros(B, G, L)
    mask[0, 0, :2] = 1
    mask[0, 1, :1] = 1  # thought 2 (index 2) has no masked token: a forced-close-only thought
    adv = torch.tensor([[1.0, -0.5, 3.0]])
    loss, stats = obj.clipped_surrogate(logp_new, logp_old, adv, mask, 0.2, 0.28)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logp_new.grad).all()
    assert stats["thought_loss"][0, 2].item() == 0.0
    assert (logp_new.grad[mask == 0] == 0).all()
    rho = math.exp(0.2)
    t0 = -min(rho * 1.0, min(rho, 1.28) * 1.0)
    t1 = -min(rho * -0.5, min(rho, 1.28) * -0.5)
    # The empty thought still counts in the 1/(B*G) mean.
    assert loss.item() == pytest.approx((t0 + t1 + 0.0) / 3, rel=1e-5)
    # All-empty batch: zero loss, finite stats.
    loss0, stats0 = obj.clipped_surrogate(logp_new, logp_old, adv, torch.zeros_like(mask), 0.2, 0.2)
    assert loss0.item() == 0.0 and stats0["clip_frac"].item() == 0.0
    assert all(torch.isfinite(v).all() for v in stats0.values())


def test_flattened_thought_axis_gives_the_same_loss_and_grad():
    torch.manual_seed(1)
    B, G, L = 3, 4, 6
    new = (-torch.rand(B, G, L) * 2).requires_grad_(True)
    old = new.detach() + 0.3 * torch.randn(B, G, L)
    adv = torch.randn(B, G)
    mask = (torch.rand(B, G, L) > 0.3).float()
    l1, s1 = obj.clipped_surrogate(new, old, adv, mask, 0.2, 0.28)
    (g1,) = torch.autograd.grad(l1, new)
    new_flat = new.detach().reshape(B * G, L).requires_grad_(True)
    l2, s2 = obj.clipped_surrogate(new_flat, old.reshape(B * G, L), adv.reshape(-1), mask.reshape(B * G, L), 0.2, 0.28)
    (g2,) = torch.autograd.grad(l2, new_flat)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1.reshape(B * G, L), g2)
    torch.testing.assert_close(s1["clip_frac"], s2["clip_frac"])
    assert 0.0 < s1["clip_frac"].item() < 1.0


def test_bf16_inputs_give_fp32_loss():
    new = torch.full((2, 3), -1.0, dtype=torch.bfloat16, requires_grad=True)
    loss, _ = obj.clipped_surrogate(new, new.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 3), 0.2, 0.2)
    assert loss.dtype == torch.float32
    loss.backward()
    assert new.grad.dtype == torch.bfloat16


def test_surrogate_validates_shapes_and_clip_range():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        obj.clipped_surrogate(x, torch.zeros(2, 4), torch.zeros(2), x, 0.2, 0.2)
    with pytest.raises(ValueError):
        obj.clipped_surrogate(x, x, torch.zeros(3), x, 0.2, 0.2)
    with pytest.raises(ValueError, match="clip"):
        obj.clipped_surrogate(x, x, torch.zeros(2), x, 1.0, 0.2)
    with pytest.raises(ValueError, match="clip"):
        obj.clipped_surrogate(x, x, torch.zeros(2), x, 0.2, -0.1)


def test_kl_penalty_k3_values():
    new = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, 9.0], [-0.5, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    kl = obj.kl_penalty(new, ref, mask)

    def k3(d):
        return math.exp(d) - d - 1

    expected = ((k3(-0.5) + k3(0.0)) / 2 + k3(0.5)) / 2
    assert kl.item() == pytest.approx(expected, rel=1e-6)
    kl.backward()
    assert new.grad[0, 2].item() == 0.0
    # d k3/d new = 1 - exp(ref - new)
    assert new.grad[1, 0].item() == pytest.approx((1 - math.exp(0.5)) / 2, rel=1e-5)
    assert obj.kl_penalty(new, new.detach(), mask).item() == 0.0


def test_next_token_loss_is_token_mean_cross_entropy():
    lp = torch.tensor([[-1.0, -2.0, -7.0], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert obj.next_token_loss(lp, mask).item() == pytest.approx((1 + 2 + 0.5) / 3)
    assert obj.next_token_loss(lp, torch.zeros_like(mask)).item() == 0.0


def test_rlp_loss_defaults_to_the_surrogate_and_adds_weighted_terms():
    torch.manual_seed(2)
    B, G, L = 2, 2, 4
    new = (-torch.rand(B, G, L)).requires_grad_(True)
    old = new.detach() + 0.1 * torch.randn(B, G, L)
    ref = new.detach() + 0.2 * torch.randn(B, G, L)
    adv = torch.randn(B, G)
    mask = torch.ones(B, G, L)
    ntp_lp = -torch.rand(B, 7)
    ntp_mask = torch.ones(B, 7)
    sur, _ = obj.clipped_surrogate(new, old, adv, mask, 0.2, 0.2)
    loss0, stats0 = obj.rlp_loss(new, old, adv, mask, 0.2, 0.2, logp_ref=ref, ntp_logp=ntp_lp, ntp_mask=ntp_mask)
    torch.testing.assert_close(loss0, sur)
    kl = obj.kl_penalty(new, ref, mask)
    ntp = obj.next_token_loss(ntp_lp, ntp_mask)
    torch.testing.assert_close(stats0["kl"], kl.detach())
    torch.testing.assert_close(stats0["ntp"], ntp)
    loss1, stats1 = obj.rlp_loss(
        new, old, adv, mask, 0.2, 0.2, kl_weight=0.1, logp_ref=ref, ntp_weight=0.3, ntp_logp=ntp_lp, ntp_mask=ntp_mask
    )
    torch.testing.assert_close(loss1, sur + 0.1 * kl + 0.3 * ntp)
    assert loss1.requires_grad
    assert all(not v.requires_grad for v in stats1.values())
    torch.testing.assert_close(stats1["loss"], loss1.detach())
    with pytest.raises(ValueError, match="logp_ref"):
        obj.rlp_loss(new, old, adv, mask, 0.2, 0.2, kl_weight=0.1)
    with pytest.raises(ValueError, match="ntp"):
        obj.rlp_loss(new, old, adv, mask, 0.2, 0.2, ntp_weight=0.1)
