"""Continuation with the thought sampler (megatron_rlp.sampling.generate): greedy continuations
equal a plain full-forward greedy decode, stop sequences end rows on the device, thoughts stop at
the close marker."""

import pytest
import torch

from megatron_rlp.models.builder import build_model, transformer_config
from megatron_rlp.models.init import initialize_layout_invariant
from megatron_rlp.models.presets import get_preset
from megatron_rlp.sampling import STOP_EOD, sample_thoughts
from megatron_rlp.sampling.generate import generate
from megatron_rlp.sampling.thoughts import STOP_SEQUENCE
from megatron_rlp.training import parallel

PRESET = get_preset("tiny").replace(tie_embeddings=False, num_layers=2)
OPEN, CLOSE, EOD = 509, 510, 511


@pytest.fixture(scope="module")
def model():
    parallel.init_distributed()
    parallel.init_model_parallel(1, 1)
    parallel.set_seed(1234)
    m = build_model(PRESET, transformer_config(PRESET))
    initialize_layout_invariant(m, 7, PRESET.num_layers)
    m.eval()
    yield m
    parallel.destroy()


@torch.no_grad()
def _greedy_by_full_forward(model, prompt: torch.Tensor, steps: int) -> list[int]:
    ids = prompt.tolist()
    for _ in range(steps):
        tokens = torch.tensor([ids])
        pos = torch.arange(len(ids))[None]
        logits = model(tokens, pos, None).float()[0, -1]
        ids.append(int(logits[: EOD + 1].argmax()))  # the sampler's vocabulary: ids 0..EOD
    return ids[prompt.numel():]


def _prompts():
    g = torch.Generator().manual_seed(3)
    # Two share their last token (one sampler call), one differs (a second call).
    a, b, c = (torch.randint(0, 500, (n,), generator=g) for n in (9, 14, 6))
    b[-1] = a[-1]
    return [a, b, c]


def test_greedy_continuation_equals_a_full_forward_decode(model):
    prompts = _prompts()
    out = generate(model, prompts, 1, 5, temperature=0.0, seed=1, max_sequence_length=64, eod_id=EOD,
                   vocab_size=EOD + 1)
    for prompt, samples in zip(prompts, out):
        want = _greedy_by_full_forward(model, prompt, 5)
        got = samples[0]
        if EOD in want:
            want = want[: want.index(EOD) + 1]
        assert got == want


def test_stop_sequences_end_rows_and_thoughts_end_at_close(model):
    prompts = _prompts()
    free = generate(model, prompts, 1, 6, temperature=0.0, seed=1, max_sequence_length=64, eod_id=EOD,
                    vocab_size=EOD + 1)
    # Stop on the pair of tokens the first prompt's greedy continuation emits at steps 2-3.
    seq = free[0][0][2:4]
    assert len(seq) == 2
    stopped = generate(model, prompts, 1, 6, temperature=0.0, seed=1, max_sequence_length=64, eod_id=EOD,
                       vocab_size=EOD + 1, stop_sequences=[seq])
    assert stopped[0][0] == free[0][0][:4]
    for got, want in zip(stopped[1:], free[1:]):  # rows without the pair are unaffected
        n = next((i + 2 for i in range(len(want[0]) - 1) if want[0][i: i + 2] == seq), len(want[0]))
        assert got[0] == want[0][:n]
    # The stop reason is recorded on the device path.
    docs = [torch.cat([prompts[0][:-1], prompts[0][-1:]])]
    batch = sample_thoughts(model, docs, [[prompts[0].numel() - 1]], 1, 6, int(prompts[0][-1]), EOD, EOD,
                            0.0, 1, 64, vocab_size=EOD + 1, stop_sequences=[seq])
    assert int(batch.stop_reason[0, 0]) == STOP_SEQUENCE and int(batch.lengths[0, 0]) == 4
    # A thought: open marker after the whole prompt, stops at the close marker or the budget.
    thoughts = generate(model, prompts, 3, 4, temperature=0.9, seed=5, max_sequence_length=64, eod_id=EOD,
                        open_id=OPEN, close_id=CLOSE, vocab_size=EOD + 1)
    assert all(1 <= len(t) <= 4 for per in thoughts for t in per)
    assert all(CLOSE not in t[:-1] and EOD not in t[:-1] for per in thoughts for t in per)
    with pytest.raises(ValueError, match="stop sequence"):
        generate(model, prompts, 1, 3, temperature=0.0, seed=1, max_sequence_length=64, eod_id=EOD,
                 vocab_size=EOD + 1, stop_sequences=[[EOD + 5]])
    assert STOP_EOD != STOP_SEQUENCE
