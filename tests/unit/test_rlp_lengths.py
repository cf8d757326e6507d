"""RLP keeps every row within --seq-length (context + open + thought + close), on documents several
times longer than that: windows, positions with room for the thought, the teacher on the window,
positions files in document coordinates, evaluation, and the up-front errors."""

import numpy as np
import pytest
import torch

from megatron_rlp.data.documents import DocumentStream, open_indexed_dataset, window_start_of, window_starts
from megatron_rlp.rlp.config import validate_rlp_lengths
from megatron_rlp.rlp.step import sample_positions
from megatron_rlp.sampling.thoughts import validate_request
from rlp_lengths import (
    LENGTHS, MAX_CONTEXT, MIN_CONTEXT, SEQ_LENGTH, THOUGHT_LEN, WINDOW, build_objective, check_within_budget,
    corpus_documents, window_end_positions, write_long_corpus,
)
from training_fixtures import tiny_run_args


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: more threads only contend on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_long_corpus(str(tmp_path_factory.mktemp("long") / "corpus"))


def test_positions_leave_room_for_the_thought():
    """The issue's case: a 1024-token document, k=16, thoughts of 64 tokens, a 1024-token budget.
    Every drawn position passes the sampler's check; the last one with room is allowed."""
    seq_length, thought_len, k = 1024, 64, 16
    max_context = seq_length - thought_len - 2
    doc = torch.zeros(1024, dtype=torch.int64)
    for seed in range(40):
        pos = sample_positions(len(doc), k, 1, np.random.default_rng(seed), max_context=max_context)
        assert len(pos) == k and all(1 <= t <= max_context for t in pos)
        validate_request([doc], [pos], 2, thought_len, 1.0, seq_length, {}, None)
    allowed = [0, 5, max_context, max_context + 1, 1023, 1024]  # document coordinates past the room
    assert set(sample_positions(1024, 40, 1, np.random.default_rng(0), allowed, max_context=max_context)) == {5, max_context}
    # The sampler's room check is the same budget: t = max_context fits, one more does not.
    validate_request([doc], [[max_context]], 2, thought_len, 1.0, seq_length, {}, None)
    with pytest.raises(ValueError, match="longer than the maximum sequence length"):
        validate_request([doc], [[max_context + 1]], 2, thought_len, 1.0, seq_length, {}, None)


def test_windows_cover_every_position_once_and_resume(corpus):
    docs = corpus_documents(corpus)
    stream = DocumentStream(open_indexed_dataset(corpus), 512, seed=3, shuffle=True)
    per_epoch = sum(len(window_starts(len(d), WINDOW, MIN_CONTEXT)) for d in docs)
    windows = stream.next_windows(2 * per_epoch, WINDOW, MIN_CONTEXT)
    for epoch in (windows[:per_epoch], windows[per_epoch:]):
        covered = {d: [] for d in range(len(docs))}
        for w in epoch:
            assert 1 <= len(w.tokens) <= WINDOW
            assert np.array_equal(w.tokens, docs[w.document][w.offset : w.offset + len(w.tokens)])
            first = 0 if w.offset == 0 else MIN_CONTEXT  # targets with >= MIN_CONTEXT tokens before them
            covered[w.document] += [w.offset + t for t in range(first, len(w.tokens))]
            assert all(window_start_of(w.offset + t, WINDOW, MIN_CONTEXT) == w.offset for t in range(first, len(w.tokens)))
        for d, positions in covered.items():
            assert sorted(positions) == list(range(len(docs[d]))), d  # every token once, nothing cut off
    assert stream.cursor.epoch == 2 and stream.cursor.token_offset == 0

    # Resume in the middle of a long document: the same windows as without the interruption.
    stream = DocumentStream(open_indexed_dataset(corpus), 512, seed=3, shuffle=True)
    first = stream.next_windows(1, WINDOW, MIN_CONTEXT)
    while stream.cursor.token_offset == 0:
        first += stream.next_windows(1, WINDOW, MIN_CONTEXT)
    resumed = DocumentStream(open_indexed_dataset(corpus), 512, seed=3, shuffle=True)
    resumed.load_state_dict(stream.state_dict())
    rest = resumed.next_windows(per_epoch - len(first), WINDOW, MIN_CONTEXT)
    for a, b in zip(first + rest, windows[:per_epoch]):
        assert (a.document, a.offset) == (b.document, b.offset) and np.array_equal(a.tokens, b.tokens)


