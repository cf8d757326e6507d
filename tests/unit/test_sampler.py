"""Thought sampler at TP=1 (one process): vocab-parallel Gumbel-max, cached decoding against a
plain full forward, both decode layouts against the naive sampler, stopping, micro-batching,
the hybrid (Mamba) model, and input validation."""

import math

import pytest
import torch

from megatron_rlp.models.builder import build_model, transformer_config
from megatron_rlp.models.hybrid import inference_state_layout
from megatron_rlp.models.init import initialize_layout_invariant
from megatron_rlp.models.presets import get_preset
from megatron_rlp.sampling import (
    PAD_ID,
    STOP_CLOSE,
    STOP_EOD,
    STOP_LENGTH,
    gumbel_noise,
    log_ratio_stats,
    sample_thoughts,
    sample_thoughts_naive,
    sample_vocab_parallel,
    thought_ratio_stats,
    uniform_noise,
)
from megatron_rlp.sampling.vocab_parallel import hash_to_unit
from megatron_rlp.sampling import sampler as sampler_module
from megatron_rlp.sampling.pipeline import StageInfo, run_pipelined, schedule_bubble, vocab_shard_logits
from megatron_rlp.sampling.thoughts import PrefillJob
from megatron_rlp.training import parallel

GPT = get_preset("tiny").replace(tie_embeddings=False, num_layers=2)
HYBRID = get_preset("tiny-hybrid")
OPEN, CLOSE, EOD = 509, 510, 511
MAX_LEN = 128


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: more threads only contend on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    parallel.init_distributed()
    parallel.init_model_parallel(1, 1)
    parallel.set_seed(1234)
    built = {}
    for preset in (GPT, HYBRID):
        model = build_model(preset, transformer_config(preset))
        initialize_layout_invariant(model, 7, preset.num_layers)
        built[preset.family] = model
    yield built
    parallel.destroy()


def _docs(seed=0, lengths=(30, 21, 26)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 500, (n,), generator=g) for n in lengths]


POSITIONS = [[5, 17, 9], [12], [3, 25]]


def _sample(model, docs=None, positions=POSITIONS, g=3, length=6, temperature=0.8, seed=11, **kw):
    docs = _docs() if docs is None else docs
    args = dict(close_id=CLOSE, eod_id=EOD, open_id=OPEN)
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    return sample_thoughts(
        model, docs, positions, g, length, temperature=temperature, seed=seed,
        max_sequence_length=MAX_LEN, **args, **kw,
    )


def _full_forward_logits(model, docs, batch):
    """Plain forward (no cache) over every (x_<t, open, sampled tokens) sequence: [N, G, L, V]."""
    n, g, length = batch.tokens.shape
    seqs, starts = [], []
    for i in range(n):
        b, t = int(batch.doc_index[i]), int(batch.position[i])
        for j in range(g):
            thought = torch.where(batch.mask[i, j], batch.tokens[i, j], torch.zeros_like(batch.tokens[i, j]))
            seqs.append(torch.cat([docs[b][:t], torch.tensor([batch.open_id]), thought]))
            starts.append(t)
    width = max(s.numel() for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.int64)  # right padding: causal, never read
    for r, s in enumerate(seqs):
        ids[r, : s.numel()] = s
    model.eval()
    with torch.no_grad():
        logits = model(ids, torch.arange(width).expand(len(seqs), -1), None).float()
    out = torch.stack([logits[r, s : s + length] for r, s in enumerate(starts)])
    return out.view(n, g, length, -1)


