"""Phase timers for the log line and TensorBoard (``timers/<name>``), in the spirit of Megatron-LM's.

A GPU runs asynchronously: the host returns from a kernel launch long before the kernel ends, so
host wall time between two points measures launches, not work.  A timer that is *active*
synchronizes the device when it starts and when it stops, so its interval holds the phase's
kernels and nothing else; an inactive timer does nothing (no synchronization, no clock).  On CPU
synchronizing is a no-op and the timers measure plain wall time.

``--timing-log-level`` (Megatron-LM's flag; levels are this project's):

* 0 — no phase timers and no synchronization;
* 1 — phase timers on the iterations that are logged (every ``--log-interval``) only: those
  iterations synchronize at each phase boundary, the others run as they would untimed;
* 2 — phase timers on every iteration; the log line shows the mean over the logging interval.

Timer names are Megatron-style (``forward-backward``, ``optimizer``) plus the objective's phases
(RLP: ``rlp-teacher``, ``rlp-sampling`` with ``rlp-sampling-prefill`` / ``rlp-sampling-decode``
measured inside the sampler, ``rlp-ema``; ``rlp-scoring`` for the straightforward
baseline of tools/bench_rlp.py).  Reported milliseconds are the maximum over ranks (the
slowest rank sets the iteration's pace), as with Megatron-LM's ``--timing-log-option max``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_rlp import collectives

TIMING_LEVELS = (0, 1, 2)


def device_synchronize() -> None:
    """Wait for the device's queued work (a no-op without CUDA, and under the CPU shim)."""
    from megatron_rlp import platform

    if platform.cuda_available():
        torch.cuda.synchronize()


class Timers:
    """Named phase timers; ``with timers("optimizer"): ...`` times a phase when timing is active.

    ``synchronize`` is called at every active start and stop (default: the device's).
    """

    def __init__(self, level: int = 0, synchronize: Optional[Callable[[], None]] = None):
        if level not in TIMING_LEVELS:
            raise ValueError(f"--timing-log-level must be one of {TIMING_LEVELS}; got {level}")
        self.level = level
        self.synchronize = synchronize or device_synchronize
        self.active = False
        self._seconds: dict[str, float] = {}
        self._timed_iterations = 0

    def start_iteration(self, logged: bool) -> None:
        """Called by the loop before each iteration: is this one timed?"""
        self.active = self.level >= 2 or (self.level == 1 and logged)
        if self.active:
            self._timed_iterations += 1

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.active:
            yield
            return
        self.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.synchronize()
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: Optional[float]) -> None:
        """Add a sub-phase measured elsewhere (e.g. by the sampler, which synchronizes itself)."""
        if self.active and seconds is not None:
            self._seconds[name] = self._seconds.get(name, 0.0) + float(seconds)

    def collect(self, reduce_over_ranks: bool = True) -> dict[str, float]:
        """Mean milliseconds per timed iteration since the last call, maximum over ranks; resets.

        Every rank must call it at the same iterations (it gathers over the world group)."""
        if self.level == 0:
            return {}
        count = max(self._timed_iterations, 1)
        local = {k: 1000.0 * v / count for k, v in self._seconds.items()}
        self._seconds, self._timed_iterations = {}, 0
        if reduce_over_ranks and dist.is_initialized() and dist.get_world_size() > 1:
            # Object gather (only on logged iterations): phases need not run on every rank.
            gathered = collectives.all_gather_object(local)
            local = {}
            for part in gathered:
                for k, v in part.items():
                    local[k] = max(local.get(k, 0.0), v)
        return local
