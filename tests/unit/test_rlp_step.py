"""The megatron RLP iteration against the independent reference (TP=1), and its invariants."""

import os

import pytest
import torch

from megatron_rlp.rlp.config import RLPConfig, resolve_markers, validate_rlp_config
from megatron_rlp.rlp.step import build_update_sequences, sample_positions
from rlp_parity import check_against_reference
from training_fixtures import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("rlp") / "corpus"), num_docs=16, seed=4)


@pytest.mark.parametrize("tie", [True, False])
def test_one_iteration_matches_reference_tp1(corpus, tie):
    from rlp_parity import run_parity

    mega, ref = run_parity(corpus, tp=1, pp=1, tie=tie)
    check_against_reference(mega, ref)
    assert any(v.abs().max() > 0 for v in mega["grads"].values())


def test_untempered_ratio_flag_scores_thoughts_at_t1(corpus):
    """--rlp-untempered-ratio keeps the old scoring (thought tokens at T = 1), which the reference
    at T = 1 reproduces; at T = 0.7 with these logits it is a clearly different update from the
    default (the tempered run's gradients differ by > 1 %), so the tempered parity test above
    cannot pass by accident with untempered scoring."""
    from rlp_parity import run_parity

    untempered, ref = run_parity(corpus, tp=1, pp=1, temperature=0.7, untempered_ratio=True)
    check_against_reference(untempered, ref)
    tempered, _ = run_parity(corpus, tp=1, pp=1, temperature=0.7)
    rel = max(((tempered["grads"][n] - untempered["grads"][n]).abs().max()
               / untempered["grads"][n].abs().max().clamp(min=1e-12)).item() for n in tempered["grads"])
    assert rel > 0.01
    # The entropy metric follows the scored policy: lower when tempered at T < 1.
    assert tempered["history"]["rlp/policy_entropy"] < untempered["history"]["rlp/policy_entropy"] - 0.05


def test_kl_reference_is_scored_at_the_sampling_temperature(corpus):
    """With --rlp-kl-beta the frozen reference's log-probs of the thought tokens are taken under
    softmax(logits / T) like the policy's (k3 is unbiased only for tokens drawn from the policy it
    compares): at the first iteration π_ref = θ, so they equal the reference's tempered log-probs,
    the KL is 0 and the update still matches the reference."""
    from rlp_parity import run_parity

    mega, ref = run_parity(corpus, tp=1, pp=1, temperature=0.7, kl_beta=0.5)
    check_against_reference(mega, ref)
    assert mega["history"]["rlp/kl"] == pytest.approx(0.0, abs=1e-6)
    got = torch.cat([mb["logp_ref"] for mb in mega["microbatches"]])  # [contexts*G, L+1]
    mask = torch.cat([mb["thought_mask"] for mb in mega["microbatches"]])
    want = [lp for per_context in ref["logp_thought"] for lp in per_context]
    for row, lp in enumerate(want):
        n = int(mask[row].sum())
        assert n == lp.numel()
        assert torch.allclose(got[row][mask[row]], lp, atol=1e-5), row


def test_tempered_rows_in_bf16_keep_t_exact():
    """On a GPU the hidden states are bf16.  Scaling them by a bf16 1/T (1/0.7 -> 1.4297) would
    shift every logit by 0.08 % (a different T); scaling in fp32 and rounding the product leaves
    only per-element rounding, which averages out in the logits.  x_t's row stays at T = 1."""
    from megatron_rlp.rlp.step import _score_at_policy_temperature

    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 5, 512, generator=gen).to(torch.bfloat16)
    weight = torch.randn(256, 512, generator=gen).to(torch.bfloat16)
    scaled = _score_at_policy_temperature(rows, RLPConfig(rlp_temperature=0.7))
    exact = (rows.float() @ weight.float().T) / 0.7
    got = scaled.float() @ weight.float().T
    big = exact[:, :-1].abs() > 10
    bias = ((got[:, :-1] - exact[:, :-1])[big] / exact[:, :-1][big]).mean().abs()
    assert bias < 1e-4, bias.item()  # a bf16 1/T gives 7.8e-4
    assert torch.equal(scaled[:, -1], rows[:, -1])
    untempered = _score_at_policy_temperature(rows, RLPConfig(rlp_temperature=0.7, rlp_untempered_ratio=True))
    assert torch.equal(untempered, rows)