def _check_against_full_forward(model, docs, batch, tol=1e-4):
    logits = _full_forward_logits(model, docs, batch)
    tokens = batch.tokens.clamp(min=0)[..., None]
    logp = torch.log_softmax(logits, -1).gather(-1, tokens)[..., 0]
    mask = batch.mask
    diff = (logp - batch.logprobs).abs()[mask]
    assert diff.max() <= tol, diff.max()
    if batch.temperature > 0:
        tempered = torch.log_softmax(logits / batch.temperature, -1).gather(-1, tokens)[..., 0]
        assert (tempered - batch.tempered_logprobs).abs()[mask].max() <= tol
    else:
        assert torch.equal(batch.tokens[mask], logits.argmax(-1)[mask])
        assert batch.tempered_logprobs.abs().max() == 0
    assert (batch.logprobs[~mask] == 0).all() and (batch.tokens[~mask] == PAD_ID).all()
    stats = thought_ratio_stats(logp, batch)
    assert stats["tokens"] == int(mask.sum()) and stats["abs_log_ratio_max"] <= tol
    return logp


# ------------------------------------------------------------------- vocab-parallel sampling


def test_noise_is_a_function_of_global_vocab_id():
    rows = torch.tensor([0, 1, 7, 123456])
    full = uniform_noise(5, 3, rows, 0, 512)
    assert torch.equal(full[:, 256:], uniform_noise(5, 3, rows, 256, 256))
    assert torch.equal(full[:, 100:300], uniform_noise(5, 3, rows, 100, 200))
    assert torch.equal(full[2:3], uniform_noise(5, 3, rows[2:3], 0, 512))  # independent of batch
    for other in (uniform_noise(6, 3, rows, 0, 512), uniform_noise(5, 4, rows, 0, 512)):
        assert (other != full).float().mean() > 0.99
    assert (full[0] != full[1]).float().mean() > 0.99
    big = uniform_noise(1, 0, torch.arange(200), 0, 1000)
    assert 0 < big.min() and big.max() < 1
    assert abs(big.mean().item() - 0.5) < 0.005 and abs(big.var().item() - 1 / 12) < 0.002
    extremes = hash_to_unit(torch.tensor([0, 1, 2**32 - 2, 2**32 - 1]))
    assert 0 < extremes.min() and extremes.max() < 1  # fp32: the top hash must not round to 1.0
    assert torch.isfinite(-torch.log(-torch.log(extremes))).all()
    gumbel = gumbel_noise(1, 0, torch.arange(200), 0, 1000).double()
    assert abs(gumbel.mean().item() - 0.5772) < 0.02  # Euler-Mascheroni
    assert abs(gumbel.var().item() - math.pi**2 / 6) < 0.05


def test_gumbel_max_samples_the_tempered_softmax():
    z = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, 1.5])
    temperature, rows = 0.7, 40000
    out = sample_vocab_parallel(z.expand(rows, -1), temperature, seed=3, step=0, rows=torch.arange(rows))
    probs = torch.softmax(z / temperature, -1)
    freq = torch.bincount(out.tokens, minlength=6).double() / rows
    assert (freq - probs.double()).abs().max() < 0.01  # 4 standard errors
    torch.testing.assert_close(out.logprobs, torch.log_softmax(z, -1)[out.tokens])
    torch.testing.assert_close(out.tempered_logprobs, torch.log_softmax(z / temperature, -1)[out.tokens])
    # Same keys, same draws; another step draws differently.
    again = sample_vocab_parallel(z.expand(rows, -1), temperature, 3, 0, torch.arange(rows))
    assert torch.equal(again.tokens, out.tokens)
    other = sample_vocab_parallel(z.expand(rows, -1), temperature, 3, 1, torch.arange(rows))
    assert (other.tokens != out.tokens).float().mean() > 0.3


def test_greedy_ties_and_padded_vocabulary():
    z = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 1.0, 2.0, 9.0]])
    out = sample_vocab_parallel(z, 0.0, 0, 0, torch.arange(2))
    assert out.tokens.tolist() == [1, 3]  # lowest id on a tie
    assert torch.equal(out.tempered_logprobs, torch.zeros(2))
    torch.testing.assert_close(out.logprobs, torch.log_softmax(z, -1).gather(-1, out.tokens[:, None])[:, 0])
    # ids >= vocab_size (padding) are never drawn and do not count in the normaliser
    capped = sample_vocab_parallel(z, 0.0, 0, 0, torch.arange(2), vocab_size=3)
    assert capped.tokens.tolist() == [1, 0]
    torch.testing.assert_close(capped.logprobs, torch.log_softmax(z[:, :3], -1).gather(-1, capped.tokens[:, None])[:, 0])
    hot = sample_vocab_parallel(z.repeat(500, 1), 2.0, 0, 0, torch.arange(1000), vocab_size=3)
    assert hot.tokens.max() < 3


