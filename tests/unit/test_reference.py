"""Checks of the independent reference (tests/reference/rlp_reference.py) and of the project against it.

1. The reference itself: identical thoughts give zero advantages and zero gradient; at θ_old = θ the
   loss is 0, ρ = 1, nothing is clipped, and the gradient is the hand-written policy gradient;
   forced close markers carry no gradient; SGD and EMA follow their formulas.
2. megatron_rlp.rlp.objective / ema agree with the reference on random tensors and on a full
   iteration of a tiny model.
3. The reference decoder reproduces a megatron-core GPTModel built by the project (tied/untied),
   so the reference can score the project's model.
"""
import copy
import random

import pytest
import torch

from megatron_rlp.rlp import objective as obj
from megatron_rlp.rlp.ema import EMATeacher
try:  # tests/ is on sys.path via tests/conftest.py (no tests/__init__.py)
    from reference import rlp_reference as ref
except ImportError:  # if tests/ ever becomes a package
    from tests.reference import rlp_reference as ref

OPEN, CLOSE = 14, 15


def _tiny_cfg(**kw):
    base = dict(
        vocab_size=16, hidden_size=16, ffn_hidden_size=24, num_layers=1, num_heads=2,
        num_query_groups=1, head_dim=8, rotary_base=10000.0, norm_eps=1e-6, tie_embeddings=False,
    )
    base.update(kw)
    return ref.RefConfig(**base)


def _tiny_model(seed=0, **kw):
    return ref.RefDecoderLM(_tiny_cfg(**kw), init_std=0.5, seed=seed)


def _batch(seed, B=2, G=3, max_ctx=5, max_thought=4):
    rng = random.Random(seed)
    contexts = [[rng.randrange(14) for _ in range(rng.randint(2, max_ctx))] for _ in range(B)]
    thoughts = [[[rng.randrange(14) for _ in range(rng.randint(1, max_thought))] for _ in range(G)] for _ in range(B)]
    next_tokens = [rng.randrange(14) for _ in range(B)]
    forced = [[rng.random() < 0.4 for _ in range(G)] for _ in range(B)]
    return contexts, thoughts, next_tokens, forced


def _run(model, ema, contexts, thoughts, next_tokens, forced, G=3, lr=0.1, tau=0.9):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return ref.reference_rlp_iteration(
        model, ema, opt, contexts, thoughts, next_tokens, OPEN, CLOSE, G, 0.2, 0.28, tau, forced
    )


# ----------------------------------------------------------------------------- the reference


def test_identical_thoughts_give_zero_advantage_and_zero_gradient():
    model = _tiny_model()
    contexts, thoughts, next_tokens, _ = _batch(0)
    same = [[list(row[0]) for _ in row] for row in thoughts]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = _run(model, None, contexts, same, next_tokens, [[False] * 3, [False] * 3])
    assert (out["advantages"] == 0).all()
    assert out["rewards"].std(dim=1).max().item() < 1e-6
    assert out["loss"].item() == 0.0
    assert all((g == 0).all() for g in out["grads"].values())
    assert all(torch.equal(before[n], p) for n, p in out["params"].items())


