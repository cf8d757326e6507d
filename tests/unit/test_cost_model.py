"""The cost model of an RLP iteration: FLOPs against hand counts, parameter counts against built
megatron-core models, memory terms, and the shared-prefix ratio the issue targets."""

import dataclasses

import pytest

from megatron_rlp.models.presets import ModelPreset, get_preset
from megatron_rlp.training import cost_model as cm
from megatron_rlp.training.cost_model import Layout, RLPSettings

# A GPT small enough to count by hand: h=8, f=16 (SwiGLU: fc1 has 32 outputs), 2 heads of 4 and
# 1 KV group (q=8, kv=4), 2 layers, vocabulary 32, tied embeddings.
MINI = ModelPreset(
    name="mini", family="gpt", num_layers=2, hidden_size=8, ffn_hidden_size=16,
    num_attention_heads=2, num_query_groups=1, kv_channels=4, vocab_size=32,
    max_position_embeddings=64, tie_embeddings=True, qk_layernorm=False,
)
# Per token, per layer: attention QKV 2*8*(8+2*4)=256, proj 2*8*8=128 -> 384;
# MLP fc1 2*8*32=512, fc2 2*16*8=256 -> 768.  Two layers: 2*(384+768) = 2304.
MINI_DENSE = 2304
MINI_PER_KEY = 2 * 4 * 8   # two attention layers x (QK^T 2q + AV 2q) with q = 8
MINI_LOGIT = 2 * 8 * 32    # one output-layer row
# Parameters: per layer norm 8 + QKV 8*16 + proj 8*8 + norm 8 + fc1 8*32 + fc2 16*8 = 592;
# 2 layers + embedding 32*8 (tied: once) + final norm 8.
MINI_PARAMS = 2 * 592 + 256 + 8

# C=3 context tokens, G=2 thoughts of L=2 tokens, one context.
HAND = RLPSettings(contexts=1, context_len=3, num_thoughts=2, thought_len=2)


def _fwd(tokens, keys, logits):
    return tokens * MINI_DENSE + keys * MINI_PER_KEY + logits * MINI_LOGIT


def test_mini_parameters_by_hand():
    assert cm.total_parameters(MINI) == MINI_PARAMS == 1448
    assert MINI.num_parameters() == MINI_PARAMS


def test_flops_hand_count_rows():
    cost = cm.rlp_iteration_cost(MINI, HAND, "rows")
    f = {k: v.model_flops for k, v in cost.phases.items()}
    # Teacher: window 3 tokens, causal keys 1+2+3=6, one logit row (k=1): 6912+384+512.
    assert f["teacher"] == _fwd(3, 6, 1) == 7808
    # Prefill of the context once: 3 tokens, 6 keys, no logits.
    assert f["sampling_prefill"] == _fwd(3, 6, 0) == 7296
    # Decode, per branch: open + 2 thought tokens fed at positions 3,4,5 -> 4+5+6 = 15 keys,
    # 3 logit rows; two branches.
    assert f["sampling_decode"] == _fwd(6, 30, 6) == 18816
    assert f["scoring"] == 0
    # Update: 2 rows of 3 + 1 + 2 + 1 = 7 tokens, 7*8/2 = 28 keys, 4 logit rows (2 thought + close
    # + x_t); forward + backward = 3x.
    assert f["update"] == 3 * _fwd(14, 56, 8) == 3 * 39936
    assert f["optimizer"] == 12 * 1448 and f["ema"] == 3 * 1448


def test_flops_hand_count_shared_prefix():
    cost = cm.rlp_iteration_cost(MINI, HAND, "shared_prefix")
    # One row: 3 context tokens (keys 1+2+3 = 6) then 2 branches of 4 tokens, each attending the
    # context and itself: 4+5+6+7 = 22 keys; 8 logit rows.
    assert cost.phases["update"].model_flops == 3 * _fwd(3 + 8, 6 + 44, 8) == 3 * 32640
    # Sampling is the same as "rows" (the sampler already shares the prefill).
    rows = cm.rlp_iteration_cost(MINI, HAND, "rows")
    for phase in ("teacher", "sampling_prefill", "sampling_decode"):
        assert cost.phases[phase].model_flops == rows.phases[phase].model_flops


