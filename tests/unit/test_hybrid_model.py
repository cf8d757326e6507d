"""megatron-core MambaModel with the TE-free hybrid spec (tiny-hybrid, TP=1, one process).

Forward + backward, prefill + single-token decode through megatron's StaticInferenceContext
against the full forward, and forking one prefilled row into K continuations.
"""

import pytest
import torch

from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.ssm.mamba_layer import MambaLayer
from megatron.core.ssm.mamba_mixer import MambaMixer
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_rlp.models.builder import build_model, transformer_config
from megatron_rlp.models.hybrid import (
    HybridMambaMixer,
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
