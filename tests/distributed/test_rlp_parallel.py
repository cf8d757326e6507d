"""RLP through megatron-core at TP=2 and PP=2: parity with the reference, and short real runs."""

import os

import pytest
import torch
import torch.distributed as dist

from training_fixtures import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    box = [str(tmp_path_factory.mktemp("rlp")) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    prefix = os.path.join(box[0], "corpus")
    if dist.get_rank() == 0:
        write_corpus(prefix, num_docs=16, seed=4)
    dist.barrier()
    return prefix


@pytest.mark.world_size(2)
@pytest.mark.parametrize("tp,pp,predictions", [(2, 1, None), (1, 2, None), (2, 1, "sampled"), (1, 2, "given")])
def test_one_iteration_matches_reference(corpus, tp, pp, predictions):
    """``predictions``: None for the information gain; else --rlp-reward prefix-match with N = 2 and
    the predictions given (fixed) or sampled by the objective's vocabulary-parallel source."""
    from rlp_parity import check_against_reference, reference_predictions, run_parity

    reward = {} if predictions is None else dict(reward="prefix-match", match_tokens=2, predictions=predictions)
    mega, ref = run_parity(corpus, tp=tp, pp=pp, **reward)
    check_against_reference(mega, ref)
    if predictions == "sampled" and mega["last_stage"]:  # every TP rank drew the reference's tokens
        call = mega["prediction_calls"][0]
        docs, positions = mega["source"].calls[0]
        continuations = [d[t : t + 2].tolist() for d, pos in zip(docs, positions) for t in pos]
        expected = reference_predictions(ref["model_at_start"], ref["contexts"], mega["source"].thoughts,
                                         continuations, call["temperature"], call["seed"], feed="text")
        assert call["predicted"].tolist() == expected


@pytest.mark.world_size(2)
@pytest.mark.parametrize("preset,tp,pp,sequence_parallel", [
    ("tiny", 2, 1, False), ("tiny", 2, 1, True), ("tiny", 1, 2, False), ("tiny-hybrid", 2, 1, False),
    ("tiny-hybrid", 1, 2, False),
])
def test_shared_update_equals_rows_update(corpus, preset, tp, pp, sequence_parallel):
    """The shared-prefix layout against one row per thought: loss, every rlp/* metric and every
    gradient shard (PP: the RoPE override must act on both stages, one shape per micro-batch)."""
    from rlp_parity import check_layouts_agree, run_parity

    runs = {
        layout: run_parity(corpus, tp=tp, pp=pp, tie=preset == "tiny", layout=layout,
                           rlp_overrides={"rlp_ntp_weight": 0.3}, with_reference=False,
                           sequence_parallel=sequence_parallel, preset_name=preset)[0]
        for layout in ("shared", "rows")
    }
    check_layouts_agree(runs["shared"], runs["rows"])
    widths = {mb["tokens"].shape for mb in runs["shared"]["microbatches"]}
    if pp > 1:
        assert len(widths) == 1  # the stages exchange one activation shape


@pytest.mark.world_size(2)
@pytest.mark.parametrize("preset,tp,pp,rpt", [("tiny", 2, 1, False), ("tiny", 1, 2, False), ("tiny-hybrid", 2, 1, False),
                                              ("tiny", 1, 2, True)])
def test_short_rlp_run_with_the_sampler(corpus, preset, tp, pp, rpt, tmp_path_factory):
    """A few real RLP iterations (sampled thoughts, EMA, checkpoint + resume) at TP=2 and PP=2,
    on the Qwen3-shaped GPT and on the hybrid Mamba model; ``rpt``: RPT's recipe, the prefix-match
    reward (N = 2, predictions sampled) on entropy-filtered positions."""
    from rlp_parity import run_short_rlp

    overrides = {"rlp_reward": "prefix-match", "rlp_reward_match_tokens": 2, "rlp_position_filter": "entropy",
                 "rlp_entropy_top_frac": 0.5} if rpt else None
    run_short_rlp(corpus, preset, tp, pp, tmp_path_factory, rlp_overrides=overrides)


@pytest.mark.world_size(2)
def test_log_line_flops_sum_the_data_parallel_ranks(corpus):
    """At DP=2 each rank samples its own contexts and thoughts: the TFLOP/s numerator is the cost
    model's FLOPs of both ranks' real batches (the optimizer and EMA phases once)."""
    from megatron_rlp.training import cost_model as cm
    from rlp_parity import run_parity

    mega, _ = run_parity(corpus, tp=1, pp=1, reference=False, layout="rows")  # world 2: DP=2
    docs, positions = mega["source"].calls[0]
    context_lens = [t for pos in positions for t in pos]
    thought_lens = [[len(c) for c in mega["source"].thoughts[i]] for i in range(len(context_lens))]
    mine = cm.rlp_batch_cost(mega["preset"], context_lens, thought_lens, "rows",
                             teacher_windows=[len(d) - 1 for d in docs], positions_per_doc=2,
                             prefill_lens=[max(pos) for pos in positions])
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, mine.model_flops - mine.phases["optimizer"].model_flops
                           - mine.phases["ema"].model_flops)
    assert per_rank[0] != per_rank[1]  # different documents on the two ranks
    expected = sum(per_rank) + mine.phases["optimizer"].model_flops + mine.phases["ema"].model_flops
    assert mega["history"]["model_flops"] == pytest.approx(expected, rel=1e-12)