def test_greedy_needs_the_untempered_ratio():
    with pytest.raises(ValueError, match=r"--rlp-temperature 0 \(greedy\).*--rlp-untempered-ratio"):
        validate_rlp_config(RLPConfig(rlp_temperature=0.0))
    validate_rlp_config(RLPConfig(rlp_temperature=0.0, rlp_untempered_ratio=True))


def test_log_line_flops_are_the_cost_model_of_the_real_batch(corpus, capsys):
    """TFLOP/s/GPU counts every phase (teacher, sampling, update, optimizer, EMA) from the cost
    model for this batch's real lengths: each context at its t, each thought at its own length.
    The thoughts are uneven, so the update's padded rows hold more tokens than are counted."""
    from megatron_rlp.training import cost_model as cm
    from rlp_parity import G, run_parity

    mega, _ = run_parity(corpus, tp=1, pp=1, layout="rows")  # one padded row per thought
    record, source = mega["history"], mega["source"]
    docs, positions = source.calls[0]
    context_lens = [t for pos in positions for t in pos]
    thought_lens = [[len(c) for c in source.thoughts[i]] for i in range(len(context_lens))]
    assert len({n for row in thought_lens for n in row}) > 1  # uneven thoughts
    # The sampler prefills each document once, up to its larger position.
    expected = cm.rlp_batch_cost(mega["preset"], context_lens, thought_lens, "rows",
                                 teacher_windows=[len(d) - 1 for d in docs], positions_per_doc=2,
                                 prefill_lens=[max(pos) for pos in positions])
    assert all(expected.phases[k].model_flops > 0 for k in ("teacher", "sampling_prefill", "sampling_decode", "update"))
    assert record["model_flops"] == pytest.approx(expected.model_flops, rel=1e-12)
    assert record["tflops_per_gpu"] == pytest.approx(
        expected.model_flops / (record["elapsed_ms"] / 1000) / 1e12, rel=1e-9)
    # Real update tokens: context + open + thought + close per row; the rows are padded past that.
    real = sum(t + n + 2 for t, row in zip(context_lens, thought_lens) for n in row)
    assert expected.phases["update"].tokens == real
    assert sum(mb["tokens"].numel() for mb in mega["microbatches"]) > real
    assert len(source.thoughts[0]) == G
    # The phase timers are in the log line and the record.
    line = next(l for l in capsys.readouterr().out.splitlines() if "iteration        1/" in l)
    phases = line.split("elapsed time per phase (ms): ")[1].split(" | ")[0]
    assert [p.rsplit(" ", 1)[0] for p in phases.split(", ")] == [
        "rlp-teacher", "rlp-sampling", "forward-backward", "optimizer", "rlp-ema"]
    assert set(record["timers_ms"]) == {"rlp-teacher", "rlp-sampling", "forward-backward", "optimizer", "rlp-ema"}


def test_reused_sample_batch_counts_no_teacher_or_sampling(corpus):
    """--rlp-updates-per-batch 2: the second iteration reuses the batch (no teacher forward, no
    sampling), so its FLOPs are the update, optimizer and EMA of the same real batch."""
    from megatron_rlp.training import cost_model as cm
    from rlp_parity import run_parity

    mega, _ = run_parity(corpus, tp=1, pp=1, iters=2, updates_per_batch=2, reference=False, layout="rows")
    first, second = mega["all_history"]
    assert len(mega["source"].calls) == 1
    docs, positions = mega["source"].calls[0]
    context_lens = [t for pos in positions for t in pos]
    thought_lens = [[len(c) for c in mega["source"].thoughts[i]] for i in range(len(context_lens))]
    sampled = cm.rlp_batch_cost(mega["preset"], context_lens, thought_lens, "rows",
                                teacher_windows=[len(d) - 1 for d in docs], positions_per_doc=2,
                                prefill_lens=[max(pos) for pos in positions])
    reused = cm.rlp_batch_cost(mega["preset"], context_lens, thought_lens, "rows", sampled=False)
    assert first["model_flops"] == pytest.approx(sampled.model_flops, rel=1e-12)
    assert second["model_flops"] == pytest.approx(reused.model_flops, rel=1e-12)
    assert set(second["timers_ms"]) == {"forward-backward", "optimizer", "rlp-ema"}


