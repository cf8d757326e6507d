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
_STRICT_DEVICE = False  # strict device tracking in force (see the "strict device mode" section)


def cuda_available() -> bool:
    return torch.cuda.is_available() and os.environ.get("MEGATRON_RLP_FORCE_CPU", "0") != "1"


def device() -> torch.device:
    """The device this process computes on.  Under the strict CPU shim it is the 'cuda' request
    the shim maps to the CPU, so that strict tracking counts the tensors placed there as GPU ones."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    if _STRICT_DEVICE:
        return _CUDA_REQUEST
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
        _DEVICE_MODE = _CpuDeviceMode() if not strict_device_requested() else _install_strict_device()
        _DEVICE_MODE.__enter__()
        _SHIM_INSTALLED = True
    return torch.device("cpu")


def shim_installed() -> bool:
    return _SHIM_INSTALLED


def cpu_rss_bytes() -> int:
    """Resident set size of this process (peak memory on CPU is read from RSS)."""
    import psutil

    return psutil.Process().memory_info().rss


# ---------------------------------------------------------------------------------------------
# Strict device mode (MEGATRON_RLP_STRICT_DEVICE=1, CPU shim only)
#
# On GPUs the training groups are NCCL, which has no CPU backend: a collective on a tensor a CUDA
# run keeps on the host kills the job, and so does an op mixing host and GPU tensors.  The shim
# maps 'cuda' to the CPU, which hides both.  Strict mode tracks which tensors a CUDA run would keep
# on the host and refuses them at the package's collectives (megatron_rlp.collectives) and in
# torch.cat / torch.stack next to GPU tensors.
#
# A tensor is *host* when it carries the `_rlp_host` mark: made by a torch call with no tensor
# input and no device request but the string 'cpu' (torch.tensor(...), torch.zeros(...) without
# device=, torch.from_numpy), by `.cpu()`, or by an op whose tensor inputs are all host.
# Everything else counts as GPU: tensors made from a 'cuda' request (device='cuda' /
# torch.cuda.current_device() / platform.device() / another tensor's .device, `.cuda()`,
# `.to('cuda')`), results of ops with any GPU input, Parameters and
# gradient buffers (megatron allocates them on the current CUDA device), and tensors born outside
# the mode (autograd's gradients).  In-place ops keep their target's status (a host tensor stays
# on the host when a GPU value is copied into it).  Groups created with backend='gloo' (megatron's
# *_gloo groups for CPU objects) are exempt.  Mixed host/GPU ops are refused for host tensors the
# package itself made (tests and megatron-core hand the model inputs of their own).
# ---------------------------------------------------------------------------------------------
STRICT_DEVICE_ENV = "MEGATRON_RLP_STRICT_DEVICE"
_HOST_MARK = "_rlp_host"
_TORCH_DIR = os.path.dirname(torch.__file__)
_GLOO_GROUPS: "weakref.WeakSet" = None  # type: ignore[assignment]
_CAT_OPS = frozenset({"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack"})


class StrictDeviceError(RuntimeError):
    """A tensor a CUDA run keeps on the host reached a place where NCCL / CUDA needs it on the GPU."""


def strict_device_requested() -> bool:
    return os.environ.get(STRICT_DEVICE_ENV, "0") == "1"


def strict_device_enabled() -> bool:
    """True when the CPU shim tracks host tensors (MEGATRON_RLP_STRICT_DEVICE=1 and no CUDA)."""
    return _STRICT_DEVICE


def _origin_here(what: str) -> tuple:
    """(what, file, line) of the first frame outside torch and this module: where a host tensor was made."""
    import sys

    frame = sys._getframe(2)
    while frame is not None and (
        frame.f_code.co_filename.startswith(_TORCH_DIR) or frame.f_code.co_filename == __file__
    ):
        frame = frame.f_back
    if frame is None:
        return (what, "?", 0)
    return (what, frame.f_code.co_filename, frame.f_lineno)


def host_origin(tensor: torch.Tensor):
    """Where a host tensor was made, ``(call, file, line)``; None for a GPU tensor (strict mode)."""
    if isinstance(tensor, torch.nn.Parameter):
        return None
    return tensor.__dict__.get(_HOST_MARK) if hasattr(tensor, "__dict__") else None


def _format_origin(origin: tuple) -> str:
    what, path, line = origin
    return f"made by {what} at {path}:{line}"


def _is_cpu_fallback_group(group) -> bool:
    try:
        return group is not None and _GLOO_GROUPS is not None and group in _GLOO_GROUPS
    except TypeError:  # not weak-referenceable: not a group we recorded
        return False


def check_collective_tensor(op: str, tensor: torch.Tensor, group=None, own_code_only: bool = False) -> None:
    """Refuse (strict mode) a host tensor at a collective on a group that is NCCL in a CUDA run.
    ``own_code_only``: only tensors the package or the tools made (direct torch.distributed calls
    of megatron-core and of test harnesses are theirs to keep)."""
    if not _STRICT_DEVICE or _is_cpu_fallback_group(group):
        return
    origin = host_origin(tensor)
    if origin is not None and (not own_code_only or origin[1].startswith(_OWN_CODE)):
        raise StrictDeviceError(
            f"{op}: tensor of shape {tuple(tensor.shape)} ({tensor.dtype}) is {_format_origin(origin)} "
            "and a CUDA run keeps it on the host; this group is NCCL there and NCCL has no CPU "
            "backend, so a GPU job dies here. Allocate it with device=megatron_rlp.platform.device() "
            f"(or move it with .to(platform.device())) before the collective. [{STRICT_DEVICE_ENV}=1]"
        )


def _is_gpu_request(value) -> bool:
    # A torch.device object counts as a GPU request even when it says 'cpu': on the CPU it is
    # almost always another tensor's .device (device=x.device), which is 'cuda' in a GPU run.
    # Only the string 'cpu' (and a missing device) means the host.
    if isinstance(value, torch.device) or _is_cuda_spec(value):
        return True
    return isinstance(value, int) and not isinstance(value, bool)


def _is_cuda_request(args, kwargs) -> bool:
    dev = kwargs.get("device")
    if dev is not None and _is_gpu_request(dev):
        return True
    return any(isinstance(a, torch.device) or _is_cuda_spec(a) for a in args)


def _tensor_inputs(args, kwargs) -> list:
    found = []
    for a in args:
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(b for b in a if isinstance(b, torch.Tensor))
    if kwargs:
        found.extend(a for a in kwargs.values() if isinstance(a, torch.Tensor))
    return found


class _StrictDeviceMode(_CpuDeviceMode):
    """The CPU shim's mode plus host tracking (see the section comment).  Only host results are
    marked; a tensor without the mark counts as GPU, so the common all-GPU op costs one dict
    lookup per input."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "__get__":  # attribute reads (.shape, .grad, .device): nothing to track
            return super().__torch_function__(func, types, args, kwargs)
        kwargs = kwargs or {}
        cuda_request = _is_cuda_request(args, kwargs)
        inputs = _tensor_inputs(args, kwargs)
        origin = None  # of the first host input
        all_host = any_gpu = False
        if inputs:
            all_host = True
            for t in inputs:
                mark = t.__dict__.get(_HOST_MARK) if type(t) is not torch.nn.Parameter else None
                if mark is None:
                    all_host, any_gpu = False, True
                elif origin is None:
                    origin = mark
        if any_gpu and origin is not None and not cuda_request and name not in _MIXING_ALLOWED \
                and not getattr(func, "__module__", "").startswith("torch.distributed"):
            # (collectives are checked per group by check_collective_tensor)
            _check_same_device(name, inputs)
        out = super().__torch_function__(func, types, args, kwargs)
        if not isinstance(out, (torch.Tensor, list, tuple)):
            return out
        if "out" in kwargs or (args and out is args[0] and (name.endswith("_") and not name.endswith("__")
                                                          or name.startswith("__i"))):
            return out  # in place: the target keeps its side
        if name == "cpu":
            origin = _origin_here(".cpu()")
        elif cuda_request or not (all_host or not inputs):
            if isinstance(out, torch.Tensor) and out.__dict__.get(_HOST_MARK) is not None:
                out = out.view_as(out)  # .to('cuda') of a host tensor returned itself on the CPU
            return out
        elif origin is None:
            origin = _origin_here(f"torch.{name}")
        if isinstance(out, torch.Tensor) and host_origin(out) is None and any(out is t for t in inputs):
            out = out.view_as(out)  # .cpu() of a GPU tensor returned itself on the CPU
        _mark_host(out, origin)
        return out


