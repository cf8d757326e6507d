"""Unit tests of megatron_rlp.rlp.ema.EMATeacher (RLP_SPEC.md "Roles": φ ← θ lazily, then φ ← τφ + (1−τ)θ)."""
import math

import pytest
import torch
from torch import nn

from megatron_rlp.rlp.ema import EMATeacher, named_parameters_of, validate_decay


def _chunks(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    a = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    b = nn.Linear(3, 2, bias=False)
    return [a.to(dtype), b.to(dtype)]


def test_names_carry_the_chunk_index():
    names = [n for n, _ in named_parameters_of(_chunks())]
    assert names == ["0.0.weight", "0.0.bias", "0.1.weight", "0.1.bias", "1.weight"]


def test_lazy_initialisation_copies_theta_once():
    model = _chunks()
    t = EMATeacher()
    assert not t.initialized
    with pytest.raises(RuntimeError, match="maybe_initialize"):
        t.update(model, 0.9)
    assert t.maybe_initialize(model) is True
    for name, p in named_parameters_of(model):
        assert t.shadow(name).dtype == torch.float32
        assert torch.equal(t.shadow(name), p.detach())
        assert t.shadow(name).data_ptr() != p.data_ptr()
    with torch.no_grad():
        for p in model[1].parameters():
            p.add_(1.0)
    assert t.maybe_initialize(model) is False  # second call is a no-op
    assert not torch.equal(t.shadow("1.weight"), model[1].weight.detach())
    assert t.num_parameters() == sum(p.numel() for m in model for p in m.parameters())


def test_update_follows_the_formula():
    model = _chunks()
    t = EMATeacher()
    t.maybe_initialize(model)
    phi0 = {n: t.shadow(n).clone() for n, _ in named_parameters_of(model)}
    with torch.no_grad():
        for p in model[0].parameters():
            p.mul_(-2.0).add_(0.5)
    t.update(model, 0.75)
    for name, p in named_parameters_of(model):
        torch.testing.assert_close(t.shadow(name), 0.75 * phi0[name] + 0.25 * p.detach())


def test_fp32_teacher_moves_where_a_bf16_ema_stalls():
    """τ = 0.999 with a realistic step: the bf16 EMA stays bitwise unchanged, the fp32 one moves."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 16, bias=False).to(torch.bfloat16)
    with torch.no_grad():  # weights of magnitude 0.01–0.05, as in a trained layer
        sign = torch.where(torch.rand(16, 16) < 0.5, -1.0, 1.0)
        lin.weight.copy_((sign * (0.01 + 0.04 * torch.rand(16, 16))).to(torch.bfloat16))
    teacher = EMATeacher()
    teacher.maybe_initialize([lin])
    bf16_ema = lin.weight.detach().clone()
    theta0 = lin.weight.detach().float().clone()
    with torch.no_grad():  # an Adam step of lr 1e-3: every element moves by ~1e-3
        lin.weight.add_(1e-3 * torch.where(torch.rand(16, 16) < 0.5, -1.0, 1.0).to(torch.bfloat16))
    assert not torch.equal(lin.weight.detach().float(), theta0)  # θ itself moved
    tau = 0.999
    bf16_ema.mul_(tau).add_(lin.weight.detach(), alpha=1 - tau)  # the same update, in bf16
    teacher.update([lin], tau)
    phi = teacher.shadow("0.weight")
    assert torch.equal(bf16_ema.float(), theta0)  # bf16 EMA did not move at all
    assert (phi != theta0).all()  # fp32 EMA moved everywhere
    torch.testing.assert_close(phi, tau * theta0 + (1 - tau) * lin.weight.detach().float(), rtol=0, atol=1e-9)


def test_swap_into_loads_phi_and_restores_theta_bitwise():
    for dtype in (torch.float32, torch.bfloat16):
        model = _chunks(dtype)
        t = EMATeacher()
        t.maybe_initialize(model)
        with torch.no_grad():
            for p in model[0].parameters():
                p.add_(torch.randn_like(p) * 0.37)
        t.update(model, 0.5)
        before = {n: p.detach().clone() for n, p in named_parameters_of(model)}
        ptrs = {n: p.data_ptr() for n, p in named_parameters_of(model)}
        x = torch.randn(5, 4, dtype=dtype)
        with t.swap_into(model):
            for n, p in named_parameters_of(model):
                assert torch.equal(p.detach(), t.shadow(n).to(dtype))
                assert p.data_ptr() == ptrs[n]
            out_teacher = model[1](model[0](x))
        for n, p in named_parameters_of(model):
            assert torch.equal(p.detach(), before[n])
            assert p.data_ptr() == ptrs[n]
        assert not torch.equal(out_teacher, model[1](model[0](x)))
        # Restored even when the block raises.
        with pytest.raises(KeyError):
            with t.swap_into(model):
                raise KeyError("boom")
        for n, p in named_parameters_of(model):
            assert torch.equal(p.detach(), before[n])


def test_gap_matches_a_hand_computation():
    lin = nn.Linear(2, 1)  # weight [1, 2], bias [1]
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 0.0]]))
        lin.bias.copy_(torch.tensor([4.0]))
    t = EMATeacher()
    t.load_state_dict({"0.weight": torch.tensor([[1.0, 1.0]]), "0.bias": torch.tensor([2.0])})
    # ‖θ−φ‖² = 2² + 1² + 2² = 9, ‖θ‖² = 9 + 16 = 25
    assert t.gap([lin]) == pytest.approx(3.0 / 5.0)
    # Only TP-sharded parameters (megatron's attribute) when replicated ones are excluded.
    lin.weight.tensor_model_parallel = True
    assert t.gap([lin], include_replicated=False) == pytest.approx(math.sqrt(5.0) / 3.0)
    t2 = EMATeacher()
    t2.maybe_initialize([lin])
    assert t2.gap([lin]) == 0.0


def test_gap_all_reduces_over_a_group():
    import torch.distributed as dist

    from megatron_rlp.training import parallel

    parallel.init_distributed()
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 0.0]]))
        lin.bias.copy_(torch.tensor([4.0]))
    t = EMATeacher()
    t.load_state_dict({"0.weight": torch.tensor([[1.0, 1.0]]), "0.bias": torch.tensor([2.0])})
    # Every rank holds the same shard here, so both sums scale by the world size: the ratio is unchanged.
    assert t.gap([lin], group=dist.group.WORLD) == pytest.approx(0.6)


def test_state_dict_round_trip_and_validation():
    model = _chunks()
    t = EMATeacher()
    assert t.state_dict() == {}
    t.maybe_initialize(model)
    with torch.no_grad():
        for p in model[1].parameters():
            p.add_(0.5)
    t.update(model, 0.9)
    sd = t.state_dict()
    assert set(sd) == {n for n, _ in named_parameters_of(model)}
    assert all(v.dtype == torch.float32 for v in sd.values())
    t2 = EMATeacher()
    t2.load_state_dict(sd, modules=model)
    assert t2.initialized
    for n in sd:
        assert torch.equal(t2.shadow(n), t.shadow(n))
    sd["1.weight"].add_(1.0)  # the state dict is a copy
    assert not torch.equal(t.shadow("1.weight"), sd["1.weight"])
    t.update(model, 0.9)
    t2.update(model, 0.9)
    assert all(torch.equal(t.shadow(n), t2.shadow(n)) for n in sd)
    # Loaded state that does not fit the model is rejected.
    bad = dict(sd)
    bad.pop("0.0.bias")
    with pytest.raises(KeyError):
        EMATeacher().load_state_dict(bad, modules=model)
    bad = dict(sd)
    bad["1.weight"] = torch.zeros(5)
    with pytest.raises(ValueError):
        EMATeacher().load_state_dict(bad, modules=model)
    t3 = EMATeacher()
    t3.load_state_dict(bad)
    with pytest.raises(ValueError):
        t3.update(model, 0.9)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, 1.5, float("nan"), "x"])
def test_decay_is_validated(bad):
    model = _chunks()
    t = EMATeacher()
    t.maybe_initialize(model)
    with pytest.raises(ValueError, match="--rlp-ema-decay"):
        t.update(model, bad)
    with pytest.raises(ValueError, match="--rlp-ema-decay"):
        validate_decay(bad)
    assert validate_decay(0.999) == 0.999
