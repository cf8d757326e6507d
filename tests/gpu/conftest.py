"""The GPU check kit's tests (``make gpu-check``; see README "Checking a GPU machine").

Every test here is marked ``cuda``; ``@pytest.mark.cuda(gpus=2)`` asks for two devices.  Without
them the test is *skipped* with the reason (never run and passed).  ``make test`` does not
collect this folder.
"""
import os

import pytest
import torch

CUDA = torch.cuda.is_available() and os.environ.get("MEGATRON_RLP_FORCE_CPU", "0") != "1"
if CUDA:
    # tests/conftest.py selects the Triton interpreter for the CPU suite; on a GPU the kernels
    # must compile for the device (the interpreter would run them on host copies).
    os.environ["TRITON_INTERPRET"] = "0"


def pytest_collection_modifyitems(config, items):
    count = torch.cuda.device_count() if CUDA else 0
    for item in items:
        marker = item.get_closest_marker("cuda")
        if marker is None:
            item.add_marker(pytest.mark.skip(reason="tests/gpu holds only tests marked cuda"))
            continue
        need = marker.kwargs.get("gpus", 1)
        if count < need:
            have = "no CUDA device" if not CUDA else f"{count} CUDA device(s)"
            item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA device(s), {have} here"))
