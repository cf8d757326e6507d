"""--sequence-parallel and --recompute-* reach megatron's TransformerConfig; bad combinations give
errors that name the flags (the runs themselves are compared in tests/distributed/test_flags_parallel.py)."""

import warnings

import pytest

from megatron_rlp.models.builder import transformer_config
from megatron_rlp.models.presets import get_preset
from megatron_rlp.pretrain import parse_run_config

PRESET = get_preset("tiny")


def test_flags_parse_into_the_run_config():
    run = parse_run_config([
        "--sequence-parallel", "--recompute-granularity", "full", "--recompute-method", "block",
        "--recompute-num-layers", "2",
    ])
    assert run.parallel.sequence_parallel is True
    t = run.training
    assert (t.recompute_granularity, t.recompute_method, t.recompute_num_layers) == ("full", "block", 2)
    run = parse_run_config([])
    assert run.parallel.sequence_parallel is False and run.training.recompute_granularity is None
    with pytest.raises(SystemExit):
        parse_run_config(["--recompute-granularity", "layers"])


def test_transformer_config_carries_the_flags():
    config = transformer_config(PRESET, tp=2, sequence_parallel=True, recompute_granularity="full",
                                recompute_method="uniform", recompute_num_layers=1)
    assert config.sequence_parallel
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == ("full", "uniform", 1)
    config = transformer_config(PRESET, recompute_granularity="selective")
    assert config.recompute_granularity == "selective" and config.recompute_modules == ["core_attn"]


def test_sequence_parallel_at_tp1_is_switched_off_with_a_warning():
    # Megatron-LM's choice: at TP=1 there is no rank to split the sequence with, so nothing changes.
    with pytest.warns(UserWarning, match="--sequence-parallel has no effect at --tensor-model-parallel-size 1"):
        config = transformer_config(PRESET, tp=1, sequence_parallel=True)
    assert not config.sequence_parallel
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert transformer_config(PRESET, tp=2, sequence_parallel=True).sequence_parallel
    assert not [w for w in caught if "--sequence-parallel" in str(w.message)]


@pytest.mark.parametrize("flags,message", [
    (dict(recompute_granularity="full"), "full needs --recompute-method uniform or block"),
    (dict(recompute_granularity="full", recompute_method="uniform"), "full needs --recompute-num-layers >= 1"),
    (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=0), "--recompute-num-layers >= 1"),
    (dict(recompute_granularity="selective", recompute_method="uniform"), "selective .* takes no --recompute-method"),
    (dict(recompute_granularity="selective", recompute_num_layers=1), "selective .* takes no --recompute-method or --recompute-num-layers"),
    (dict(recompute_method="block", recompute_num_layers=1), "need --recompute-granularity full"),
    (dict(recompute_granularity="layer"), "--recompute-granularity must be one of"),
])
def test_bad_recompute_flags_are_rejected(flags, message):
    with pytest.raises(ValueError, match=message):
        transformer_config(PRESET, **flags)


def test_hybrid_te_spec_uses_the_stack_with_full_recompute():
    # megatron's MambaStack ignores recompute_granularity='full'; the TE path must use ours too.
    from megatron.core.extensions.transformer_engine import TENorm

    from megatron_rlp.models.hybrid import HybridMambaMixer, HybridMambaStack, hybrid_stack_spec

    spec = hybrid_stack_spec(get_preset("tiny-hybrid"), use_te=True)
    assert spec.module is HybridMambaStack and spec.params["final_norm"] is TENorm
    assert spec.submodules.mamba_layer.submodules.mixer.module is HybridMambaMixer
    # megatron's shared spec is left as it was
    from megatron.core.models.mamba.mamba_layer_specs import mamba_stack_spec
    from megatron.core.ssm.mamba_block import MambaStack

    assert mamba_stack_spec.module is MambaStack
    assert mamba_stack_spec.submodules.mamba_layer.submodules.mixer.module is not HybridMambaMixer


def test_cpu_shim_is_in_force_inside_custom_backward():
    # megatron's sequence-parallel and recompute backwards allocate on torch.cuda.current_device().
    import torch

    from megatron_rlp import platform

    if platform.setup_platform().type != "cpu":
        pytest.skip("the shim is installed only without CUDA")

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            return grad * torch.full(grad.shape, 2.0, device=torch.cuda.current_device())

    x = torch.ones(3, requires_grad=True)
    Double.apply(x).sum().backward()
    assert x.grad.tolist() == [2.0, 2.0, 2.0]
