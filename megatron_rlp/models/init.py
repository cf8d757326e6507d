"""Parallel-layout-invariant weight initialisation.

megatron-core draws initial weights from the RNG in build order, so the same seed gives a
different model at PP=2 than at PP=1 (each stage starts its draws from the seed).  Here each
parameter is drawn from a generator seeded by (seed, its global checkpoint key, its layer),
as a full tensor of its global shape, and each rank keeps the slice its ShardedTensor says it
owns.  The result is bitwise the same model at any TP/PP/DP layout, which makes runs at
different layouts comparable (and is what the parallel-equivalence tests rely on).
"""

from __future__ import annotations

import math
import zlib

import torch

from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory


def _std_for(key: str, std: float, num_layers: int) -> float:
    if key.endswith("linear_proj.weight") or key.endswith("linear_fc2.weight") or key.endswith("out_proj.weight"):
        return std / math.sqrt(2.0 * num_layers)
    return std


def _is_norm(key: str) -> bool:
    return "layernorm" in key or "layer_norm" in key or key.endswith("norm.weight")


@torch.no_grad()
def initialize_layout_invariant(model, seed: int, num_layers: int, std: float = 0.02) -> None:
    """Re-initialise the weights of one model chunk (norm weights 1, matrices N(0, std))."""
    shards = []
    for value in nested_values(model.sharded_state_dict()):
        if isinstance(value, ShardedTensorFactory):
            shards.extend(v for v in nested_values(value.build()) if isinstance(v, ShardedTensor))
        elif isinstance(value, ShardedTensor):
            shards.append(value)
    for shard in shards:
        key = shard.key
        if not (key.endswith(".weight") or key.endswith("layer_norm_weight")) or shard.data.dtype not in (
            torch.float32, torch.bfloat16, torch.float16,
        ):
            continue
        lead = shard.prepend_axis_num
        layer = tuple(int(o) for o in shard.global_offset[:lead])
        local = tuple(shard.global_shape[lead:])
        slices = tuple(
            slice(int(off), int(off) + int(n))
            for off, n in zip(shard.global_offset[lead:], shard.data.shape)
        )
        if _is_norm(key):
            shard.data.fill_(1.0)
            continue
        gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}|{key}|{layer}".encode()))
        full = torch.randn(local, generator=gen, dtype=torch.float32) * _std_for(key, std, num_layers)
        shard.data.copy_(full[slices].to(shard.data.dtype))