# Ops where CUDA accepts a host tensor next to GPU ones (copies across devices, CPU indices).
_MIXING_ALLOWED = frozenset({
    "__getitem__", "__setitem__", "copy_", "to", "type_as", "new_tensor", "tensor", "as_tensor",
    "set_", "index_put_", "index_put",
})


def _mark_host(out, origin) -> None:
    if isinstance(out, torch.Tensor):
        out.__dict__[_HOST_MARK] = origin
    elif isinstance(out, (list, tuple)):
        for t in out:
            if isinstance(t, torch.Tensor):
                t.__dict__[_HOST_MARK] = origin


_OWN_CODE = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
             os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools") + os.sep)


def _check_same_device(name, inputs) -> None:
    """A CUDA run refuses to mix a host tensor with GPU ones, except a 0-dim one in elementwise
    math (cat / stack take none).  Checked for host tensors made by the package and the tools:
    the discipline of their own code (tests and megatron-core hand in inputs of their own)."""
    for i, t in enumerate(inputs):
        origin = host_origin(t)
        if origin is not None and (t.dim() > 0 or name in _CAT_OPS) and origin[1].startswith(_OWN_CODE):
            raise StrictDeviceError(
                f"{name}: tensor input {i} of shape {tuple(t.shape)} is {_format_origin(origin)} and a "
                "CUDA run keeps it on the host, while other inputs are on the GPU; CUDA refuses to mix "
                "devices here. Allocate it with device=megatron_rlp.platform.device() (or derive it "
                f"from a GPU tensor, e.g. other.new_tensor(...)). [{STRICT_DEVICE_ENV}=1]"
            )


