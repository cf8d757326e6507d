"""RLP over documents several times longer than --seq-length: shared by tests/unit (TP=1) and
tests/distributed (PP=2).

The run records what the thought sampler, the EMA teacher and the update are given, so the tests
can check that every row stays within the budget --seq-length = context + open + thought + close.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from training_fixtures import NULL_VOCAB

SEQ_LENGTH = 24
THOUGHT_LEN = 5
MIN_CONTEXT = 3
MAX_CONTEXT = SEQ_LENGTH - THOUGHT_LEN - 2  # 17: x_<t + open + 5 thought tokens + close = 24 inputs
WINDOW = MAX_CONTEXT + 1  # context + target
# Long documents (100 tokens: 7 windows; 70: 5 windows), shorter than the window (10), too short
# for any position (2), and one that ends just past a window boundary (40: 3 windows).
LENGTHS = (100, 10, 70, 2, 40)


def write_long_corpus(prefix: str, lengths=LENGTHS) -> str:
    """Document d holds tokens (37 d + i) mod 500 at position i: every token says where it is."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d, n in enumerate(lengths):
        builder.add_item(torch.tensor([(37 * d + i) % NULL_VOCAB for i in range(n)]))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def corpus_documents(prefix: str) -> list[np.ndarray]:
    from megatron_rlp.data.documents import open_indexed_dataset

    dataset = open_indexed_dataset(prefix)
    return [np.asarray(dataset.get(i), dtype=np.int64) for i in range(len(dataset.sequence_lengths))]


class Recorder:
    """Wraps a thought source and the objective's forward-only passes (the teacher's)."""

    def __init__(self, thought_source):
        self.thought_source = thought_source
        self.sampler_calls = []  # (documents, positions, max_sequence_length, max_thought_len)
        self.teacher_widths = []
        self.update_widths = []
        self.path_lengths = []
        self.windows = []  # every window the stream gave, in order

    def __call__(self, model, documents, positions, num_thoughts, max_thought_len, *args, max_sequence_length, **kw):
        self.sampler_calls.append(([d.clone() for d in documents], [list(p) for p in positions],
                                   max_sequence_length, max_thought_len))
        return self.thought_source(model, documents, positions, num_thoughts, max_thought_len, *args,
                                   max_sequence_length=max_sequence_length, **kw)

    def attach(self, objective) -> None:
        forward_only, microbatches, next_windows = (
            objective._forward_only, objective.microbatches, objective.stream.next_windows)

        def recorded_forward_only(batches, loss_fn):
            self.teacher_widths += [b["tokens"].shape[1] for b in batches]
            return forward_only(batches, loss_fn)

        def recorded_microbatches(*args):
            out = microbatches(*args)
            self.update_widths += [mb["tokens"].shape[1] for mb in out]
            # One path: a row (rows layout), or a context and one of its branches (shared layout,
            # whose packed rows may be longer than --seq-length).
            self.path_lengths += [
                mb["tokens"].shape[1] if "layout" not in mb else
                max(t + max(lens) for t, lens in zip(mb["layout"].context_lens, mb["layout"].branch_lens))
                for mb in out
            ]
            return out

        def recorded_next_windows(*args, **kw):
            out = next_windows(*args, **kw)
            self.windows += out
            return out

        objective._forward_only = recorded_forward_only
        objective.microbatches = recorded_microbatches
        objective.stream.next_windows = recorded_next_windows


def build_objective(prefix: str, tp: int = 1, pp: int = 1, global_batch: int = 4, iters: int = 3,
                    positions_file: str | None = None, positions_per_doc: int = 2, thought_source=None,
                    seq_length: int = SEQ_LENGTH, shuffle: bool = False, rlp_overrides=None):
    """A tiny RLP run at --seq-length ``seq_length`` over the long corpus; returns (state, objective, recorder)."""
    from megatron_rlp.data.documents import DocumentStream, open_indexed_dataset
    from megatron_rlp.rlp.config import RLPConfig
    from megatron_rlp.rlp.step import RLPObjective
    from megatron_rlp.sampling import sample_thoughts
    from megatron_rlp.training import loop
    from rlp_parity import MarkerTokenizer

    run = loop.RunConfig()
    run.model.model_preset, run.model.num_layers, run.model.layout_invariant_init = "tiny", 2, True
    run.parallel.tensor_model_parallel_size, run.parallel.pipeline_model_parallel_size = tp, pp
    t = run.training
    t.micro_batch_size, t.global_batch_size, t.train_iters, t.lr, t.seed = 1, global_batch, iters, 1e-3, 5
    t.seq_length = seq_length
    state = loop.setup(run, loop.resolve_preset(run.model))
    stream = DocumentStream(open_indexed_dataset(prefix), state.preset.vocab_size, seed=5, shuffle=shuffle)
    config = RLPConfig(rlp_num_thoughts=2, rlp_thought_len=THOUGHT_LEN, rlp_positions_per_doc=positions_per_doc,
                       rlp_min_context=MIN_CONTEXT, rlp_positions_file=positions_file, **(rlp_overrides or {}))
    recorder = Recorder(thought_source or sample_thoughts)
    objective = RLPObjective(config, state, MarkerTokenizer(), stream, thought_source=recorder)
    recorder.attach(objective)
    return state, objective, recorder


def window_end_positions(prefix: str, path: str) -> str:
    """A --rlp-positions-file with one position per window, the last one the window can predict
    (t = MAX_CONTEXT: the longest row), plus position 1 (< MIN_CONTEXT: never used)."""
    from megatron_rlp.data.documents import window_starts

    allowed = []
    for doc in corpus_documents(prefix):
        n = len(doc)
        ends = [min(s + WINDOW - 1, n - 1) for s in window_starts(n, WINDOW, MIN_CONTEXT)] if n > MIN_CONTEXT else []
        allowed.append([1] + ends)
    with open(path, "w") as f:
        json.dump(allowed, f)
    return path


def check_within_budget(recorder: Recorder, prefix: str) -> None:
    """Every sampler request, teacher forward and update row fits --seq-length; the windows are
    slices of the documents at their offsets."""
    docs = corpus_documents(prefix)
    assert recorder.sampler_calls and recorder.update_widths and recorder.teacher_widths
    assert max(recorder.path_lengths) <= SEQ_LENGTH, f"update paths of {max(recorder.path_lengths)} inputs"
    # The teacher scores a window, never a whole document.
    assert max(recorder.teacher_widths) <= MAX_CONTEXT, f"teacher rows of {max(recorder.teacher_widths)} inputs"
    for documents, positions, max_sequence_length, max_thought_len in recorder.sampler_calls:
        assert max_sequence_length == SEQ_LENGTH and max_thought_len == THOUGHT_LEN
        for doc, pos in zip(documents, positions):
            assert len(doc) <= WINDOW
            assert pos and all(MIN_CONTEXT <= t <= min(MAX_CONTEXT, len(doc) - 1) for t in pos), (len(doc), pos)
            # The sampler's own room check: x_<t + open + L + close inputs.
            assert all(t + THOUGHT_LEN + 2 <= SEQ_LENGTH for t in pos)
    for w in recorder.windows:
        assert np.array_equal(w.tokens, docs[w.document][w.offset : w.offset + len(w.tokens)])
