"""GPU-only sampler defects reproduced on CPU (issue 10 item 5).

(a) megatron's fused causal masked-softmax (``masked_softmax_fusion`` with bf16, the default on
    a GPU with apex's kernels and no Transformer Engine) ignores an explicit mask and asserts
    queries == keys; the "tree" decode layout sends G query tokens with a branch mask.  The CUDA
    extensions are emulated here with megatron's own dispatch left intact, so the fused kernel is
    taken exactly where it would be on a GPU.
(b) sampling log-probs must equal the trainer's (fp32 projection of bf16 hidden states and
    weights) to 1e-4 in bf16, with logits large enough that a bf16 output layer is far off.
"""

import sys
import types

import pytest
import torch

from megatron_rlp.kernels import linear_logprob
from megatron_rlp.models.builder import build_model, transformer_config
from megatron_rlp.models.init import initialize_layout_invariant
from megatron_rlp.models.presets import get_preset
from megatron_rlp.rlp.step import output_weight
from megatron_rlp.sampling import sample_thoughts
from megatron_rlp.sampling import sampler as sampler_module
from megatron_rlp.sampling.pipeline import StageInfo, vocab_shard_logits
from megatron_rlp.sampling.thoughts import ThoughtRecorder
from megatron_rlp.training import parallel

GPT = get_preset("tiny").replace(num_layers=2)  # 4 heads, tied embeddings
OPEN, CLOSE, EOD = 509, 510, 511


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    parallel.init_distributed()
    parallel.init_model_parallel(1, 1)
    parallel.set_seed(1234)
    yield
    parallel.destroy()
    torch.set_num_threads(threads)


def _bf16_model(fusion: bool, logit_offset: float = 0.0):
    """``logit_offset``: add about ``logit_offset`` x (normed hidden state 0) to every logit of
    a row (final-norm weight 0 and output-layer column 0), as in trained models whose logits sit
    far from 0: the distribution is unchanged, but bf16 logits are only 0.25 apart at |z| = 40."""
    preset = GPT.replace(tie_embeddings=False) if logit_offset else GPT
    config = transformer_config(preset, params_dtype=torch.bfloat16)
    config.masked_softmax_fusion = fusion
    model = build_model(preset, config)
    initialize_layout_invariant(model, 7, preset.num_layers)
    if logit_offset:
        with torch.no_grad():
            model.decoder.final_layernorm.weight[0] = logit_offset
            model.output_layer.weight[:, 0] = 1.0
    return model


class _FusedKernels:
    """CPU stand-ins for apex's ``scaled_upper_triang_masked_softmax_cuda`` and
    ``scaled_masked_softmax_cuda``: the causal kernel applies its own upper-triangular mask (the
    explicit mask never reaches it) in fp32 and returns the input dtype, as the CUDA kernel does."""

    def __init__(self):
        self.shapes = []  # [attn_batches, sq, sk] of every fused causal call
        self.causal = types.ModuleType("scaled_upper_triang_masked_softmax_cuda")
        self.causal.forward = self._causal_forward
        self.masked = types.ModuleType("scaled_masked_softmax_cuda")
        self.masked.get_batch_per_block = self._batch_per_block

    def _causal_forward(self, inputs, scale):
        self.shapes.append(tuple(inputs.shape))
        sq, sk = inputs.shape[1:]
        x = inputs.float() * float(scale)
        future = torch.ones(sq, sk, dtype=torch.bool).triu(1 + sk - sq)
        return torch.softmax(x.masked_fill(future, -10000.0), dim=-1).to(inputs.dtype)

    @staticmethod
    def _batch_per_block(sq, sk, b, np):
        # scaled_masked_softmax.h: 128 threads, warps of min(32, next_pow2(sk)), 2 rows per
        # warp up to 128 keys
        pow2 = 1 << max(0, (sk - 1).bit_length())
        warp = min(pow2, 32)
        return (128 // warp) * (2 if pow2 <= 128 else 1)


@pytest.fixture
def fused_kernels(monkeypatch):
    kernels = _FusedKernels()
    monkeypatch.setitem(sys.modules, kernels.causal.__name__, kernels.causal)
    monkeypatch.setitem(sys.modules, kernels.masked.__name__, kernels.masked)
    return kernels


def _docs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 500, (n,), generator=g) for n in lengths]