def test_schedule_bubble():
    assert schedule_bubble([(0, u) for u in range(5)], 1, True) == (5, 0.0)
    ticks, bubble = schedule_bubble([(0, u) for u in range(6)], 2, True)
    assert (ticks, bubble) == (12, 0.5)  # one micro-batch: the stages take turns
    items = [(m, u) for u in range(6) for m in range(2)]
    ticks, bubble = schedule_bubble(items, 2, True)
    assert ticks == 13 and math.isclose(bubble, 1 / 13)  # M = S: only fill and drain
    ticks, bubble = schedule_bubble([(0, 0), (1, 0)], 2, False)
    assert ticks == 3 and math.isclose(bubble, 1 / 3)


def test_log_ratio_stats():
    a = torch.tensor([[-1.0, -2.0, -3.0]])
    b = torch.tensor([[-1.5, -2.0, -2.0]])
    stats = log_ratio_stats(a, b, torch.tensor([[True, True, False]]))
    assert stats["tokens"] == 2
    assert math.isclose(stats["abs_log_ratio_mean"], 0.25)
    assert math.isclose(stats["abs_log_ratio_max"], 0.5)
    assert math.isclose(stats["log_ratio_mean"], 0.25)
    assert math.isclose(stats["ratio_max"], math.exp(0.5))
    assert log_ratio_stats(a, b, torch.zeros(1, 3, dtype=torch.bool))["tokens"] == 0
    with pytest.raises(ValueError, match="shapes differ"):
        log_ratio_stats(a, b[:, :2])


