"""Device choice, and the CPU shim that lets megatron-core 0.16.1 run without CUDA.

megatron-core hard-codes CUDA in a few hundred places (``device="cuda"``,
``torch.cuda.current_device()``, the CUDA RNG tracker, ``param.type() ==
'torch.cuda.FloatTensor'`` checks, ``pin_memory``).  On a machine without a GPU
(tests, ``make demo``) :func:`setup_platform` installs a small set of patches so
that the *same* megatron-core code path runs on CPU over gloo:

* a ``TorchFunctionMode`` that rewrites any CUDA device argument to ``cpu``;
* ``Tensor.cuda()`` / ``Module.cuda()`` become no-ops, ``pin_memory`` returns self;
* ``Tensor.type()`` reports ``torch.cuda.*Tensor`` names (megatron's optimizer
  asserts on them);
* ``torch.cuda`` RNG / device / sync helpers answer for the CPU;
* megatron's CUDA RNG tracker is replaced by one that forks the CPU generator;
* the ``is_cuda`` assertion in megatron's inference p2p helpers is relaxed;
* custom autograd ``Function.backward`` re-enters the device mode (see :func:`_patch_autograd`).

With CUDA present :func:`setup_platform` only picks the device: nothing is patched.
No other module of the package knows about the shim.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_SHIM_INSTALLED = False
_DEVICE_MODE: "_CpuDeviceMode | None" = None


def cuda_available() -> bool:
    return torch.cuda.is_available() and os.environ.get("MEGATRON_RLP_FORCE_CPU", "0") != "1"


def device() -> torch.device:
    """The device this process computes on."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def dist_backend() -> str:
    return "nccl" if cuda_available() else "gloo"


def _is_cuda_spec(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.startswith("cuda")
    return False


def _rewrite_device(value: Any, allow_int: bool) -> Any:
    if _is_cuda_spec(value):
        return torch.device("cpu")
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cpu")
    return value


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs = dict(kwargs)
            kwargs["device"] = _rewrite_device(kwargs["device"], allow_int=True)
        if "pin_memory" in kwargs:
            kwargs = dict(kwargs)
            kwargs["pin_memory"] = False
        if args and any(_is_cuda_spec(a) for a in args):
            args = tuple(_rewrite_device(a, allow_int=False) for a in args)
        return func(*args, **kwargs)


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


class CpuRNGStatesTracker:
    """megatron's RNG tracker API (add / fork / get_states / set_states) on the CPU generator."""

    def __init__(self, *args, **kwargs):
        self.reset()
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = False

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._current_state_name = "default-rng"

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        gen = torch.Generator()
        gen.manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        prev_name, self._current_state_name = self._current_state_name, name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)
            self._current_state_name = prev_name


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: None
    cuda.manual_seed_all = lambda seed: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.max_memory_reserved = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.get_device_capability = lambda *a, **k: (0, 0)
    cuda.get_device_name = lambda *a, **k: "cpu"
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.Stream = _NullStream
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.Event = _CpuEvent
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None

    class _Device:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    cuda.device = _Device


class _NullStream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def record_event(self, *a, **k):
        return _CpuEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CpuEvent:
    def __init__(self, *a, **k):
        import time

        self._time = time
        self._t = None

    def record(self, *a, **k):
        self._t = self._time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, *a, **k):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return (other._t - self._t) * 1000.0


def _patch_tensor_methods() -> None:
    orig_type = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None:
            return _CUDA_TYPE_NAMES.get(self.dtype, orig_type(self))
        if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
            dtype = dtype.replace("torch.cuda.", "torch.")
        return orig_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.pin_memory = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    mp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    orig_init = mp_random.initialize_rng_tracker

    def initialize_rng_tracker(*args, force_reset: bool = False, **kwargs):
        if force_reset or mp_random._CUDA_RNG_STATE_TRACKER is None:
            mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
            mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    mp_random.initialize_rng_tracker = initialize_rng_tracker
    del orig_init

    try:
        from megatron.core.inference import communication_utils as comm

        comm._is_cuda = lambda tensor: None
        comm._is_cuda_contiguous = lambda tensor: tensor.is_contiguous() or None
    except ImportError:  # pragma: no cover - optional module
        pass


def _patch_autograd() -> None:
    """Custom autograd ``Function.backward`` runs with the device mode off: ``loss.backward()``
    itself passes through the mode, and a mode is suspended while its own handler runs.  megatron
    allocates with ``device=torch.cuda.current_device()`` in such backwards (the sequence-parallel
    collectives, recompute's replayed forward), so re-enter the mode there."""
    from torch.autograd.function import BackwardCFunction
    from torch.overrides import _get_current_function_mode_stack

    run_backward = BackwardCFunction.apply

    def apply(self, *args):
        if _DEVICE_MODE is None or _DEVICE_MODE in _get_current_function_mode_stack():
            return run_backward(self, *args)
        with _DEVICE_MODE:
            return run_backward(self, *args)

    BackwardCFunction.apply = apply


def setup_platform() -> torch.device:
    """Pick the device; without CUDA, install the CPU shim (idempotent). Returns the device."""
    global _SHIM_INSTALLED, _DEVICE_MODE
    if cuda_available():
        return device()
    if not _SHIM_INSTALLED:
        _patch_torch_cuda()
        _patch_tensor_methods()
        _patch_megatron()
        _patch_autograd()
        _DEVICE_MODE = _CpuDeviceMode()
        _DEVICE_MODE.__enter__()
        _SHIM_INSTALLED = True
    return torch.device("cpu")


def shim_installed() -> bool:
    return _SHIM_INSTALLED


def cpu_rss_bytes() -> int:
    """Resident set size of this process (peak memory on CPU is read from RSS)."""
    import psutil

    return psutil.Process().memory_info().rss


# --- the dry run: models on the meta device ---------------------------------------------------
def _is_meta(value: Any) -> bool:
    return (isinstance(value, torch.device) and value.type == "meta") or value == "meta"


class _MetaDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device arguments (and bare device indices) of every torch call to 'meta'."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device_arg = kwargs.get("device")
        if device_arg is not None and not _is_meta(device_arg) and (
            _is_cuda_spec(device_arg) or (isinstance(device_arg, int) and not isinstance(device_arg, bool))
        ):
            kwargs = dict(kwargs, device=torch.device("meta"))
        if args and any(_is_cuda_spec(a) for a in args):
            args = tuple(torch.device("meta") if _is_cuda_spec(a) else a for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device():
    """Inside it, tensors created on 'cuda' (megatron's ``device=torch.cuda.current_device()``)
    or without a device live on the meta device: shapes and dtypes, no storage, no compute.
    ``--dry-run`` builds a 12B model chunk this way in well under a second."""
    with _MetaDeviceMode(), torch.device("meta"):
        yield
