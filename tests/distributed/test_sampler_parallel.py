"""Thought sampler under tensor and pipeline parallelism (gloo, CPU).

    torchrun --nproc_per_node 2 -m pytest -q tests/distributed/test_sampler_parallel.py
    torchrun --nproc_per_node 4 -m pytest -q tests/distributed/test_sampler_parallel.py

Every layout is compared with TP=1 in the same test (layout-invariant weights): greedy thoughts
must be identical, log-probs equal to float rounding; at a temperature every TP rank (and every
pipeline stage) must hold the same tokens.
"""

import pytest
import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_rlp.models.builder import build_model, transformer_config
from megatron_rlp.models.init import initialize_layout_invariant
from megatron_rlp.models.presets import get_preset
from megatron_rlp.sampling import sample_thoughts, sample_vocab_parallel

GPT = get_preset("tiny").replace(tie_embeddings=False, num_layers=2)
HYBRID = get_preset("tiny-hybrid")
OPEN, CLOSE, EOD = 509, 510, 511
POSITIONS = [[5, 17], [12], [3, 20]]
G, L = 3, 5


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ranks share two cores
    yield
    torch.set_num_threads(threads)


def _model(preset, tp, pp):
    model = build_model(preset, transformer_config(preset, tp, pp))
    initialize_layout_invariant(model, 7, preset.num_layers)
    return model


