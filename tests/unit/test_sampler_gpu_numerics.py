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
from megatron_rlp.sampling.pipeline import StageInfo
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


def _bf16_model(fusion: bool, logit_scale: float = 1.0):
    config = transformer_config(GPT, params_dtype=torch.bfloat16)
    config.masked_softmax_fusion = fusion
    model = build_model(GPT, config)
    initialize_layout_invariant(model, 7, GPT.num_layers)
    if logit_scale != 1.0:
        with torch.no_grad():
            model.decoder.final_layernorm.weight.mul_(logit_scale)
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


def _sample(model, docs, positions, **kw):
    return sample_thoughts(
        model, docs, positions, num_thoughts=4, max_thought_len=4, open_id=OPEN, close_id=CLOSE,
        eod_id=EOD, temperature=0.8, seed=5, max_sequence_length=128, **kw,
    )


def test_fused_causal_softmax_is_detected_and_gets_the_rows_layout(fused_kernels):
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
    got, want = _sample(fused, docs, positions), _sample(plain, docs, positions, layout="rows")
    assert got.stats["layout"] == "rows"
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-6, rtol=0)
    assert all(sq == sk for _, sq, sk in fused_kernels.shapes)
    with pytest.raises(ValueError, match="'tree' decode layout"):
        _sample(fused, docs, positions, layout="tree")

    # Align slot 20: the prefill (20 queries = 20 keys, causal) does take the fused kernel, and
    # is right there: same thoughts as without the fusion.
    fused_kernels.shapes.clear()
    positions = [[20], [13]]
    got, want = _sample(fused, docs, positions), _sample(plain, docs, positions, layout="rows")
    assert fused_kernels.shapes and all(sq == sk for _, sq, sk in fused_kernels.shapes)
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-5, rtol=0)