# torch.distributed calls whose tensors a CUDA run sends through NCCL: argument positions / names
# holding tensors (or lists of them).  Patched on the torch.distributed module, so megatron-core's
# calls are checked too; torch's own internals (object collectives, which pick their device from
# the backend) call the c10d functions directly and are not.
_TENSOR_CALLS = {
    "all_reduce": ("tensor",), "broadcast": ("tensor",), "reduce": ("tensor",),
    "all_gather": ("tensor_list", "tensor"), "all_gather_into_tensor": ("output_tensor", "input_tensor"),
    "reduce_scatter": ("output", "input_list"), "reduce_scatter_tensor": ("output", "input"),
    "all_to_all_single": ("output", "input"),
    # isend / irecv stay unpatched: P2POp accepts only the original functions
    "send": ("tensor",), "recv": ("tensor",),
}


def _check_distributed_calls(dist) -> None:
    import functools
    import inspect

    def checked(name, fn, params):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs).arguments
            group = bound.get("group")
            for p in params:
                value = bound.get(p)
                for t in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(t, torch.Tensor):
                        check_collective_tensor(f"torch.distributed.{name}", t, group, own_code_only=True)
            return fn(*args, **kwargs)

        return call

    for name, params in _TENSOR_CALLS.items():
        fn = getattr(dist, name, None)
        if fn is not None:
            setattr(dist, name, checked(name, fn, params))

    batch = dist.batch_isend_irecv

    @functools.wraps(batch)
    def batch_isend_irecv(p2p_op_list):
        for op in p2p_op_list:
            check_collective_tensor("torch.distributed.batch_isend_irecv", op.tensor, op.group,
                                    own_code_only=True)
        return batch(p2p_op_list)

    dist.batch_isend_irecv = batch_isend_irecv


def _install_strict_device() -> "_StrictDeviceMode":
    """Switch the shim to strict tracking: from_numpy and .cpu()/.cuda() mark their results, and
    groups created with backend='gloo' are remembered as exempt."""
    global _STRICT_DEVICE, _GLOO_GROUPS, _CUDA_REQUEST
    import weakref

    import torch.distributed as dist

    _GLOO_GROUPS = weakref.WeakSet()
    from_numpy = torch.from_numpy

    def strict_from_numpy(array):
        out = from_numpy(array)
        out.__dict__[_HOST_MARK] = _origin_here("torch.from_numpy")
        return out

    def strict_cuda(self, *args, **kwargs):
        if host_origin(self) is None:
            return self
        moved = self.view_as(self)  # a CUDA run returns a new tensor on the GPU
        moved.__dict__.pop(_HOST_MARK, None)
        return moved

    new_group = dist.new_group

    def strict_new_group(*args, **kwargs):
        group = new_group(*args, **kwargs)
        backend = kwargs.get("backend", args[2] if len(args) > 2 else None)
        # (non-members get a sentinel int, not a group)
        if isinstance(group, dist.ProcessGroup) and isinstance(backend, str) and backend.lower().startswith("gloo"):
            _GLOO_GROUPS.add(group)
        return group

    _CUDA_REQUEST = torch.device("cuda", 0)  # made before the mode starts (it rewrites 'cuda')
    torch.from_numpy = strict_from_numpy
    torch.Tensor.cuda = strict_cuda
    dist.new_group = strict_new_group
    _check_distributed_calls(dist)
    _STRICT_DEVICE = True
    return _StrictDeviceMode()


_CUDA_REQUEST = None  # torch.device("cuda", 0), set by _install_strict_device


def to_device(batch: dict) -> dict:
    """The batch's tensors on :func:`device` (micro-batches are built on the host; the model, the
    loss and the collectives that reduce its report need them on the GPU)."""
    where = device()
    return {k: v.to(where) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
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
