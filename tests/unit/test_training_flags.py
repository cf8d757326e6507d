"""Validation of the Megatron-LM flags for overlap, uneven pipeline stages and the NaN check
(the runs themselves are compared in tests/distributed/test_training_flags.py)."""

import pytest

from megatron_rlp import config as cfg
from megatron_rlp.models.builder import pipeline_stage_sizes, transformer_config, validate_parallel_layout
from megatron_rlp.models.presets import get_preset
from megatron_rlp.pretrain import parse_run_config
from megatron_rlp.training import loop


def test_overlap_param_gather_needs_the_distributed_optimizer_and_overlapped_reduction():
    with pytest.raises(ValueError, match="--use-distributed-optimizer"):
        loop.validate_overlap(cfg.ParallelConfig(overlap_grad_reduce=True, overlap_param_gather=True))
    with pytest.raises(ValueError, match="needs --overlap-grad-reduce"):
        loop.validate_overlap(cfg.ParallelConfig(use_distributed_optimizer=True, overlap_param_gather=True))
    loop.validate_overlap(cfg.ParallelConfig(overlap_grad_reduce=True))  # fine without the sharded optimizer


def test_overlap_flags_parse_with_megatron_names():
    run = parse_run_config(["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
                            "--decoder-first-pipeline-num-layers", "15", "--decoder-last-pipeline-num-layers", "17"])
    p = run.parallel
    assert p.overlap_grad_reduce and p.overlap_param_gather and p.use_distributed_optimizer
    assert (p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers) == (15, 17)


def test_nan_check_is_on_by_default_like_megatron_lm():
    assert parse_run_config([]).training.check_for_nan_in_loss_and_grad is True
    assert parse_run_config(["--no-check-for-nan-in-loss-and-grad"]).training.check_for_nan_in_loss_and_grad is False


@pytest.mark.parametrize("num_layers,pp,first,last,sizes", [
    (62, 4, 14, 14, [14, 17, 17, 14]),  # the 12B's 62 layers on PP=4
    (62, 4, 17, None, [17, 15, 15, 15]),
    (62, 4, None, 2, [20, 20, 20, 2]),
    (3, 2, 1, None, [1, 2]),
    (3, 2, 2, 1, [2, 1]),
    (8, 4, None, None, [2, 2, 2, 2]),
    (5, 1, None, None, [5]),
])
def test_pipeline_stage_sizes_follow_megatron(num_layers, pp, first, last, sizes):
    assert pipeline_stage_sizes(num_layers, pp, first, last) == sizes
    assert sum(sizes) == num_layers


@pytest.mark.parametrize("num_layers,pp,first,last,message", [
    (62, 4, None, None, "does not divide the 62 layers; set --decoder-first"),
    (62, 4, 15, 16, "31 layers left .* do not divide evenly over the other 2"),
    (4, 2, 1, 1, "must add up to the 4 layers"),
    (4, 3, 2, 2, "0 layers left .* at least one layer"),
    (4, 2, 4, None, "--decoder-first-pipeline-num-layers 4 must be between 1 and 3"),
    (4, 2, None, 0, "--decoder-last-pipeline-num-layers 0 must be between 1 and 3"),
    (4, 1, 2, None, "need --pipeline-model-parallel-size > 1"),
])
def test_impossible_pipeline_splits_are_rejected_naming_the_flags(num_layers, pp, first, last, message):
    with pytest.raises(ValueError, match=message):
        pipeline_stage_sizes(num_layers, pp, first, last)


def test_layout_validation_and_transformer_config_take_the_split():
    preset = get_preset("tiny").replace(num_layers=3)
    with pytest.raises(ValueError, match="does not divide the 3 layers"):
        validate_parallel_layout(preset, 1, 2, 2)
    validate_parallel_layout(preset, 1, 2, 2, first_stage_layers=1)
    hybrid = get_preset("tiny-hybrid")
    with pytest.raises(ValueError, match="does not divide the 6 layers"):
        validate_parallel_layout(hybrid, 1, 4, 4)
    validate_parallel_layout(hybrid, 1, 4, 4, first_stage_layers=3, last_stage_layers=1)
    config = transformer_config(preset, pp=2, first_stage_layers=1)
    assert (config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage) == (1, None)