# ------------------------------------------------------------------------------ the sampler


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_cached_sampling_matches_full_forward_and_naive(models, temperature):
    model = models["gpt"]
    docs = _docs()
    model.train()
    tree = _sample(model, docs, temperature=temperature, layout="tree")
    assert model.training  # train mode restored
    rows = _sample(model, docs, temperature=temperature, layout="rows")
    naive = sample_thoughts_naive(
        model, docs, POSITIONS, 3, 6, OPEN, CLOSE, EOD, temperature, 11, MAX_LEN
    )
    assert tree.stats["layout"] == "tree" and rows.stats["layout"] == "rows"
    assert tree.tokens.shape == (6, 3, 6)
    assert tree.doc_index.tolist() == [0, 0, 0, 1, 2, 2]
    assert tree.position.tolist() == [5, 17, 9, 12, 3, 25]
    for other in (rows, naive):
        assert torch.equal(other.tokens, tree.tokens)
        assert torch.equal(other.lengths, tree.lengths)
        torch.testing.assert_close(other.logprobs, tree.logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(other.tempered_logprobs, tree.tempered_logprobs, atol=1e-5, rtol=0)
    _check_against_full_forward(model, docs, tree)
    # one prefill per document, up to its largest position
    assert tree.stats["prefill_tokens"] == 3 * 25 and naive.stats["prefill_tokens"] == 3 * (5 + 17 + 9 + 12 + 3 + 25 + 6)
    if temperature > 0:
        assert (tree.tokens[:, 0] != tree.tokens[:, 1]).any()  # branches differ
        again = _sample(model, docs, temperature=temperature)
        assert torch.equal(again.tokens, tree.tokens)  # same seed, same thoughts
        other_seed = _sample(model, docs, temperature=temperature, seed=12)
        assert (other_seed.tokens != tree.tokens).float().mean() > 0.5


def test_stopping_at_close_and_eod(models):
    model = models["gpt"]
    docs = _docs(1)
    base = _sample(model, docs, temperature=1.0, close_id=OPEN + 1, eod_id=None, length=8)
    assert (base.stop_reason == STOP_LENGTH).all() and base.forced.all()
    assert (base.lengths == 8).all()
    # Choose as close / EOD tokens the ones two branches drew at steps 2 and 4: the noise and the
    # prefix do not depend on the stop rule, so each branch stops at its first such token.
    close_tok, eod_tok = int(base.tokens[0, 0, 2]), int(base.tokens[1, 1, 4])
    assert close_tok != eod_tok
    batch = _sample(model, docs, temperature=1.0, close_id=close_tok, eod_id=eod_tok, length=8)
    for n in range(batch.num_contexts):
        for g in range(batch.num_thoughts):
            seq = base.tokens[n, g].tolist()
            hits = [i for i, tok in enumerate(seq) if tok in (close_tok, eod_tok)]
            if hits:
                stop = hits[0]
                expected_reason = STOP_CLOSE if seq[stop] == close_tok else STOP_EOD
                expected_len = stop + 1
            else:
                expected_reason, expected_len = STOP_LENGTH, 8
            assert batch.lengths[n, g] == expected_len
            assert batch.stop_reason[n, g] == expected_reason
            assert batch.forced[n, g] == (expected_reason != STOP_CLOSE)
            assert batch.tokens[n, g, :expected_len].tolist() == seq[:expected_len]
            assert (batch.tokens[n, g, expected_len:] == PAD_ID).all()
    assert batch.stop_reason[0, 0] == STOP_CLOSE and batch.lengths[0, 0] <= 3
    assert (batch.stop_reason == STOP_EOD).any()
    _check_against_full_forward(model, docs, batch)
    closed, lengths = batch.closed_tokens(pad_id=0)
    assert closed.shape == (6, 3, 9)
    for n in range(batch.num_contexts):
        for g in range(batch.num_thoughts):
            k = int(batch.lengths[n, g])
            want = batch.tokens[n, g, :k].tolist() + ([close_tok] if batch.forced[n, g] else [])
            assert closed[n, g, : lengths[n, g]].tolist() == want
            assert want[-1] == close_tok and (closed[n, g, lengths[n, g]:] == 0).all()


def test_micro_batches_and_unmasked_attention_plan(models, monkeypatch):
    model = models["gpt"]
    docs = _docs(2)
    ref = _sample(model, docs, temperature=0.9)
    assert ref.stats["decode_microbatches"] == 1
    split_tree = _sample(model, docs, temperature=0.9, micro_batch_size=6)  # 2 contexts each
    split_rows = _sample(model, docs, temperature=0.9, micro_batch_size=5, layout="rows")
    assert split_tree.stats["decode_microbatches"] == 3
    assert split_rows.stats["decode_microbatches"] == 4  # 18 rows, branches split across
    for other in (split_tree, split_rows):
        assert torch.equal(other.tokens, ref.tokens)
        torch.testing.assert_close(other.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    # An attention that ignores explicit masks at decode (Transformer Engine's): rows layout,
    # micro-batches of one context length each, no padding, no mask.
    monkeypatch.setattr(sampler_module, "model_traits", lambda model, stage: (False, False, False))
    assert _sample(model, docs, temperature=0.9, length=2).stats["layout"] == "cascade"  # "auto"
    unmasked = _sample(model, docs, temperature=0.9, layout="rows")
    assert unmasked.stats["layout"] == "rows" and not unmasked.stats["masked_decode"]
    assert unmasked.stats["decode_microbatches"] == 6 and unmasked.stats["padded_context_slots"] == 0
    assert torch.equal(unmasked.tokens, ref.tokens)
    with pytest.raises(ValueError, match="'tree' decode layout"):
        _sample(model, docs, layout="tree")


def test_auto_layout_follows_the_cost_model(models):
    model = models["gpt"]
    cost = sampler_module.decode_cost
    assert cost("tree", [256], 8, 32) < cost("rows", [256], 8, 32)  # the benchmark's setting
    assert cost("tree", [2048], 16, 2048) > cost("rows", [2048], 16, 2048)  # the paper's
    docs = _docs(4)
    short = _sample(model, docs, positions=[[20], [15], [20]], length=4)
    long = _sample(model, docs, positions=[[1], [2], [1]], length=20)
    assert short.stats["layout"] == "tree" and long.stats["layout"] == "rows"
    forced = _sample(model, docs, positions=[[1], [2], [1]], length=20, layout="tree")
    assert torch.equal(forced.tokens, long.tokens)


def test_hybrid_cached_decoding_matches_full_recompute(models):
    model = models["hybrid"]
    docs = _docs(3)
    for temperature in (0.0, 0.8):
        batch = _sample(model, docs, temperature=temperature, length=5)
        assert batch.stats["layout"] == "cascade"
        # one prefill job per document, one call per sampled position (3 + 1 + 2)
        assert batch.stats["prefill_forwards"] == 6
        assert batch.stats["decode_microbatches"] == 1
        logp = _check_against_full_forward(model, docs, batch)
        assert torch.isfinite(logp).all()
        naive = sample_thoughts_naive(model, docs, POSITIONS, 3, 5, OPEN, CLOSE, EOD, temperature, 11, MAX_LEN)
        assert torch.equal(naive.tokens, batch.tokens)
        torch.testing.assert_close(naive.logprobs, batch.logprobs, atol=1e-5, rtol=0)
    split = _sample(model, docs, temperature=0.8, length=5, micro_batch_size=4)
    assert torch.equal(split.tokens, batch.tokens)
    with pytest.raises(ValueError, match="'tree' decode layout"):
        _sample(model, docs, layout="tree")


class _TokenByTokenPrefill(PrefillJob):
    """The hybrid prefill before segments: one call up to the first sampled position, then one
    token per call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        first = self.ends[0]
        self.ends = [first] + list(range(first + 1, self.length + 1))
        self.num_steps = len(self.ends)


def _contexts_of_doc(positions):
    contexts = [(b, t) for b, ts in enumerate(positions) for t in ts]
    by_doc = {}
    for n, (b, t) in enumerate(contexts):
        by_doc.setdefault(b, []).append((n, t))
    return by_doc


def test_hybrid_prefill_in_segments_matches_token_by_token(models):
    """One call per sampled position (multi-token chunks continued from the Mamba states): the
    conv/SSM snapshots at every position and the final hidden states of every token equal the
    one-token-per-call prefill; the logits equal a plain forward."""
    model = models["hybrid"].eval()
    docs, by_doc = _docs(3), _contexts_of_doc(POSITIONS)
    mamba = [layer for layer, kind in inference_state_layout(model).items() if kind == "mamba"]

    def run(job_class, job_docs):
        job = job_class(job_docs, docs, by_doc, True, mamba, torch.device("cpu"))
        hidden = []
        job.on_output = lambda step, h: hidden.append(h)
        with torch.no_grad():
            run_pipelined(model, StageInfo.current(), [job], feedback=False)
        return job, torch.cat(hidden)  # [P, b, h]

    for job_docs in ([0], [2], [0, 1, 2]):  # one document per job (the sampler's plan), and a batch
        seg, seg_hidden = run(PrefillJob, job_docs)
        tok, tok_hidden = run(_TokenByTokenPrefill, job_docs)
        ends = sorted({t for b in job_docs for t in POSITIONS[b]})
        assert seg.ends == ends and seg.forwards == len(ends)
        assert tok.forwards == 1 + ends[-1] - ends[0]
        torch.testing.assert_close(seg_hidden, tok_hidden, atol=1e-5, rtol=0)
        length, batch, hidden_size = seg_hidden.shape
        logits = vocab_shard_logits(model, seg_hidden.reshape(-1, hidden_size)).view(length, batch, -1)
        with torch.no_grad():
            full = model(seg.tokens, torch.arange(length).expand(batch, -1), None).float()
        torch.testing.assert_close(logits.transpose(0, 1), full, atol=1e-5, rtol=0)
        contexts = {n for b in job_docs for n, _ in by_doc[b]}
        assert seg.snapshots.keys() == tok.snapshots.keys() == contexts
        for n in contexts:
            for layer in mamba:
                for a, b in zip(seg.snapshots[n][layer], tok.snapshots[n][layer]):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_hybrid_prefill_in_segments_keeps_the_thoughts(models, monkeypatch, temperature):
    model = models["hybrid"]
    docs = _docs(3)
    jobs = []

    class Counted(PrefillJob):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            jobs.append(self)

    monkeypatch.setattr(sampler_module, "PrefillJob", Counted)
    seg = _sample(model, docs, temperature=temperature, length=5)
    # k forwards for the k positions of each document: [5, 17, 9], [12], [3, 25]
    assert {tuple(job.docs): job.forwards for job in jobs} == {(0,): 3, (1,): 1, (2,): 2}
    monkeypatch.setattr(sampler_module, "PrefillJob", _TokenByTokenPrefill)
    tok = _sample(model, docs, temperature=temperature, length=5)
    assert tok.stats["prefill_forwards"] == 13 + 1 + 23
    for name in ("tokens", "lengths", "stop_reason"):
        assert torch.equal(getattr(seg, name), getattr(tok, name)), name
    torch.testing.assert_close(seg.logprobs, tok.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(seg.tempered_logprobs, tok.tempered_logprobs, atol=1e-5, rtol=0)


def test_padded_vocabulary_is_never_sampled(models):
    # The tokenizer has 303 ids; the embedding is padded to 512.  Make the padding dominate.
    model = models["gpt"]
    weight = model.output_layer.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[303:] *= 50
        kw = dict(open_id=300, close_id=301, eod_id=302, temperature=1.0, length=8)
        free = _sample(model, **kw)
        assert (free.tokens[free.mask] >= 303).any()
        capped = _sample(model, vocab_size=303, **kw)
        naive = sample_thoughts_naive(
            model, _docs(), POSITIONS, 3, 8, 300, 301, 302, 1.0, 11, MAX_LEN, vocab_size=303
        )
        for batch in (capped, naive):
            assert batch.tokens[batch.mask].max() < 303
        assert torch.equal(capped.tokens, naive.tokens)
        # both log-probs are over the real ids only (the policy the update differentiates)
        logits = _full_forward_logits(model, _docs(), capped)[..., :303]
        tokens, mask = capped.tokens.clamp(min=0)[..., None], capped.mask
        logp = torch.log_softmax(logits, -1).gather(-1, tokens)[..., 0]
        tempered = torch.log_softmax(logits, -1).gather(-1, tokens)[..., 0]
        assert (logp - capped.logprobs).abs()[mask].max() <= 1e-4
        assert (tempered - capped.tempered_logprobs).abs()[mask].max() <= 1e-4
        with pytest.raises(ValueError, match="exceeds the model's vocabulary"):
            _sample(model, vocab_size=513, **kw)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_bad_inputs_are_rejected(models):
    model = models["gpt"]
    docs = _docs()
    with pytest.raises(ValueError, match=r"position 0 of document 1 is outside"):
        _sample(model, docs, positions=[[5], [0], [3]])
    with pytest.raises(ValueError, match=r"position 21 of document 1 is outside.*1 <= t <= 20"):
        _sample(model, docs, positions=[[5], [21], [3]])
    with pytest.raises(ValueError, match="outside"):
        _sample(model, docs, positions=[[-2], [4], [3]])
    long_doc = [torch.randint(0, 500, (200,))]
    with pytest.raises(ValueError, match=r"prefix of 150 tokens.*max_thought_len=10.*162 input tokens.*128"):
        _sample(model, long_doc, positions=[[150]], length=10)
    with pytest.raises(ValueError, match=r"num_thoughts \(G\) must be an integer >= 1, got 0"):
        _sample(model, docs, g=0)
    with pytest.raises(ValueError, match="max_thought_len must be"):
        _sample(model, docs, length=0)
    with pytest.raises(ValueError, match="temperature"):
        _sample(model, docs, temperature=-0.1)
    with pytest.raises(ValueError, match="one list of positions per document"):
        _sample(model, docs, positions=[[5]])
    with pytest.raises(ValueError, match="no positions"):
        _sample(model, docs, positions=[[], [], []])
    with pytest.raises(ValueError, match="close_id 600"):
        _sample(model, docs, close_id=600)
    with pytest.raises(ValueError, match="layout"):
        _sample(model, docs, layout="ragged")
    with pytest.raises(ValueError, match="micro_batch_size"):
        _sample(model, docs, micro_batch_size=0)
    model.config.sequence_parallel = True  # sample_thoughts switches it off (tests/distributed)
    try:
        with pytest.raises(ValueError, match="cannot run sequence-parallel.*sequence_parallel_off"):
            sample_thoughts_naive(model, docs, POSITIONS, 3, 5, OPEN, CLOSE, EOD, 0.8, 11, MAX_LEN)
    finally:
        model.config.sequence_parallel = False
    ok = _sample(model, docs, positions=[[29], [20], [1]], length=4)  # the extreme positions
    assert ok.position.tolist() == [29, 20, 1]


# ------------------------------------------------------------------ cascade layout, memory


class _TELikeAttention:
    """Makes the core attention behave as Transformer Engine's does at decode — megatron passes
    ``no_mask`` past the prompt and the explicit mask is ignored — while ``ignore_masks`` is set;
    ``plan(honest)`` sets what the sampler's plan sees (model_traits, as in the unmasked-plan
    test above)."""

    def __init__(self, models, monkeypatch):
        from megatron.core.transformer.attention import Attention
        from megatron.core.transformer.enums import AttnMaskType

        self.ignore_masks = True
        self.monkeypatch = monkeypatch
        for model in models.values():
            for module in model.modules():
                if isinstance(module, Attention):
                    core = module.core_attention
                    original = core.forward

                    def forward(query, key, value, attention_mask, *args, original=original, **kwargs):
                        if (self.ignore_masks and attention_mask is not None
                                and kwargs.get("attn_mask_type") == AttnMaskType.no_mask):
                            attention_mask = torch.zeros_like(attention_mask)  # nothing masked
                        return original(query, key, value, attention_mask, *args, **kwargs)

                    monkeypatch.setattr(core, "forward", forward)

    def plan(self, honest: bool) -> None:
        self.monkeypatch.setattr(sampler_module, "model_traits", lambda model, stage: (honest, False, honest))


@pytest.fixture
def te_like_attention(models, monkeypatch):
    return _TELikeAttention(models, monkeypatch)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_cascade_matches_tree_where_the_attention_ignores_masks(models, te_like_attention, temperature):
    model = models["gpt"]
    docs = _docs()
    te_like_attention.plan(True)  # a plan that trusts the mask: the tree layout runs, wrongly
    broken = _sample(model, docs, temperature=temperature, layout="tree")
    te_like_attention.plan(False)
    cascade = _sample(model, docs, temperature=temperature)
    split = _sample(model, docs, temperature=temperature, micro_batch_size=5, layout="cascade")
    rows = _sample(model, docs, temperature=temperature, layout="rows")
    assert cascade.stats["layout"] == "cascade" and split.stats["decode_microbatches"] == 4
    te_like_attention.ignore_masks = False  # the reference: tree layout, honest attention
    te_like_attention.plan(True)
    tree = _sample(model, docs, temperature=temperature, layout="tree")
    assert not torch.allclose(broken.logprobs, tree.logprobs, atol=1e-3)  # the emulation bites
    for other in (cascade, split, rows):
        assert torch.equal(other.tokens, tree.tokens)
        assert torch.equal(other.lengths, tree.lengths)
        torch.testing.assert_close(other.logprobs, tree.logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(other.tempered_logprobs, tree.tempered_logprobs, atol=1e-5, rtol=0)
    _check_against_full_forward(model, docs, cascade, tol=1e-5)
    # the context caches are read once per context, not once per branch
    assert cascade.stats["kv_slot_reads"] < rows.stats["kv_slot_reads"] / 2


def test_cascade_finished_rows_leave_the_batch(models):
    model = models["gpt"]
    docs = _docs(1)
    # An 8-id vocabulary with close and EOD in it: at T = 2 about a quarter of the running rows
    # stop at every step, so the batch halves (and is compacted) more than once.
    kw = dict(temperature=2.0, open_id=5, close_id=6, eod_id=7, vocab_size=8, length=10, g=4)
    tree = _sample(model, docs, layout="tree", **kw)
    cascade = _sample(model, docs, layout="cascade", **kw)
    assert torch.equal(cascade.tokens, tree.tokens) and torch.equal(cascade.stop_reason, tree.stop_reason)
    torch.testing.assert_close(cascade.logprobs, tree.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(cascade.tempered_logprobs, tree.tempered_logprobs, atol=1e-5, rtol=0)
    lengths = tree.lengths.flatten()
    assert lengths.float().std() > 1 and (lengths < 4).float().mean() > 0.5  # rows stop at different steps
    assert cascade.stats["decode_row_steps"] < tree.stats["decode_row_steps"] * 3 // 4


def test_cascade_hybrid_matches_rows(models):
    model = models["hybrid"]
    docs = _docs(3)
    for temperature in (0.0, 0.8):
        auto = _sample(model, docs, temperature=temperature, length=5)
        rows = _sample(model, docs, temperature=temperature, length=5, layout="rows")
        split = _sample(model, docs, temperature=temperature, length=5, layout="cascade", micro_batch_size=4)
        assert auto.stats["layout"] == "cascade"
        for other in (auto, split):
            assert torch.equal(other.tokens, rows.tokens)
            torch.testing.assert_close(other.logprobs, rows.logprobs, atol=1e-5, rtol=0)
    _check_against_full_forward(model, docs, auto)


@pytest.mark.parametrize("layout", ["cascade", "rows", "tree"])
def test_decode_cache_memory_is_bounded_by_the_micro_batch(models, layout):
    model = models["gpt"]
    docs = _docs()
    g, length = 3, 6
    full = _sample(model, docs, g=g, length=length, layout=layout)
    small = _sample(model, docs, g=g, length=length, layout=layout, micro_batch_size=g)  # one context
    assert torch.equal(small.tokens, full.tokens)
    peak_full, peak_small = full.stats["decode_cache_bytes_peak"], small.stats["decode_cache_bytes_peak"]
    assert small.stats["decode_microbatches"] == 6
    assert 0 < peak_small * 4 < peak_full  # 6 contexts per micro-batch -> 1
    assert full.stats["cache_bytes_peak"] > peak_full  # the prefill caches are counted too
    if layout == "cascade":  # the analytic layout: [C, T] context slots + [R, L] own slots
        per_slot = GPT.num_layers * 2 * GPT.num_query_groups * GPT.kv_channels * 4
        ts = [t for pos in POSITIONS for t in pos]
        assert peak_full == per_slot * (len(ts) * max(ts) + len(ts) * g * length)
        assert peak_small == per_slot * (max(ts) + g * length)


def test_cascade_decode_syncs_the_host_once_per_step(models, monkeypatch):
    """Explicit host reads (item / bool / int / float / tolist / nonzero) during decoding: one per
    decode step on the common path (no rows finish early here).  Counted differentially: the
    same request with 12 and with 6 decode steps."""
    model = models["gpt"]
    docs = _docs()
    counts = {"n": 0, "depth": 0}
    for name in ("item", "__bool__", "__int__", "__float__", "tolist", "nonzero", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, original=original, **kwargs):
            counts["n"] += counts["depth"] == 0  # not the CPU shim's re-dispatch of the same read
            counts["depth"] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                counts["depth"] -= 1

        monkeypatch.setattr(torch.Tensor, name, counted)
    syncs = {}
    for length in (6, 12):
        counts["n"] = 0
        batch = _sample(model, docs, temperature=0.8, close_id=OPEN + 1, eod_id=None,
                        length=length, layout="cascade")
        assert batch.stats["decode_row_steps"] == batch.stats["rows"] * length  # no compaction
        syncs[length] = counts["n"]
    assert syncs[12] - syncs[6] <= 6, syncs
