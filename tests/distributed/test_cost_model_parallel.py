"""The cost model's parameter count per rank equals the model megatron-core builds on that rank,
at TP=2 and at PP=2 (even and uneven first/last stages), for both model families (2 ranks)."""

import dataclasses

import pytest
import torch
import torch.distributed as dist

from megatron.core import parallel_state

from megatron_rlp.models.builder import build_model, transformer_config
from megatron_rlp.models.presets import get_preset
from megatron_rlp.training import cost_model as cm


def _built_parameters(preset, tp, pp, first=None, last=None) -> int:
    config = transformer_config(preset, tp=tp, pp=pp)
    if first is not None or last is not None:
        config = dataclasses.replace(
            config, num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last
        )
    model = build_model(preset, config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny", "tiny-hybrid"])
@pytest.mark.parametrize("tp,pp,first,last", [(2, 1, None, None), (1, 2, None, None), (1, 2, 1, None)])
def test_parameters_per_rank_equal_built_model(model_parallel, name, tp, pp, first, last):
    preset = get_preset(name)
    model_parallel(tp, pp)
    built = _built_parameters(preset, tp, pp, first, last)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    expected = cm.stage_parameters(preset, tp=tp, pp=pp, first=first, last=last)[stage]
    counts = torch.tensor([built, expected])
    everyone = [torch.zeros_like(counts) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, counts)  # every rank sees every rank's result, so all fail together
    assert all(int(c[0]) == int(c[1]) for c in everyone), [c.tolist() for c in everyone]