def test_rlp_on_long_documents_stays_within_seq_length(corpus):
    """Four RLP iterations (real sampler) over one epoch of documents up to 4x --seq-length, with
    a document shorter than the window and one with no room for a position."""
    from megatron_rlp.training import loop, parallel

    try:
        state, objective, recorder = build_objective(corpus, global_batch=4, iters=4)
        history = loop.train(state, objective)
        assert all(np.isfinite(h["rlp loss"]) for h in history)
        check_within_budget(recorder, corpus)
        docs = corpus_documents(corpus)
        # In order (no shuffling): every document in its windows; the 2-token one has no position.
        expected = [(d, s) for d, n in enumerate(LENGTHS) for s in window_starts(n, WINDOW, MIN_CONTEXT)]
        assert [(w.document, w.offset) for w in recorder.windows] == expected
        sampled = [len(d) for documents, *_ in recorder.sampler_calls for d in documents]
        assert sampled == [len(w.tokens) for w in recorder.windows if w.document != 3]
        assert len(docs[1]) in sampled and len(docs[1]) < WINDOW  # the short document, whole
        cursor = objective.state_dict()["cursor"]  # one epoch read, in windows: the checkpointed cursor
        assert (cursor["epoch"], cursor["order_index"], cursor["token_offset"]) == (1, 0, 0)
    finally:
        parallel.destroy()


def test_positions_file_maps_into_windows(corpus, tmp_path):
    """--rlp-positions-file positions are document coordinates: each is used in the one window
    holding it, at the right token; positions at a window's end give rows of exactly --seq-length."""
    from megatron_rlp.training import loop, parallel
    from rlp_parity import GivenThoughtSource

    path = window_end_positions(corpus, str(tmp_path / "positions.json"))
    allowed = __import__("json").load(open(path))
    docs = corpus_documents(corpus)
    try:
        state, objective, _ = build_objective(corpus, positions_file=path, positions_per_doc=1)
        usable = sum(len(p) - 1 for p in allowed)  # one per window, position 1 never
        windows, positions = objective._next_contexts(usable)
        used = []
        for w, (t,) in zip(windows, positions):
            assert w.tokens[t] == docs[w.document][w.offset + t]
            assert MIN_CONTEXT <= t <= MAX_CONTEXT
            used.append((w.document, w.offset + t))
        assert sorted(used) == sorted((d, p) for d, ps in enumerate(allowed) for p in ps if p >= MIN_CONTEXT)
        assert any(t == MAX_CONTEXT for (t,) in positions) and any(w.offset > 0 for w in windows)
        parallel.destroy()

        # The longest rows: context MAX_CONTEXT + open + THOUGHT_LEN tokens + a forced close.
        n = 4 * 1  # contexts in one iteration: 4 windows x 1 position
        thoughts = [[list(range(10, 10 + THOUGHT_LEN))] * 2 for _ in range(n)]
        source = GivenThoughtSource(thoughts, [[True, True]] * n, THOUGHT_LEN)
        state, objective, recorder = build_objective(corpus, positions_file=path, positions_per_doc=1, iters=1,
                                                     thought_source=source)
        loop.train(state, objective)
        check_within_budget(recorder, corpus)
        assert max(recorder.path_lengths) == SEQ_LENGTH
    finally:
        parallel.destroy()


def test_seq_length_too_short_or_too_long_is_a_clear_error(corpus, capsys):
    from megatron_rlp.pretrain import main

    with pytest.raises(ValueError, match=r"--seq-length 24 cannot hold an RLP row: --rlp-min-context 3 .* "
                                         r"--rlp-thought-len 20 .* at least 25"):
        validate_rlp_lengths(24, 1024, thought_len=20, min_context=3)
    validate_rlp_lengths(25, 1024, thought_len=20, min_context=3)  # exactly enough
    with pytest.raises(ValueError, match=r"--seq-length 2048 exceeds the model's maximum sequence length "
                                         r"\(max_position_embeddings = 1024\)"):
        validate_rlp_lengths(2048, 1024, thought_len=20, min_context=3)

    base = tiny_run_args(corpus, iters=1) + ["--rlp", "--rlp-num-thoughts", "2", "--rlp-min-context", "3"]
    assert main(base + ["--rlp-thought-len", "30"]) == 2  # --seq-length 32 (tiny_run_args)
    assert "--seq-length 32 cannot hold an RLP row" in capsys.readouterr().err
    assert main(base + ["--rlp-thought-len", "4", "--seq-length", "4096"]) == 2
    assert "--seq-length 4096 exceeds the model's maximum sequence length" in capsys.readouterr().err