def _copy_from_tp1(model, full_state, preset):
    """Give this stage's hybrid model the weights of a TP=1, PP=1 model (the Mamba parameters that
    megatron initialises itself — A_log, D, dt_bias, conv1d — are not layout-invariant)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    offset = parallel_state.get_pipeline_model_parallel_rank() * (preset.num_layers // pp)
    d_inner = preset.mamba_num_heads * preset.mamba_head_dim
    gs = preset.mamba_num_groups * preset.mamba_state_dim
    packed = {  # row sections of the packed projections, each split over TP on its own
        "mixer.in_proj.weight": [d_inner, d_inner, gs, gs, preset.mamba_num_heads],
        "mixer.conv1d.weight": [d_inner, gs, gs],
        "mixer.conv1d.bias": [d_inner, gs, gs],
    }
    with torch.no_grad():
        for name, local in model.state_dict().items():
            if local is None or not torch.is_floating_point(local):
                continue
            parts = name.split(".")
            if parts[:2] == ["decoder", "layers"]:
                parts[2] = str(int(parts[2]) + offset)
            full = full_state[".".join(parts)]
            if tuple(full.shape) != tuple(local.shape):
                sections = next((v for k, v in packed.items() if name.endswith(k)), None)
                if sections is not None:
                    full = torch.cat([c.chunk(tp, 0)[rank] for c in full.split(sections, 0)])
                else:
                    (dim,) = [d for d in range(full.dim()) if full.shape[d] != local.shape[d]]
                    full = full.chunk(tp, dim)[rank]
            local.copy_(full)


def _docs():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 500, (n,), generator=g) for n in (24, 16, 22)]


def _sample(model, temperature, close_id=CLOSE, **kw):
    return sample_thoughts(
        model, _docs(), POSITIONS, G, L, OPEN, close_id, EOD, temperature, seed=5,
        max_sequence_length=64, **kw,
    )


def _gather(tensor, group):
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def _assert_same_on_group(batch, group):
    for name in ("tokens", "logprobs", "tempered_logprobs", "lengths", "stop_reason"):
        parts = _gather(getattr(batch, name), group)
        for p in parts[1:]:
            assert torch.equal(p, parts[0]), name


def _assert_matches(batch, ref, exact_tokens=True):
    if exact_tokens:
        assert torch.equal(batch.tokens, ref.tokens)
        assert torch.equal(batch.lengths, ref.lengths)
        assert torch.equal(batch.stop_reason, ref.stop_reason)
    torch.testing.assert_close(batch.logprobs, ref.logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(batch.tempered_logprobs, ref.tempered_logprobs, atol=1e-4, rtol=0)


def _full_forward_logprobs_tp(model, batch):
    """log p of the sampled tokens from a plain forward (no cache), logits gathered over TP."""
    docs = _docs()
    n, g, length = batch.tokens.shape
    seqs = []
    for i in range(n):
        b, t = int(batch.doc_index[i]), int(batch.position[i])
        for j in range(g):
            seqs.append(torch.cat([docs[b][:t], torch.tensor([OPEN]), batch.tokens[i, j].clamp(min=0)]))
    width = max(s.numel() for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.int64)
    for r, s in enumerate(seqs):
        ids[r, : s.numel()] = s
    model.eval()
    with torch.no_grad():
        logits = model(ids, torch.arange(width).expand(len(seqs), -1), None)
    logits = gather_from_tensor_model_parallel_region(logits).float()
    logp = torch.log_softmax(logits, -1)
    out = torch.zeros(n, g, length)
    for r in range(len(seqs)):
        i, j = divmod(r, g)
        t = int(batch.position[i])
        out[i, j] = logp[r, t : t + length].gather(-1, batch.tokens[i, j].clamp(min=0)[:, None])[:, 0]
    return out


def test_tp2_matches_tp1_and_tp_ranks_agree(model_parallel):
    model_parallel(1, 1)
    ref = {t: _sample(_model(GPT, 1, 1), t) for t in (0.0, 0.8)}
    model_parallel(2, 1)
    model = _model(GPT, 2, 1)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    for temperature in (0.0, 0.8):
        batch = _sample(model, temperature)
        _assert_same_on_group(batch, tp_group)
        _assert_matches(batch, ref[temperature])
        train = _full_forward_logprobs_tp(model, batch)
        assert (train - batch.logprobs).abs()[batch.mask].max() <= 1e-4
    rows = _sample(model, 0.8, layout="rows", micro_batch_size=4)
    _assert_same_on_group(rows, tp_group)
    _assert_matches(rows, ref[0.8])
    for temperature in (0.0, 0.8):  # the mask-free prefix-shared layout, mixed context lengths
        cascade = _sample(model, temperature, layout="cascade", micro_batch_size=4)
        assert cascade.stats["layout"] == "cascade"
        _assert_same_on_group(cascade, tp_group)
        _assert_matches(cascade, ref[temperature])


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_vocab_parallel_gumbel_max_equals_full_vocabulary(model_parallel, temperature):
    model_parallel(2, 1)
    rank = parallel_state.get_tensor_model_parallel_rank()
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(300, 10, generator=gen) * 2
    full[5, 2] = full[5, 7] = full[5].max() + 1  # a tie across the two shards: lowest id wins
    rows = torch.arange(100, 400)
    shard = full[:, rank * 5 : (rank + 1) * 5]
    group = parallel_state.get_tensor_model_parallel_group()
    for vocab_size in (10, 9):
        got = sample_vocab_parallel(shard, temperature, 4, 2, rows, tp_group=group, vocab_size=vocab_size)
        want = sample_vocab_parallel(full, temperature, 4, 2, rows, vocab_size=vocab_size)
        assert torch.equal(got.tokens, want.tokens)
        torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.tempered_logprobs, want.tempered_logprobs, atol=1e-6, rtol=0)
        assert got.tokens.max() < vocab_size
        for p in _gather(got.tokens, group)[1:]:
            assert torch.equal(p, got.tokens)
    if temperature == 0:
        assert got.tokens[5] == 2


def test_pp2_matches_tp1_with_micro_batches(model_parallel):
    model_parallel(1, 1)
    model = _model(GPT, 1, 1)
    greedy = _sample(model, 0.0)
    # Greedy branches of a context are identical: stop context 1's branches after 2 tokens by
    # making its second token the close marker; the other contexts (micro-batches) go on.
    close_tok = int(greedy.tokens[1, 0, 1])
    ref_stop = _sample(model, 0.0, close_id=close_tok)
    ref_hot = _sample(model, 0.9)
    assert ref_stop.lengths[1].tolist() == [2, 2, 2]
    model_parallel(1, 2)
    model = _model(GPT, 1, 2)
    world = dist.group.WORLD  # = the pipeline group at PP=2, TP=1

    batch = _sample(model, 0.0)  # default: ceil(rows / 2) rows -> 2 micro-batches
    _assert_matches(batch, greedy)
    _assert_same_on_group(batch, world)
    assert batch.stats["decode_microbatches"] == 2 and batch.stats["pipeline_stages"] == 2
    assert 0 < batch.stats["decode_bubble"] < 0.25

    one = _sample(model, 0.0, micro_batch_size=G * 5)  # a single micro-batch: stages alternate
    _assert_matches(one, greedy)
    assert one.stats["decode_microbatches"] == 1 and one.stats["decode_bubble"] == 0.5

    stop = _sample(model, 0.0, close_id=close_tok, micro_batch_size=G)  # one context each
    _assert_matches(stop, ref_stop)
    _assert_same_on_group(stop, world)
    assert stop.stats["decode_microbatches"] == 5
    assert stop.stats["decode_steps"] < 5 * L  # the stopped micro-batch left the schedule

    # context 1's rows stop after two tokens: its micro-batch (contexts 2 and 1) is compacted
    stop = _sample(model, 0.0, close_id=close_tok, layout="cascade", micro_batch_size=2 * G)
    _assert_matches(stop, ref_stop)
    _assert_same_on_group(stop, world)
    assert stop.stats["layout"] == "cascade" and stop.stats["decode_microbatches"] == 3
    assert stop.stats["decode_row_steps"] < 5 * G * L

    for kw in ({}, {"layout": "rows", "micro_batch_size": 4}, {"layout": "cascade", "micro_batch_size": 4}):
        hot = _sample(model, 0.9, **kw)
        _assert_matches(hot, ref_hot)
        _assert_same_on_group(hot, world)


def test_hybrid_tp2_and_pp2_match_tp1(model_parallel):
    model_parallel(1, 1)
    ref_model = _model(HYBRID, 1, 1)
    full_state = {k: v.detach().clone() for k, v in ref_model.state_dict().items() if v is not None}
    ref = {t: _sample(ref_model, t) for t in (0.0, 0.8)}
    for tp, pp in ((2, 1), (1, 2)):
        model_parallel(tp, pp)
        model = _model(HYBRID, tp, pp)
        _copy_from_tp1(model, full_state, HYBRID)
        for temperature in (0.0, 0.8):
            for layout in ("auto", "rows"):
                batch = _sample(model, temperature, micro_batch_size=5, layout=layout)
                assert batch.stats["layout"] == ("cascade" if layout == "auto" else "rows")
                # the prefill in segments, on every stage: one call per sampled position
                assert batch.stats["prefill_forwards"] == 5 and batch.stats["prefill_microbatches"] == 3
                _assert_matches(batch, ref[temperature])
                _assert_same_on_group(batch, dist.group.WORLD)


@pytest.mark.world_size(4)
def test_tp2_pp2_matches_tp1(model_parallel):
    model_parallel(1, 1)
    model = _model(GPT, 1, 1)
    ref = {t: _sample(model, t) for t in (0.0, 0.8)}
    model_parallel(2, 2)
    model = _model(GPT, 2, 2)
    assert parallel_state.get_pipeline_model_parallel_world_size() == 2
    tp_group = parallel_state.get_tensor_model_parallel_group()
    for temperature in (0.0, 0.8):
        batch = _sample(model, temperature)
        _assert_same_on_group(batch, tp_group)
        _assert_same_on_group(batch, dist.group.WORLD)  # every stage and TP rank
        _assert_matches(batch, ref[temperature])
        assert batch.stats["decode_microbatches"] == 2
    rows = _sample(model, 0.8, layout="rows", micro_batch_size=4)
    _assert_same_on_group(rows, dist.group.WORLD)
    _assert_matches(rows, ref[0.8])
    cascade = _sample(model, 0.0, layout="cascade", micro_batch_size=4)
    _assert_same_on_group(cascade, dist.group.WORLD)
    _assert_matches(cascade, ref[0.0])