def test_update_does_not_depend_on_the_teacher(corpus):
    """S_ema cancels from the group advantage: the gradients are bitwise the same whatever the
    teacher holds, and whether or not its forward runs (--rlp-baseline-interval)."""
    from rlp_parity import run_parity

    base, _ = run_parity(corpus, tp=1, pp=1)
    noisy, _ = run_parity(corpus, tp=1, pp=1, teacher_noise=0.5)
    skipped, _ = run_parity(corpus, tp=1, pp=1, skip_baseline=True)
    assert all("s_ema" in mb for mb in base["microbatches"])
    assert not any("s_ema" in mb for mb in skipped["microbatches"])
    assert noisy["reward_mean"] != pytest.approx(base["reward_mean"], abs=1e-3)
    assert skipped["reward_mean"] is None
    for name in base["grads"]:
        assert torch.equal(base["grads"][name], noisy["grads"][name]), name
        assert torch.equal(base["grads"][name], skipped["grads"][name]), name


def test_positions_and_sequences():
    rng = __import__("numpy").random.default_rng(0)
    assert sample_positions(10, 3, 4, rng, max_context=20) == sorted(
        sample_positions(10, 3, 4, __import__("numpy").random.default_rng(0), max_context=20))
    assert all(4 <= t < 10 for t in sample_positions(10, 3, 4, rng, max_context=20))
    assert sample_positions(3, 2, 4, rng, max_context=20) == []
    assert sample_positions(10, 2, 1, rng, allowed=[5], max_context=20) == [5, 5]

    doc = torch.arange(10, 20)
    closed = torch.tensor([[[7, 8, 99, 0], [99, 0, 0, 0]]])  # thought "7 8" + close; empty thought + close
    seqs = build_update_sequences([doc], torch.tensor([0]), torch.tensor([4]), closed, torch.tensor([[3, 1]]),
                                  torch.tensor([[False, True]]), open_id=98, pad_id=0)
    # Row 0: 10 11 12 13 <98> 7 8 99 | x_t = 14
    assert seqs["tokens"][0, :8].tolist() == [10, 11, 12, 13, 98, 7, 8, 99]
    assert seqs["labels"][0, :8].tolist() == [11, 12, 13, 98, 7, 8, 99, 14]
    assert seqs["thought_slot"][0, :3].tolist() == [4, 5, 6]
    assert seqs["target_slot"].tolist() == [7, 5]
    assert seqs["labels"][1, 5].item() == 14
    # A forced close gets no gradient; a sampled close does.
    assert seqs["thought_mask"].tolist() == [[True, True, True, False], [False, False, False, False]]


class _Tok:
    eod = 0

    def token_to_id(self, piece):
        return {"<think>": 1}.get(piece)


@pytest.mark.parametrize("field,value,flag", [
    ("rlp_num_thoughts", 1, "--rlp-num-thoughts"),
    ("rlp_ema_decay", 1.0, "--rlp-ema-decay"),
    ("rlp_ema_decay", 0.0, "--rlp-ema-decay"),
    ("rlp_thought_len", 0, "--rlp-thought-len"),
    ("rlp_positions_per_doc", 0, "--rlp-positions-per-doc"),
    ("rlp_updates_per_batch", 0, "--rlp-updates-per-batch"),
    ("rlp_baseline_interval", 0, "--rlp-baseline-interval"),
])
def test_invalid_flags_are_rejected(field, value, flag):
    config = RLPConfig(**{field: value})
    with pytest.raises(ValueError, match=flag):
        validate_rlp_config(config)


def test_marker_missing_from_tokenizer():
    with pytest.raises(ValueError, match=r"--rlp-think-close '</think>' is not a single token"):
        resolve_markers(RLPConfig(), _Tok())


def test_shared_layout_counts_each_context_once(corpus):
    """With the shared-prefix update the log line's FLOPs use the cost model's shared_prefix
    variant: the update counts each context once plus its G branches (fewer tokens than rows)."""
    from rlp_parity import run_parity

    rows, _ = run_parity(corpus, tp=1, pp=1, layout="rows", with_reference=False)
    shared, _ = run_parity(corpus, tp=1, pp=1, layout="shared", with_reference=False)
    assert shared["layout"] == "shared"
    assert shared["history"]["model_flops"] < rows["history"]["model_flops"]