def test_flops_hand_count_straightforward():
    f = {k: v.model_flops for k, v in cm.rlp_iteration_cost(MINI, HAND, "straightforward").phases.items()}
    # Each thought prefills context + open (4 tokens, 10 keys) and takes one logit row.
    assert f["sampling_prefill"] == 2 * _fwd(4, 10, 1) == 20736
    # Then feeds its 2 thought tokens at positions 4, 5: 5 + 6 = 11 keys, 2 logit rows.
    assert f["sampling_decode"] == 2 * _fwd(2, 11, 2) == 12672
    # Separate S_pred pass over each 7-token row, logits at x_t only.
    assert f["scoring"] == 2 * _fwd(7, 28, 1) == 36864
    assert f["update"] == 3 * 39936


def test_flops_hand_count_hybrid_mamba_layer():
    # One Mamba layer: h=8, 2 heads of 4 (d_inner 8), 1 group, state 4 (conv channels 8+2*4=16).
    p = ModelPreset(
        name="mini-hybrid", family="hybrid", num_layers=3, hidden_size=8, ffn_hidden_size=16,
        num_attention_heads=2, num_query_groups=1, kv_channels=4, vocab_size=32,
        max_position_embeddings=64, tie_embeddings=False, qk_layernorm=False,
        activation="squared_relu", hybrid_pattern="M*-", mamba_num_heads=2, mamba_head_dim=4,
        mamba_state_dim=4, mamba_num_groups=1,
    )
    # Mamba: in_proj 2*8*(2*8 + 2*4 + 2) = 416, conv 2*16*4 = 128, scan 6*8*4 = 192,
    # out_proj 2*8*8 = 128 -> 864.  Attention layer 384, MLP (no gate) 2*8*16 + 2*16*8 = 512.
    dense, per_key, logit = 864 + 384 + 512, 4 * 8, 2 * 8 * 32
    cost = cm.rlp_iteration_cost(p, HAND, "shared_prefix")
    assert cost.phases["update"].model_flops == 3 * (11 * dense + 50 * per_key + 8 * logit)
    # Decode: the Mamba layer costs the same per token wherever it is; only attention grows.
    assert cost.phases["sampling_decode"].model_flops == 6 * dense + 30 * per_key + 6 * logit
    # Parameters: M 8+208+16*5+3*2+8+64 = 374, * 8+192 = 200, - 8+256 = 264, untied 2*256, norm 8.
    assert cm.total_parameters(p) == 374 + 200 + 264 + 512 + 8


def test_recompute_adds_forward_to_hardware_flops_only():
    s = RLPSettings(contexts=4, context_len=64, num_thoughts=4, thought_len=16)
    p = get_preset("tiny")
    none = cm.rlp_iteration_cost(p, s, "rows", recompute="none").phases["update"]
    sel = cm.rlp_iteration_cost(p, s, "rows", recompute="selective").phases["update"]
    full = cm.rlp_iteration_cost(p, s, "rows", recompute="full").phases["update"]
    assert none.model_flops == sel.model_flops == full.model_flops == none.hardware_flops
    assert full.hardware_flops == pytest.approx(none.model_flops * 4 / 3)
    assert none.hardware_flops < sel.hardware_flops < full.hardware_flops
    with pytest.raises(ValueError, match="recompute"):
        cm.rlp_iteration_cost(p, s, "rows", recompute="block")


def test_context_distribution_is_not_its_mean():
    p = get_preset("tiny")
    mixed = cm.rlp_iteration_cost(p, RLPSettings(8, [16, 240], 4, 8), "rows")
    parts = [cm.rlp_iteration_cost(p, RLPSettings(8, c, 4, 8), "rows") for c in (16, 240)]
    at_mean = cm.rlp_iteration_cost(p, RLPSettings(8, 128, 4, 8), "rows")
    assert mixed.model_flops == pytest.approx((parts[0].model_flops + parts[1].model_flops) / 2)
    assert mixed.model_flops > at_mean.model_flops  # attention is quadratic in the context


@pytest.mark.parametrize("name", ["tiny", "qwen3-1.7b", "nemotron-nano-12b-v2"])
def test_flops_grow_with_every_size_and_variants_are_ordered(name):
    p = get_preset(name)
    base = RLPSettings(contexts=16, context_len=512, num_thoughts=8, thought_len=128)
    total = lambda s, v="rows": cm.rlp_iteration_cost(p, s, v).model_flops  # noqa: E731
    for change in (dict(context_len=1024), dict(thought_len=256), dict(num_thoughts=16), dict(contexts=32)):
        bigger = dataclasses.replace(base, **change)
        for v in cm.VARIANTS:
            assert total(bigger, v) > total(base, v), (change, v)
    assert total(base, "shared_prefix") < total(base, "rows") < total(base, "straightforward")
    # Amortisation over U updates and a sparser teacher lower the cost.
    assert total(dataclasses.replace(base, updates_per_batch=2)) < total(base)
    assert total(dataclasses.replace(base, baseline_interval=4)) < total(base)