def test_evaluation_scores_long_documents_in_windows():
    """evaluate_thinking on a document 2x the budget (3 windows): every forward fits --seq-length and the
    no-thought log-prob of each position is the one from its window."""
    from megatron_rlp.models.builder import build_model, transformer_config
    from megatron_rlp.models.init import initialize_layout_invariant
    from megatron_rlp.models.presets import get_preset
    from megatron_rlp.rlp.evaluate import evaluate_thinking
    from megatron_rlp.sampling import sample_thoughts
    from megatron_rlp.training import parallel

    parallel.init_distributed()
    parallel.init_model_parallel(1, 1)
    parallel.set_seed(1234)
    try:
        preset = get_preset("tiny").replace(num_layers=2)
        model = build_model(preset, transformer_config(preset))
        initialize_layout_invariant(model, 7, preset.num_layers)
        widths, calls = [], []
        model.register_forward_pre_hook(
            lambda m, args, kwargs: widths.append((args[0] if args else kwargs["input_ids"]).shape[1]),
            with_kwargs=True)

        def recording_sampler(model, documents, positions, *args, max_sequence_length, **kw):
            calls.append(([len(d) for d in documents], positions, max_sequence_length))
            return sample_thoughts(model, documents, positions, *args, max_sequence_length=max_sequence_length, **kw)

        gen = torch.Generator().manual_seed(0)
        docs = [torch.randint(0, 500, (2 * SEQ_LENGTH,), generator=gen), torch.randint(0, 500, (12,), generator=gen)]
        positions = [list(range(MIN_CONTEXT, len(docs[0]))), [4, 11]]
        result = evaluate_thinking(model, docs, positions, recording_sampler, 2, THOUGHT_LEN, 1.0, 501, 502, 500,
                                   seed=3, max_sequence_length=SEQ_LENGTH, vocab_size=503, min_context=MIN_CONTEXT)
        assert max(widths) <= SEQ_LENGTH
        (lengths, window_positions, max_len), = calls
        assert max_len == SEQ_LENGTH and max(lengths) <= WINDOW
        assert all(t + THOUGHT_LEN + 2 <= SEQ_LENGTH for pos in window_positions for t in pos)
        assert len(result.thought_ids) == sum(len(p) for p in positions) and len(result.gain) == 2

        model.eval()
        with torch.no_grad():
            for i, (doc, pos) in enumerate(zip(docs, positions)):
                direct = []
                for p in pos:
                    start = window_start_of(p, WINDOW, MIN_CONTEXT)
                    ctx = doc[start:p][None]
                    logits = model(ctx, torch.arange(ctx.shape[1])[None], None)[0, -1, :503].float()
                    direct.append(torch.log_softmax(logits, -1)[doc[p]].item())
                assert result.logp_plain[i] == pytest.approx(np.mean(direct), abs=1e-5)
    finally:
        parallel.destroy()


@pytest.mark.parametrize("script", ["qwen3_1.7b", "nemotron_nano_12b_v2"])
def test_example_launch_scripts_fit_their_seq_length(script):
    """The slurm examples' RLP rows (the paper's 2048-token thoughts) fit their --seq-length."""
    import os

    from megatron_rlp.models.presets import get_preset
    from megatron_rlp.pretrain import parse_run_config

    import subprocess

    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", script, "rlp.sbatch")
    # The script's TRAIN_ARGS array, expanded by bash itself.
    show = 'eval "$(sed -n "/^TRAIN_ARGS=(/,/^)/p" "$0")"; printf "%s\\n" "${TRAIN_ARGS[@]}"'
    env = dict(os.environ, DATA="/d", HF_DIR="/hf", BASE_CKPT="/base", RUN_DIR="/run")
    flags = subprocess.run(["bash", "-c", show, path], capture_output=True, text=True, env=env,
                           check=True).stdout.splitlines()
    run = parse_run_config(flags + ["--train-iters", "10"])
    rlp = run.extra["rlp"]
    assert rlp.rlp_thought_len == 2048
    validate_rlp_lengths(run.training.seq_length, get_preset(run.model.model_preset).max_position_embeddings,
                         rlp.rlp_thought_len, rlp.rlp_min_context)


def test_resumed_run_draws_the_same_windows_and_positions(corpus):
    """The RLP checkpoint state (the stream's cursor) taken in the middle of a long document gives
    the same windows and positions as the uninterrupted run."""
    from megatron_rlp.training import parallel

    def draws(objective, count):
        windows, positions = objective._next_contexts(count)
        return [(w.document, w.offset, p) for w, p in zip(windows, positions)]

    try:
        _, objective, _ = build_objective(corpus)
        straight = draws(objective, 3) + draws(objective, 6)
        parallel.destroy()
        _, objective, _ = build_objective(corpus)
        first = draws(objective, 3)
        saved = objective.state_dict()
        assert saved["cursor"]["token_offset"] > 0  # stopped inside a long document
        parallel.destroy()
        _, objective, _ = build_objective(corpus)
        objective.load_state_dict(saved)
        assert first + draws(objective, 6) == straight
    finally:
        parallel.destroy()


