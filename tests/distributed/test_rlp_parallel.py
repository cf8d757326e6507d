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
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_one_iteration_matches_reference(corpus, tp, pp):
    from rlp_parity import check_against_reference, run_parity

    mega, ref = run_parity(corpus, tp=tp, pp=pp)
    check_against_reference(mega, ref)


@pytest.mark.world_size(2)
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_short_rlp_run_with_the_sampler(corpus, tp, pp, tmp_path_factory):
    """A few real RLP iterations (sampled thoughts, EMA, checkpoint + resume) at TP=2 and PP=2."""
    from megatron_rlp.rlp.config import RLPConfig
    from megatron_rlp.rlp.step import RLPObjective
    from megatron_rlp.data.documents import DocumentStream, open_indexed_dataset
    from megatron_rlp.training import checkpoint, loop, parallel
    from rlp_parity import MarkerTokenizer

    box = [str(tmp_path_factory.mktemp("rlpck")) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    save = box[0]

    def build(iters, load=None):
        run = loop.RunConfig()
        run.model.num_layers, run.model.layout_invariant_init = 2, True
        run.parallel.tensor_model_parallel_size, run.parallel.pipeline_model_parallel_size = tp, pp
        t = run.training
        t.micro_batch_size, t.global_batch_size, t.train_iters, t.lr, t.seed = 1, 2, iters, 1e-3, 5
        run.checkpoint.save, run.checkpoint.load = save, load
        state = loop.setup(run, loop.resolve_preset(run.model))
        stream = DocumentStream(open_indexed_dataset(corpus), state.preset.vocab_size, seed=5)
        config = RLPConfig(rlp_num_thoughts=2, rlp_thought_len=3, rlp_positions_per_doc=1, rlp_min_context=2)
        return state, RLPObjective(config, state, MarkerTokenizer(), stream)

    try:
        state, objective = build(2)
        history = loop.train(state, objective)
        assert all(torch.isfinite(torch.tensor(h["rlp loss"])) for h in history)
        assert history[-1]["rlp/ema_gap"] > 0
        assert 1 <= history[-1]["rlp/thought_len_mean"] <= 4
        assert history[-1]["rlp/sample_logprob_drift"] < 1e-4  # sampler and update agree
        assert checkpoint.read_tracker(save) == 2
        saved_teacher = {k: v.clone() for k, v in objective.teacher.state_dict().items()}
        parallel.destroy()
        state, objective = build(3)
        state.iteration = checkpoint.load_checkpoint(save, state.model, state.optimizer, state.scheduler,
                                                     objective, loop.model_signature(state.preset))
        assert state.iteration == 2
        loaded_teacher = objective.teacher.state_dict()  # the fp32 EMA teacher came back exactly
        assert set(loaded_teacher) == set(saved_teacher)
        assert all(torch.equal(loaded_teacher[k], saved_teacher[k]) for k in saved_teacher)
        resumed = loop.train(state, objective)
        assert [h["iteration"] for h in resumed] == [3]
    finally:
        parallel.destroy()