def test_one_layer_iteration_against_hand_computation():
    torch.manual_seed(0)
    model = _tiny_model(seed=1)
    ema = _tiny_model(seed=2)  # a teacher different from θ, so S_ema is not S_pred's no-think twin
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    phi0 = {n: p.detach().clone() for n, p in ema.named_parameters()}
    contexts, thoughts, next_tokens, forced = _batch(3)
    probe, ema_probe = copy.deepcopy(model), copy.deepcopy(ema)
    lr, tau, B, G = 0.1, 0.9, 2, 3
    out = _run(model, ema, contexts, thoughts, next_tokens, forced, lr=lr, tau=tau)

    # Rewards, by explicit slot arithmetic on the logits.
    policy_terms = 0.0
    for b in range(B):
        ctx = contexts[b]
        logits = ema_probe(torch.tensor(ctx)).detach()
        s_ema = torch.log_softmax(logits[-1], -1)[next_tokens[b]].item()
        assert out["s_ema"][b].item() == pytest.approx(s_ema, abs=1e-5)
        r, token_lps = [], []
        for i in range(G):
            seq = ctx + [OPEN] + thoughts[b][i] + [CLOSE, next_tokens[b]]
            lps = torch.log_softmax(probe(torch.tensor(seq[:-1])), -1)
            r.append(lps[-1, next_tokens[b]].item() - s_ema)
            # Policy tokens: thought tokens, plus the close marker when it was sampled.
            n_tok = len(thoughts[b][i]) + (0 if forced[b][i] else 1)
            assert out["policy_lengths"][b, i].item() == n_tok
            start = len(ctx)  # logits at index j predict seq[j + 1]; seq[len(ctx) + 1] is c_1
            targets = torch.tensor(seq[start + 1 : start + 1 + n_tok])
            tok_lp = lps[start : start + n_tok].gather(-1, targets[:, None])[:, 0]
            torch.testing.assert_close(out["logp_new"][b][i], tok_lp.detach())
            token_lps.append(tok_lp)
        for i in range(G):
            adv = (G / (G - 1)) * (r[i] - sum(r) / G)
            policy_terms = policy_terms + adv * token_lps[i].mean()
        torch.testing.assert_close(out["rewards"][b], torch.tensor(r), atol=1e-5, rtol=0)
        torch.testing.assert_close(out["advantages"][b].sum(), torch.tensor(0.0), atol=1e-5, rtol=0)
    # At θ_old = θ: ρ = 1, so L = -(1/BG) Σ A = 0, nothing is clipped, and
    # ∇L = -(1/BG) Σ_i A_i (1/|c_i|) Σ_u ∇ log π(ℓ_u): the policy gradient.
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["clip_frac"] == 0.0
    (-policy_terms / (B * G)).backward()
    for n, p in probe.named_parameters():
        torch.testing.assert_close(out["grads"][n], p.grad, atol=1e-6, rtol=1e-4)
    # SGD step and EMA update.
    for n in theta0:
        torch.testing.assert_close(out["params"][n], theta0[n] - lr * out["grads"][n])
        torch.testing.assert_close(out["ema_params"][n], tau * phi0[n] + (1 - tau) * out["params"][n])
    assert any(g.abs().max() > 0 for g in out["grads"].values())


def test_forced_close_gets_no_gradient_and_lazy_ema_initialises_from_theta():
    contexts, thoughts, next_tokens, _ = _batch(5, B=1, G=2)
    m1, m2 = _tiny_model(seed=4), _tiny_model(seed=4)
    theta0 = {n: p.detach().clone() for n, p in m1.named_parameters()}
    sampled = _run(m1, None, contexts, thoughts, next_tokens, [[False, False]], G=2, tau=0.5)
    forced = _run(m2, None, contexts, thoughts, next_tokens, [[True, False]], G=2, tau=0.5)
    assert forced["policy_lengths"][0, 0] == sampled["policy_lengths"][0, 0] - 1
    torch.testing.assert_close(forced["rewards"], sampled["rewards"])  # scoring is unchanged
    assert not torch.allclose(forced["grads"]["embed"], sampled["grads"]["embed"])
    # φ was created as θ before the step, then φ ← τθ_0 + (1−τ)θ_1.
    for n, p in forced["params"].items():
        torch.testing.assert_close(forced["ema_params"][n], 0.5 * theta0[n] + 0.5 * p)


def test_reference_advantage_and_loss_pieces():
    assert ref.reference_advantages([1.0, 2.0, 6.0]) == pytest.approx([-3.0, -1.5, 4.5])
    with pytest.raises(ValueError):
        ref.reference_advantages([1.0])
    new = torch.log(torch.tensor([1.5, 0.5]))
    old = torch.zeros(2)
    assert ref.reference_thought_loss(new, old, 1.0, 0.2, 0.2).item() == pytest.approx(-0.85)
    assert ref.reference_thought_loss(new, old, -1.0, 0.2, 0.2).item() == pytest.approx(1.15)
    assert ref.reference_thought_clipped_count(new, old, 1.0, 0.2, 0.2) == 1


# ------------------------------------------------------------------- project vs reference


