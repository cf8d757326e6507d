"""The per-iteration log line (Megatron-LM's format) and TensorBoard scalars."""

from __future__ import annotations

import math
import sys
from datetime import datetime
from typing import Optional


def format_log_line(
    iteration: int,
    train_iters: int,
    consumed_samples: int,
    elapsed_ms: float,
    tflops_per_gpu: Optional[float],
    lr: float,
    global_batch_size: int,
    metrics: dict[str, float],
    grad_norm: Optional[float],
    skipped: int = 0,
    nan_iterations: int = 0,
    phase_ms: Optional[dict[str, float]] = None,
) -> str:
    parts = [
        f" [{datetime.now().strftime('%Y-%m-%d %H:%M:%S')}] iteration {iteration:8d}/{train_iters:8d}",
        f"consumed samples: {consumed_samples:12d}",
        f"elapsed time per iteration (ms): {elapsed_ms:.1f}",
    ]
    if phase_ms:  # the phase timers (megatron_rlp.training.timers)
        parts.append("elapsed time per phase (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in phase_ms.items()))
    if tflops_per_gpu is not None:
        parts.append(f"throughput per GPU (TFLOP/s/GPU): {tflops_per_gpu:.3f}")
    parts.append(f"learning rate: {lr:.6E}")
    parts.append(f"global batch size: {global_batch_size:5d}")
    for key, value in metrics.items():
        parts.append(f"{key}: {value:.6E}")
    if grad_norm is not None:
        parts.append(f"grad norm: {grad_norm:.3f}")
    parts.append(f"number of skipped iterations: {skipped:3d}")
    parts.append(f"number of nan iterations: {nan_iterations:3d}")
    return " | ".join(parts) + " |"


class MetricsWriter:
    """Prints the log line and writes TensorBoard scalars (on the logging rank only)."""

    def __init__(self, tensorboard_dir: Optional[str], enabled: bool):
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=tensorboard_dir)

    def log(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True, file=sys.stdout)

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        if self.tb is None:
            return
        for key, value in values.items():
            if value is not None and math.isfinite(value):
                self.tb.add_scalar(key, value, iteration)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
