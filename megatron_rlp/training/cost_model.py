"""The one cost model of a training iteration: FLOPs by phase and memory per GPU by pipeline stage.

Used by the log line's TFLOP/s (:func:`rlp_batch_cost` of the actual batch, :func:`ntp_iteration_cost`;
model FLOPs of every phase), ``tools/bench_rlp.py --analytic``, the dry run and the FLOP-matched
comparisons.  Pure arithmetic on a :class:`ModelPreset`; no torch.

What is exact and what is an estimate
-------------------------------------
* **Parameter counts** (:func:`stage_parameters`) are exact: they follow megatron-core 0.16.1's
  modules (GPTModel / MambaModel with this project's specs) per pipeline stage and tensor-parallel
  rank, and the unit and distributed tests compare them with built models.
* **FLOPs** are analytic counts of matrix multiplies (2 FLOPs per multiply-add) plus the Mamba
  convolution and scan; norms, activations, RoPE, softmax, sampling and the loss are not counted
  (they are a few percent at most).  The Mamba scan is counted in its recurrent form
  (``MAMBA_SCAN_FLOPS`` per d_inner x d_state element per token); the chunked SSD kernel used in
  training does somewhat different work, so that term is an estimate (about 2 % of a Mamba layer at
  12B).  Optimizer and EMA FLOPs are per-parameter estimates.
* **Memory** for weights, gradients, optimizer states and the EMA teacher is exact bytes for the
  parameter counts (buffer padding and allocator fragmentation aside).  Activation and
  sampler-cache memory are estimates (see :func:`stage_memory`).

FLOP formulas (per token, forward; h hidden, V vocabulary, q = heads x kv_channels, kv = groups x
kv_channels, f FFN width, x2 for SwiGLU's fc1; Mamba: d_i = heads x head_dim, g groups, n state):

* attention layer: 2h(q + 2kv) + 2qh dense, plus 4q per attended key (QK^T and AV);
* MLP: 2hf(2 if SwiGLU else 1) + 2fh;
* Mamba layer: 2h(2d_i + 2gn + heads) in_proj + 2(d_i + 2gn)·d_conv conv
  + MAMBA_SCAN_FLOPS·d_i·n scan + 2d_i·h out_proj;
* output layer: 2hV per row whose logits are computed.

Attention counts the keys each query actually attends: s(s+1)/2 for a causal sequence of s tokens
(Megatron-LM's current formula counts s²/2), a cached decode step at position p attends p + 1 keys.

**Model FLOPs** count forward + backward = 3 x forward of the work a phase needs on real tokens
(Megatron-LM's TFLOP/s convention).  They are what the log line's TFLOP/s/GPU divides by time
(:func:`rlp_batch_cost` of the actual batch), what ``tools/bench_rlp.py`` reports per phase and
what its ``flops_ratio`` / ``flops_ratio_straightforward`` compare.  **Hardware FLOPs** add what
recomputation re-runs: the whole update forward with ``recompute="full"``, the core attention
(QK^T, AV) with ``"selective"``; the dry run prints them next to the model FLOPs and
``bench_rlp.py --analytic --recompute`` prints them; no throughput figure uses them.

Padding is in neither (the work the iteration needs, not the shapes it runs in): not the update
micro-batches' padding to their widest row, not the sampler's prefill padded to the longest
document of its micro-batch, finished rows that decode on until their micro-batch stops, or the
masked-out work of the "tree" decode layout.  :func:`padded_update_cost` is the exception: the
update as executed with its padding, for ``bench_rlp.py --analytic``'s ratios against the padded
rows layouts.  The output layer is counted on the rows the code sends through it, which are real
slots only (the RLP step drops IGNORE targets before the fused kernel): thought tokens, close
marker and x_t in the update (plus the context slots with --rlp-ntp-weight > 0), the k positions
in the teacher, one row per decode step in the sampler; next-token iterations count every token
(Megatron-LM's formula puts logits on every token).  The sampler prefills a document once for all
its k positions (``prefill_lens``), the straightforward baseline every thought.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from megatron_rlp.models.presets import ModelPreset

__all__ = [
    "VARIANTS", "PHASES", "RLPSettings", "ThoughtLengths", "Layout", "PhaseCost", "IterationCost", "Work",
    "layer_kinds", "stage_layer_kinds", "stage_parameters", "total_parameters",
    "forward_flops", "rlp_iteration_cost", "rlp_batch_cost", "padded_update_cost", "ntp_iteration_cost",
    "training_flops",
    "StageMemory", "stage_memory",
]

VARIANTS = ("shared_prefix", "rows", "straightforward")
PHASES = ("teacher", "sampling_prefill", "sampling_decode", "prediction", "scoring", "update", "optimizer", "ema")

MAMBA_D_CONV = 4        # megatron MambaMixer's default d_conv (the presets do not change it)
MAMBA_SCAN_FLOPS = 6    # per d_inner x d_state element per token: decay, dt·B·x, add, C·h (2)
ADAM_FLOPS_PER_PARAM = 12  # estimate: moments, bias correction, sqrt, divide, weight decay, update
EMA_FLOPS_PER_PARAM = 3    # φ ← τφ + (1 − τ)θ
GRAD_BYTES = 4          # the loop's DDP buffer is fp32 (grad_reduce_in_fp32=True)

# Layer kinds: "T" a GPT transformer layer (attention + MLP); hybrid "M" Mamba, "*" attention, "-" MLP.
_GPT_LAYER = "T"


# ---------------------------------------------------------------------------------------------
# Layers and stages
# ---------------------------------------------------------------------------------------------
def layer_kinds(preset: ModelPreset) -> str:
    """One symbol per layer: "T" for each GPT layer, the hybrid pattern for a hybrid preset."""
    if preset.family == "gpt":
        return _GPT_LAYER * preset.num_layers
    if preset.family == "hybrid":
        if not preset.hybrid_pattern or len(preset.hybrid_pattern) != preset.num_layers:
            raise ValueError(f"hybrid preset {preset.name!r} needs a hybrid_pattern of {preset.num_layers} layers")
        return preset.hybrid_pattern
    raise ValueError(f"unknown model family {preset.family!r} in preset {preset.name!r}")


def stage_layer_kinds(preset: ModelPreset, pp: int, first: Optional[int] = None,
                      last: Optional[int] = None) -> list[str]:
    """The layers of each pipeline stage, split as megatron-core splits them (even split, or
    ``--decoder-first/last-pipeline-num-layers`` with the rest spread evenly over the middle)."""
    kinds = layer_kinds(preset)
    n = len(kinds)
    if pp < 1:
        raise ValueError(f"--pipeline-model-parallel-size must be >= 1; got {pp}")
    if first is None and last is None:
        if n % pp:
            raise ValueError(
                f"--pipeline-model-parallel-size {pp} does not divide the {n} layers of {preset.name!r}; "
                "set --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers"
            )
        counts = [n // pp] * pp
    else:
        if pp < 2:
            raise ValueError("uneven first/last pipeline stage layers need --pipeline-model-parallel-size >= 2")
        middle_stages = pp - (first is not None) - (last is not None)
        middle_layers = n - (first or 0) - (last or 0)
        if middle_layers < 0 or (middle_stages == 0 and middle_layers) or (
            middle_stages and middle_layers % middle_stages
        ):
            raise ValueError(
                f"first/last stage layers ({first}, {last}) leave {middle_layers} of the {n} layers of "
                f"{preset.name!r} for {middle_stages} middle stage(s): they must divide evenly"
            )
        per_middle = middle_layers // middle_stages if middle_stages else 0
        counts = [per_middle] * pp
        if first is not None:
            counts[0] = first
        if last is not None:
            counts[-1] = last
    bounds = list(itertools.accumulate([0] + counts))
    return [kinds[a:b] for a, b in zip(bounds, bounds[1:])]


def _dims(p: ModelPreset) -> dict:
    d_inner = p.mamba_num_heads * p.mamba_head_dim
    return dict(
        h=p.hidden_size, f=p.ffn_hidden_size, V=p.vocab_size,
        q=p.num_attention_heads * p.kv_channels, kv=p.num_query_groups * p.kv_channels,
        f_in=p.ffn_hidden_size * (2 if p.activation == "swiglu" else 1),
        di=d_inner, gn=p.mamba_num_groups * p.mamba_state_dim, nh=p.mamba_num_heads,
        n=p.mamba_state_dim, conv=d_inner + 2 * p.mamba_num_groups * p.mamba_state_dim,
    )


def _check_tp(preset: ModelPreset, tp: int) -> None:
    divisible = {
        "attention heads": preset.num_attention_heads, "KV groups": preset.num_query_groups,
        "vocabulary": preset.vocab_size, "FFN width": preset.ffn_hidden_size,
    }
    if preset.family == "hybrid":
        divisible.update({"Mamba heads": preset.mamba_num_heads, "Mamba groups": preset.mamba_num_groups})
    bad = [f"{name} ({value})" for name, value in divisible.items() if value % tp]
    if tp < 1 or bad:
        raise ValueError(f"--tensor-model-parallel-size {tp} does not divide the {', '.join(bad) or 'model'} "
                         f"of {preset.name!r}")


def _layer_parameters(p: ModelPreset, kind: str, tp: int) -> int:
    """Parameters of one layer on one tensor-parallel rank (norms are replicated on every rank)."""
    d = _dims(p)
    h = d["h"]
    attention = (h * (d["q"] + 2 * d["kv"]) + d["q"] * h) // tp + (2 * p.kv_channels if p.qk_layernorm else 0)
    mlp = (h * d["f_in"] + d["f"] * h) // tp
    if kind == _GPT_LAYER:
        return h + attention + h + mlp  # input norm, attention, pre-MLP norm, MLP
    if kind == "*":
        return h + attention
    if kind == "-":
        return h + mlp
    if kind == "M":
        in_proj = h * (2 * d["di"] + 2 * d["gn"] + d["nh"]) // tp
        conv = (d["conv"] // tp) * (MAMBA_D_CONV + 1)  # depthwise weight + bias
        per_head = 3 * d["nh"] // tp                   # A_log, D, dt_bias
        gated_norm = d["di"] // tp
        out_proj = d["di"] * h // tp
        return h + in_proj + conv + per_head + gated_norm + out_proj
    raise ValueError(f"unknown layer kind {kind!r}")


def stage_parameters(preset: ModelPreset, tp: int = 1, pp: int = 1, first: Optional[int] = None,
                     last: Optional[int] = None) -> list[int]:
    """Exact parameter count of one tensor-parallel rank of each pipeline stage (megatron-core).

    The first stage holds the (vocab-parallel) embedding, the last the final norm and the output
    layer; with tied embeddings and PP > 1 the last stage keeps its own copy of the output weight
    (megatron synchronises it with the embedding), so it is counted on both stages.
    """
    _check_tp(preset, tp)
    emb = preset.vocab_size // tp * preset.hidden_size
    counts = []
    stages = stage_layer_kinds(preset, pp, first, last)
    for s, kinds in enumerate(stages):
        n = sum(_layer_parameters(preset, k, tp) for k in kinds)
        if s == 0:
            n += emb
        if s == len(stages) - 1:
            n += preset.hidden_size  # final norm
            if not (preset.tie_embeddings and s == 0):
                n += emb
        counts.append(n)
    return counts


def total_parameters(preset: ModelPreset) -> int:
    """Parameters of the whole model at TP=1, PP=1 (tied embeddings counted once)."""
    return stage_parameters(preset)[0]


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Work:
    """What one forward pass does: ``tokens`` through every layer, ``keys`` attended keys summed
    over those tokens (per attention layer), ``logit_rows`` rows through the output layer."""

    tokens: float = 0.0
    keys: float = 0.0
    logit_rows: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.tokens + other.tokens, self.keys + other.keys, self.logit_rows + other.logit_rows)

    def __mul__(self, k: float) -> "Work":
        return Work(self.tokens * k, self.keys * k, self.logit_rows * k)

    __rmul__ = __mul__


def _layer_dense_flops(p: ModelPreset, kind: str) -> float:
    """Forward FLOPs per token of a layer, without the attention over keys."""
    d = _dims(p)
    h = d["h"]
    attention = 2 * h * (d["q"] + 2 * d["kv"]) + 2 * d["q"] * h
    mlp = 2 * h * d["f_in"] + 2 * d["f"] * h
    if kind == _GPT_LAYER:
        return attention + mlp
    if kind == "*":
        return attention
    if kind == "-":
        return mlp
    if kind == "M":
        return (2 * h * (2 * d["di"] + 2 * d["gn"] + d["nh"]) + 2 * d["conv"] * MAMBA_D_CONV
                + MAMBA_SCAN_FLOPS * d["di"] * d["n"] + 2 * d["di"] * h)
    raise ValueError(f"unknown layer kind {kind!r}")


def _attention_layers(kinds: str) -> int:
    return sum(k in (_GPT_LAYER, "*") for k in kinds)


def forward_flops(preset: ModelPreset, work: Work) -> float:
    """Forward FLOPs of ``work`` through the whole model."""
    kinds = layer_kinds(preset)
    dense = sum(_layer_dense_flops(preset, k) for k in kinds)
    q = preset.num_attention_heads * preset.kv_channels
    return (work.tokens * dense + _attention_layers(kinds) * 4 * q * work.keys
            + work.logit_rows * 2 * preset.hidden_size * preset.vocab_size)


def _core_attention_flops(preset: ModelPreset, work: Work) -> float:
    q = preset.num_attention_heads * preset.kv_channels
    return _attention_layers(layer_kinds(preset)) * 4 * q * work.keys


def _causal(s: float) -> float:
    """Keys attended by a causal sequence of s tokens (each token sees itself and its past)."""
    return s * (s + 1) / 2


def _suffix(prefix: float, s: float) -> float:
    """Keys attended by s tokens that follow ``prefix`` cached/visible tokens."""
    return s * prefix + _causal(s)


@dataclass(frozen=True)
class RLPSettings:
    """The shape of one RLP iteration.

    ``contexts``: B·k contexts per iteration over all data-parallel ranks (the paper: 512).
    ``context_len``: C, or a list of context lengths taken as equally likely (attention is
    quadratic, so a distribution is not its mean).  ``thought_len``: L, tokens of a thought before
    its close marker, or a list (equally likely, independent of C).  ``window_len``: tokens of the
    EMA teacher's forward per document (default: the context length, i.e. the shortest window
    that holds x_t).  ``positions_per_doc``: k
    (documents = contexts / k).  ``baseline_interval``: the teacher runs every N sample batches;
    ``updates_per_batch``: U optimizer steps per sample batch (sampling is amortised over them).
    ``prediction_tokens``: N of --rlp-reward prefix-match (0: the information-gain reward, no
    prediction pass).  ``teacher_rows_per_doc``: logit rows of the teacher per document (default
    ``positions_per_doc``; the entropy position filter scores every candidate).
    ``thought_len`` may also be a :class:`ThoughtLengths` distribution (values with probabilities).
    ``ntp`` / ``kl_reference``: --rlp-ntp-weight > 0 / --rlp-kl-beta > 0 (see :func:`_context_work`).
    The sampling temperature does not change any FLOP count and is not an input.
    """

    contexts: int
    context_len: Union[int, Sequence[int]]
    num_thoughts: int
    thought_len: Union[float, Sequence[float], "ThoughtLengths"]
    positions_per_doc: int = 1
    window_len: Optional[int] = None
    baseline_interval: int = 1
    updates_per_batch: int = 1
    prediction_tokens: int = 0
    teacher_rows_per_doc: Optional[int] = None
    ntp: bool = False
    kl_reference: bool = False

    def __post_init__(self):
        cs, ls = self.context_lens, self.thought_lens
        problems = []
        if self.contexts < 1:
            problems.append(f"contexts must be >= 1; got {self.contexts}")
        if self.num_thoughts < 1:
            problems.append(f"num_thoughts (G) must be >= 1; got {self.num_thoughts}")
        if not cs or min(cs) < 1:
            problems.append(f"context lengths must be >= 1; got {self.context_len}")
        if not ls or min(ls) < 0:
            problems.append(f"thought lengths must be >= 0; got {self.thought_len}")
        if self.positions_per_doc < 1 or self.baseline_interval < 1 or self.updates_per_batch < 1:
            problems.append("positions_per_doc, baseline_interval and updates_per_batch must be >= 1")
        if self.prediction_tokens < 0:
            problems.append(f"prediction_tokens must be >= 0; got {self.prediction_tokens}")
        if problems:
            raise ValueError("invalid RLP settings: " + "; ".join(problems))

    @property
    def context_lens(self) -> tuple:
        return tuple(self.context_len) if isinstance(self.context_len, (list, tuple)) else (self.context_len,)

    @property
    def thought_lens(self) -> tuple:
        if isinstance(self.thought_len, ThoughtLengths):
            return self.thought_len.values
        return tuple(self.thought_len) if isinstance(self.thought_len, (list, tuple)) else (self.thought_len,)

    @property
    def thought_probs(self) -> tuple:
        if isinstance(self.thought_len, ThoughtLengths):
            return self.thought_len.probs
        n = len(self.thought_lens)
        return (1.0 / n,) * n

    @property
    def thought_distribution(self) -> "ThoughtLengths":
        return ThoughtLengths(tuple(self.thought_lens), tuple(self.thought_probs))


@dataclass(frozen=True)
class ThoughtLengths:
    """A distribution of thought lengths (tokens before the close marker): ``values`` with
    probabilities ``probs``."""

    values: tuple
    probs: tuple

    def __post_init__(self):
        if len(self.values) != len(self.probs) or not self.values or abs(sum(self.probs) - 1.0) > 1e-9:
            raise ValueError("ThoughtLengths needs as many probabilities as values, summing to 1")

    @classmethod
    def fixed(cls, length: float) -> "ThoughtLengths":
        return cls((length,), (1.0,))

    @classmethod
    def capped_geometric(cls, mean: float, cap: int) -> "ThoughtLengths":
        """The sampler's lengths under a constant close probability p per sampled token (a
        memoryless policy): L = u < cap with probability (1−p)^u p, L = cap (close forced) with
        (1−p)^cap.  p is set so that E[L] = ``mean``; ``mean`` = cap puts every thought at the cap."""
        if not 0 <= mean <= cap or cap < 1:
            raise ValueError(f"a mean thought length of {mean} needs 0 <= mean <= cap ({cap})")
        if mean >= cap:
            return cls.fixed(cap)

        def mean_of(p: float) -> float:  # E[L] = q (1 − q^cap) / p, decreasing in p
            q = 1.0 - p
            return q * (1.0 - q ** cap) / p

        lo, hi = 1e-12, 1.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if mean_of(mid) > mean else (lo, mid)
        p = 0.5 * (lo + hi)
        q = 1.0 - p
        probs = [q ** u * p for u in range(cap)] + [q ** cap]
        return cls(tuple(range(cap + 1)), tuple(probs))

    @property
    def mean(self) -> float:
        return sum(v * p for v, p in zip(self.values, self.probs))

    def cdf(self) -> list:
        out, acc = [], 0.0
        for p in self.probs:
            acc += p
            out.append(min(acc, 1.0))
        return out

    def max_of(self, n: int) -> "ThoughtLengths":
        """The distribution of the largest of ``n`` independent draws."""
        order = sorted(range(len(self.values)), key=lambda i: self.values[i])
        values = [self.values[i] for i in order]
        probs, acc, below = [], 0.0, 0.0
        for i in order:
            acc = min(acc + self.probs[i], 1.0)
            probs.append(acc ** n - below)
            below = acc ** n
        total = sum(probs)
        return ThoughtLengths(tuple(values), tuple(p / total for p in probs))

    def expect(self, f) -> float:
        return sum(p * f(v) for v, p in zip(self.values, self.probs))


def _context_work(variant: str, c: float, branch_lens: Sequence[float], ntp: bool = False,
                  kl_reference: bool = False, prediction_tokens: int = 0) -> dict[str, Work]:
    """Forward work of one context and its branches (thought lengths ``branch_lens``) per phase.

    Branch inputs are open marker, L thought tokens, close marker (L + 2 tokens); x_t is a label.
    Sampling feeds the open marker and the L thought tokens (the close is sampled, not fed).
    Prefix-match (``prediction_tokens`` N > 0) adds a forward-only pass in the update's layout over
    the branches fed N − 1 continuation tokens more, with logits at N rows per branch.
    Logit rows are those the code sends through the output layer: in the update the L + 1 thought
    slots (tokens and close) and x_t's slot of each branch (padded slots and the context are
    skipped); with ``ntp`` (--rlp-ntp-weight > 0) also the t context slots of every row the update
    runs (once per context in the shared layout, once per thought in the rows layout).
    ``kl_reference`` (--rlp-kl-beta > 0): a forward of the update's rows under the frozen reference,
    logits at the thought slots, counted in "scoring".
    """
    prefill, decode, scoring, update, prediction = Work(), Work(), Work(), Work(), Work()
    if variant != "straightforward":
        prefill = Work(c, _causal(c), 0)  # one prefill per context, branches decode over its cache
    if variant == "shared_prefix":
        update = Work(c, _causal(c), 0)   # the context once; branches attend [its K/V; their own]
        if prediction_tokens:
            prediction = Work(c, _causal(c), 0)
    for l in branch_lens:
        if prediction_tokens:
            fed = l + 2 + prediction_tokens - 1
            prediction += (Work(fed, _suffix(c, fed), prediction_tokens) if variant == "shared_prefix"
                           else Work(c + fed, _causal(c + fed), prediction_tokens))
        branch = l + 2
        if variant == "straightforward":
            prefill += Work(c + 1, _causal(c + 1), 1)           # x_<t + open, per thought
            decode += Work(l, _suffix(c + 1, l), l)
            scoring += Work(c + branch, _causal(c + branch), 1)  # S_pred in its own pass
        else:
            decode += Work(l + 1, _suffix(c, l + 1), l + 1)
        if variant == "shared_prefix":
            update += Work(branch, _suffix(c, branch), branch)
        else:
            update += Work(c + branch, _causal(c + branch), branch + (c if ntp else 0))
    if ntp and variant == "shared_prefix":
        update += Work(0, 0, c)
    if kl_reference:
        scoring += Work(update.tokens, update.keys, sum(l + 1 for l in branch_lens))
    return {"sampling_prefill": prefill, "sampling_decode": decode, "prediction": prediction, "scoring": scoring,
            "update": update}


@dataclass(frozen=True)
class PhaseCost:
    model_flops: float
    hardware_flops: float
    tokens: float  # tokens through the model (forward passes; the update's counted once)


@dataclass
class IterationCost:
    phases: dict[str, PhaseCost] = field(default_factory=dict)

    @property
    def model_flops(self) -> float:
        return sum(p.model_flops for p in self.phases.values())

    @property
    def hardware_flops(self) -> float:
        return sum(p.hardware_flops for p in self.phases.values())


def _check_recompute(recompute: str) -> None:
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute must be 'none', 'selective' or 'full' (--recompute-granularity); got {recompute!r}")


def _train_phase(preset: ModelPreset, work: Work, recompute: str) -> PhaseCost:
    fwd = forward_flops(preset, work)
    extra = {"none": 0.0, "selective": _core_attention_flops(preset, work), "full": fwd}[recompute]
    return PhaseCost(3 * fwd, 3 * fwd + extra, work.tokens)


def _parameter_phases(preset: ModelPreset) -> dict[str, PhaseCost]:
    n = total_parameters(preset)
    return {"optimizer": PhaseCost(ADAM_FLOPS_PER_PARAM * n, ADAM_FLOPS_PER_PARAM * n, 0),
            "ema": PhaseCost(EMA_FLOPS_PER_PARAM * n, EMA_FLOPS_PER_PARAM * n, 0)}


def rlp_iteration_cost(preset: ModelPreset, settings: RLPSettings, variant: str = "rows",
                       recompute: str = "none") -> IterationCost:
    """FLOPs of one RLP iteration (one optimizer step), whole job (all GPUs), by phase.

    ``variant``: "shared_prefix" (each context once in the update, followed by its G branches,
    which attend to [shared context K/V; their own]); "rows" (today: one row per thought in the
    update, shared prefill in the sampler, S_pred from the update forward); "straightforward" (one
    sequence per thought re-prefilled for sampling, a separate S_pred scoring pass, one row per
    thought in the update).  The teacher (forward over each document's window, logits at its k
    positions) is the same in all three.
    """
    _check_variant(variant, recompute)
    s = settings
    mean = {k: Work() for k in _FORWARD_PHASES + ("update",)}
    # Every per-branch term is linear in the branch's own work, so G branches of length l weighted
    # by P(l) is the expectation over independent lengths.
    for c in s.context_lens:
        for l, p in zip(s.thought_lens, s.thought_probs):
            for k, w in _context_work(variant, c, [l] * s.num_thoughts, s.ntp, s.kl_reference,
                                      s.prediction_tokens).items():
                mean[k] = mean[k] + w * (p / len(s.context_lens))
    if variant != "straightforward" and s.positions_per_doc > 1:
        # The sampler prefills a document once, up to the largest of its k positions.
        longest = ThoughtLengths(s.context_lens, (1.0 / len(s.context_lens),) * len(s.context_lens))
        longest = longest.max_of(s.positions_per_doc)
        mean["sampling_prefill"] = Work(longest.mean, longest.expect(_causal), 0) * (1.0 / s.positions_per_doc)
    teacher = Work()
    rows = s.teacher_rows_per_doc if s.teacher_rows_per_doc is not None else s.positions_per_doc
    for c in s.context_lens:  # one forward per document over its window, logits at its k positions
        w = s.window_len if s.window_len is not None else c
        teacher = teacher + Work(w, _causal(w), rows) * (1.0 / len(s.context_lens))
    per_batch = s.contexts / s.updates_per_batch  # sampling and teacher amortised over U steps
    forward = {"teacher": teacher * (per_batch / s.positions_per_doc / s.baseline_interval)}
    forward.update({k: mean[k] * per_batch for k in _FORWARD_PHASES})
    return _assemble(preset, forward, mean["update"] * s.contexts, recompute)


def rlp_batch_cost(preset: ModelPreset, context_lens: Sequence[int], thought_lens: Sequence[Sequence[int]],
                   variant: str = "rows", recompute: str = "none", teacher_windows: Sequence[int] = (),
                   positions_per_doc: int = 1, sampled: bool = True, teacher_rows: Optional[Sequence[int]] = None,
                   prediction_tokens: int = 0, prefill_lens: Optional[Sequence[int]] = None,
                   ntp: bool = False, kl_reference: bool = False) -> IterationCost:
    """FLOPs of one iteration over an actual batch, real tokens only (no padding).

    ``context_lens[i]``: t of context i; ``thought_lens[i]``: the sampled lengths (before the close
    marker) of its G thoughts.  ``teacher_windows``: tokens of each document the teacher scored in
    this iteration (empty when it did not run), with ``positions_per_doc`` logit rows each, or
    ``teacher_rows[i]`` (the entropy filter scores every candidate position).
    ``sampled=False`` for a reused sample batch (--rlp-updates-per-batch > 1): no sampling cost.
    ``prediction_tokens``: N of the prefix-match reward's prediction pass (0: none).
    ``prefill_lens``: tokens of each document's sampler prefill, its largest position (the sampler
    prefills a document once for all its k positions); default each context's own t.  Not used
    by "straightforward", which prefills every thought.  ``ntp``, ``kl_reference``: see
    :func:`_context_work`.
    """
    _check_variant(variant, recompute)
    if len(context_lens) != len(thought_lens):
        raise ValueError(f"{len(context_lens)} context lengths but {len(thought_lens)} lists of thought lengths")
    work = {k: Work() for k in _FORWARD_PHASES + ("update",)}
    for c, branch_lens in zip(context_lens, thought_lens):
        for k, w in _context_work(variant, c, branch_lens, ntp, kl_reference, prediction_tokens).items():
            work[k] = work[k] + w
    if prefill_lens is not None and variant != "straightforward":
        work["sampling_prefill"] = sum((Work(p, _causal(p), 0) for p in prefill_lens), Work())
    rows = teacher_rows if teacher_rows is not None else [positions_per_doc] * len(teacher_windows)
    forward = {"teacher": sum((Work(w, _causal(w), r) for w, r in zip(teacher_windows, rows)), Work())}
    forward.update({k: work[k] * (1.0 if sampled else 0.0) for k in _FORWARD_PHASES})
    return _assemble(preset, forward, work["update"], recompute)


def padded_update_cost(preset: ModelPreset, settings: RLPSettings, variant: str, contexts_per_group: int,
                       recompute: str = "none") -> PhaseCost:
    """The update phase as executed with padding: expected FLOPs per iteration (whole job) when
    the rows of every group of ``contexts_per_group`` contexts are padded to the group's widest —
    a micro-batch's contexts (today's layouts) or a rank's whole step (the path before issue 12).
    Context and thought lengths are independent draws from ``settings``' distributions (integers).

    * rows / straightforward: each thought's row (t + L + 2 inputs) padded to the widest of the
      group's rows; a padded slot runs through every layer and the causal attention like a real
      one (megatron's kernels do not skip it);
    * shared_prefix: each packed row (t + Σ(L_i + 2)) padded to the group's widest (padded slots
      run through the dense layers; the shared attention skips them), and inside the attention
      every branch padded to the group's longest (the [G, longest] query blocks of
      megatron_rlp.models.shared_prefix).

    Attention is counted causally in both (the keys a query may see).  The output layer runs on
    real slots only (rlp_loss_func skips IGNORE targets), so logit rows are not padded.
    ``hardware_flops`` adds recompute as :func:`rlp_iteration_cost` does.
    """
    import numpy as np

    _check_variant(variant, recompute)
    if contexts_per_group < 1:
        raise ValueError(f"contexts_per_group must be >= 1; got {contexts_per_group}")
    s, g = settings, settings.num_thoughts

    def pmf(values, probs):
        if any(float(v) != int(v) or v < 0 for v in values):
            raise ValueError(f"the padded update needs whole, non-negative lengths; got {values}")
        out = np.zeros(int(max(values)) + 1)
        for v, p in zip(values, probs):
            out[int(v)] += p
        return out

    def largest(p, n):  # pmf of the largest of n independent draws
        cdf = np.minimum(np.cumsum(p), 1.0) ** n
        return np.diff(cdf, prepend=0.0)

    def expect(p, f):
        return float(np.sum(p * f(np.arange(len(p), dtype=np.float64))))

    def shifted(p, k):  # the pmf of X + k
        return np.concatenate([np.zeros(k), p])

    causal = lambda x: x * (x + 1) / 2  # noqa: E731
    context = pmf(s.context_lens, (1.0 / len(s.context_lens),) * len(s.context_lens))
    thought = pmf(s.thought_lens, s.thought_probs)
    mean_c, mean_l = expect(context, lambda x: x), expect(thought, lambda x: x)
    logits = g * (mean_l + 2) + ((mean_c if variant == "shared_prefix" else g * mean_c) if s.ntp else 0.0)
    if variant == "shared_prefix":
        branch = shifted(thought, 2)
        size = g * (len(branch) - 1) + 1
        branches = np.fft.irfft(np.fft.rfft(branch, size) ** g, size)  # Σ of G branch lengths
        branches = np.clip(branches, 0.0, None)
        row = np.convolve(context, branches / branches.sum())
        width = largest(row, contexts_per_group)
        longest = shifted(largest(thought, contexts_per_group * g), 2)
        tokens = expect(width, lambda x: x)
        keys = expect(context, causal) + g * (expect(longest, lambda x: x) * mean_c + expect(longest, causal))
    else:
        width = largest(shifted(np.convolve(context, thought), 2), contexts_per_group * g)
        tokens, keys = g * expect(width, lambda x: x), g * expect(width, causal)
    return _train_phase(preset, Work(tokens, keys, logits) * s.contexts, recompute)


def _check_variant(variant: str, recompute: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    _check_recompute(recompute)


_FORWARD_PHASES = ("sampling_prefill", "sampling_decode", "prediction", "scoring")


def _assemble(preset: ModelPreset, forward: dict, update: Work, recompute: str) -> IterationCost:
    cost = IterationCost()
    for k, work in forward.items():
        f = forward_flops(preset, work)
        cost.phases[k] = PhaseCost(f, f, work.tokens)
    cost.phases["update"] = _train_phase(preset, update, recompute)
    cost.phases.update(_parameter_phases(preset))
    cost.phases = {k: cost.phases[k] for k in PHASES}
    return cost


def ntp_iteration_cost(preset: ModelPreset, global_batch_size: int, seq_length: int,
                       recompute: str = "none") -> IterationCost:
    """FLOPs of one next-token iteration: ``global_batch_size`` rows of ``seq_length`` tokens,
    causal attention, logits at every token; plus optimizer (no EMA)."""
    _check_recompute(recompute)
    work = Work(seq_length, _causal(seq_length), seq_length) * global_batch_size
    cost = IterationCost({"update": _train_phase(preset, work, recompute)})
    cost.phases["optimizer"] = _parameter_phases(preset)["optimizer"]
    return cost


def training_flops(preset: ModelPreset, tokens: float, seq_length: int) -> float:
    """Model FLOPs (forward + backward) of ``tokens`` tokens in causal rows of ``seq_length`` with
    logits at every token (the update phase of :func:`ntp_iteration_cost`)."""
    rows = tokens / seq_length
    return 3 * forward_flops(preset, Work(seq_length, _causal(seq_length), seq_length) * rows)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
_DTYPE_BYTES = {"bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class Layout:
    """A parallel layout and the memory-relevant training flags (Megatron-LM names in brackets).

    ``micro_batch_size``: documents per update micro-batch [--micro-batch-size] (each brings k
    contexts and all G branches of each).  ``sampler_micro_batch_size``: rows (branches) per decode
    micro-batch [--rlp-sampler-micro-batch-size]; default as the sampler: all rows at PP=1,
    ceil(rows / PP) otherwise.  ``flash_attention``: fused attention that keeps no score matrix
    (Transformer Engine on a GPU); False for megatron's local DotProductAttention (CPU).
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    distributed_optimizer: bool = False
    params_dtype: str = "bf16"
    recompute: str = "none"
    micro_batch_size: int = 1
    sequence_parallel: bool = False
    flash_attention: bool = True
    sampler_micro_batch_size: Optional[int] = None
    recompute_method: str = "uniform"   # with recompute="full" [--recompute-method]
    recompute_num_layers: int = 1       # [--recompute-num-layers]: uniform chunk size / block layers per stage

    def __post_init__(self):
        if self.params_dtype not in _DTYPE_BYTES:
            raise ValueError(f"params_dtype must be 'bf16' or 'fp32'; got {self.params_dtype!r}")
        _check_recompute(self.recompute)
        if self.recompute_method not in ("uniform", "block") or self.recompute_num_layers < 1:
            raise ValueError("recompute_method must be 'uniform' or 'block' and recompute_num_layers >= 1; "
                             f"got {self.recompute_method!r}, {self.recompute_num_layers}")
        if min(self.tp, self.pp, self.dp, self.micro_batch_size) < 1:
            raise ValueError("tp, pp, dp and micro_batch_size must be >= 1")