def _sample(model, docs, positions, temperature=0.8, **kw):
    return sample_thoughts(
        model, docs, positions, num_thoughts=4, max_thought_len=4, open_id=OPEN, close_id=CLOSE,
        eod_id=EOD, temperature=temperature, seed=5, max_sequence_length=128, **kw,
    )


def test_fused_causal_softmax_is_detected_and_gets_a_mask_free_layout(fused_kernels):
    fused = _bf16_model(fusion=True)
    plain = _bf16_model(fusion=False)
    plain.load_state_dict(fused.state_dict())
    stage = StageInfo.current()
    assert sampler_module.model_traits(fused, stage) == (True, False, False)
    assert sampler_module.model_traits(plain, stage) == (True, False, True)

    # Align slot 19: every tree step has 4 queries and 20 + 4u keys, 2 contexts x 4 heads -> the
    # fused kernel qualifies (16 < keys, multiples of 4, 8 attention batches per block).
    docs, positions = _docs((26, 30)), [[19], [12]]
    assert _sample(plain, docs, positions).stats["layout"] == "tree"  # "auto" without fusion
    got, want = _sample(fused, docs, positions, layout="rows"), _sample(plain, docs, positions, layout="rows")
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-6, rtol=0)
    # "auto": the cascade layout (no mask), against the tree layout without the fusion; bf16
    # K/V and activations, fp32 attention in both: rounding apart
    cascade, tree = _sample(fused, docs, positions), _sample(plain, docs, positions, layout="tree")
    assert cascade.stats["layout"] == "cascade"
    assert torch.equal(cascade.tokens, tree.tokens)
    torch.testing.assert_close(cascade.logprobs, tree.logprobs, atol=2e-2, rtol=0)
    assert all(sq == sk for _, sq, sk in fused_kernels.shapes)
    with pytest.raises(ValueError, match="'tree' decode layout"):
        _sample(fused, docs, positions, layout="tree")

    # Align slot 20: the prefill (20 queries = 20 keys, causal) does take the fused kernel, and
    # is right there: same thoughts as without the fusion.
    fused_kernels.shapes.clear()
    positions = [[20], [13]]
    got, want = _sample(fused, docs, positions, layout="rows"), _sample(plain, docs, positions, layout="rows")
    assert fused_kernels.shapes and all(sq == sk for _, sq, sk in fused_kernels.shapes)
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-5, rtol=0)


def _hidden_states(model, tokens):
    """Final normed hidden states [b, s, h] of a plain (training) forward."""
    model.return_hidden = True
    try:
        with torch.no_grad():
            out = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
    finally:
        model.return_hidden = False
    return out.transpose(0, 1)


