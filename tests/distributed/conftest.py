"""Multi-rank tests: run inside ONE torchrun launch per world size, e.g.

    torchrun --nproc_per_node 2 -m pytest tests/distributed
    torchrun --nproc_per_node 4 -m pytest tests/distributed

Every rank runs every selected test; a test declares the world size it needs with
``@pytest.mark.world_size(N)`` (default 2) and is deselected (not skipped) in launches of
another size.  The ``model_parallel`` fixture re-creates megatron-core's parallel state per test.
"""
import os

import pytest
import torch.distributed as dist

from megatron_rlp.training import parallel


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def pytest_configure(config):
    config.addinivalue_line("markers", "world_size(n): run only in a launch with n ranks")


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("world_size")
        wanted = marker.args[0] if marker else 2
        (keep if wanted == _world_size() else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session", autouse=True)
def _distributed():
    if _world_size() < 2:
        pytest.exit("tests/distributed must be launched with torchrun --nproc_per_node >= 2", 2)
    parallel.init_distributed()
    yield
    dist.barrier()


@pytest.fixture
def model_parallel():
    """Call as model_parallel(tp, pp, seed=1234) to (re)build parallel state and seed."""

    def setup(tp: int = 1, pp: int = 1, seed: int = 1234):
        parallel.init_model_parallel(tp, pp)
        parallel.set_seed(seed)

    yield setup
    dist.barrier()
    parallel.destroy()
