"""Strict device mode (MEGATRON_RLP_STRICT_DEVICE=1): the CPU shim refuses, at collectives on
groups that are NCCL in a CUDA run, tensors a CUDA run would keep on the host.

The launch runs in strict mode (tests/conftest.py and the Makefile turn it on under torchrun),
so every distributed test also checks the device discipline of the code it runs.
"""
import pytest
import torch
import torch.distributed as dist

from megatron.core import parallel_state

from megatron_rlp import collectives, platform
from megatron_rlp.training.loop import _PreemptionFlag, _reduce_reports


def test_launch_runs_in_strict_mode():
    assert platform.strict_device_enabled(), (
        "tests/distributed must run with MEGATRON_RLP_STRICT_DEVICE=1 (make test sets it)")


def test_host_tensor_all_reduce_on_default_group_is_refused(model_parallel):
    """The original defect: _PreemptionFlag.any_rank all-reduced torch.tensor([...]) (host) on
    the default group, which is NCCL on GPUs — every GPU job died after iteration 1."""
    model_parallel(1, 1)
    flag = torch.tensor([0.0])  # what the old any_rank built
    with pytest.raises(platform.StrictDeviceError, match=r"all_reduce.*torch\.tensor at .*test_strict_device\.py"):
        collectives.all_reduce(flag)
    # the direct torch.distributed call of the old code is refused as well
    with pytest.raises(platform.StrictDeviceError, match=r"torch\.distributed\.all_reduce"):
        dist.all_reduce(flag)


def test_device_tensors_pass_and_reduce(model_parallel):
    model_parallel(1, 1)
    rank = dist.get_rank()
    placed = torch.tensor([float(rank)], device=platform.device())
    collectives.all_reduce(placed)
    moved = torch.tensor([1.0]).to(platform.device())
    collectives.all_reduce(moved)
    world = dist.get_world_size()
    assert placed.item() == sum(range(world)) and moved.item() == world
    # the fixed preemption check: a flag raised on one rank is seen by all
    flag = _PreemptionFlag(enabled=False)
    flag.raised = rank == world - 1
    assert flag.any_rank() is True


def test_report_reduction_takes_device_values_and_refuses_host_ones(model_parallel):
    model_parallel(1, 1)
    loss = torch.tensor(2.0, device=platform.device())
    good = [{"lm loss": torch.stack([loss, loss.new_tensor(1.0)])}]
    assert _reduce_reports(good)["lm loss"] == pytest.approx(2.0)
    # the old RLP report: a host count stacked with a device value
    with pytest.raises(platform.StrictDeviceError, match="stack"):
        torch.stack([loss, torch.tensor(1.0)])
    with pytest.raises(platform.StrictDeviceError, match="all_reduce"):
        _reduce_reports([{"lm loss": torch.tensor([2.0, 1.0])}])


def test_parameters_results_and_grad_buffers_count_as_gpu(model_parallel):
    model_parallel(1, 1)
    weight = torch.nn.Parameter(torch.ones(3))
    assert platform.host_origin(weight) is None
    total = (weight * 2).sum()
    collectives.all_reduce(total.detach())
    buffer = torch.zeros(4, device=torch.cuda.current_device())  # how megatron allocates grad buffers
    collectives.all_reduce(buffer[:2])
    with pytest.raises(platform.StrictDeviceError, match="mul"):
        weight * torch.ones(3)  # a host operand next to a GPU one, as CUDA would refuse
    # a host tensor stays on the host when a device value is copied into it
    host = torch.zeros(3)
    host.copy_(weight.detach())
    with pytest.raises(platform.StrictDeviceError):
        collectives.broadcast(host, src=0)


def test_gloo_groups_for_cpu_objects_are_exempt(model_parallel):
    model_parallel(1, 1)
    gloo = parallel_state.get_data_parallel_group_gloo()
    counts = torch.ones(2)  # megatron keeps such bookkeeping on the host, on its gloo groups
    collectives.all_reduce(counts, group=gloo)
    assert counts.tolist() == [float(dist.get_world_size())] * 2
    with pytest.raises(platform.StrictDeviceError):
        collectives.all_reduce(torch.ones(2), group=parallel_state.get_data_parallel_group())
