"""Next-token prediction: the pretraining objective (and the paper's continued-pretraining baseline).

An objective is the one hook object the loop calls: ``microbatches()`` before the pipeline
schedule, ``forward_step()`` inside it, ``after_optimizer_step()`` after the step,
``state_dict()`` / ``sharded_state_dict()`` for checkpoints, and ``prepare_evaluation()`` /
``evaluate()`` for --eval-interval.  RLP implements the same interface.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch

from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rlp import collectives, platform
from megatron_rlp.data.documents import Cursor, DocumentStream
from megatron_rlp.training.cost_model import ntp_iteration_cost


def lm_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Mean per-token loss of one micro-batch and its [sum, count] report."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    loss_sum = (losses * mask).sum()
    count = mask.sum()
    loss = loss_sum / count.clamp(min=1)
    return loss, {"lm loss": torch.stack([loss_sum.detach().clone(), count])}


class NextTokenObjective:
    name = "ntp"

    def __init__(self, stream: DocumentStream, seq_length: int, micro_batch_size: int):
        self.stream = stream
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.validation: Optional[DocumentStream] = None

    def microbatches(self, iteration: int, num_microbatches: int, model_chunks) -> list[dict]:
        """This data-parallel rank's micro-batches for one optimizer step."""
        return self._microbatches(self.stream, num_microbatches)

    def _microbatches(self, stream: DocumentStream, num_microbatches: int) -> list[dict]:
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        per_rank = num_microbatches * self.micro_batch_size
        keep = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        samples = torch.from_numpy(stream.next_samples(per_rank * dp_size, self.seq_length, keep))
        batches = []
        for i in range(num_microbatches):
            rows = samples[i * self.micro_batch_size : (i + 1) * self.micro_batch_size]
            tokens = rows[:, :-1].contiguous()
            batches.append(platform.to_device(
                {
                    "tokens": tokens,
                    "labels": rows[:, 1:].contiguous(),
                    "loss_mask": torch.ones_like(tokens, dtype=torch.float32),
                    "position_ids": torch.arange(self.seq_length).unsqueeze(0).expand_as(tokens),
                }
            ))
        return batches

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(lm_loss_func, batch["loss_mask"])

    def iteration_cost(self, preset, global_batch_size: int, recompute: str = "none"):
        """The cost model's FLOPs of one iteration, whole job (every row is whole: no padding)."""
        return ntp_iteration_cost(preset, global_batch_size, self.seq_length, recompute)

    def prepare_evaluation(self, validation: DocumentStream) -> None:
        self.validation = validation

    def evaluate(self, model_chunks, num_iterations: int) -> dict[str, float]:
        """Validation loss and perplexity (Megatron-LM's "lm loss" / "lm loss PPL"): the mean
        per-token loss over ``num_iterations`` global batches of packed validation samples, the same
        samples at every evaluation; forward-only under the pipeline schedule.  Valid on the last
        pipeline stage."""
        from megatron.core.num_microbatches_calculator import get_num_microbatches

        self.validation.cursor = Cursor()  # the same held-out samples every time
        num_mb = get_num_microbatches()
        total = torch.zeros(2, dtype=torch.float64, device=platform.device())
        was_training = [m.training for m in model_chunks]
        for m in model_chunks:
            m.eval()
        try:
            with torch.no_grad():
                for _ in range(num_iterations):
                    batches = self._microbatches(self.validation, num_mb)
                    reports = get_forward_backward_func()(
                        forward_step_func=self.forward_step, data_iterator=iter(batches), model=model_chunks,
                        num_microbatches=num_mb, seq_length=self.seq_length,
                        micro_batch_size=self.micro_batch_size, forward_only=True,
                    )
                    for report in reports:  # last pipeline stage only
                        total += report["lm loss"].to(total)
        finally:
            for m, mode in zip(model_chunks, was_training):
                m.train(mode)
        if not parallel_state.is_pipeline_last_stage():
            return {}
        collectives.all_reduce(total, group=parallel_state.get_data_parallel_group())
        loss = (total[0] / total[1].clamp(min=1)).item()
        return {"lm loss": loss, "lm loss PPL": math.exp(min(20.0, loss))}

    def after_optimizer_step(self, model_chunks, iteration: int) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"cursor": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["cursor"])

    def sharded_state_dict(self, model_sharded_state_dict) -> dict:
        return {}

    def load_sharded_state_dict(self, loaded: dict) -> None:
        pass