def test_objective_matches_reference_on_random_tensors():
    torch.manual_seed(7)
    B, G, L = 3, 4, 6
    s_pred = -torch.rand(B, G) * 4
    s_ema = -torch.rand(B) * 4
    r = obj.information_gain_reward(s_pred, s_ema)
    a = obj.group_advantages(r)
    for b in range(B):
        r_ref = ref.reference_information_gain(s_pred[b].tolist(), s_ema[b].item())
        torch.testing.assert_close(r[b], torch.tensor(r_ref))
        torch.testing.assert_close(a[b], torch.tensor(ref.reference_advantages(r_ref)), atol=1e-6, rtol=1e-6)

    lengths = torch.randint(0, L + 1, (B, G))
    lengths[0, 0] = 0
    mask = (torch.arange(L)[None, None, :] < lengths[..., None]).float()
    logp_old = -torch.rand(B, G, L) * 3
    logp_ref = logp_old + 0.3 * torch.randn(B, G, L)
    logp_new = (logp_old + 0.4 * torch.randn(B, G, L)).requires_grad_(True)  # ρ far from 1: clipping active
    loss, stats = obj.rlp_loss(logp_new, logp_old, a, mask, 0.2, 0.28, kl_weight=0.05, logp_ref=logp_ref)
    (g_obj,) = torch.autograd.grad(loss, logp_new)

    leaf = logp_new.detach().clone().requires_grad_(True)
    total, clipped, n_tok, kl = 0.0, 0, 0, 0.0
    for b in range(B):
        for i in range(G):
            n = int(lengths[b, i])
            new_i, old_i = leaf[b, i, :n], logp_old[b, i, :n]
            total = total + ref.reference_thought_loss(new_i, old_i, a[b, i].item(), 0.2, 0.28)
            kl = kl + ref.reference_k3_kl(new_i, logp_ref[b, i, :n])
            clipped += ref.reference_thought_clipped_count(new_i.detach(), old_i, a[b, i].item(), 0.2, 0.28)
            n_tok += n
    loss_ref = total / (B * G) + 0.05 * kl / (B * G)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_obj, leaf.grad, atol=1e-7, rtol=1e-5)
    assert stats["clip_frac"].item() == pytest.approx(clipped / n_tok)
    assert 0 < clipped < n_tok
    assert int(stats["num_tokens"]) == n_tok


def test_objective_and_ema_reproduce_a_reference_iteration():
    """Rewards, advantages, gradients and the EMA teacher of the project match the reference."""
    B, G, tau, lr = 2, 3, 0.9, 0.1
    contexts, thoughts, next_tokens, forced = _batch(11, B=B, G=G)
    m_ref = _tiny_model(seed=8)
    m_obj = copy.deepcopy(m_ref)
    out = _run(m_ref, None, contexts, thoughts, next_tokens, forced, G=G, lr=lr, tau=tau)

    teacher = EMATeacher()
    teacher.maybe_initialize([m_obj])
    L = max(len(c) for row in thoughts for c in row) + 1
    logp_new = [[None] * G for _ in range(B)]
    s_pred = torch.zeros(B, G)
    s_ema = torch.zeros(B)
    with torch.no_grad(), teacher.swap_into([m_obj]):  # teacher forward through the same module
        for b in range(B):
            s_ema[b] = ref.token_logprobs(m_obj, contexts[b] + [next_tokens[b]])[-1]
    mask = torch.zeros(B, G, L)
    for b in range(B):
        for i in range(G):
            seq = contexts[b] + [OPEN] + thoughts[b][i] + [CLOSE, next_tokens[b]]
            lp = ref.token_logprobs(m_obj, seq)
            s_pred[b, i] = lp[-1].detach()
            n = len(thoughts[b][i]) + (0 if forced[b][i] else 1)
            start = len(contexts[b])
            logp_new[b][i] = torch.cat([lp[start : start + n], torch.full((L - n,), -1e9)])
            mask[b, i, :n] = 1
    lp_new = torch.stack([torch.stack(row) for row in logp_new])
    rewards = obj.information_gain_reward(s_pred, s_ema)
    adv = obj.group_advantages(rewards)
    loss, stats = obj.rlp_loss(lp_new, lp_new.detach(), adv, mask, 0.2, 0.28)
    loss.backward()
    torch.testing.assert_close(rewards, out["rewards"])
    torch.testing.assert_close(adv, out["advantages"])
    torch.testing.assert_close(loss.detach(), out["loss"], atol=1e-7, rtol=0)
    assert stats["clip_frac"].item() == out["clip_frac"] == 0.0
    for n, p in m_obj.named_parameters():
        torch.testing.assert_close(p.grad, out["grads"][n], atol=1e-7, rtol=1e-5)
    with torch.no_grad():
        for p in m_obj.parameters():
            p.add_(p.grad, alpha=-lr)
    teacher.update([m_obj], tau)
    for n, _ in m_obj.named_parameters():
        torch.testing.assert_close(teacher.shadow(f"0.{n}"), out["ema_params"][n], atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------ reference vs megatron-core GPTModel


@pytest.fixture(scope="module")
def megatron_gpt():
    from megatron_rlp.training import parallel

    parallel.init_distributed()
    parallel.init_model_parallel(1, 1)

    from megatron_rlp.models.builder import build_gpt_model, transformer_config
    from megatron_rlp.models.presets import get_preset

    def build(tied: bool):
        parallel.set_seed(1)
        p = get_preset("tiny").replace(num_layers=2, tie_embeddings=tied)
        m = build_gpt_model(p, transformer_config(p)).eval()
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():  # non-trivial norms and larger weights so attention/RoPE matter
            for name, prm in m.named_parameters():
                if "layernorm" in name:
                    prm.copy_(1.0 + 0.3 * torch.randn(prm.shape, generator=gen))
                else:
                    prm.mul_(5.0)
        cfg = ref.RefConfig(
            vocab_size=p.vocab_size, hidden_size=p.hidden_size, ffn_hidden_size=p.ffn_hidden_size,
            num_layers=p.num_layers, num_heads=p.num_attention_heads, num_query_groups=p.num_query_groups,
            head_dim=p.kv_channels, rotary_base=p.rotary_base, norm_eps=p.norm_epsilon,
            tie_embeddings=p.tie_embeddings,
        )
        return m, cfg

    models = {True: build(True), False: build(False)}
    yield models
    parallel.destroy()


def _megatron_logits(m, tokens):
    pos = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    with torch.no_grad():
        return m(tokens, pos, None).float()


@pytest.mark.parametrize("tied", [True, False])
def test_reference_model_matches_megatron_gpt(megatron_gpt, tied):
    m, cfg = megatron_gpt[tied]
    r = ref.RefDecoderLM(cfg)
    sd = m.state_dict()
    ref.load_from_megatron_state_dict(r, sd, num_query_groups=cfg.num_query_groups)
    assert ("output_layer.weight" in sd) != tied
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    got = _megatron_logits(m, tokens)
    with torch.no_grad():
        want = r(tokens)
    assert got.shape == want.shape == (2, 9, cfg.vocab_size)
    assert got.abs().max() > 1.0  # logits are not trivially small
    torch.testing.assert_close(want, got, atol=1e-5, rtol=1e-5)
    # Exporting the reference back to megatron names reproduces the state dict exactly.
    exported = ref.megatron_state_dict_from_reference(dict(r.named_parameters()), cfg)
    expected = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)


