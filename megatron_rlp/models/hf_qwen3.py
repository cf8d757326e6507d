"""Hugging Face Qwen3 <-> megatron-core GPTModel weight and config mapping.

Pure functions over state dicts (name -> tensor); nothing here builds a model or touches
torch.distributed.  Three layers of mapping:

1. Names and layouts, HF <-> megatron FULL state dict (TP=1, every layer, global layer indices):
   ``hf_to_megatron`` / ``megatron_to_hf``.  Megatron differs from HF in two layouts:

   * ``linear_qkv`` fuses q, k and v and interleaves them per query (KV) group,
     ``[q(g0 heads) k(g0) v(g0) | q(g1 heads) k(g1) v(g1) | ...]`` (see
     ``SelfAttention.get_query_key_value_tensors`` in megatron/core/transformer/attention.py);
   * ``linear_fc1`` stacks the SwiGLU halves as ``[gate; up]`` (megatron's ``glu`` applies the
     activation to the first chunk).

   The local layer spec keeps separate ``input_layernorm`` / ``pre_mlp_layernorm`` modules; the
   Transformer Engine spec fuses them into ``self_attention.linear_qkv.layer_norm_weight`` and
   ``mlp.linear_fc1.layer_norm_weight``.  ``te_spec`` picks the naming.

2. Tensor parallelism, full <-> per-rank shard: ``shard_megatron_state_dict`` /
   ``gather_megatron_state_dict``.  Column-parallel weights (``linear_qkv``, ``linear_fc1``,
   ``word_embeddings``, ``output_layer``) split on dim 0, row-parallel ones (``linear_proj``,
   ``linear_fc2``) on dim 1, norms are replicated.  Because the fused QKV is grouped, a contiguous
   dim-0 split hands each rank whole query groups when ``num_query_groups % tp == 0``, and exactly
   the slice megatron expects when ``tp > num_query_groups`` (megatron then all-gathers the QKV
   output and picks its heads).  ``linear_fc1`` splits gate and up separately and re-stacks
   ``[gate_r; up_r]`` per rank.  ``VocabParallelEmbedding`` and the output layer require the vocab
   to be divisible by TP; GPTModel does not pad it, so pad explicitly with ``padded_vocab_size``.

3. Pipeline parallelism, full <-> per-stage: ``slice_pipeline_stage`` / ``merge_pipeline_stages``.
   Megatron's plain ``state_dict()`` numbers decoder layers locally per stage (``decoder.layers.0``
   is the first layer OF THAT STAGE); ``pipeline_layer_range`` gives the global layers of a stage
   (even split, or megatron's uneven first/last stage sizes; virtual pipelining not supported).
   With tied embeddings, a last stage that is not also first holds its own copy of the embedding
   as ``output_layer.weight``.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import torch

from megatron_rlp.models.presets import ModelPreset

Tensor = torch.Tensor
StateDict = dict[str, Any]

EXTRA_STATE_SUFFIX = "_extra_state"

# --------------------------------------------------------------------------------------------
# Config mapping
# --------------------------------------------------------------------------------------------


def _cfg_get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _rope_theta(config: Any) -> float:
    params = _cfg_get(config, "rope_parameters") or _cfg_get(config, "rope_scaling")
    if params:
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"Qwen3 config uses RoPE scaling {rope_type!r}; only the default RoPE maps onto "
                "megatron's rotary embedding here"
            )
        if "rope_theta" in params:
            return float(params["rope_theta"])
    theta = _cfg_get(config, "rope_theta")
    if theta is None:
        raise ValueError("Qwen3 config has neither rope_parameters['rope_theta'] nor rope_theta")
    return float(theta)


def preset_from_hf_config(config: Any, name: str = "hf-qwen3") -> ModelPreset:
    """ModelPreset for a ``transformers.Qwen3Config`` (or its ``config.json`` as a dict)."""
    model_type = _cfg_get(config, "model_type", "qwen3")
    if model_type != "qwen3":
        raise ValueError(f"expected a Qwen3 config, got model_type={model_type!r}")
    if _cfg_get(config, "attention_bias", False):
        raise ValueError("attention_bias=True is not supported (the GPT preset has no biases)")
    act = _cfg_get(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported; Qwen3 uses SwiGLU (silu)")
    if _cfg_get(config, "use_sliding_window", False):
        raise ValueError("use_sliding_window=True is not supported")
    hidden = int(_cfg_get(config, "hidden_size"))
    heads = int(_cfg_get(config, "num_attention_heads"))
    kv_heads = _cfg_get(config, "num_key_value_heads") or heads
    head_dim = _cfg_get(config, "head_dim") or hidden // heads
    tie = _cfg_get(config, "tie_word_embeddings")
    return ModelPreset(
        name=name,
        family="gpt",
        num_layers=int(_cfg_get(config, "num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(_cfg_get(config, "intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=int(kv_heads),
        kv_channels=int(head_dim),
        vocab_size=int(_cfg_get(config, "vocab_size")),
        max_position_embeddings=int(_cfg_get(config, "max_position_embeddings")),
        tie_embeddings=bool(True if tie is None else tie),
        rotary_base=_rope_theta(config),
        qk_layernorm=True,
        norm_epsilon=float(_cfg_get(config, "rms_norm_eps", 1e-6)),
        activation="swiglu",
    )


def hf_config_from_preset(preset: ModelPreset, **overrides: Any):
    """``transformers.Qwen3Config`` for a GPT-family preset (transformers is imported lazily)."""
    _check_qwen3_preset(preset)
    from transformers import Qwen3Config

    kwargs = dict(
        vocab_size=preset.vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.ffn_hidden_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_query_groups,
        head_dim=preset.kv_channels,
        hidden_act="silu",
        max_position_embeddings=preset.max_position_embeddings,
        rms_norm_eps=preset.norm_epsilon,
        tie_word_embeddings=preset.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(preset.rotary_base)},
        attention_bias=False,
        use_sliding_window=False,
    )
    kwargs.update(overrides)
    return Qwen3Config(**kwargs)


def _check_qwen3_preset(preset: ModelPreset) -> None:
    problems = []
    if preset.family != "gpt":
        problems.append(f"family={preset.family!r} (need 'gpt')")
    if preset.activation != "swiglu":
        problems.append(f"activation={preset.activation!r} (need 'swiglu')")
    if not preset.qk_layernorm:
        problems.append("qk_layernorm=False (Qwen3 always has q/k RMSNorm)")
    if preset.num_attention_heads % preset.num_query_groups:
        problems.append(
            f"{preset.num_attention_heads} heads not divisible by {preset.num_query_groups} groups"
        )
    if problems:
        raise ValueError(
            f"preset {preset.name!r} is not a Qwen3 architecture: " + "; ".join(problems)
        )


# --------------------------------------------------------------------------------------------
# Fused layouts
# --------------------------------------------------------------------------------------------


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, num_query_groups: int, head_dim: int) -> Tensor:
    """HF q/k/v projections (weights [out, in] or biases [out]) -> megatron's grouped linear_qkv."""
    heads = q.shape[0] // head_dim
    if q.shape[0] != heads * head_dim or heads % num_query_groups:
        raise ValueError(
            f"q rows {q.shape[0]} do not form {num_query_groups} groups of heads of size {head_dim}"
        )
    expect_kv = num_query_groups * head_dim
    if k.shape[0] != expect_kv or v.shape[0] != expect_kv:
        raise ValueError(f"k/v rows {k.shape[0]}/{v.shape[0]} != groups*head_dim {expect_kv}")
    per_group = heads // num_query_groups
    rest = tuple(q.shape[1:])
    qg = q.reshape(num_query_groups, per_group * head_dim, *rest)
    kg = k.reshape(num_query_groups, head_dim, *rest)
    vg = v.reshape(num_query_groups, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def split_qkv(
    qkv: Tensor, num_attention_heads: int, num_query_groups: int, head_dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`fuse_qkv`."""
    if num_attention_heads % num_query_groups:
        raise ValueError(f"{num_attention_heads} heads not divisible by {num_query_groups} groups")
    per_group = num_attention_heads // num_query_groups
    rows = (num_attention_heads + 2 * num_query_groups) * head_dim
    if qkv.shape[0] != rows:
        raise ValueError(f"linear_qkv has {qkv.shape[0]} rows, expected {rows}")
    rest = tuple(qkv.shape[1:])
    grouped = qkv.reshape(num_query_groups, (per_group + 2) * head_dim, *rest)
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return (
        q.reshape(num_attention_heads * head_dim, *rest),
        k.reshape(num_query_groups * head_dim, *rest),
        v.reshape(num_query_groups * head_dim, *rest),
    )


def fuse_gate_up(gate: Tensor, up: Tensor) -> Tensor:
    """HF gate_proj/up_proj -> megatron linear_fc1 = [gate; up]."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: Tensor) -> tuple[Tensor, Tensor]:
    if fc1.shape[0] % 2:
        raise ValueError(f"linear_fc1 has an odd number of rows ({fc1.shape[0]})")
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


# --------------------------------------------------------------------------------------------
# HF <-> megatron full state dict
# --------------------------------------------------------------------------------------------


def megatron_layer_names(te_spec: bool = False) -> dict[str, str]:
    """Per-layer megatron names (relative to ``decoder.layers.{i}.``) keyed by role."""
    return {
        "input_norm": (
            "self_attention.linear_qkv.layer_norm_weight" if te_spec else "input_layernorm.weight"
        ),
        "qkv": "self_attention.linear_qkv.weight",
        "q_norm": "self_attention.q_layernorm.weight",
        "k_norm": "self_attention.k_layernorm.weight",
        "proj": "self_attention.linear_proj.weight",
        "mlp_norm": "mlp.linear_fc1.layer_norm_weight" if te_spec else "pre_mlp_layernorm.weight",
        "fc1": "mlp.linear_fc1.weight",
        "fc2": "mlp.linear_fc2.weight",
    }


_HF_LAYER_NAMES = {
    "input_norm": "input_layernorm.weight",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "proj": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "fc2": "mlp.down_proj.weight",
}


def is_te_state_dict(sd: Mapping[str, Any]) -> bool:
    """True when a megatron state dict uses the Transformer Engine spec's fused-norm names."""
    return any(k.endswith("linear_qkv.layer_norm_weight") for k in sd)


def padded_vocab_size(vocab_size: int, tp_size: int, divisible_by: int = 128) -> int:
    """Megatron-LM's rule: round the vocab up to a multiple of ``divisible_by * tp_size``."""
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def _pad_rows(t: Tensor, rows: Optional[int]) -> Tensor:
    if rows is None or rows == t.shape[0]:
        return t
    if rows < t.shape[0]:
        raise ValueError(f"padded_vocab_size {rows} is smaller than the vocab {t.shape[0]}")
    pad = t.new_zeros((rows - t.shape[0], *t.shape[1:]))
    return torch.cat([t, pad], dim=0)


def hf_to_megatron(
    hf_sd: Mapping[str, Tensor],
    preset: ModelPreset,
    *,
    te_spec: bool = False,
    padded_vocab_size: Optional[int] = None,
) -> StateDict:
    """HF Qwen3 state dict -> megatron GPTModel full state dict (TP=1, all layers).

    ``padded_vocab_size`` appends zero rows to the embedding (and untied output layer) for a
    megatron model built with a padded vocab.  With tied embeddings ``lm_head.weight`` is ignored
    (it must equal the embedding when present).  Unknown HF keys raise.
    """
    _check_qwen3_preset(preset)
    src = dict(hf_sd)
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in src:
            raise KeyError(f"HF state dict lacks {name!r}")
        used.add(name)
        return src[name]

    out: StateDict = {}
    embed = take("model.embed_tokens.weight")
    out["embedding.word_embeddings.weight"] = _pad_rows(embed, padded_vocab_size)
    mnames = megatron_layer_names(te_spec)
    hd, ng, nh = preset.kv_channels, preset.num_query_groups, preset.num_attention_heads
    for i in range(preset.num_layers):
        h = f"model.layers.{i}."
        m = f"decoder.layers.{i}."
        for role, hf_name in _HF_LAYER_NAMES.items():
            out[m + mnames[role]] = take(h + hf_name)
        q = take(h + "self_attn.q_proj.weight")
        if q.shape[0] != nh * hd:
            raise ValueError(f"{h}self_attn.q_proj has {q.shape[0]} rows, preset needs {nh * hd}")
        out[m + mnames["qkv"]] = fuse_qkv(
            q, take(h + "self_attn.k_proj.weight"), take(h + "self_attn.v_proj.weight"), ng, hd
        )
        out[m + mnames["fc1"]] = fuse_gate_up(
            take(h + "mlp.gate_proj.weight"), take(h + "mlp.up_proj.weight")
        )
    out["decoder.final_layernorm.weight"] = take("model.norm.weight")
    if preset.tie_embeddings:
        if "lm_head.weight" in src:
            used.add("lm_head.weight")
            if not torch.equal(src["lm_head.weight"], embed):
                raise ValueError("preset ties embeddings but HF lm_head.weight != embed_tokens")
    else:
        out["output_layer.weight"] = _pad_rows(take("lm_head.weight"), padded_vocab_size)
    unknown = sorted(set(src) - used)
    if unknown:
        raise KeyError(f"unmapped HF keys (layers beyond the preset? biases?): {unknown[:8]}")
    return out


def megatron_to_hf(
    mcore_sd: Mapping[str, Any],
    preset: ModelPreset,
    *,
    te_spec: Optional[bool] = None,
    include_tied_lm_head: bool = True,
) -> dict[str, Tensor]:
    """Megatron GPTModel full state dict (TP=1, all layers) -> HF Qwen3 state dict.

    ``te_spec=None`` detects the naming.  Rows beyond ``preset.vocab_size`` (vocab padding) are
    dropped.  With tied embeddings ``lm_head.weight`` is the embedding tensor itself, as in
    ``Qwen3ForCausalLM.state_dict()``; pass ``include_tied_lm_head=False`` for safetensors files.
    ``_extra_state`` entries are ignored; any other unknown key raises.
    """
    _check_qwen3_preset(preset)
    src = {k: v for k, v in mcore_sd.items() if not k.endswith(EXTRA_STATE_SUFFIX)}
    if te_spec is None:
        te_spec = is_te_state_dict(src)
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in src:
            raise KeyError(f"megatron state dict lacks {name!r}")
        used.add(name)
        return src[name]

    v = preset.vocab_size
    out: dict[str, Tensor] = {}
    embed = take("embedding.word_embeddings.weight")[:v]
    out["model.embed_tokens.weight"] = embed
    mnames = megatron_layer_names(te_spec)
    hd, ng, nh = preset.kv_channels, preset.num_query_groups, preset.num_attention_heads
    for i in range(preset.num_layers):
        h = f"model.layers.{i}."
        m = f"decoder.layers.{i}."
        q, k, vv = split_qkv(take(m + mnames["qkv"]), nh, ng, hd)
        out[h + "self_attn.q_proj.weight"] = q
        out[h + "self_attn.k_proj.weight"] = k
        out[h + "self_attn.v_proj.weight"] = vv
        gate, up = split_gate_up(take(m + mnames["fc1"]))
        out[h + "mlp.gate_proj.weight"] = gate
        out[h + "mlp.up_proj.weight"] = up
        for role, hf_name in _HF_LAYER_NAMES.items():
            out[h + hf_name] = take(m + mnames[role])
    out["model.norm.weight"] = take("decoder.final_layernorm.weight")
    if preset.tie_embeddings:
        if "output_layer.weight" in src:  # a pipeline last stage's copy of the embedding
            used.add("output_layer.weight")
        if include_tied_lm_head:
            out["lm_head.weight"] = embed
    else:
        out["lm_head.weight"] = take("output_layer.weight")[:v]
    unknown = sorted(set(src) - used)
    if unknown:
        raise KeyError(f"unmapped megatron keys: {unknown[:8]}")
    return {k: t.contiguous() for k, t in out.items()}


# --------------------------------------------------------------------------------------------
# Tensor parallelism
# --------------------------------------------------------------------------------------------

_COLUMN = re.compile(
    r"(^|\.)(embedding\.word_embeddings\.weight|output_layer\.(weight|bias)"
    r"|linear_qkv\.(weight|bias))$"
)
_FC1 = re.compile(r"(^|\.)linear_fc1\.(weight|bias)$")
_ROW = re.compile(r"(^|\.)(linear_proj|linear_fc2)\.weight$")
_REPLICATED = re.compile(
    r"(^|\.)(input_layernorm|pre_mlp_layernorm|final_layernorm|q_layernorm|k_layernorm)"
    r"\.(weight|bias)$|(^|\.)(linear_qkv|linear_fc1)\.layer_norm_(weight|bias)$"
    r"|(^|\.)(linear_proj|linear_fc2)\.bias$"
)


def _tp_kind(name: str) -> str:
    if name.endswith(EXTRA_STATE_SUFFIX):
        return "extra"
    if _REPLICATED.search(name):
        return "replicated"
    if _FC1.search(name):
        return "fc1"
    if _COLUMN.search(name):
        return "column"
    if _ROW.search(name):
        return "row"
    raise KeyError(f"no tensor-parallel rule for megatron key {name!r}")


def _split(t: Tensor, parts: int, dim: int, name: str) -> list[Tensor]:
    if t.shape[dim] % parts:
        hint = (
            " (pad the vocab: hf_to_megatron(..., padded_vocab_size=padded_vocab_size(V, tp)))"
            if "word_embeddings" in name or "output_layer" in name
            else ""
        )
        raise ValueError(f"{name}: dim {dim} of size {t.shape[dim]} not divisible by {parts}{hint}")
    return list(torch.chunk(t, parts, dim=dim))


def _own(t: Tensor) -> Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def shard_megatron_state_dict(
    full_sd: Mapping[str, Any],
    tp_rank: int,
    tp_size: int,
    num_query_groups: int,
    *,
    gated_linear_unit: bool = True,
) -> StateDict:
    """The TP rank ``tp_rank``'s shard of a full (TP=1) megatron GPTModel state dict.

    ``linear_qkv`` is split on dim 0 in its grouped layout: whole query groups per rank when
    ``num_query_groups % tp_size == 0``; when ``tp_size > num_query_groups`` (``tp_size`` a
    multiple of the groups) each rank gets its contiguous slice, as megatron expects.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} outside [0, {tp_size})")
    if num_query_groups % tp_size and tp_size % num_query_groups:
        raise ValueError(
            f"tp_size {tp_size} and num_query_groups {num_query_groups}: one must divide the other"
        )
    out: StateDict = {}
    for name, t in full_sd.items():
        kind = _tp_kind(name)
        if kind in ("extra", "replicated") or tp_size == 1:
            out[name] = t if kind == "extra" else _own(t)
        elif kind == "column":
            out[name] = _own(_split(t, tp_size, 0, name)[tp_rank])
        elif kind == "row":
            out[name] = _own(_split(t, tp_size, 1, name)[tp_rank])
        elif gated_linear_unit:  # fc1 = [gate; up]: split each half, re-stack per rank
            gate, up = split_gate_up(t)
            out[name] = torch.cat(
                [_split(gate, tp_size, 0, name)[tp_rank], _split(up, tp_size, 0, name)[tp_rank]]
            )
        else:
            out[name] = _own(_split(t, tp_size, 0, name)[tp_rank])
    return out


def gather_megatron_state_dict(
    shards: Sequence[Mapping[str, Any]],
    *,
    gated_linear_unit: bool = True,
    check_replicated: bool = True,
) -> StateDict:
    """Inverse of :func:`shard_megatron_state_dict`: TP shards in rank order -> full state dict.

    Replicated tensors are taken from rank 0 (and, with ``check_replicated``, must be
    bitwise-equal on every rank).
    """
    if not shards:
        raise ValueError("no shards given")
    names = list(shards[0])
    for r, s in enumerate(shards[1:], start=1):
        if set(s) != set(names):
            diff = sorted(set(s) ^ set(names))
            raise KeyError(f"shard {r} has different keys than shard 0: {diff[:8]}")
    tp = len(shards)
    out: StateDict = {}
    for name in names:
        parts = [s[name] for s in shards]
        kind = _tp_kind(name)
        if kind == "extra":
            out[name] = parts[0]
        elif kind == "replicated" or tp == 1:
            if check_replicated and any(not torch.equal(parts[0], p) for p in parts[1:]):
                raise ValueError(f"replicated tensor {name!r} differs across TP ranks")
            out[name] = _own(parts[0])
        elif kind == "column":
            out[name] = torch.cat(parts, dim=0)
        elif kind == "row":
            out[name] = torch.cat(parts, dim=1)
        elif gated_linear_unit:
            halves = [split_gate_up(p) for p in parts]
            out[name] = torch.cat([g for g, _ in halves] + [u for _, u in halves], dim=0)
        else:
            out[name] = torch.cat(parts, dim=0)
    return out


# --------------------------------------------------------------------------------------------
# Pipeline parallelism
# --------------------------------------------------------------------------------------------

_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def pipeline_layer_range(
    num_layers: int,
    pp_rank: int,
    pp_size: int,
    num_layers_in_first_stage: Optional[int] = None,
    num_layers_in_last_stage: Optional[int] = None,
) -> range:
    """Global decoder-layer indices held by pipeline stage ``pp_rank`` (megatron's split, no VPP).

    Even split by default; ``num_layers_in_{first,last}_stage`` mirror TransformerConfig's
    ``num_layers_in_{first,last}_pipeline_stage`` (the remaining layers split evenly).
    """
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank {pp_rank} outside [0, {pp_size})")
    if pp_size == 1:
        return range(num_layers)
    first, last = num_layers_in_first_stage, num_layers_in_last_stage
    middle_stages = pp_size - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    if middle_layers < 0 or (middle_stages == 0 and middle_layers != 0):
        raise ValueError(
            f"first/last stage sizes {first}/{last} do not fit {num_layers} layers "
            f"on {pp_size} stages"
        )
    if middle_stages and middle_layers % middle_stages:
        raise ValueError(
            f"{middle_layers} layers do not split evenly over {middle_stages} pipeline stages"
        )
    per_middle = middle_layers // middle_stages if middle_stages else 0
    sizes = []
    for r in range(pp_size):
        if r == 0 and first is not None:
            sizes.append(first)
        elif r == pp_size - 1 and last is not None:
            sizes.append(last)
        else:
            sizes.append(per_middle)
    start = sum(sizes[:pp_rank])
    return range(start, start + sizes[pp_rank])


def slice_pipeline_stage(
    full_sd: Mapping[str, Any],
    pp_rank: int,
    pp_size: int,
    num_layers: int,
    tie_embeddings: bool,
    *,
    num_layers_in_first_stage: Optional[int] = None,
    num_layers_in_last_stage: Optional[int] = None,
) -> StateDict:
    """Pipeline stage ``pp_rank``'s state dict, with decoder layers renumbered locally.

    The first stage keeps the embedding, the last stage the final norm and output layer; with tied
    embeddings a last stage that is not also first gets ``output_layer.weight`` = the embedding.
    """
    layers = pipeline_layer_range(
        num_layers, pp_rank, pp_size, num_layers_in_first_stage, num_layers_in_last_stage
    )
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    out: StateDict = {}
    for name, t in full_sd.items():
        m = _LAYER_KEY.match(name)
        if m:
            g = int(m.group(1))
            if g >= num_layers:
                raise KeyError(f"{name}: layer {g} beyond num_layers={num_layers}")
            if g in layers:
                out[f"decoder.layers.{g - layers.start}.{m.group(2)}"] = t
        elif name.startswith("embedding."):
            if first:
                out[name] = t
        elif name.startswith("decoder.final_layernorm.") or name.startswith("output_layer."):
            if last:
                out[name] = t
        else:
            raise KeyError(f"no pipeline rule for megatron key {name!r}")
    if tie_embeddings and last and not first:
        out["output_layer.weight"] = full_sd["embedding.word_embeddings.weight"]
    return out


def merge_pipeline_stages(
    stage_sds: Sequence[Mapping[str, Any]],
    num_layers: int,
    tie_embeddings: bool,
    *,
    num_layers_in_first_stage: Optional[int] = None,
    num_layers_in_last_stage: Optional[int] = None,
) -> StateDict:
    """Inverse of :func:`slice_pipeline_stage`: stage state dicts in order -> full state dict."""
    pp = len(stage_sds)
    out: StateDict = {}
    for r, sd in enumerate(stage_sds):
        layers = pipeline_layer_range(
            num_layers, r, pp, num_layers_in_first_stage, num_layers_in_last_stage
        )
        for name, t in sd.items():
            m = _LAYER_KEY.match(name)
            if m:
                local = int(m.group(1))
                if local >= len(layers):
                    raise KeyError(f"stage {r} key {name} beyond its {len(layers)} layers")
                out[f"decoder.layers.{layers.start + local}.{m.group(2)}"] = t
            elif tie_embeddings and pp > 1 and name == "output_layer.weight":
                continue  # the last stage's copy of the tied embedding
            else:
                if name in out:
                    raise KeyError(f"{name!r} appears on more than one pipeline stage")
                out[name] = t
    return out


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_megatron_state_dict(model: torch.nn.Module, sd: Mapping[str, Any]) -> None:
    """Strict ``load_state_dict`` into a megatron module, keeping the module's own
    ``_extra_state`` entries (megatron's linears and TE modules report them as keys)."""
    full = dict(sd)
    for name, value in model.state_dict().items():
        if name.endswith(EXTRA_STATE_SUFFIX) and name not in full:
            full[name] = value
    model.load_state_dict(full, strict=True)