def test_sampling_logprobs_match_the_trainers_in_bf16():
    model = _bf16_model(fusion=False, logit_offset=25.0)
    model.eval()
    tokens = torch.stack(_docs((24, 24, 24, 24), seed=3))
    hidden = _hidden_states(model, tokens).reshape(-1, GPT.hidden_size)  # bf16 [96, h]
    assert hidden.dtype == torch.bfloat16
    weight = output_weight(model)
    z = hidden.float() @ weight.float().t()
    assert 30 < z.abs().max() < 120  # logits large enough for bf16 rounding to matter

    # Every id: the sampler's logits against the trainer's log-prob of that id.
    with torch.no_grad():
        sampler_logp = torch.log_softmax(vocab_shard_logits(model, hidden), dim=-1)
        ids = torch.arange(GPT.vocab_size)
        train_all = linear_logprob(hidden.repeat_interleave(len(ids), 0), weight, ids.repeat(len(hidden)),
                                   impl="reference").view(len(hidden), -1)
    gap = (sampler_logp - train_all).abs()
    assert gap.max() < 1e-4, f"train/sample log-prob gap {gap.max():.3g} (mean {gap.mean():.3g})"

    # The sampled tokens (T = 1.5: mostly not the argmax, whose log-prob is least sensitive).
    stage = StageInfo.current()
    rows = torch.arange(hidden.shape[0])
    recorder = ThoughtRecorder(model, stage, rows, 1, CLOSE, EOD, 1.5, 3, hidden.device, vocab_size=500)
    with torch.no_grad():
        sampled = recorder.record(0, hidden)
        train = linear_logprob(hidden, weight, sampled, vocab_size=500)
    assert int(sampled.max()) < 500
    gap = (recorder.logprobs[:, 0] - train).abs()
    assert gap.max() < 1e-4, f"train/sample log-prob gap {gap.max():.3g} (mean {gap.mean():.3g})"


def test_sampled_thoughts_logprobs_match_the_update_forward_in_bf16():
    """End to end: the sampler's log-probs against the RLP update's recomputation (a full
    forward over x_<t, open, thought) of the same bf16 model.  The hidden states themselves
    differ here (KV-cache decode vs one full forward, each rounded to bf16: ~3e-3 in log-prob);
    a bf16 output layer added ~0.2 on top of that."""
    from megatron_rlp.rlp.step import build_update_sequences

    model = _bf16_model(fusion=False, logit_offset=25.0)
    docs, positions = _docs((26, 30), seed=1), [[9, 19], [12]]
    batch = _sample(model, docs, positions, temperature=1.5)
    closed, closed_len = batch.closed_tokens(EOD)
    seqs = build_update_sequences(docs, batch.doc_index, batch.position, closed, closed_len,
                                  batch.forced, OPEN, EOD)
    model.eval()
    hidden = _hidden_states(model, seqs["tokens"])
    slots = seqs["thought_slot"]
    labels = seqs["labels"].gather(1, slots.clamp(min=0))
    rows = hidden.gather(1, slots.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1]))
    with torch.no_grad():
        train = linear_logprob(rows.reshape(-1, rows.shape[-1]), output_weight(model), labels.reshape(-1)).view(slots.shape)
    length = batch.max_thought_len  # slots: L + 1 (a forced close is not sampled)
    sample = batch.logprobs.reshape(slots.shape[0], length)
    mask = batch.mask.reshape(slots.shape[0], length)
    assert mask.sum() > 10 and (sample * mask).min() < -1  # not only near-certain tokens
    gap = (sample - train[:, :length]).abs() * mask
    assert gap.max() < 2e-2, f"train/sample log-prob gap {gap.max():.3g}"


def test_thinking_evaluation_scores_with_the_trainers_fp32_logits():
    from megatron_rlp.rlp.evaluate import _score

    model = _bf16_model(fusion=False, logit_offset=25.0)
    model.eval()
    tokens = torch.stack(_docs((20, 20, 20), seed=4))
    slots = torch.tensor([[3, 10, 19], [0, 5, 7], [12, 13, 18]])
    targets = torch.randint(0, 500, slots.shape, generator=torch.Generator().manual_seed(2))
    logp, _ = _score(model, tokens, slots, targets, batch_size=2, vocab_size=500)
    hidden = _hidden_states(model, tokens)
    rows = hidden.gather(1, slots[..., None].expand(-1, -1, hidden.shape[-1])).reshape(-1, hidden.shape[-1])
    with torch.no_grad():
        train = linear_logprob(rows, output_weight(model), targets.reshape(-1), vocab_size=500)
    gap = (torch.cat(logp).reshape(-1) - train).abs()
    assert gap.max() < 1e-4, f"evaluation/trainer log-prob gap {gap.max():.3g}"