@pytest.mark.parametrize("thought_len", [256, 1024, 2048])
def test_shared_prefix_update_ratio_near_token_ratio_at_12b(thought_len):
    # At 12B the dense layers dominate, so the update's FLOP ratio stays within 5% of the token
    # ratio (C + G(L+2)) / (G(C+L+2)).  (qwen3-1.7b deviates more: its logit and attention terms,
    # which sharing does not shrink, are a larger share of a token's cost.)
    s = RLPSettings(contexts=512, context_len=2048, num_thoughts=16, thought_len=thought_len)
    p = get_preset("nemotron-nano-12b-v2")
    shared = cm.rlp_iteration_cost(p, s, "shared_prefix").phases["update"].model_flops
    rows = cm.rlp_iteration_cost(p, s, "rows").phases["update"].model_flops
    token_ratio = (2048 + 16 * (thought_len + 2)) / (16 * (2048 + thought_len + 2))
    assert shared / rows == pytest.approx(token_ratio, rel=0.05)


def test_training_flops_is_the_ntp_iteration():
    p = get_preset("qwen3-1.7b")
    ntp = cm.ntp_iteration_cost(p, global_batch_size=8, seq_length=2048)
    assert cm.training_flops(p, 8 * 2048, 2048) == ntp.phases["update"].model_flops
    # Attention is causal: per token s(s+1)/2 / s keys, not s.
    work = cm.Work(2048, 2048 * 2049 / 2, 2048)
    assert cm.training_flops(p, 2048, 2048) == 3 * cm.forward_flops(p, work)
    # 6·N·D is a lower bound here (attention on top of the matmuls of every parameter).
    assert cm.training_flops(p, 2048, 2048) > 6 * cm.total_parameters(p) * 2048


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def tp1():
    from megatron_rlp.training import parallel

    parallel.init_distributed()
    parallel.init_model_parallel(1, 1)
    parallel.set_seed(1234)
    yield
    parallel.destroy()


@pytest.mark.parametrize("name", ["tiny", "tiny-hybrid"])
def test_parameters_equal_built_model(tp1, name):
    from megatron_rlp.models.builder import build_model, transformer_config

    p = get_preset(name)
    model = build_model(p, transformer_config(p))
    assert cm.total_parameters(p) == sum(t.numel() for t in model.parameters())


def test_nemotron_12b_total_and_splits():
    p = get_preset("nemotron-nano-12b-v2")
    assert (p.hybrid_pattern.count("M"), p.hybrid_pattern.count("*"), p.hybrid_pattern.count("-")) == (28, 6, 28)
    # Embedding and output layer (untied, 131072 x 5120 each), 28 Mamba, 6 attention and 28 MLP
    # layers with their norms, conv biases, A_log/D/dt_bias and gated-norm weights, final norm.
    assert cm.total_parameters(p) == 12_310_001_152
    # PP splits partition the layers; untied embeddings, so the stages add up to the total.
    for first, last in ((None, None), (30, 32), (None, 30)):
        assert sum(cm.stage_parameters(p, pp=2, first=first, last=last)) == 12_310_001_152
    # TP=8: everything but the replicated norms (5120 per layer and the final norm) is split.
    (tp8,) = cm.stage_parameters(p, tp=8)
    replicated = 63 * 5120
    assert 8 * (tp8 - replicated) + replicated == 12_310_001_152
    # PP=2: 31 layers each; the first holds 3 x 'M-M-M-M*-' + 'M-M-' (14 Mamba, 3 attention).
    stages = cm.stage_layer_kinds(p, 2)
    assert [len(s) for s in stages] == [31, 31] and stages[0].count("M") == 14 and stages[0].count("*") == 3
    with pytest.raises(ValueError, match="does not divide the 62 layers"):
        cm.stage_parameters(p, pp=4)
    with pytest.raises(ValueError, match="attention heads"):
        cm.stage_parameters(p, tp=3)
    with pytest.raises(ValueError, match="must divide evenly"):
        cm.stage_layer_kinds(p, 4, first=10, last=11)


