"""RLP's knobs (``--rlp-*`` flags) and their validation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megatron_rlp.config import option
from megatron_rlp.rlp.rewards import POSITION_FILTERS, REWARDS


@dataclass
class RLPConfig:
    rlp_num_thoughts: int = option(16, "G: thoughts sampled per context (group size for the advantage).")
    rlp_thought_len: int = option(
        2048, "Length cap of a thought in tokens; a thought reaching it is closed by force.  Every RLP row "
        "(context + open marker + thought + close marker) fits in --seq-length, so contexts are at most "
        "--seq-length minus this minus 2 tokens."
    )
    rlp_temperature: float = option(
        0.7, "Sampling temperature T of thoughts.  The ratio, the policy gradient, the entropy metric "
        "and the KL term score thought tokens under softmax(logits / T), the policy that drew them; "
        "S_pred and S_ema score x_t at T = 1.  0 (greedy) needs --rlp-untempered-ratio."
    )
    rlp_untempered_ratio: bool = option(
        False, "Score thought tokens at T = 1 in the ratio, the policy gradient, the entropy metric and "
        "the KL term instead of at --rlp-temperature (this project's behaviour before the tempered "
        "ratio; not the policy that sampled them unless T = 1)."
    )
    rlp_positions_per_doc: int = option(1, "k: positions t sampled per document.")
    rlp_min_context: int = option(
        1, "Smallest context length t a position may have; also the overlap of the successive windows "
        "a document longer than the row budget is read in."
    )
    rlp_positions_file: Optional[str] = option(
        None, "JSON list (one entry per document of --data-path, in order) of the positions allowed "
        "for RLP in that document, in document coordinates (each is used in the window that holds it); "
        "default: every position >= --rlp-min-context."
    )
    rlp_valid_positions_file: Optional[str] = option(
        None, "Like --rlp-positions-file, for the documents of --valid-data-path (--eval-interval); "
        "under --split the validation documents take theirs from --rlp-positions-file."
    )
    rlp_ema_decay: float = option(0.999, "τ of the EMA teacher: φ ← τφ + (1−τ)θ after every step.")
    rlp_clip_low: float = option(0.2, "ε_low of the clipped surrogate (ratio floor 1 − ε_low).")
    rlp_clip_high: float = option(0.2, "ε_high of the clipped surrogate (ratio ceiling 1 + ε_high).")
    rlp_kl_beta: float = option(0.0, "β of a KL term toward the initial model (paper: 0).")
    rlp_ntp_weight: float = option(0.0, "λ of a next-token term on the context tokens (paper: 0).")
    rlp_updates_per_batch: int = option(1, "Optimizer steps per sampled batch (θ_old fixed within it).")
    rlp_baseline_interval: int = option(1, "Run the EMA no-think baseline every N sample batches (monitoring only; the update does not depend on it).")
    rlp_think_open: str = option("<think>", "Token that opens a thought.")
    rlp_think_close: str = option("</think>", "Token that closes a thought.")
    rlp_sampler_micro_batch_size: Optional[int] = option(None, "Rows per decode micro-batch in the thought sampler.")
    rlp_reward: str = option(
        "info-gain", "The thought's reward.  info-gain: log p_θ(x_t | x_<t, c) − log p̄_φ(x_t | x_<t), the "
        "paper's.  prefix-match: RPT's sparse reward: after the thought and its close marker the policy "
        "(θ_old, at --rlp-temperature) samples its prediction of the next --rlp-reward-match-tokens "
        "tokens; 1 when they equal the text's continuation x_t.., else 0.",
        choices=["info-gain", "prefix-match"],
    )
    rlp_reward_match_tokens: int = option(
        1, "N for --rlp-reward prefix-match: how many predicted tokens must match x_t..x_{t+N-1}.  "
        "Positions leave room for them: t + N <= window, and the row (context + open + thought + close "
        "+ N - 1 continuation tokens) fits in --seq-length."
    )
    rlp_position_filter: str = option(
        "none", "How the k positions of a window are chosen.  none: uniformly among its candidates.  "
        "entropy: uniformly among the candidates whose EMA teacher's next-token entropy is in the top "
        "--rlp-entropy-top-frac of the window's (RPT's filter); the teacher then scores every batch, "
        "whatever --rlp-baseline-interval says.",
        choices=["none", "entropy"],
    )
    rlp_entropy_top_frac: float = option(
        0.5, "F in (0, 1] for --rlp-position-filter entropy: keep the ceil(F x candidates) positions "
        "of highest teacher entropy per window (at least --rlp-positions-per-doc of them)."
    )
    rlp_update_layout: Optional[str] = option(
        None, "How the update lays out a context's G thoughts.  shared: the context once, its G branches "
        "after it in one packed row (shared-prefix attention; each context is computed once).  rows: one "
        "row (x_<t, <think>, c_i, </think>) per thought (the context recomputed G times).  Default: shared.",
        choices=["rows", "shared"],
    )


def validate_rlp_config(c: RLPConfig) -> None:
    """Reject values outside their ranges, naming the flag and the allowed range."""
    checks = [
        (c.rlp_num_thoughts >= 2, f"--rlp-num-thoughts must be >= 2 (group-relative advantages need two thoughts); got {c.rlp_num_thoughts}"),
        (c.rlp_thought_len >= 1, f"--rlp-thought-len must be >= 1; got {c.rlp_thought_len}"),
        (c.rlp_temperature >= 0, f"--rlp-temperature must be >= 0; got {c.rlp_temperature}"),
        (c.rlp_positions_per_doc >= 1, f"--rlp-positions-per-doc must be >= 1; got {c.rlp_positions_per_doc}"),
        (c.rlp_min_context >= 1, f"--rlp-min-context must be >= 1; got {c.rlp_min_context}"),
        (0.0 < c.rlp_ema_decay < 1.0, f"--rlp-ema-decay must lie in (0, 1); got {c.rlp_ema_decay}"),
        (0.0 <= c.rlp_clip_low < 1.0, f"--rlp-clip-low must lie in [0, 1); got {c.rlp_clip_low}"),
        (c.rlp_clip_high >= 0.0, f"--rlp-clip-high must be >= 0; got {c.rlp_clip_high}"),
        (c.rlp_kl_beta >= 0.0, f"--rlp-kl-beta must be >= 0; got {c.rlp_kl_beta}"),
        (c.rlp_ntp_weight >= 0.0, f"--rlp-ntp-weight must be >= 0; got {c.rlp_ntp_weight}"),
        (c.rlp_updates_per_batch >= 1, f"--rlp-updates-per-batch must be >= 1; got {c.rlp_updates_per_batch}"),
        (c.rlp_baseline_interval >= 1, f"--rlp-baseline-interval must be >= 1; got {c.rlp_baseline_interval}"),
        (c.rlp_reward in REWARDS, f"--rlp-reward must be one of {', '.join(REWARDS)}; got {c.rlp_reward!r}"),
        (c.rlp_position_filter in POSITION_FILTERS,
         f"--rlp-position-filter must be one of {', '.join(POSITION_FILTERS)}; got {c.rlp_position_filter!r}"),
        (c.rlp_reward_match_tokens >= 1,
         f"--rlp-reward-match-tokens must be >= 1 (the number of predicted tokens that must match the "
         f"text); got {c.rlp_reward_match_tokens}"),
        (0.0 < c.rlp_entropy_top_frac <= 1.0,
         f"--rlp-entropy-top-frac must lie in (0, 1] (1 keeps every candidate position); got "
         f"{c.rlp_entropy_top_frac}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    # Flags that only act with another one: silently training something else would be worse.
    if c.rlp_reward != "prefix-match" and c.rlp_reward_match_tokens != 1:
        raise ValueError(
            f"--rlp-reward-match-tokens {c.rlp_reward_match_tokens} applies to --rlp-reward prefix-match "
            f"(this run's reward is {c.rlp_reward}); add --rlp-reward prefix-match or drop the flag"
        )
    if c.rlp_position_filter != "entropy" and c.rlp_entropy_top_frac != RLPConfig.rlp_entropy_top_frac:
        raise ValueError(
            f"--rlp-entropy-top-frac {c.rlp_entropy_top_frac} applies to --rlp-position-filter entropy "
            f"(this run's filter is {c.rlp_position_filter}); add --rlp-position-filter entropy or drop the flag"
        )
    if c.rlp_temperature == 0 and not c.rlp_untempered_ratio:
        raise ValueError(
            "--rlp-temperature 0 (greedy) has no sampling distribution to score thoughts under "
            "(logits / 0), and greedy thoughts are the same in all G branches of a context, so every "
            "advantage is 0; use --rlp-temperature > 0 (the recipe: 0.7), or add --rlp-untempered-ratio "
            "to score greedy thoughts at T = 1"
        )


def policy_inverse_temperature(c: RLPConfig) -> float:
    """1/T of the policy the thought tokens are scored under: the sampling policy softmax(logits / T)
    by default, T = 1 with --rlp-untempered-ratio."""
    return 1.0 if c.rlp_untempered_ratio else 1.0 / c.rlp_temperature


def resolve_update_layout(layout: Optional[str], family: str) -> str:
    """--rlp-update-layout for a model family ('gpt' or 'hybrid'): the default, or a clear error."""
    if layout is None:
        return "shared"
    if layout not in ("rows", "shared"):
        raise ValueError(f"--rlp-update-layout must be rows or shared; got {layout!r}")
    return layout


def longest_context(seq_length: int, thought_len: int, target_tokens: int = 1) -> int:
    """The longest context x_<t an RLP row of ``seq_length`` input tokens has room for: the row's
    inputs are x_<t, the open marker, up to ``thought_len`` thought tokens and the close marker
    (x_t is the last label, as the (seq_length + 1)-th token of a next-token sample is), and with
    ``target_tokens`` N > 1 (prefix-match) the continuation x_t..x_{t+N−2} fed after the close."""
    return seq_length - thought_len - 2 - (target_tokens - 1)


def target_tokens_of(c: RLPConfig) -> int:
    """Tokens of the text after x_<t that a position needs: x_t, or x_t..x_{t+N−1} for prefix-match."""
    return c.rlp_reward_match_tokens if c.rlp_reward == "prefix-match" else 1


def validate_rlp_lengths(
    seq_length: int,
    max_position_embeddings: int,
    thought_len: int,
    min_context: int,
    thought_flag: str = "--rlp-thought-len",
    context_flag: str = "--rlp-min-context",
    target_tokens: int = 1,
) -> None:
    """--seq-length is the budget of every RLP row: it must hold the shortest context, the
    markers and a whole thought (and, for prefix-match with ``target_tokens`` N > 1, the N − 1
    continuation tokens fed after the close), and the model must take sequences that long."""
    if seq_length > max_position_embeddings:
        raise ValueError(
            f"--seq-length {seq_length} exceeds the model's maximum sequence length "
            f"(max_position_embeddings = {max_position_embeddings}); lower --seq-length"
        )
    if longest_context(seq_length, thought_len) < min_context:
        raise ValueError(
            f"--seq-length {seq_length} cannot hold an RLP row: {context_flag} {min_context} context "
            f"tokens + the open marker + {thought_flag} {thought_len} thought tokens + the close marker "
            f"= {min_context + thought_len + 2} input tokens (x_t is the last label); raise --seq-length "
            f"to at least {min_context + thought_len + 2} or lower {thought_flag} / {context_flag}"
        )
    if longest_context(seq_length, thought_len, target_tokens) < min_context:
        need = min_context + thought_len + 2 + target_tokens - 1
        raise ValueError(
            f"--rlp-reward-match-tokens {target_tokens} is too long for --seq-length {seq_length}: a "
            f"prefix-match row feeds {context_flag} {min_context} context tokens + the open marker + "
            f"{thought_flag} {thought_len} thought tokens + the close marker + {target_tokens - 1} "
            f"continuation tokens = {need} input tokens; lower --rlp-reward-match-tokens to at most "
            f"{seq_length - thought_len - 1 - min_context}, or raise --seq-length to {need}"
        )


def validate_position_filter(c: RLPConfig, max_context: int) -> None:
    """--rlp-entropy-top-frac must leave at least k = --rlp-positions-per-doc candidates in a full
    window (``max_context`` − --rlp-min-context + 1 candidates)."""
    if c.rlp_position_filter != "entropy":
        return
    candidates = max_context - c.rlp_min_context + 1
    kept = math.ceil(c.rlp_entropy_top_frac * candidates - 1e-9)
    if kept < c.rlp_positions_per_doc:
        raise ValueError(
            f"--rlp-entropy-top-frac {c.rlp_entropy_top_frac} keeps {kept} of the {candidates} candidate "
            f"positions of a full window, fewer than --rlp-positions-per-doc {c.rlp_positions_per_doc}; "
            f"raise --rlp-entropy-top-frac to at least {c.rlp_positions_per_doc / candidates:.4g} or lower "
            f"--rlp-positions-per-doc"
        )


def resolve_markers(c: RLPConfig, tokenizer) -> tuple[int, int]:
    """Token ids of the thought markers; each must be a single token of the tokenizer."""
    ids = []
    for flag, piece in (("--rlp-think-open", c.rlp_think_open), ("--rlp-think-close", c.rlp_think_close)):
        idx = tokenizer.token_to_id(piece)
        if idx is None:
            raise ValueError(
                f"{flag} {piece!r} is not a single token of the tokenizer; train the tokenizer with it "
                "as a user-defined symbol (megatron_rlp.data.tokenizer.train_sentencepiece does) or "
                f"pick a marker the vocabulary has"
            )
        ids.append(idx)
    if ids[0] == ids[1]:
        raise ValueError("--rlp-think-open and --rlp-think-close must be different tokens")
    return ids[0], ids[1]
