"""The shared-prefix update: its attention against a dense block mask, its packing against the
one-row-per-thought rows, and one RLP iteration in both layouts (TP=1)."""

import math

import pytest
import torch

from megatron_rlp.models.shared_prefix import SharedPrefixLayout, shared_prefix_attention
from megatron_rlp.rlp.config import resolve_update_layout
from megatron_rlp.rlp.step import build_shared_sequences, build_update_sequences
from rlp_parity import check_layouts_agree
from training_fixtures import write_corpus


def _dense_reference(q, k, v, layout, scale):
    """Plain attention over each packed row with an explicit [S, S] block mask."""
    s, nb, hq, d = q.shape
    k = k.repeat_interleave(hq // k.shape[2], dim=2)
    v = v.repeat_interleave(hq // v.shape[2], dim=2)
    out = torch.zeros(s, nb, hq, d, dtype=torch.float64)
    for b in range(nb):
        t, lens = layout.context_lens[b], layout.branch_lens[b]
        segment = torch.full((s,), -2)  # -2 padding, -1 context, j branch j
        segment[:t] = -1
        start = t
        for j, n in enumerate(lens):
            segment[start : start + n] = j
            start += n
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        allowed = causal & ((segment[None, :] == -1) | (segment[None, :] == segment[:, None]))
        pad = segment == -2
        allowed = (allowed & ~pad[:, None]) | (torch.eye(s, dtype=torch.bool) & pad[:, None])  # finite, masked out below
        scores = torch.einsum("qhd,khd->hqk", q[:, b].double(), k[:, b].double()) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[:, b] = torch.einsum("hqk,khd->qhd", probs, v[:, b].double())
    return out.reshape(s, nb, hq * d)


def test_attention_matches_a_block_mask_forward_and_backward():
    gen = torch.Generator().manual_seed(0)
    layout = SharedPrefixLayout(context_lens=[3, 5], branch_lens=[[2, 4, 1], [3, 1, 2]])
    s, nb, hq, hk, d = 16, 2, 4, 2, 8  # grouped-query attention; row 0 has 2 padding slots
    q, k, v = (torch.randn(s, nb, h, d, generator=gen, requires_grad=True) for h in (hq, hk, hk))
    scale = 1 / math.sqrt(d)
    out = shared_prefix_attention(q, k, v, layout, scale)
    ref = _dense_reference(q, k, v, layout, scale)
    used = torch.zeros(s, nb, 1, dtype=torch.bool)
    for b in range(nb):
        used[: layout.row_length(b), b] = True
    assert torch.allclose(out.double(), ref * used, atol=1e-6)
    cotangent = torch.randn(out.shape, generator=gen) * used
    grads = torch.autograd.grad(out, (q, k, v), cotangent)
    ref_grads = torch.autograd.grad(ref, (q, k, v), cotangent.double())
    for name, g, r in zip("qkv", grads, ref_grads):
        assert torch.allclose(g.double(), r.double(), atol=1e-6), name
    # Every branch reads the context: its keys get gradient from every branch's queries.
    assert grads[1][:3, 0].abs().sum() > 0


def test_attention_rejects_a_layout_that_does_not_fit():
    q = torch.zeros(6, 1, 2, 4)
    with pytest.raises(ValueError, match="do not fit"):
        shared_prefix_attention(q, q, q, SharedPrefixLayout(context_lens=[3], branch_lens=[[2, 2]]), 0.5)


def test_packed_rows_hold_the_rows_of_every_thought():
    """Each branch of a packed row sees, at the same RoPE positions, exactly the tokens of its row
    in the rows layout, and its slots carry the same labels and masks."""
    docs = [torch.arange(10, 30), torch.arange(40, 60)]
    closed = torch.tensor([[[7, 8, 99, 0], [99, 0, 0, 0], [5, 6, 7, 8]],
                           [[1, 99, 0, 0], [2, 3, 4, 99], [99, 0, 0, 0]]])
    lengths = torch.tensor([[3, 1, 4], [2, 4, 1]])
    forced = torch.tensor([[False, False, True], [False, False, False]])
    args = ([docs[0], docs[1]], torch.tensor([0, 1]), torch.tensor([4, 6]), closed, lengths, forced)
    rows = build_update_sequences(*args, open_id=98, pad_id=0)
    packed = build_shared_sequences(*args, open_id=98, pad_id=0, width=40)
    assert packed["tokens"].shape == (2, 40)
    assert packed["layout"].context_lens == [4, 6]
    assert packed["layout"].branch_lens == [[4, 2, 5], [3, 5, 2]]
    for r in range(6):
        i, t = r // 3, [4, 6][r // 3]
        p = packed["branch_row"][r]
        m = int(lengths.view(-1)[r])
        branch = packed["thought_slot"][r, 0].item()  # slot of the open marker
        slots = list(range(t)) + list(range(branch, branch + 1 + m))
        assert packed["tokens"][p, slots].tolist() == rows["tokens"][r, : t + 1 + m].tolist()
        assert packed["labels"][p, slots].tolist() == rows["labels"][r, : t + 1 + m].tolist()
        assert packed["position_ids"][p, slots].tolist() == list(range(t + 1 + m))
        assert torch.equal(packed["thought_mask"][r], rows["thought_mask"][r])
        assert packed["labels"][p, packed["target_slot"][r]] == rows["labels"][r, rows["target_slot"][r]]
    assert packed["thought_mask"][2].tolist() == [True, True, True, False]  # forced close: no gradient


def test_layout_flag():
    assert resolve_update_layout(None, "gpt") == "shared"
    assert resolve_update_layout(None, "hybrid") == "shared"
    assert resolve_update_layout("rows", "gpt") == "rows"
    with pytest.raises(ValueError, match="rows or shared"):
        resolve_update_layout("packed", "gpt")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("shared") / "corpus"), num_docs=16, seed=4)


