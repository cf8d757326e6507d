"""Evaluation while training at TP=2 and PP=2 (forward-only under the pipeline schedule) gives the
single-process values, and leaves the training iterations as they are."""

import os

import pytest
import torch.distributed as dist

from megatron_rlp.pretrain import parse_run_config, run_training
from megatron_rlp.training import parallel
from training_fixtures import NULL_VOCAB, run_single_process, tiny_run_args, write_corpus

ITERS = 3
OBJECTIVES = {
    "ntp": dict(split="90,10,0", eval_interval=2, eval_iters=2),
    "rlp": dict(split="90,10,0", eval_interval=2, eval_iters=1, rlp=True, rlp_num_thoughts=2, rlp_thought_len=3,
                rlp_min_context=2, rlp_think_open=NULL_VOCAB - 2, rlp_think_close=NULL_VOCAB - 1,
                rlp_temperature=0.7),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    box = [str(tmp_path_factory.mktemp("evalpar")) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    prefix = os.path.join(box[0], "corpus")
    if dist.get_rank() == 0:
        write_corpus(prefix)
    dist.barrier()
    return prefix


@pytest.fixture(scope="module")
def baselines(corpus):
    """TP=PP=DP=1 histories, from single-rank processes run by rank 0."""
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [{name: run_single_process(tiny_run_args(corpus, iters=ITERS, **extra))
                    for name, extra in OBJECTIVES.items()}]
        except Exception as e:  # every rank must fail, not wait forever on rank 0
            box = [f"baseline failed: {e}"]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise AssertionError(box[0])
    return box[0]


@pytest.mark.world_size(2)
@pytest.mark.parametrize("objective,tp,pp", [("ntp", 1, 2), ("rlp", 2, 1), ("rlp", 1, 2)])
def test_evaluation_matches_single_process(corpus, baselines, objective, tp, pp):
    try:
        history = run_training(parse_run_config(tiny_run_args(corpus, tp=tp, pp=pp, iters=ITERS,
                                                              **OBJECTIVES[objective])))
    finally:
        parallel.destroy()
    want = baselines[objective]
    assert [h["iteration"] for h in history] == [h["iteration"] for h in want]
    evaluated = 0
    # rlp/ema_gap (a monitoring norm) differs at PP=2 before any evaluation: the tied embedding is
    # held by both stages and counted twice; it is no concern of this test.
    skip = {"elapsed_ms", "tflops_per_gpu", "timers_ms"} | ({"rlp/ema_gap"} if pp > 1 else set())
    for got_h, want_h in zip(history, want):
        keys = set(want_h) - skip
        assert keys == set(got_h) - skip
        for k in sorted(keys):
            assert abs(got_h[k] - want_h[k]) <= 1e-4 * max(1.0, abs(want_h[k])), (got_h["iteration"], k)
        evaluated += any(" validation" in k for k in keys)
    assert evaluated == 2  # iteration 2 and the end of training
