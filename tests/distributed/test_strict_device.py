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
from megatron_rlp.rlp import step
from megatron_rlp.training import loop
from megatron_rlp.training.loop import _PreemptionFlag, _reduce_reports


# Code before the fix, verbatim, compiled under the file name of the module it lived in, so that
# strict mode treats it as the package's own code (it polices mixed host/GPU ops and direct
# torch.distributed calls for tensors the package made; the collectives helper for all tensors).
OLD_ANY_RANK = """
def any_rank(raised):
    flag = torch.tensor([1.0 if raised else 0.0])
    dist.all_reduce(flag)
    return bool(flag.item())
"""
OLD_RLP_REPORT = """
def report(loss, b):
    ones = torch.tensor(float(b))
    return {"rlp loss": torch.stack([loss.detach() * b, ones])}
"""
HOST_OPERAND = """
def scale(weight):
    return weight * torch.ones(weight.shape)
"""


def _as_package_code(source, module, name):
    namespace = {"torch": torch, "dist": dist}
    exec(compile(source, module.__file__, "exec"), namespace)
    return namespace[name]


strict_only = pytest.mark.skipif(not platform.strict_device_enabled(),
                                 reason="needs MEGATRON_RLP_STRICT_DEVICE=1 (test_launch_runs_in_strict_mode fails)")


def test_launch_runs_in_strict_mode():
    assert platform.strict_device_enabled(), (
        "tests/distributed must run with MEGATRON_RLP_STRICT_DEVICE=1 (make test sets it)")


@strict_only
def test_host_tensor_all_reduce_on_default_group_is_refused(model_parallel):
    """The original defect: _PreemptionFlag.any_rank all-reduced torch.tensor([...]) (host) on
    the default group, which is NCCL on GPUs — every GPU job died after iteration 1."""
    model_parallel(1, 1)
    flag = torch.tensor([0.0])  # what the old any_rank built
    with pytest.raises(platform.StrictDeviceError, match=r"all_reduce.*torch\.tensor at .*test_strict_device\.py"):
        collectives.all_reduce(flag)
    # the old code called torch.distributed directly (the AST test forbids that now); strict mode
    # refuses that call too for tensors the package made
    old_any_rank = _as_package_code(OLD_ANY_RANK, loop, "any_rank")
    with pytest.raises(platform.StrictDeviceError,
                       match=r"torch\.distributed\.all_reduce.*made by torch\.tensor at .*loop\.py"):
        old_any_rank(False)


@strict_only
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


@strict_only
def test_report_reduction_takes_device_values_and_refuses_host_ones(model_parallel):
    model_parallel(1, 1)
    loss = torch.tensor(2.0, device=platform.device())
    good = [{"lm loss": torch.stack([loss, loss.new_tensor(1.0)])}]
    assert _reduce_reports(good)["lm loss"] == pytest.approx(2.0)
    # the old RLP report: a host count stacked with a device value
    old_report = _as_package_code(OLD_RLP_REPORT, step, "report")
    with pytest.raises(platform.StrictDeviceError, match=r"stack: .*torch\.tensor at .*step\.py"):
        old_report(loss, 4)
    with pytest.raises(platform.StrictDeviceError, match="all_reduce"):
        _reduce_reports([{"lm loss": torch.tensor([2.0, 1.0])}])


@strict_only
def test_parameters_results_and_grad_buffers_count_as_gpu(model_parallel):
    model_parallel(1, 1)
    weight = torch.nn.Parameter(torch.ones(3))
    assert platform.host_origin(weight) is None
    total = (weight * 2).sum()
    collectives.all_reduce(total.detach())
    buffer = torch.zeros(4, device=torch.cuda.current_device())  # how megatron allocates grad buffers
    collectives.all_reduce(buffer[:2])
    with pytest.raises(platform.StrictDeviceError, match="mul"):
        _as_package_code(HOST_OPERAND, step, "scale")(weight)  # CUDA refuses a host operand here
    # a host tensor stays on the host when a device value is copied into it
    host = torch.zeros(3)
    host.copy_(weight.detach())
    with pytest.raises(platform.StrictDeviceError):
        collectives.broadcast(host, src=0)


@strict_only
def test_gloo_groups_for_cpu_objects_are_exempt(model_parallel):
    model_parallel(1, 1)
    gloo = parallel_state.get_data_parallel_group_gloo()
    counts = torch.ones(2)  # megatron keeps such bookkeeping on the host, on its gloo groups
    collectives.all_reduce(counts, group=gloo)
    assert counts.tolist() == [float(dist.get_world_size())] * 2
    with pytest.raises(platform.StrictDeviceError):
        collectives.all_reduce(torch.ones(2), group=parallel_state.get_data_parallel_group())