def test_shared_update_equals_rows_update_tp1(corpus):
    """Gradients, loss and every rlp/* metric of one iteration, with the NTP and KL terms on (they
    read the context and the thoughts through the packing too), untied output layer."""
    from rlp_parity import run_parity

    extra = {"rlp_ntp_weight": 0.3, "rlp_kl_beta": 0.1}
    shared, _ = run_parity(corpus, tp=1, pp=1, tie=False, layout="shared", rlp_overrides=extra, with_reference=False)
    rows, _ = run_parity(corpus, tp=1, pp=1, tie=False, layout="rows", rlp_overrides=extra, with_reference=False)
    assert {"rlp/ntp", "rlp/kl", "rlp/info_gain", "rlp/clip_frac"} <= set(shared["metrics"])
    check_layouts_agree(shared, rows)
    # The shared layout holds each context once: fewer slots than G rows of it.
    assert sum(mb["tokens"].numel() for mb in shared["microbatches"]) < sum(
        mb["tokens"].numel() for mb in rows["microbatches"])


def test_shared_update_equals_rows_update_on_the_hybrid(corpus):
    """tiny-hybrid (Mamba, attention and MLP layers): each branch's Mamba layers start from the
    context's convolution inputs and SSM state at t, with gradient back into the context."""
    from rlp_parity import run_parity

    runs = {
        layout: run_parity(corpus, tp=1, pp=1, tie=False, layout=layout, rlp_overrides={"rlp_ntp_weight": 0.3},
                           with_reference=False, preset_name="tiny-hybrid")[0]
        for layout in ("shared", "rows")
    }
    check_layouts_agree(runs["shared"], runs["rows"])
    mixer_grads = [g for name, g in runs["shared"]["grads"].items() if "mixer.A_log" in name]
    assert mixer_grads and all(g.abs().max() > 0 for g in mixer_grads)