def test_reference_loads_transformer_engine_names_and_the_check_is_sensitive(megatron_gpt):
    m, cfg = megatron_gpt[False]
    sd = {k: v for k, v in m.state_dict().items() if not k.endswith("_extra_state")}
    te = {}
    for k, v in sd.items():
        k = k.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
        k = k.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")
        te[k] = v
    tokens = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    got = _megatron_logits(m, tokens)
    r = ref.RefDecoderLM(cfg)
    ref.load_from_megatron_state_dict(r, te)
    with torch.no_grad():
        torch.testing.assert_close(r(tokens), got, atol=1e-5, rtol=1e-5)
        # A naive [Q; K; V] split of the fused weight (wrong for megatron's per-group layout) and a
        # wrong RoPE base are both caught by far more than the tolerance.
        d, nh, ng = cfg.head_dim, cfg.num_heads, cfg.num_query_groups
        qkv = sd["decoder.layers.0.self_attention.linear_qkv.weight"]
        naive = copy.deepcopy(r)
        naive.blocks[0].attn.q_proj.copy_(qkv[: nh * d])
        naive.blocks[0].attn.k_proj.copy_(qkv[nh * d : (nh + ng) * d])
        naive.blocks[0].attn.v_proj.copy_(qkv[(nh + ng) * d :])
        assert (naive(tokens) - got).abs().max() > 1e-2
        cfg_rope = copy.deepcopy(cfg)
        cfg_rope.rotary_base = cfg.rotary_base * 10
        r_rope = ref.RefDecoderLM(cfg_rope)
        r_rope.load_state_dict(r.state_dict())
        assert (r_rope(tokens) - got).abs().max() > 1e-3
    with pytest.raises(KeyError):
        ref.load_from_megatron_state_dict(ref.RefDecoderLM(cfg), {k: v for k, v in te.items() if "fc2" not in k})
