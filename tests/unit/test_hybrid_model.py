"""megatron-core MambaModel with the TE-free hybrid spec (tiny-hybrid, TP=1, one process).

Forward + backward, prefill + single-token decode through megatron's StaticInferenceContext
against the full forward, multi-token chunks at a cache offset against one-token decoding, and
forking one prefilled row into K continuations.
"""

import sys
import types

import pytest
import torch

from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.ssm.mamba_layer import MambaLayer
from megatron.core.ssm.mamba_mixer import MambaMixer
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_rlp.models.builder import build_model, transformer_config
from megatron_rlp.models.hybrid import (
    HybridMambaMixer,
    HybridSelfAttention,
    ShardedGatedRMSNorm,
    build_hybrid_model,
    fork_inference_state,
    inference_state_layout,
)
from megatron_rlp.models.presets import get_preset
from megatron_rlp.training import parallel

PRESET = get_preset("tiny-hybrid")
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture
def tp1():
    parallel.init_distributed()
    parallel.init_model_parallel(1, 1)
    parallel.set_seed(1234)
    yield
    parallel.destroy()


def _model(chunk_size=None):
    model = build_model(PRESET, transformer_config(PRESET))
    if chunk_size is not None:
        for mixer in _mixers(model):
            mixer.chunk_size = chunk_size
    return model


def _mixers(model):
    return [m for m in model.modules() if isinstance(m, MambaMixer)]


def _tokens(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, PRESET.vocab_size, (batch, length), generator=g)


def _positions(ids):
    return torch.arange(ids.shape[1]).expand(ids.shape[0], -1)


def _full_logits(model, ids):
    with torch.no_grad():
        return model(ids, _positions(ids), None)


def _step(model, context, ids):
    """One inference call on ``ids`` at the context's offset; advances the offset."""
    offset = context.sequence_len_offset
    pos = torch.arange(offset, offset + ids.shape[1]).expand(ids.shape[0], -1)
    with torch.no_grad():
        logits = model(ids, pos, None, inference_context=context, runtime_gather_output=True)
    context.sequence_len_offset += ids.shape[1]
    return logits


def test_model_follows_preset(tp1):
    model = _model()
    layers = model.decoder.layers
    kinds = "".join(
        "M" if isinstance(x, MambaLayer) else "-" if isinstance(x, MLPLayer) else "*"
        for x in layers
    )
    assert kinds == PRESET.hybrid_pattern
    assert isinstance(layers[0], MambaLayer) and isinstance(layers[1], TransformerLayer)
    mixer = layers[0].mixer
    assert isinstance(mixer, HybridMambaMixer) and isinstance(mixer.norm, ShardedGatedRMSNorm)
    assert (mixer.nheads, mixer.headdim, mixer.d_state, mixer.ngroups) == (8, 16, 16, 2)
    assert mixer.norm.group_size == 64 and not mixer.norm.norm_before_gate
    cfg = model.config
    assert cfg.is_hybrid_model and not cfg.use_mamba_mem_eff_path
    assert cfg.mamba_num_heads == PRESET.mamba_num_heads
    assert model.position_embedding_type == "none"
    assert not hasattr(model.embedding, "position_embeddings")
    assert not model.share_embeddings_and_output_weights
    assert model.output_layer.weight.data_ptr() != model.embedding.word_embeddings.weight.data_ptr()
    assert isinstance(model.decoder.final_norm, torch.nn.RMSNorm)
    assert model.decoder.final_norm.eps == PRESET.norm_epsilon
    assert layers[0].norm.eps == PRESET.norm_epsilon
    # MLP layers use the squared-ReLU activation, no gating.
    mlp = layers[2].mlp
    assert mlp.linear_fc1.weight.shape == (PRESET.ffn_hidden_size, PRESET.hidden_size)
    h = torch.tensor([-2.0, 0.5, 3.0])
    torch.testing.assert_close(mlp.activation_func(h), torch.tensor([0.0, 0.25, 9.0]))


def test_invalid_patterns_are_rejected(tp1):
    cfg = transformer_config(PRESET)
    with pytest.raises(ValueError, match="layer symbols"):
        build_hybrid_model(PRESET.replace(hybrid_pattern="M*-ME-"), cfg)
    with pytest.raises(ValueError, match="has 4 layers"):
        build_hybrid_model(PRESET.replace(hybrid_pattern="M*-M"), cfg)


