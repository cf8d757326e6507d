"""Next-token prediction: the pretraining objective (and the paper's continued-pretraining baseline).

An objective is the one hook object the loop calls: ``microbatches()`` before the pipeline
schedule, ``forward_step()`` inside it, ``after_optimizer_step()`` after the step, and
``state_dict()`` / ``sharded_state_dict()`` for checkpoints.  RLP implements the same interface.
"""

from __future__ import annotations

from functools import partial

import torch

from megatron.core import parallel_state

from megatron_rlp import platform
from megatron_rlp.data.documents import DocumentStream
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

    def microbatches(self, iteration: int, num_microbatches: int, model_chunks) -> list[dict]:
        """This data-parallel rank's micro-batches for one optimizer step."""
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        per_rank = num_microbatches * self.micro_batch_size
        keep = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        samples = torch.from_numpy(self.stream.next_samples(per_rank * dp_size, self.seq_length, keep))
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
