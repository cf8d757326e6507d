"""The per-iteration log line (Megatron-LM's format), the validation line, and the scalars that go
to TensorBoard and (optionally) Weights & Biases."""

from __future__ import annotations

import math
import os
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


def format_validation_line(label: str, values: dict[str, float]) -> str:
    """Megatron-LM's validation line, e.g. ``validation loss at iteration 100 | lm loss value:
    ... | lm loss PPL: ... |`` (a key ending in " PPL" is printed as is)."""
    parts = [f" validation loss at {label}"]
    for key, value in values.items():
        parts.append(f"{key}: {value:.6E}" if key.endswith(" PPL") else f"{key} value: {value:.6E}")
    return " | ".join(parts) + " |"


def validation_scalars(values: dict[str, float]) -> dict[str, float]:
    """Megatron-LM's TensorBoard tags for validation values: "<key> validation" ("lm loss PPL"
    becomes "lm loss validation ppl")."""
    return {(f"{k[:-4]} validation ppl" if k.endswith(" PPL") else f"{k} validation"): v for k, v in values.items()}


def check_wandb_config(logging_config) -> None:
    """--wandb-*: fail at start, on every rank, when W&B is asked for but cannot be used."""
    if not logging_config.wandb_project:
        return
    if not logging_config.wandb_exp_name:
        raise ValueError("--wandb-project needs --wandb-exp-name (the run's name), as in Megatron-LM")
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ValueError(
            "--wandb-project needs the wandb package, which is not installed: pip install "
            "'megatron-rlp[wandb]' (or pip install wandb), or drop the --wandb-* flags"
        ) from None


class MetricsWriter:
    """Prints the log line and writes the scalars to TensorBoard and W&B (on the logging rank only).

    Every ``scalars()`` call goes to both with the iteration as the step, so the two hold the
    same keys, steps and values."""

    def __init__(self, tensorboard_dir: Optional[str], enabled: bool, wandb_project: Optional[str] = None,
                 wandb_exp_name: Optional[str] = None, wandb_save_dir: Optional[str] = None,
                 config: Optional[dict] = None):
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=tensorboard_dir)
        if enabled and wandb_project:
            import wandb

            if wandb_save_dir:
                os.makedirs(wandb_save_dir, exist_ok=True)
            self.wandb = wandb.init(project=wandb_project, name=wandb_exp_name, dir=wandb_save_dir,
                                    config=config or {})

    def log(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True, file=sys.stdout)

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        finite = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
        if self.tb is not None:
            for key, value in finite.items():
                self.tb.add_scalar(key, value, iteration)
        if self.wandb is not None and finite:
            self.wandb.log(finite, step=iteration)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