def test_positions_file_without_usable_positions_is_an_error(corpus, tmp_path):
    """A positions file with no position a window can hold stops with a DataError (not a hang),
    and one that lists too few documents is refused up front."""
    import json

    from megatron_rlp.data.documents import DataError
    from megatron_rlp.training import parallel

    unusable = tmp_path / "unusable.json"
    unusable.write_text(json.dumps([[1, 10_000]] * len(LENGTHS)))  # before --rlp-min-context / past the end
    short = tmp_path / "short.json"
    short.write_text(json.dumps([[5]] * (len(LENGTHS) - 1)))
    try:
        _, objective, _ = build_objective(corpus, positions_file=str(unusable))
        with pytest.raises(DataError, match="no document has a position t >= --rlp-min-context 3 listed in"):
            objective._next_contexts(1)
        parallel.destroy()
        with pytest.raises(ValueError, match=r"lists 4 documents, fewer than the 5 of --data-path"):
            build_objective(corpus, positions_file=str(short))
    finally:
        parallel.destroy()


def test_prefix_match_positions_leave_room_for_the_continuation(corpus):
    """--rlp-reward prefix-match with N = 3: a position needs x_t..x_{t+2} in its window and the row
    x_<t + open + thought + close + 2 continuation tokens in --seq-length; the windows overlap so
    that every such position of a document is a candidate in exactly one window."""
    from megatron_rlp.training import parallel

    n = 3
    try:
        _, objective, _ = build_objective(corpus, rlp_overrides={"rlp_reward": "prefix-match",
                                                                 "rlp_reward_match_tokens": n})
        assert objective.max_context == MAX_CONTEXT - (n - 1)
        seen, windows_seen = [], set()
        while True:  # one epoch (unshuffled: the next one repeats its first window)
            windows, candidates, _ = objective._next_candidates(1)
            (w,), (cands,) = windows, candidates
            if (w.document, w.offset) in windows_seen:
                break
            windows_seen.add((w.document, w.offset))
            assert all(t + n <= len(w.tokens) and t + THOUGHT_LEN + 2 + (n - 1) <= SEQ_LENGTH for t in cands)
            seen += [(w.document, w.offset, w.offset + t) for t in cands]
        docs = corpus_documents(corpus)
        by_doc = {}
        for d, _, p in seen:
            by_doc.setdefault(d, []).append(p)
        for d, doc in enumerate(docs):
            expected = list(range(MIN_CONTEXT, len(doc) - n + 1))
            assert sorted(by_doc.get(d, [])) == expected, d
    finally:
        parallel.destroy()


def test_entropy_filtered_positions_are_drawn_again_on_resume(corpus):
    """--rlp-position-filter entropy: the positions depend on the cursor, the seed and the teacher,
    so a run resumed mid-document (cursor restored, same teacher) draws the same ones; and the
    filter changes the draws (they come from the top 30 % of each window by teacher entropy)."""
    from megatron_rlp.rlp.rewards import entropy_filtered_candidates
    from megatron_rlp.training import parallel

    overrides = {"rlp_position_filter": "entropy", "rlp_entropy_top_frac": 0.3}

    def build(**kw):
        _, objective, _ = build_objective(corpus, **kw)
        objective.teacher.maybe_initialize(objective.models)
        return objective

    def draws(objective, count):
        windows, positions, s_ema = objective._choose_contexts(count)
        assert len(s_ema) == sum(len(p) for p in positions)  # S_ema at the chosen positions
        return [(w.document, w.offset, p) for w, p in zip(windows, positions)]

    try:
        objective = build(rlp_overrides=overrides)
        straight = draws(objective, 3) + draws(objective, 6)
        parallel.destroy()
        objective = build(rlp_overrides=overrides)
        first = draws(objective, 3)
        saved = objective.state_dict()
        assert saved["cursor"]["token_offset"] > 0  # stopped inside a long document
        parallel.destroy()
        objective = build(rlp_overrides=overrides)
        objective.load_state_dict(saved)
        assert first + draws(objective, 6) == straight
        # The positions are in the top fraction of the teacher's entropy over the window's candidates.
        docs = corpus_documents(corpus)
        windows = [docs[d][o : o + WINDOW] for d, o, _ in straight]
        candidates = [list(range(MIN_CONTEXT, min(len(w) - 1, MAX_CONTEXT) + 1)) for w in windows]
        _, entropy = objective._score_documents([torch.from_numpy(w) for w in windows], candidates, with_entropy=True)
        start = 0
        for (_, _, pos), cands in zip(straight, candidates):
            top = entropy_filtered_candidates(cands, entropy[start : start + len(cands)].tolist(), 0.3, 2)
            assert set(pos) <= set(top) and len(top) < len(cands)
            start += len(cands)
        parallel.destroy()
        plain = build()
        assert draws(plain, 3) + draws(plain, 6) != straight
    finally:
        parallel.destroy()