@dataclass(frozen=True)
class StageMemory:
    """Bytes per GPU of one pipeline stage (every TP/DP rank of a stage holds the same)."""

    stage: int
    layers: str
    parameters: int
    terms: dict  # name -> bytes: weights, main_grads, optimizer_states, ema_teacher, activations, sampler_cache
    sampler_microbatch: int = 0  # KV cache and Mamba states of one decode micro-batch (in sampler_cache)

    @property
    def static(self) -> int:
        return sum(v for k, v in self.terms.items() if k not in ("activations", "sampler_cache"))

    @property
    def peak(self) -> int:
        """Static state plus the larger of the update's activations and the sampler's caches
        (sampling ends, and its caches are freed, before the update starts)."""
        return self.static + max(self.terms["activations"], self.terms["sampler_cache"])

    @property
    def largest_term(self) -> str:
        return max(self.terms, key=self.terms.get)


def _activation_bytes_per_token(p: ModelPreset, kind: str, tp: int, sp: bool, scores_len: float,
                                 element_bytes: int) -> float:
    """Bytes a layer keeps for backward per token (elements of the params dtype; estimate).

    Saved: norm inputs and outputs (h each; split over TP only with sequence parallelism), and the
    inputs of the following matmuls / kernels (split over TP): Q, K, V (+ their QK-norm inputs),
    the attention output, fc1's output and the activation's output; for Mamba, in_proj's output,
    the conv output, the scan output and the gated norm's output.  Without fused attention the
    softmax output (heads x keys) is kept too.
    """
    d = _dims(p)
    rep = d["h"] / (tp if sp else 1)
    attn = (d["q"] + 2 * d["kv"] + (d["q"] + d["kv"] if p.qk_layernorm else 0) + d["q"]) / tp
    attn += p.num_attention_heads * scores_len / tp
    mlp = (d["f_in"] + d["f"]) / tp
    if kind == _GPT_LAYER:
        n = 4 * rep + attn + mlp
    elif kind == "*":
        n = 2 * rep + attn
    elif kind == "-":
        n = 2 * rep + mlp
    else:
        n = 2 * rep + (2 * d["di"] + 2 * d["gn"] + d["nh"] + d["conv"] + 2 * d["di"]) / tp
    return element_bytes * n