def test_tied_embedding_counted_on_both_end_stages():
    p = get_preset("tiny")
    first, last = cm.stage_parameters(p, pp=2)
    emb = p.vocab_size * p.hidden_size
    assert first + last == cm.total_parameters(p) + emb


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
PAPER = RLPSettings(contexts=512, context_len=2048, num_thoughts=16, thought_len=2048)


def test_memory_static_terms_are_bytes_of_the_parameters():
    p = get_preset("nemotron-nano-12b-v2")
    plain = cm.stage_memory(p, Layout(tp=4, pp=2, dp=8), PAPER)
    dist = cm.stage_memory(p, Layout(tp=4, pp=2, dp=8, distributed_optimizer=True), PAPER)
    for a, b, n in zip(plain, dist, cm.stage_parameters(p, tp=4, pp=2)):
        assert a.parameters == n
        assert a.terms["weights"] == 2 * n and a.terms["main_grads"] == 4 * n
        assert a.terms["ema_teacher"] == 4 * n
        assert a.terms["optimizer_states"] == 12 * n  # fp32 main weights + two moments
        assert b.terms["optimizer_states"] == -(-12 * n // 8)
    fp32 = cm.stage_memory(p, Layout(tp=4, pp=2, dp=8, params_dtype="fp32"), PAPER)
    assert fp32[0].terms["optimizer_states"] == 8 * plain[0].parameters  # no separate main copy


def test_memory_activations_and_caches_respond_to_the_layout():
    p = get_preset("qwen3-1.7b")
    s = RLPSettings(contexts=64, context_len=2048, num_thoughts=16, thought_len=1024)
    mem = lambda **kw: cm.stage_memory(p, Layout(**kw), s)  # noqa: E731
    act = lambda **kw: [m.terms["activations"] for m in mem(**kw)]  # noqa: E731
    assert act(recompute="full")[0] < act(recompute="selective")[0] <= act()[0]
    assert act(flash_attention=False)[0] > act()[0]                     # the softmax output
    assert act(tp=2)[0] < act()[0] and act(tp=2, sequence_parallel=True)[0] < act(tp=2)[0]
    # 1F1B: the first stage holds PP micro-batches in flight, the last one.
    first, last = act(pp=4, dp=1)[0], act(pp=4, dp=1)[-1]
    assert first == pytest.approx(4 * last, rel=1e-6)
    shared = cm.stage_memory(p, Layout(), s, "shared_prefix")[0].terms["activations"]
    assert shared < act()[0]                                           # C once, not G times
    cache = lambda **kw: mem(**kw)[0].terms["sampler_cache"]  # noqa: E731
    assert cache(dp=2) == pytest.approx(cache() / 2, rel=0.01)
    assert cache(tp=2) == pytest.approx(cache() / 2, rel=0.01)
    # Qwen3-1.7B: 28 layers x (K and V) x 8 groups x 128 x bf16 per cached token; prefill of 64
    # documents of 2048 tokens, then (cascade, all 1024 rows in one micro-batch at PP=1) each of
    # the 64 contexts' K/V once and 1024 branch caches of 1024 + 1 slots.
    per_token = 28 * 2 * 8 * 128 * 2
    assert cache() == (64 * 2048 + 64 * 2048 + 1024 * (1024 + 1)) * per_token
    # --rlp-sampler-micro-batch-size bounds the decode caches: 256 rows = 16 contexts at once.
    assert mem(sampler_micro_batch_size=256)[0].sampler_microbatch == (16 * 2048 + 256 * 1025) * per_token
    assert cache(sampler_micro_batch_size=256) == (64 * 2048 + 16 * 2048 + 256 * 1025) * per_token
    # PP stages decode PP micro-batches at once (each stage holding half the layers).
    assert cache(sampler_micro_batch_size=256, pp=2, dp=1) == pytest.approx(cache(sampler_micro_batch_size=512, dp=1) / 2)
    m = mem()[0]
    assert m.largest_term == "sampler_cache" and m.peak == m.static + m.terms["sampler_cache"]


def test_memory_hybrid_mamba_states_in_sampler_cache():
    p = get_preset("nemotron-nano-12b-v2")
    s = RLPSettings(contexts=8, context_len=2048, num_thoughts=16, thought_len=1024)
    (m,) = cm.stage_memory(p, Layout(tp=8), s)
    kv_token = 6 * 2 * 1 * 128 * 2                          # 6 attention layers, 1 group per rank
    mamba = 28 * ((12288 // 8) * 4 + 16 * 80 * 128) * 2     # conv + SSM state of all Mamba layers
    prefill = 8 * (2048 * kv_token + mamba) + 8 * mamba      # 8 documents; a snapshot per context
    decode = 8 * 16 * ((1024 + 1) * kv_token + mamba) + 8 * 2048 * kv_token  # branches; contexts once
    assert m.terms["sampler_cache"] == prefill + decode


# ---------------------------------------------------------------------------------------------
# Actual batches and the benchmark's analytic mode
# ---------------------------------------------------------------------------------------------
def test_batch_cost_counts_each_thought_at_its_own_length():
    # Context of 3 with thoughts of 1 and 3 tokens (mean 2) against the hand counts above.
    cost = cm.rlp_batch_cost(MINI, [3], [[1, 3]], "shared_prefix", teacher_windows=[3])
    # Branches of 3 and 5 tokens after the context: keys 4+5+6 and 4+5+6+7+8; 8 logit rows.
    assert cost.phases["update"].model_flops == 3 * _fwd(3 + 3 + 5, 6 + 15 + 30, 8)
    # Decode: 2 and 4 tokens fed from position 3: keys 4+5 and 4+5+6+7.
    assert cost.phases["sampling_decode"].model_flops == _fwd(6, 9 + 22, 6)
    assert cost.phases["teacher"].model_flops == _fwd(3, 6, 1)
    # Equal lengths reproduce the settings-based cost; a reused batch has no sampling cost.
    same = cm.rlp_batch_cost(MINI, [3], [[2, 2]], "rows", teacher_windows=[3])
    ref = cm.rlp_iteration_cost(MINI, HAND, "rows")
    assert {k: v.model_flops for k, v in same.phases.items()} == {k: v.model_flops for k, v in ref.phases.items()}
    reused = cm.rlp_batch_cost(MINI, [3], [[2, 2]], "rows", sampled=False)
    assert reused.phases["sampling_decode"].model_flops == reused.phases["teacher"].model_flops == 0
    assert reused.phases["update"].model_flops == ref.phases["update"].model_flops
    with pytest.raises(ValueError, match="thought lengths"):
        cm.rlp_batch_cost(MINI, [3, 4], [[2, 2]])


def test_prediction_phase_and_filtered_teacher_by_hand():
    """Prefix-match: a forward-only pass in the update's layout over the branches fed N − 1 = 1
    continuation token more, logits at N = 2 rows per branch.  The entropy filter: the teacher's
    logit rows are the window's candidates."""
    # rows: context 3, thoughts of 1 and 3 tokens: rows of 3 + (1 + 2 + 1) = 7 and 3 + (3 + 2 + 1) = 9.
    rows = cm.rlp_batch_cost(MINI, [3], [[1, 3]], "rows", prediction_tokens=2)
    assert rows.phases["prediction"].model_flops == _fwd(7 + 9, 28 + 45, 4)
    # shared: the context once (keys 6), branches of 4 and 6 tokens after it: keys 4+5+6+7, 4+..+9.
    shared = cm.rlp_batch_cost(MINI, [3], [[1, 3]], "shared_prefix", prediction_tokens=2)
    assert shared.phases["prediction"].model_flops == _fwd(3 + 4 + 6, 6 + 22 + 39, 4)
    # The prediction changes nothing else; info-gain (0) and a reused batch have none.
    plain = cm.rlp_batch_cost(MINI, [3], [[1, 3]], "rows")
    assert plain.phases["prediction"].model_flops == 0
    assert {k: v for k, v in rows.phases.items() if k != "prediction"} == {
        k: v for k, v in plain.phases.items() if k != "prediction"}
    assert cm.rlp_batch_cost(MINI, [3], [[1, 3]], "rows", prediction_tokens=2,
                             sampled=False).phases["prediction"].model_flops == 0
    teacher = cm.rlp_batch_cost(MINI, [3], [[1, 3]], "rows", teacher_windows=[3, 5], teacher_rows=[2, 4])
    assert teacher.phases["teacher"].model_flops == _fwd(3, 6, 2) + _fwd(5, 15, 4)
    # The analytic settings: the same hand counts.
    s = RLPSettings(contexts=1, context_len=3, num_thoughts=2, thought_len=2, prediction_tokens=2)
    f = cm.rlp_iteration_cost(MINI, s, "rows").phases["prediction"].model_flops
    assert f == 2 * _fwd(3 + 2 + 2 + 1, 36, 2)


def test_bench_rlp_analytic_prints_a_json_line_per_setting(capsys):
    import json

    from tools import bench_rlp

    rc = bench_rlp.main(["--analytic", "--presets", "tiny", "tiny-hybrid", "--context-len", "256",
                         "--num-thoughts", "8", "--contexts", "8", "--thought-lens", "16", "32",
                         "--thought-cap", "64", "--data-parallel-size", "1"])
    assert rc == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["preset"], r["mean_thought_len"]) for r in records] == [
        ("tiny", 16), ("tiny", 32), ("tiny-hybrid", 16), ("tiny-hybrid", 32)]
    for r in records:
        totals = {v: sum(r["phases"][v].values()) for v in cm.VARIANTS}
        assert r["flops_ratio"] == pytest.approx(totals["shared_prefix"] / totals["rows"])
        assert r["flops_ratio_straightforward"] == pytest.approx(totals["shared_prefix"] / totals["straightforward"])
        assert 0 < r["flops_ratio_straightforward"] < r["flops_ratio"] < 1
        # Uneven thoughts (capped geometric): the previous path's step padding (a rank's 8
        # contexts) costs the rows layout more than padding each micro-batch (1 context).
        assert r["step_contexts_per_rank"] == 8 and r["microbatch_contexts"] == 1
        assert r["flops_ratio_vs_previous_path"] < r["flops_ratio_vs_rows_padded"] < 1
        ex = r["update_executed"]
        assert ex["rows_step_padded"]["flops"] > ex["rows"]["flops"] > r["phases"]["rows"]["update"]
    # Every thought at the same length: nothing to pad, the three ratios agree.
    bench_rlp.main(["--analytic", "--presets", "tiny", "--context-len", "256", "--num-thoughts", "8",
                    "--contexts", "8", "--thought-lens", "16", "--thought-dist", "fixed", "--data-parallel-size", "1"])
    (fixed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert fixed["flops_ratio_vs_previous_path"] == pytest.approx(fixed["flops_ratio"], rel=1e-9)
    assert fixed["flops_ratio_vs_rows_padded"] == pytest.approx(fixed["flops_ratio"], rel=1e-9)


def test_sampler_prefill_is_counted_once_per_document():
    # Two contexts (t = 3 and 2) of one document: the sampler prefills x_<3 once.
    one_doc = cm.rlp_batch_cost(MINI, [3, 2], [[2, 2], [2, 2]], "rows", prefill_lens=[3])
    assert one_doc.phases["sampling_prefill"].model_flops == _fwd(3, 6, 0)
    two_docs = cm.rlp_batch_cost(MINI, [3, 2], [[2, 2], [2, 2]], "rows")
    assert two_docs.phases["sampling_prefill"].model_flops == _fwd(3, 6, 0) + _fwd(2, 3, 0)
    straight = cm.rlp_batch_cost(MINI, [3, 2], [[2, 2], [2, 2]], "straightforward", prefill_lens=[3])
    assert straight.phases["sampling_prefill"].model_flops == 2 * _fwd(4, 10, 1) + 2 * _fwd(3, 6, 1)
    # Settings: k = 2 positions per document, t = 2 or 3 equally likely: the prefill runs to the
    # larger, 3 with probability 3/4 -> 2.75 tokens and 0.25 * 3 + 0.75 * 6 = 5.25 keys per document.
    s = RLPSettings(contexts=2, context_len=[2, 3], num_thoughts=2, thought_len=2, positions_per_doc=2)
    assert cm.rlp_iteration_cost(MINI, s, "shared_prefix").phases["sampling_prefill"].model_flops == pytest.approx(
        _fwd(2.75, 5.25, 0))


def test_ntp_and_kl_reference_logit_rows_by_hand():
    # --rlp-ntp-weight > 0: logits at the 3 context slots of every row the update runs.
    ntp = dataclasses.replace(HAND, ntp=True)
    assert cm.rlp_iteration_cost(MINI, ntp, "rows").phases["update"].model_flops == 3 * _fwd(14, 56, 8 + 2 * 3)
    assert cm.rlp_iteration_cost(MINI, ntp, "shared_prefix").phases["update"].model_flops == 3 * _fwd(11, 50, 8 + 3)
    # --rlp-kl-beta > 0: a reference forward of the update's rows, logits at the 3 thought slots
    # (2 tokens + close) of each branch, in "scoring".
    kl = dataclasses.replace(HAND, kl_reference=True)
    assert cm.rlp_iteration_cost(MINI, kl, "rows").phases["scoring"].model_flops == _fwd(14, 56, 6)
    assert cm.rlp_iteration_cost(MINI, kl, "shared_prefix").phases["scoring"].model_flops == _fwd(11, 50, 6)


def test_capped_geometric_thought_lengths_by_hand():
    # cap 2, mean 1: q (1 + q) = 1 -> q = (sqrt 5 - 1) / 2; P(0) = p, P(1) = q p, P(2) = q^2 (forced).
    q = (5 ** 0.5 - 1) / 2
    d = cm.ThoughtLengths.capped_geometric(1.0, 2)
    assert d.values == (0, 1, 2)
    assert d.probs == pytest.approx((1 - q, q * (1 - q), q * q), abs=1e-9)
    assert d.mean == pytest.approx(1.0)
    # The larger of two: P(max <= u) = F(u)^2.
    m = d.max_of(2)
    assert m.probs == pytest.approx(((1 - q) ** 2, q ** 2 - (1 - q) ** 2, 1 - q ** 2), abs=1e-9)
    assert cm.ThoughtLengths.capped_geometric(2048, 2048).probs == (1.0,)
    with pytest.raises(ValueError, match="mean"):
        cm.ThoughtLengths.capped_geometric(3, 2)


def test_padded_update_by_hand():
    # C = 3, G = 2, thoughts of 1 or 3 tokens (equally likely), one context per micro-batch.
    s = RLPSettings(contexts=1, context_len=3, num_thoughts=2, thought_len=cm.ThoughtLengths((1, 3), (0.5, 0.5)))
    # rows: both rows padded to 3 + max(l1, l2) + 2: 6 with probability 1/4, 8 with 3/4 ->
    # 2 x 7.5 tokens, 2 x (0.25 * 21 + 0.75 * 36) keys; logits at real slots only, 2 x (2 + 2).
    rows = cm.padded_update_cost(MINI, s, "rows", contexts_per_group=1)
    assert rows.model_flops == pytest.approx(3 * _fwd(15, 64.5, 8))
    assert rows.tokens == pytest.approx(15)
    # shared: one packed row, no tail padding (11 tokens on average); context keys 6, each branch
    # padded to max(l1, l2) + 2 (3 or 5) in the attention: 2 x (4.5 * 3 + 0.25 * 6 + 0.75 * 15).
    shared = cm.padded_update_cost(MINI, s, "shared_prefix", contexts_per_group=1)
    assert shared.model_flops == pytest.approx(3 * _fwd(11, 6 + 2 * (13.5 + 12.75), 8))
    # Two contexts per group (rows: the largest of 4 thoughts is 1 with probability 1/16).
    two = dataclasses.replace(s, contexts=2)
    assert cm.padded_update_cost(MINI, two, "rows", 2).tokens == pytest.approx(2 * 2 * (6 / 16 + 8 * 15 / 16))
    # Every thought of one length: nothing is padded, the executed update is the model's.
    fixed = dataclasses.replace(s, thought_len=2)
    for variant in cm.VARIANTS:
        assert cm.padded_update_cost(MINI, fixed, variant, 1).model_flops == pytest.approx(
            cm.rlp_iteration_cost(MINI, fixed, variant).phases["update"].model_flops)


def test_fp32_activations_and_caches_take_twice_the_bytes():
    p = get_preset("tiny-hybrid")
    s = RLPSettings(contexts=4, context_len=128, num_thoughts=4, thought_len=32)
    for recompute in ("none", "full"):
        bf16, fp32 = (cm.stage_memory(p, Layout(params_dtype=d, recompute=recompute), s)[0] for d in ("bf16", "fp32"))
        for term in ("weights", "activations", "sampler_cache"):
            assert fp32.terms[term] == pytest.approx(2 * bf16.terms[term], rel=1e-9), term
    with pytest.raises(ValueError, match="params_dtype"):
        Layout(params_dtype="fp16")