def test_forward_backward_and_chunk_size_invariance(tp1):
    model = _model()
    ids = _tokens(2, 40)
    logits = model(ids, _positions(ids), None)
    assert logits.shape == (2, 40, PRESET.vocab_size)
    assert torch.isfinite(logits).all()
    labels = _tokens(2, 40, seed=1)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name
    # Mamba parameters get their gradient through the torch scan and gated norm.
    mixer = _mixers(model)[0]
    for p in (mixer.A_log, mixer.dt_bias, mixer.D, mixer.norm.weight, mixer.conv1d.weight):
        assert p.grad.abs().max() > 0
    # One chunk (chunk 128 > 40), 5 chunks of 8, and uneven chunks of 7 give the same logits.
    reference = logits.detach()
    for chunk in (8, 7):
        for m in _mixers(model):
            m.chunk_size = chunk
        torch.testing.assert_close(_full_logits(model, ids), reference, **TOL)


def test_prefill_then_decode_matches_full_forward(tp1):
    model = _model(chunk_size=8).eval()
    ids = _tokens(2, 24)
    full = _full_logits(model, ids)
    prefix = 13  # not a multiple of the chunk size
    context = StaticInferenceContext(max_batch_size=2, max_sequence_length=32)
    context.materialize_only_last_token_logits = False
    prefill = _step(model, context, ids[:, :prefix])
    torch.testing.assert_close(prefill, full[:, :prefix], **TOL)
    for t in range(prefix, ids.shape[1]):
        logits = _step(model, context, ids[:, t : t + 1])
        assert logits.shape == (2, 1, PRESET.vocab_size)
        torch.testing.assert_close(logits[:, 0], full[:, t], **TOL)

    # The state layout the sampler relies on.
    layout = inference_state_layout(model)
    assert layout == {1: "mamba", 2: "attention", 4: "mamba", 5: "attention"}
    assert set(context.key_value_memory_dict) == set(layout)
    conv, ssm = context.key_value_memory_dict[1]
    mixer = _mixers(model)[0]
    assert conv.shape == (2, mixer.d_inner + 2 * mixer.ngroups * mixer.d_state, mixer.d_conv)
    assert ssm.shape == (2, mixer.nheads, mixer.headdim, mixer.d_state)
    key, value = context.key_value_memory_dict[2]
    assert key.shape == value.shape == (32, 2, PRESET.num_query_groups, PRESET.kv_channels)

    # The decode really reads the SSM state: corrupting it changes the next logits.
    ssm.mul_(0.0)
    nxt = _tokens(2, 1, seed=5)
    corrupted = _step(model, context, nxt)
    expected = _full_logits(model, torch.cat([ids, nxt], dim=1))[:, -1]
    assert (corrupted[:, 0] - expected).abs().max() > 1e-4


def _states(context):
    """Copies of every layer's inference state (Mamba conv/SSM, attention K/V)."""
    return {layer: tuple(x.clone() for x in state) for layer, state in context.key_value_memory_dict.items()}


def _assert_same_states(model, a, b, slots):
    assert a.keys() == b.keys()
    for layer, kind in inference_state_layout(model).items():
        for x, y in zip(a[layer], b[layer]):
            if kind == "attention":  # [slots, batch, groups, dim]: the filled slots
                x, y = x[:slots], y[:slots]
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


# Chunk ends: chunks of 5 (offset 0), 2 (< d_conv), 1 (megatron's own decode), 3, 8 (two scan
# chunks of 4 from an initial state, not aligned), 7.
CHUNK_ENDS = [5, 7, 8, 11, 19, 26]


def _chunked_and_stepped(model, ids, ends):
    """Logits and states at every end: one call per chunk, and one call up to ends[0] then one
    token per call."""
    batch, length = ids.shape
    results = []
    for bounds in (ends, [ends[0]] + list(range(ends[0] + 1, length + 1))):
        context = StaticInferenceContext(max_batch_size=batch, max_sequence_length=length + 2)
        context.materialize_only_last_token_logits = False
        logits, states, start = [], {}, 0
        for end in bounds:
            logits.append(_step(model, context, ids[:, start:end]))
            start = end
            if end in ends:
                states[end] = _states(context)
        results.append((torch.cat(logits, dim=1), states))
    return results


def test_chunks_at_an_offset_match_one_token_decode(tp1):
    """A multi-token call at a non-zero offset (megatron runs only one token there) continues the
    Mamba conv/SSM states and appends to the KV cache causally: every state at every chunk end,
    and every logit, equal one-token decoding and the plain forward."""
    model = _model(chunk_size=4).eval()
    assert all(isinstance(m, HybridSelfAttention) for m in model.modules() if isinstance(m, SelfAttention))
    ids = _tokens(2, CHUNK_ENDS[-1], seed=9)
    (chunked, chunk_states), (stepped, step_states) = _chunked_and_stepped(model, ids, CHUNK_ENDS)
    torch.testing.assert_close(chunked, stepped, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked, _full_logits(model, ids), atol=1e-5, rtol=0)
    for end in CHUNK_ENDS:
        _assert_same_states(model, chunk_states[end], step_states[end], end)