def stage_memory(preset: ModelPreset, layout: Layout, settings: RLPSettings,
                 variant: str = "rows", parameters: Optional[Sequence[int]] = None) -> list[StageMemory]:
    """Memory per GPU of each pipeline stage during an RLP iteration.

    Exact for the parameter count: ``weights`` (params dtype), ``main_grads`` (fp32 buffer),
    ``optimizer_states`` (Adam: fp32 main weights when bf16, two fp32 moments; divided over DP with
    the distributed optimizer), ``ema_teacher`` (fp32 copy).  Estimates:

    * ``activations``: the update micro-batch (padded to its widest row: max context and thought
      length) through this stage's layers (:func:`_activation_bytes_per_token`), times the
      micro-batches 1F1B keeps in flight on the stage (PP − stage, at most the micro-batch count).
      ``recompute="full"``, ``recompute_method="uniform"``: each chunk of ``recompute_num_layers``
      layers keeps only its input (h per token), plus one chunk's working set while it is rebuilt;
      ``"block"``: the first ``recompute_num_layers`` layers of the stage keep only their inputs,
      the others keep everything;
      ``"selective"``: the softmax output is not kept (no difference with fused attention).
    * ``sampler_cache``: the sampler's peak: the prefill caches (each document up to its largest
      position, Mamba states and a state snapshot per context), held until decoding ends, plus
      the decode caches of one wave of PP decode micro-batches of --rlp-sampler-micro-batch-size
      rows (the sampler builds and frees them wave by wave) in the "cascade" layout a Transformer
      Engine run decodes with: each context's K/V once (copied from the prefill), each branch
      its own thought cache (thought cap + 1 slots) and Mamba state.
      ``sampler_microbatch`` is the share of one decode micro-batch.

    ``parameters``: the parameter count of one GPU of each stage when it is known from a built
    model (the dry run builds every stage on the meta device); default :func:`stage_parameters`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    L, s, g = layout, settings, settings.num_thoughts
    stages = stage_layer_kinds(preset, L.pp, L.first_stage_layers, L.last_stage_layers)
    if parameters is None:
        params = stage_parameters(preset, L.tp, L.pp, L.first_stage_layers, L.last_stage_layers)
    elif len(parameters) != L.pp:
        raise ValueError(f"{len(parameters)} stage parameter counts for {L.pp} pipeline stages")
    else:
        params = list(parameters)
    wbytes = _DTYPE_BYTES[L.params_dtype]
    opt_per_param = (4 if L.params_dtype == "bf16" else 0) + 8
    opt_div = L.dp if L.distributed_optimizer else 1

    contexts_per_rank = s.contexts / L.dp
    per_mb_contexts = L.micro_batch_size * s.positions_per_doc
    num_microbatches = max(1, math.ceil(contexts_per_rank / per_mb_contexts))
    c_max, l_max = max(s.context_lens), max(s.thought_lens)
    if variant == "shared_prefix":  # one packed row per context
        row_len, rows = c_max + g * (l_max + 2), per_mb_contexts
    else:
        row_len, rows = c_max + l_max + 2, per_mb_contexts * g
    mb_tokens = rows * row_len
    # Unfused attention keeps the softmax output: every token against its (padded) row.
    scores_len = 0.0 if (L.flash_attention or L.recompute == "selective") else row_len

    contexts_here = math.ceil(contexts_per_rank)
    docs_here = math.ceil(contexts_here / s.positions_per_doc)
    rows_total = contexts_here * g
    sampler_mbs = L.sampler_micro_batch_size or (rows_total if L.pp == 1 else math.ceil(rows_total / L.pp))
    wave_rows = min(rows_total, L.pp * sampler_mbs)  # decode caches held at once
    d = _dims(preset)
    kv_per_token = 2 * (preset.num_query_groups // L.tp) * preset.kv_channels * wbytes
    mamba_per_row = ((d["conv"] // L.tp) * MAMBA_D_CONV + (d["nh"] // L.tp) * preset.mamba_head_dim * d["n"]) * wbytes

    out = []
    for i, (kinds, n) in enumerate(zip(stages, params)):
        per_token = [_activation_bytes_per_token(preset, k, L.tp, L.sequence_parallel, scores_len, wbytes)
                     for k in kinds]
        if L.recompute == "full":
            layer_input = wbytes * d["h"] / (L.tp if L.sequence_parallel else 1)
            k = L.recompute_num_layers
            if L.recompute_method == "block":
                # Backward meets the kept layers first (all their activations), then rebuilds the
                # recomputed ones one at a time.
                r = min(k, len(kinds))
                act_mb = mb_tokens * (r * layer_input + max(sum(per_token[r:]), max(per_token[:r], default=0.0)))
            else:
                chunks = [sum(per_token[i:i + k]) for i in range(0, len(kinds), k)]
                act_mb = mb_tokens * (len(chunks) * layer_input + max(chunks, default=0.0))
        else:
            act_mb = mb_tokens * sum(per_token)
        in_flight = min(num_microbatches, L.pp - i)
        attn, mamba = _attention_layers(kinds), kinds.count("M")
        # Cascade layout: per branch its own thought cache and Mamba state, per context its K/V.
        decode_row = attn * kv_per_token * (l_max + 1) + mamba * mamba_per_row
        per_context = attn * kv_per_token * c_max
        # Prefill: every document's cache up to its position, live Mamba states and one state
        # snapshot per context; freed only after every decode micro-batch has been forked.
        prefill = docs_here * (attn * kv_per_token * c_max + mamba * mamba_per_row) + contexts_here * mamba * mamba_per_row
        cache = prefill + wave_rows * decode_row + math.ceil(wave_rows / g) * per_context
        terms = {
            "weights": n * wbytes,
            "main_grads": n * GRAD_BYTES,
            "optimizer_states": math.ceil(n * opt_per_param / opt_div),
            "ema_teacher": n * 4,
            "activations": int(act_mb * in_flight),
            "sampler_cache": int(cache),
        }
        out.append(StageMemory(i, kinds, n, terms, sampler_microbatch=int(sampler_mbs * decode_row + math.ceil(sampler_mbs / g) * per_context)))
    return out
