"""RLP at PP=2 over documents several times longer than --seq-length: no failure, no row past
the budget on either stage (tests/unit/test_rlp_lengths.py has the TP=1 cases)."""

import os

import numpy as np
import pytest
import torch.distributed as dist


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
    from rlp_lengths import write_long_corpus

    box = [str(tmp_path_factory.mktemp("rlp_long")) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    prefix = os.path.join(box[0], "corpus")
    if dist.get_rank() == 0:
        write_long_corpus(prefix)
    dist.barrier()
    return prefix


@pytest.mark.world_size(2)
def test_rlp_on_long_documents_at_pp2_stays_within_seq_length(long_corpus):
    from megatron_rlp.data.documents import window_starts
    from megatron_rlp.training import loop, parallel
    from rlp_lengths import LENGTHS, MIN_CONTEXT, WINDOW, build_objective, check_within_budget

    try:
        state, objective, recorder = build_objective(long_corpus, pp=2, global_batch=4, iters=4)
        history = loop.train(state, objective)
        assert len(history) == 4 and all(np.isfinite(h["rlp loss"]) for h in history)
        check_within_budget(recorder, long_corpus)
        expected = [(d, s) for d, n in enumerate(LENGTHS) for s in window_starts(n, WINDOW, MIN_CONTEXT)]
        assert [(w.document, w.offset) for w in recorder.windows] == expected  # one epoch, in windows
        widths = [None] * dist.get_world_size()
        dist.all_gather_object(widths, (recorder.update_widths, recorder.teacher_widths))
        assert all(w == widths[0] for w in widths)  # both stages ran the same shapes
    finally:
        parallel.destroy()
