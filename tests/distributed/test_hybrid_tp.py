"""tiny-hybrid MambaModel at TP=2 against the same weights at TP=1 (2 ranks, gloo).

Run: torchrun --nproc_per_node 2 -m pytest -q tests/distributed/test_hybrid_tp.py
"""

import os
import tempfile

import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing, parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_rlp.models.builder import transformer_config
from megatron_rlp.models.hybrid import build_hybrid_model, fork_inference_state
from megatron_rlp.models.presets import get_preset

PRESET = get_preset("tiny-hybrid")
TOL = dict(atol=1e-5, rtol=1e-5)


def _build(tp, chunk_size=8):
    model = build_hybrid_model(PRESET, transformer_config(PRESET, tp=tp))
    for m in model.modules():
        if hasattr(m, "chunk_size") and hasattr(m, "A_log"):
            m.chunk_size = chunk_size
    return model


def _tokens(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, PRESET.vocab_size, (batch, length), generator=g)


def _positions(ids, offset=0):
    return torch.arange(offset, offset + ids.shape[1]).expand(ids.shape[0], -1)


def _mixer_sections(d_inner, ngroups, d_state, nheads):
    """Row sections of the packed Mamba projections; each section is split over TP on its own."""
    return {
        "mixer.in_proj.weight": [d_inner, d_inner, ngroups * d_state, ngroups * d_state, nheads],
        "mixer.conv1d.weight": [d_inner, ngroups * d_state, ngroups * d_state],
        "mixer.conv1d.bias": [d_inner, ngroups * d_state, ngroups * d_state],
    }


def _shard(name, full, local_shape, rank, size):
    """This TP rank's part of a full (TP=1) tensor, independent of megatron's sharding code."""
    if tuple(full.shape) == tuple(local_shape):
        return full  # replicated (norms)
    d_inner = PRESET.mamba_num_heads * PRESET.mamba_head_dim
    sections = _mixer_sections(
        d_inner, PRESET.mamba_num_groups, PRESET.mamba_state_dim, PRESET.mamba_num_heads
    )
    for suffix, sizes in sections.items():
        if name.endswith(suffix):
            parts = torch.split(full, sizes, dim=0)
            return torch.cat([p.chunk(size, dim=0)[rank] for p in parts], dim=0)
    (dim,) = [d for d in range(full.dim()) if full.shape[d] != local_shape[d]]
    return full.chunk(size, dim=dim)[rank]


def _randomize_and_broadcast(model):
    """Perturb every parameter (norm weights and D start at ones, where a wrongly placed shard would
    not show), then make rank 0's values everyone's."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            dist.broadcast(p.data, src=0)


def _tp1_reference(model_parallel, ids, weights):
    model_parallel(tp=1, pp=1)
    model = _build(tp=1)
    _randomize_and_broadcast(model)
    logits = model(ids, _positions(ids), None)
    (logits * weights).sum().backward()
    state = {
        k: v.detach().clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()
    }
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return model, logits.detach(), state, grads


def test_tp2_logits_and_grads_match_tp1(model_parallel):
    ids = _tokens(2, 21, seed=0)
    weights = torch.randn(2, 21, PRESET.vocab_size, generator=torch.Generator().manual_seed(1))
    _, ref_logits, full_state, full_grads = _tp1_reference(model_parallel, ids, weights)

    model_parallel(tp=2, pp=1)
    rank = parallel_state.get_tensor_model_parallel_rank()
    model = _build(tp=2)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # everything must come from the TP=1 weights
    local = model.state_dict()
    model.load_state_dict(
        {
            k: _shard(k, full_state[k], v.shape, rank, 2) if torch.is_tensor(v) else v
            for k, v in local.items()
        },
        strict=True,
    )
    logits = gather_from_tensor_model_parallel_region(model(ids, _positions(ids), None))
    assert logits.shape == ref_logits.shape
    torch.testing.assert_close(logits, ref_logits, **TOL)

    (logits * weights).sum().backward()
    sharded = 0
    for name, p in model.named_parameters():
        want = _shard(name, full_grads[name], p.shape, rank, 2)
        # Gradients sum over many tokens: compare relative to the tensor's scale.
        err = (p.grad - want).abs().max() / want.abs().max()
        assert err <= 1e-5, (name, err.item())
        sharded += p.shape != full_grads[name].shape
    assert sharded >= 10  # in_proj, conv1d, A_log, D, dt_bias, gated norm, qkv, fc1, ... are split


def test_tp2_prefill_decode_and_fork_match_full_forward(model_parallel):
    model_parallel(tp=2, pp=1)
    model = _build(tp=2).eval()
    prefix, k, steps = _tokens(1, 13, seed=2), 3, 4
    nxt = _tokens(k, steps, seed=3)
    whole = torch.cat([prefix.expand(k, -1), nxt], dim=1)
    with torch.no_grad():
        full = gather_from_tensor_model_parallel_region(model(whole, _positions(whole), None))
        context = StaticInferenceContext(max_batch_size=1, max_sequence_length=20)
        context.materialize_only_last_token_logits = False
        prefill = model(prefix, _positions(prefix), None, inference_context=context,
                        runtime_gather_output=True)
        torch.testing.assert_close(prefill[0], full[0, :13], **TOL)
        context.sequence_len_offset = 13
        fork_inference_state(model, context, [0] * k)
        out = []
        for t in range(steps):
            tok = nxt[:, t : t + 1]
            out.append(model(tok, _positions(tok, 13 + t), None, inference_context=context,
                             runtime_gather_output=True))
            context.sequence_len_offset += 1
    decoded = torch.cat(out, dim=1)
    assert decoded.shape == (k, steps, PRESET.vocab_size)
    torch.testing.assert_close(decoded, full[:, 13:], **TOL)


def test_tp1_distributed_checkpoint_loads_at_tp2(model_parallel):
    """torch_dist checkpoint written at TP=1 (DP=2) and read at TP=2 gives the TP=1 logits: the
    gated norm's and the mixer's sharded state dicts split the packed tensors consistently."""
    ids = _tokens(2, 15, seed=4)
    weights = torch.zeros(2, 15, PRESET.vocab_size)
    model, ref_logits, _, _ = _tp1_reference(model_parallel, ids, weights)
    path = [tempfile.mkdtemp(prefix="hybrid_ckpt_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    ckpt = os.path.join(path[0], "tp1")
    if dist.get_rank() == 0:
        os.makedirs(ckpt)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), ckpt)
    dist.barrier()

    model_parallel(tp=2, pp=1)
    model2 = _build(tp=2)
    with torch.no_grad():
        for p in model2.parameters():
            p.zero_()  # everything must come from the checkpoint
    loaded = dist_checkpointing.load(model2.sharded_state_dict(), ckpt)
    model2.load_state_dict(loaded, strict=True)
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model2(ids, _positions(ids), None))
    torch.testing.assert_close(logits, ref_logits, **TOL)
    dist.barrier()
    if dist.get_rank() == 0:
        import shutil

        shutil.rmtree(path[0], ignore_errors=True)