# ---------------------------------------------------------------------------------------------
# --rlp-reward prefix-match and --rlp-position-filter entropy
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("match_tokens", [1, 3])
def test_prefix_match_matches_reference(corpus, match_tokens):
    """RPT-style reward from fixed predictions (one match per group of 3) at T = 0.7: rewards,
    advantages, loss, gradients, parameters and EMA against the reference's prefix-match."""
    from rlp_parity import run_parity

    mega, ref = run_parity(corpus, tp=1, pp=1, reward="prefix-match", match_tokens=match_tokens)
    check_against_reference(mega, ref)
    rewards = torch.cat([mb["rewards"] for mb in mega["microbatches"]])
    assert set(rewards.tolist()) == {0.0, 1.0}
    assert mega["metrics"]["rlp/reward_mean"] == pytest.approx(1 / 3)
    # Mismatches in the last token still matched N − 1 leading tokens.
    assert mega["metrics"]["rlp/matched_prefix_len"] == pytest.approx((match_tokens + (match_tokens - 1)) / 3)
    assert any(v.abs().max() > 0 for v in mega["grads"].values())
    # The positions leave room for x_t..x_{t+N−1} in the window.
    docs, positions = mega["source"].calls[0]
    assert all(t + match_tokens <= len(d) for d, pos in zip(docs, positions) for t in pos)


@pytest.mark.parametrize("layout", ["shared", "rows"])
def test_sampled_predictions_are_the_policys(corpus, layout):
    """The default prediction source (θ_old at T = 0.7, one forward in the update's layout) draws,
    at every one of the N = 2 slots, the token the reference model draws with the sampler's noise
    given the text before it; its rewards are those of autoregressive decoding; the loss and
    gradients match the reference's; the prediction pass is timed and counted."""
    from megatron_rlp.training import cost_model as cm
    from rlp_parity import reference_predictions, run_parity

    mega, ref = run_parity(corpus, tp=1, pp=1, reward="prefix-match", match_tokens=2, predictions="sampled",
                           layout=layout)
    check_against_reference(mega, ref)  # rewards from the reference's own autoregressive predictions
    call = mega["prediction_calls"][0]
    assert call["temperature"] == 0.7
    got = call["predicted"]
    forced = reference_predictions(ref["model_at_start"], ref["contexts"], mega["source"].thoughts,
                                   _continuations(mega, 2), call["temperature"], call["seed"], feed="text")
    assert got.tolist() == forced
    assert "rlp-prediction" in mega["history"]["timers_ms"]
    source = mega["source"]
    docs, positions = source.calls[0]
    context_lens = [t for pos in positions for t in pos]
    thought_lens = [[len(c) for c in source.thoughts[i]] for i in range(len(context_lens))]
    variant = "shared_prefix" if layout == "shared" else "rows"
    expected = cm.rlp_batch_cost(mega["preset"], context_lens, thought_lens, variant,
                                 teacher_windows=[len(d) - 1 for d in docs], positions_per_doc=2, prediction_tokens=2,
                                 prefill_lens=[max(pos) for pos in positions])
    assert expected.phases["prediction"].model_flops > 0
    assert mega["history"]["model_flops"] == pytest.approx(expected.model_flops, rel=1e-12)


def _continuations(mega, n):
    docs, positions = mega["source"].calls[0]
    return [d[t : t + n].tolist() for d, pos in zip(docs, positions) for t in pos]


def test_entropy_filter_picks_uncertain_positions_every_batch(corpus):
    """--rlp-position-filter entropy: the k positions of each window lie in the top fraction of
    its candidates by the teacher's next-token entropy (computed here with the reference model at
    θ_0 = φ), and the teacher runs although --rlp-baseline-interval would skip this batch."""
    import math

    from rlp_parity import MarkerTokenizer
    from reference.rlp_reference import reference_entropies
    from rlp_parity import run_parity

    frac = 0.25
    mega, ref = run_parity(corpus, tp=1, pp=1, skip_baseline=True, position_filter="entropy",
                           entropy_top_frac=frac)
    assert all("s_ema" in mb for mb in mega["microbatches"])  # the teacher ran
    assert "rlp-teacher" in mega["history"]["timers_ms"]
    objective = mega["objective"]
    docs, positions = mega["source"].calls[0]
    scored = 0
    for doc, pos in zip(docs, positions):
        last = min(len(doc) - 1, objective.max_context)
        cands = list(range(objective.config.rlp_min_context, last + 1))
        per_prefix = reference_entropies(ref["model_at_start"], doc[:last].tolist(), MarkerTokenizer.vocab_size)
        ent = {t: per_prefix[t - 1] for t in cands}  # H(p(· | x_<t))
        keep = max(math.ceil(frac * len(cands)), 2)
        threshold = sorted(ent.values(), reverse=True)[keep - 1]
        assert all(ent[t] >= threshold - 1e-4 for t in pos), (pos, ent)
        assert len(cands) > keep  # the filter excluded something
        scored += len(cands)
    # The teacher's logit rows in the FLOP count are every candidate.
    assert objective._teacher_rows and sum(objective._teacher_rows) == scored
    check_against_reference(mega, ref)  # the update itself is unchanged