def test_chunk_continuation_needs_the_earlier_state(tp1):
    model = _model().eval()
    context = StaticInferenceContext(max_batch_size=2, max_sequence_length=16)
    _step(model, context, _tokens(2, 4))
    other = StaticInferenceContext(max_batch_size=1, max_sequence_length=16)
    other.sequence_len_offset = 4  # nothing ran in this context
    with pytest.raises(ValueError, match="continues the conv/SSM states"):
        _step(model, other, _tokens(1, 3))


class MaskTypeAttention(torch.nn.Module):
    """Core attention that, like Transformer Engine's, applies the mask *type* it is handed
    (causal = top-left, causal_bottom_right, no_mask) and ignores explicit masks."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        sq, sk, heads = query.shape[0], key.shape[0], query.shape[2]
        key = key.repeat_interleave(heads // key.shape[2], dim=2)
        value = value.repeat_interleave(heads // value.shape[2], dim=2)
        scores = torch.einsum("qbhd,kbhd->bhqk", query, key) * self.scale
        if attn_mask_type == AttnMaskType.causal:
            hidden = torch.ones(sq, sk, dtype=torch.bool).triu(1)
        elif attn_mask_type == AttnMaskType.causal_bottom_right:
            hidden = torch.ones(sq, sk, dtype=torch.bool).triu(sk - sq + 1)
        else:
            assert attn_mask_type == AttnMaskType.no_mask, attn_mask_type
            hidden = torch.zeros(sq, sk, dtype=torch.bool)
        probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
        out = torch.einsum("bhqk,kbhd->qbhd", probs, value)
        return out.reshape(sq, out.shape[1], -1)


def test_chunks_with_an_attention_that_reads_only_the_mask_type(tp1, monkeypatch):
    """Transformer Engine's attention ignores explicit masks: the chunk must reach it as
    causal_bottom_right (megatron hands it no_mask at a non-zero offset)."""
    model = _model(chunk_size=4).eval()
    for m in model.modules():
        if isinstance(m, HybridSelfAttention):
            m.core_attention = MaskTypeAttention(m.core_attention.softmax_scale)
    ids = _tokens(2, CHUNK_ENDS[-1], seed=10)
    full = _full_logits(model, ids)
    (chunked, chunk_states), (stepped, step_states) = _chunked_and_stepped(model, ids, CHUNK_ENDS)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)
    for end in CHUNK_ENDS:
        _assert_same_states(model, chunk_states[end], step_states[end], end)
    # megatron's own mask type (no_mask) lets a chunk's tokens see the later ones.
    monkeypatch.setattr(HybridSelfAttention, "_adjust_key_value_for_inference",
                        SelfAttention._adjust_key_value_for_inference)
    (unmasked, _), _ = _chunked_and_stepped(model, ids, CHUNK_ENDS)
    assert (unmasked - full).abs().max() > 1e-4


def _fused_softmax_kernels(monkeypatch, calls):
    """CPU stand-ins for apex's fused softmax extensions (the causal one computes a square
    upper-triangular softmax; megatron asserts queries == keys before calling it)."""

    def causal(x, scale):
        calls.append(("causal", tuple(x.shape)))
        future = torch.ones(x.shape[1:], dtype=torch.bool).triu(1)
        return torch.softmax((x.float() * float(scale)).masked_fill(future, -10000.0), -1).to(x.dtype)

    def masked(x, mask, scale):
        calls.append(("masked", tuple(x.shape)))
        return torch.softmax((x.float() * float(scale)).masked_fill(mask, -10000.0), -1).to(x.dtype)

    def batch_per_block(sq, sk, b, np):  # scaled_masked_softmax.h
        pow2 = 1 << max(0, (sk - 1).bit_length())
        return (128 // min(pow2, 32)) * (2 if pow2 <= 128 else 1)

    for name, attrs in (("scaled_upper_triang_masked_softmax_cuda", {"forward": causal}),
                        ("scaled_masked_softmax_cuda", {"forward": masked, "get_batch_per_block": batch_per_block})):
        module = types.ModuleType(name)
        for key, value in attrs.items():
            setattr(module, key, value)
        monkeypatch.setitem(sys.modules, name, module)


def test_chunks_with_megatrons_fused_softmax(tp1, monkeypatch):
    """bf16 with masked_softmax_fusion (the GPU default without Transformer Engine): a chunk of 8
    queries against 24 and 32 keys qualifies for the fused kernels; it must take the masked one
    with the bottom-right mask, not the causal one (queries == keys only)."""
    calls = []
    _fused_softmax_kernels(monkeypatch, calls)
    models = {}
    for fusion in (True, False):
        config = transformer_config(PRESET, params_dtype=torch.bfloat16)
        config.masked_softmax_fusion = fusion
        models[fusion] = build_model(PRESET, config).eval()
    models[False].load_state_dict(models[True].state_dict())
    ids = _tokens(2, 32, seed=11)
    ends = [8, 16, 24, 32]
    (fused, _), _ = _chunked_and_stepped(models[True], ids, ends)
    assert ("masked", (2, 4, 8, 24)) in calls and ("masked", (2, 4, 8, 32)) in calls
    assert all(shape[-2] == shape[-1] for kind, shape in calls if kind == "causal")
    (plain, _), _ = _chunked_and_stepped(models[False], ids, ends)
    torch.testing.assert_close(fused.float(), plain.float(), atol=1e-3, rtol=0)  # same math
    full = _full_logits(models[False], ids).float()  # |logits| < 1 here; bf16 rounding ~4e-3
    torch.testing.assert_close(fused.float(), full, atol=1e-2, rtol=0)


def test_fork_one_prefill_into_k_continuations(tp1):
    model = _model(chunk_size=8).eval()
    prefix = _tokens(1, 11, seed=2)
    k, steps = 3, 5
    continuations = _tokens(k, steps, seed=3)
    context = StaticInferenceContext(max_batch_size=1, max_sequence_length=24)  # grows on fork
    _step(model, context, prefix)
    fork_inference_state(model, context, [0] * k)
    assert context.max_batch_size == k
    assert context.key_value_memory_dict[1][1].shape[0] == k
    assert context.key_value_memory_dict[2][0].shape[1] == k
    decoded = torch.cat(
        [_step(model, context, continuations[:, t : t + 1]) for t in range(steps)], dim=1
    )
    full = _full_logits(model, torch.cat([prefix.expand(k, -1), continuations], dim=1))
    torch.testing.assert_close(decoded, full[:, prefix.shape[1] :], **TOL)
    assert (decoded[0, 1:] - decoded[1, 1:]).abs().max() > 1e-4  # the branches differ


def test_fork_reorders_rows_of_a_batch(tp1):
    """Forking with a permutation-with-repeats of a batch-2 prefill."""
    model = _model(chunk_size=4).eval()
    prefix = _tokens(2, 9, seed=4)
    rows = [1, 0, 1]
    nxt = _tokens(3, 2, seed=6)
    context = StaticInferenceContext(max_batch_size=4, max_sequence_length=16)
    _step(model, context, prefix)
    fork_inference_state(model, context, torch.tensor(rows))
    assert context.max_batch_size == 4
    decoded = torch.cat([_step(model, context, nxt[:, t : t + 1]) for t in range(2)], dim=1)
    full = _full_logits(model, torch.cat([prefix[rows], nxt], dim=1))
    torch.testing.assert_close(decoded, full[:, -2:], **TOL)


def test_two_contexts_in_turn_keep_their_states(tp1):
    """States belong to the context: decoding a batch-1 and a batch-2 context alternately works
    (stock MambaMixer would re-allocate zero states whenever the batch size changes)."""
    model = _model(chunk_size=8).eval()
    a_ids, b_ids = _tokens(1, 12, seed=7), _tokens(2, 12, seed=8)
    ctx_a = StaticInferenceContext(max_batch_size=1, max_sequence_length=16)
    ctx_b = StaticInferenceContext(max_batch_size=2, max_sequence_length=16)
    _step(model, ctx_a, a_ids[:, :8])
    _step(model, ctx_b, b_ids[:, :8])
    out_a, out_b = [], []
    for t in range(8, 12):
        out_a.append(_step(model, ctx_a, a_ids[:, t : t + 1]))
        out_b.append(_step(model, ctx_b, b_ids[:, t : t + 1]))
    torch.testing.assert_close(torch.cat(out_a, 1), _full_logits(model, a_ids)[:, 8:], **TOL)
    torch.testing.assert_close(torch.cat(out_b, 1), _full_logits(model, b_ids)[:, 8:], **TOL)


def test_config_changes_stay_on_the_models_copy(tp1):
    cfg = transformer_config(PRESET)
    model = build_hybrid_model(PRESET, cfg)
    assert not cfg.is_hybrid_model and cfg.use_mamba_mem_eff_path  # caller's config untouched
    assert model.config is not cfg
    # The hybrid init scales output layers by 1/sqrt(num_layers), not 1/sqrt(2 * num_layers).
    std = model.config.init_method_std / PRESET.num_layers**0.5
    w = model.decoder.layers[0].mixer.out_proj.weight
    assert abs(w.std().item() - std) < 0.25 * std