@pytest.mark.parametrize("field,value,flag", [
    ("rlp_reward", "prefix", "--rlp-reward"),
    ("rlp_position_filter", "topk", "--rlp-position-filter"),
    ("rlp_reward_match_tokens", 0, "--rlp-reward-match-tokens"),
    ("rlp_entropy_top_frac", 0.0, r"--rlp-entropy-top-frac must lie in \(0, 1\]"),
    ("rlp_entropy_top_frac", 1.5, r"--rlp-entropy-top-frac must lie in \(0, 1\]"),
])
def test_invalid_reward_flags_are_rejected(field, value, flag):
    with pytest.raises(ValueError, match=flag):
        validate_rlp_config(RLPConfig(**{field: value, "rlp_reward": "prefix-match", "rlp_position_filter": "entropy"}
                                      if field.endswith(("tokens", "frac")) else {field: value}))


def test_reward_flags_without_their_mode_are_rejected():
    with pytest.raises(ValueError, match="--rlp-reward-match-tokens 3 applies to --rlp-reward prefix-match"):
        validate_rlp_config(RLPConfig(rlp_reward_match_tokens=3))
    with pytest.raises(ValueError, match="--rlp-entropy-top-frac 0.2 applies to --rlp-position-filter entropy"):
        validate_rlp_config(RLPConfig(rlp_entropy_top_frac=0.2))
    validate_rlp_config(RLPConfig(rlp_reward="prefix-match", rlp_reward_match_tokens=3,
                                  rlp_position_filter="entropy", rlp_entropy_top_frac=0.2))


@pytest.mark.parametrize("flag,value", [("--rlp-reward", "rpt"), ("--rlp-position-filter", "high-entropy")])
def test_unknown_reward_or_filter_name_on_the_command_line(flag, value, capsys):
    from megatron_rlp.pretrain import parse_run_config

    with pytest.raises(SystemExit):
        parse_run_config(["--rlp", flag, value])
    err = capsys.readouterr().err
    assert f"argument {flag}: invalid choice: '{value}'" in err
    run = parse_run_config(["--rlp", "--rlp-reward", "prefix-match", "--rlp-reward-match-tokens", "3",
                            "--rlp-position-filter", "entropy", "--rlp-entropy-top-frac", "0.2"])
    rlp = run.extra["rlp"]
    assert (rlp.rlp_reward, rlp.rlp_reward_match_tokens, rlp.rlp_position_filter, rlp.rlp_entropy_top_frac) == (
        "prefix-match", 3, "entropy", 0.2)


def test_match_tokens_and_top_frac_must_fit_the_budget():
    from megatron_rlp.rlp.config import longest_context, validate_position_filter, validate_rlp_lengths

    # 128 = 3 context + open + 100 thought + close + 23 continuation tokens: N = 24 fits, 25 does not.
    validate_rlp_lengths(128, 4096, 100, 3, target_tokens=24)
    assert longest_context(128, 100, 24) == 3
    with pytest.raises(ValueError, match=r"--rlp-reward-match-tokens 25 is too long for --seq-length 128.*"
                                         r"lower --rlp-reward-match-tokens to at most 24, or raise --seq-length to 129"):
        validate_rlp_lengths(128, 4096, 100, 3, target_tokens=25)
    # A full window of max_context 50, --rlp-min-context 3: 48 candidates; F = 0.05 keeps 3 < k = 4.
    config = RLPConfig(rlp_position_filter="entropy", rlp_entropy_top_frac=0.05, rlp_positions_per_doc=4,
                       rlp_min_context=3)
    with pytest.raises(ValueError, match=r"--rlp-entropy-top-frac 0.05 keeps 3 of the 48 candidate positions.*"
                                         r"fewer than --rlp-positions-per-doc 4; raise --rlp-entropy-top-frac to at "
                                         r"least 0.08333"):
        validate_position_filter(config, 50)
    validate_position_filter(RLPConfig(rlp_position_filter="entropy", rlp_entropy_top_frac=0.07,
                                       rlp_positions_per_doc=4, rlp_min_context=3), 50)
    validate_position_filter(RLPConfig(rlp_entropy_top_frac=0.01, rlp_positions_per_doc=4), 50)  # filter off
