"""Hugging Face Nemotron-H <-> megatron-core ``MambaModel`` weight and config mapping.

Pure functions over state dicts (name -> tensor), like :mod:`megatron_rlp.models.hf_qwen3`; the
megatron side is the model :func:`megatron_rlp.models.hybrid.build_hybrid_model` builds.

Names.  transformers' ``NemotronHForCausalLM`` keeps one block per layer, ``{prefix}layers.{i}``
with a pre-norm ``norm`` and a ``mixer`` whose kind comes from the hybrid pattern (``M`` Mamba-2,
``*`` attention, ``-`` MLP).  Checkpoints on disk (and ``save_pretrained``) use the prefix
``backbone.``; the loaded module uses ``model.`` (transformers renames on load).  Both are
accepted; :func:`megatron_to_hf` writes ``backbone.`` unless told otherwise.

==========================================  ===================================================
HF                                          megatron (local spec; TE-spec name in brackets)
==========================================  ===================================================
``embeddings.weight``                       ``embedding.word_embeddings.weight``
M ``layers.i.norm.weight``                  ``decoder.layers.i.norm.weight``
                                            [``mixer.in_proj.layer_norm_weight``]
M ``layers.i.mixer.{in_proj.weight,``       ``decoder.layers.i.mixer.<same name>``
  ``conv1d.weight, conv1d.bias, A_log,``
  ``D, dt_bias, norm.weight, out_proj.weight}``
\\* ``layers.i.norm.weight``                ``decoder.layers.i.input_layernorm.weight``
                                            [``self_attention.linear_qkv.layer_norm_weight``]
\\* ``layers.i.mixer.{q,k,v}_proj.weight``  ``...self_attention.linear_qkv.weight`` (grouped)
\\* ``layers.i.mixer.o_proj.weight``        ``...self_attention.linear_proj.weight``
\\- ``layers.i.norm.weight``                ``decoder.layers.i.pre_mlp_layernorm.weight``
                                            [``mlp.linear_fc1.layer_norm_weight``]
\\- ``layers.i.mixer.up_proj.weight``       ``...mlp.linear_fc1.weight`` (squared ReLU, no GLU)
\\- ``layers.i.mixer.down_proj.weight``     ``...mlp.linear_fc2.weight``
``norm_f.weight``                           ``decoder.final_norm.weight``
``lm_head.weight``                          ``output_layer.weight``
==========================================  ===================================================

The Mamba tensors need no re-layout at TP=1: both sides pack ``in_proj`` as ``[z, x, B, C, dt]``
(rows ``d_inner, d_inner, G*N, G*N, H``), ``conv1d`` over ``[x, B, C]``, ``D`` per head, the gated
norm's weight over ``d_inner`` normalised in ``G`` groups.  Attention uses megatron's grouped QKV
(:func:`megatron_rlp.models.hf_qwen3.fuse_qkv`).  Nemotron-H has no position embedding and no
QK-norm.

Tensor parallelism (:func:`shard_hybrid_state_dict` / :func:`gather_hybrid_state_dict`): each
section of the packed ``in_proj`` and ``conv1d`` is split over TP on its own (rank r gets heads
``[r H/tp, (r+1) H/tp)`` and Mamba groups ``[r G/tp, (r+1) G/tp)``, so whole groups stay
together), ``A_log``/``D``/``dt_bias``/the gated norm weight split on dim 0 (the norm's groups stay
whole because ``tp`` divides ``G``), ``out_proj`` is row-parallel; attention and MLP as in GPT
(``linear_fc1`` is a plain column split: no gate/up halves); norms are replicated.

Semantics worth knowing (why HF and megatron can differ on real checkpoints):

* transformers' Mamba mixer clamps ``dt = softplus(dt + dt_bias)`` from below at
  ``config.time_step_min`` (``time_step_limit = (time_step_min, inf)`` in ``NemotronHMamba2Mixer``);
  megatron's mixer (and NVIDIA's original Nemotron-H code, ``time_step_limit=(0, inf)``) does not
  clamp.  The outputs differ only where ``dt`` falls below ``time_step_min`` (1e-3 by default).
* megatron's gated norm uses eps 1e-5 regardless of the config, so :func:`preset_from_hf_config`
  refuses another ``layer_norm_epsilon``; megatron's conv kernel is 4 (``conv_kernel`` must be 4).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import torch

from megatron_rlp.models.hf_qwen3 import (
    EXTRA_STATE_SUFFIX,
    _cfg_get,
    fuse_qkv,
    split_qkv,
)
from megatron_rlp.models.presets import ModelPreset

Tensor = torch.Tensor
StateDict = dict[str, Any]

HF_PREFIXES = ("backbone.", "model.")
DEFAULT_HF_PREFIX = "backbone."
MAMBA, ATTENTION, MLP = "M", "*", "-"
_LAYER_TYPES = {"linear_attention": MAMBA, "full_attention": ATTENTION, "mlp": MLP, "moe": "E"}
MEGATRON_GATED_NORM_EPS = 1e-5
MEGATRON_CONV_KERNEL = 4

# --------------------------------------------------------------------------------------------
# Config mapping
# --------------------------------------------------------------------------------------------


def hybrid_pattern_from_hf_config(config: Any) -> str:
    """The ``M``/``*``/``-`` pattern of a NemotronH config (``layers_block_type`` in transformers 5,
    ``hybrid_override_pattern`` in older configs)."""
    types = _cfg_get(config, "layers_block_type") or _cfg_get(config, "layer_types")
    if types:
        unknown = sorted({t for t in types if t not in _LAYER_TYPES})
        if unknown:
            raise ValueError(f"Nemotron-H config has unknown layer types {unknown}")
        return "".join(_LAYER_TYPES[t] for t in types)
    pattern = _cfg_get(config, "hybrid_override_pattern")
    if not pattern:
        raise ValueError("Nemotron-H config has neither layers_block_type nor hybrid_override_pattern")
    return str(pattern)


def preset_from_hf_config(config: Any, name: str = "hf-nemotron-h") -> ModelPreset:
    """ModelPreset for a ``transformers.NemotronHConfig`` (or its ``config.json`` as a dict).

    Raises ValueError, naming the field, for anything megatron's hybrid model here cannot
    represent exactly (MoE layers, multi-token prediction, biases, other activations, ...)."""
    model_type = _cfg_get(config, "model_type", "nemotron_h")
    if model_type != "nemotron_h":
        raise ValueError(f"expected a Nemotron-H config, got model_type={model_type!r}")
    pattern = hybrid_pattern_from_hf_config(config)
    problems = []
    bad = sorted(set(pattern) - {MAMBA, ATTENTION, MLP})
    if bad:
        problems.append(
            f"layer symbols {bad} in pattern {pattern!r} (only M = Mamba, * = attention, "
            "- = MLP are supported; E = MoE is not)"
        )
    checks = [
        ("mlp_hidden_act", "relu2"),
        ("mamba_hidden_act", "silu"),
        ("conv_kernel", MEGATRON_CONV_KERNEL),
        ("use_conv_bias", True),
        ("use_bias", False),
        ("mamba_proj_bias", False),
        ("mlp_bias", False),
        ("attention_bias", False),
        ("num_nextn_predict_layers", 0),
        ("sliding_window", None),
    ]
    for key, want in checks:
        got = _cfg_get(config, key, want)
        if got != want:
            problems.append(f"{key}={got!r} (need {want!r})")
    eps = float(_cfg_get(config, "layer_norm_epsilon", MEGATRON_GATED_NORM_EPS))
    if eps != MEGATRON_GATED_NORM_EPS:
        problems.append(
            f"layer_norm_epsilon={eps} (megatron's Mamba gated norm always uses "
            f"{MEGATRON_GATED_NORM_EPS})"
        )
    hidden = int(_cfg_get(config, "hidden_size"))
    heads = int(_cfg_get(config, "num_attention_heads"))
    kv_heads = int(_cfg_get(config, "num_key_value_heads") or heads)
    head_dim = int(
        _cfg_get(config, "head_dim") or _cfg_get(config, "attention_head_dim") or hidden // heads
    )
    mamba_heads = int(_cfg_get(config, "mamba_num_heads"))
    mamba_groups = int(_cfg_get(config, "n_groups", _cfg_get(config, "mamba_n_groups", 8)))
    if heads % kv_heads:
        problems.append(f"{heads} attention heads not divisible by {kv_heads} KV heads")
    declared = _cfg_get(config, "num_hidden_layers")
    if isinstance(config, Mapping) and declared is not None and int(declared) != len(pattern):
        problems.append(f"num_hidden_layers={declared} but the pattern has {len(pattern)} layers")
    if mamba_heads % mamba_groups:
        problems.append(f"{mamba_heads} Mamba heads not divisible by n_groups={mamba_groups}")
    if problems:
        raise ValueError("Nemotron-H config not supported: " + "; ".join(problems))
    tie = _cfg_get(config, "tie_word_embeddings", False)
    return ModelPreset(
        name=name,
        family="hybrid",
        num_layers=len(pattern),
        hidden_size=hidden,
        ffn_hidden_size=int(_cfg_get(config, "intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        kv_channels=head_dim,
        vocab_size=int(_cfg_get(config, "vocab_size")),
        max_position_embeddings=int(_cfg_get(config, "max_position_embeddings", 4096)),
        tie_embeddings=bool(tie),
        qk_layernorm=False,
        norm_epsilon=eps,
        activation="squared_relu",
        hybrid_pattern=pattern,
        mamba_num_heads=mamba_heads,
        mamba_head_dim=int(_cfg_get(config, "mamba_head_dim")),
        mamba_state_dim=int(_cfg_get(config, "ssm_state_size")),
        mamba_num_groups=mamba_groups,
    )


def check_nemotron_h_preset(preset: ModelPreset) -> str:
    """The preset's pattern, after checking it describes a Nemotron-H architecture."""
    problems = []
    if preset.family != "hybrid":
        problems.append(f"family={preset.family!r} (need 'hybrid')")
    if preset.activation != "squared_relu":
        problems.append(f"activation={preset.activation!r} (need 'squared_relu')")
    if preset.qk_layernorm:
        problems.append("qk_layernorm=True (Nemotron-H has no QK-norm)")
    pattern = preset.hybrid_pattern or ""
    if not pattern or set(pattern) - {MAMBA, ATTENTION, MLP}:
        problems.append(f"hybrid_pattern={preset.hybrid_pattern!r} (need M, * and - only)")
    elif len(pattern) != preset.num_layers:
        problems.append(f"hybrid_pattern has {len(pattern)} layers, num_layers={preset.num_layers}")
    if preset.num_query_groups < 1 or preset.num_attention_heads % preset.num_query_groups:
        problems.append(
            f"{preset.num_attention_heads} heads not divisible by {preset.num_query_groups} groups"
        )
    if preset.mamba_num_groups < 1 or preset.mamba_num_heads % preset.mamba_num_groups:
        problems.append(
            f"{preset.mamba_num_heads} Mamba heads not divisible by {preset.mamba_num_groups} groups"
        )
    if problems:
        raise ValueError(
            f"preset {preset.name!r} is not a Nemotron-H architecture: " + "; ".join(problems)
        )
    return pattern


def hf_config_from_preset(preset: ModelPreset, **overrides: Any):
    """``transformers.NemotronHConfig`` for a hybrid preset (transformers is imported lazily)."""
    pattern = check_nemotron_h_preset(preset)
    from transformers import NemotronHConfig

    names = {MAMBA: "linear_attention", ATTENTION: "full_attention", MLP: "mlp"}
    kwargs = dict(
        vocab_size=preset.vocab_size,
        hidden_size=preset.hidden_size,
        layers_block_type=[names[c] for c in pattern],
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_query_groups,
        head_dim=preset.kv_channels,
        intermediate_size=preset.ffn_hidden_size,
        mlp_hidden_act="relu2",
        mamba_num_heads=preset.mamba_num_heads,
        mamba_head_dim=preset.mamba_head_dim,
        ssm_state_size=preset.mamba_state_dim,
        n_groups=preset.mamba_num_groups,
        mamba_hidden_act="silu",
        conv_kernel=MEGATRON_CONV_KERNEL,
        use_conv_bias=True,
        use_bias=False,
        mamba_proj_bias=False,
        mlp_bias=False,
        attention_bias=False,
        layer_norm_epsilon=preset.norm_epsilon,
        max_position_embeddings=preset.max_position_embeddings,
        tie_word_embeddings=preset.tie_embeddings,
        num_nextn_predict_layers=0,
    )
    kwargs.update(overrides)
    return NemotronHConfig(**kwargs)


# --------------------------------------------------------------------------------------------
# Names and shapes
# --------------------------------------------------------------------------------------------


def _mamba_dims(preset: ModelPreset) -> tuple[int, int, int, int]:
    d_inner = preset.mamba_num_heads * preset.mamba_head_dim
    gn = preset.mamba_num_groups * preset.mamba_state_dim
    return d_inner, gn, preset.mamba_num_heads, d_inner + 2 * gn


def mamba_in_proj_sections(preset: ModelPreset) -> list[int]:
    """Row sizes of the packed ``in_proj``: ``[z, x, B, C, dt]``."""
    d_inner, gn, heads, _ = _mamba_dims(preset)
    return [d_inner, d_inner, gn, gn, heads]


def mamba_conv_sections(preset: ModelPreset) -> list[int]:
    """Channel sizes of ``conv1d``: ``[x, B, C]``."""
    d_inner, gn, _, _ = _mamba_dims(preset)
    return [d_inner, gn, gn]


_MIXER_TENSORS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "A_log", "D", "dt_bias",
                  "norm.weight", "out_proj.weight")


def expected_hf_shapes(
    preset: ModelPreset, prefix: str = DEFAULT_HF_PREFIX, include_lm_head: bool = True
) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint for this preset, with its shape."""
    pattern = check_nemotron_h_preset(preset)
    h, v = preset.hidden_size, preset.vocab_size
    d_inner, _, heads, conv_dim = _mamba_dims(preset)
    q = preset.num_attention_heads * preset.kv_channels
    kv = preset.num_query_groups * preset.kv_channels
    mamba = {
        "in_proj.weight": (sum(mamba_in_proj_sections(preset)), h),
        "conv1d.weight": (conv_dim, 1, MEGATRON_CONV_KERNEL),
        "conv1d.bias": (conv_dim,),
        "A_log": (heads,),
        "D": (heads,),
        "dt_bias": (heads,),
        "norm.weight": (d_inner,),
        "out_proj.weight": (h, d_inner),
    }
    attention = {"q_proj.weight": (q, h), "k_proj.weight": (kv, h), "v_proj.weight": (kv, h),
                 "o_proj.weight": (h, q)}
    mlp = {"up_proj.weight": (preset.ffn_hidden_size, h),
           "down_proj.weight": (h, preset.ffn_hidden_size)}
    out = {f"{prefix}embeddings.weight": (v, h)}
    for i, kind in enumerate(pattern):
        base = f"{prefix}layers.{i}."
        out[base + "norm.weight"] = (h,)
        mixer = {MAMBA: mamba, ATTENTION: attention, MLP: mlp}[kind]
        for name, shape in mixer.items():
            out[base + "mixer." + name] = shape
    out[f"{prefix}norm_f.weight"] = (h,)
    if include_lm_head:
        out["lm_head.weight"] = (v, h)
    return out


def detect_hf_prefix(keys) -> str:
    """``backbone.`` or ``model.``: the prefix of a Nemotron-H state dict's backbone tensors."""
    found = {p for p in HF_PREFIXES for k in keys if k.startswith(p)}
    if len(found) != 1:
        raise KeyError(
            f"cannot tell the Nemotron-H backbone prefix (found {sorted(found) or 'none'} of "
            f"{list(HF_PREFIXES)})"
        )
    return found.pop()


def megatron_layer_names(kind: str, te_spec: bool = False) -> dict[str, str]:
    """HF name (relative to ``layers.i.``) -> megatron name (relative to ``decoder.layers.i.``),
    for the layer kinds whose tensors map one to one (QKV is fused separately)."""
    if kind == MAMBA:
        names = {"norm.weight": "mixer.in_proj.layer_norm_weight" if te_spec else "norm.weight"}
        names.update({f"mixer.{t}": f"mixer.{t}" for t in _MIXER_TENSORS})
        return names
    if kind == ATTENTION:
        return {
            "norm.weight": (
                "self_attention.linear_qkv.layer_norm_weight" if te_spec
                else "input_layernorm.weight"
            ),
            "mixer.o_proj.weight": "self_attention.linear_proj.weight",
        }
    if kind == MLP:
        return {
            "norm.weight": (
                "mlp.linear_fc1.layer_norm_weight" if te_spec else "pre_mlp_layernorm.weight"
            ),
            "mixer.up_proj.weight": "mlp.linear_fc1.weight",
            "mixer.down_proj.weight": "mlp.linear_fc2.weight",
        }
    raise ValueError(f"unknown layer kind {kind!r}")


def is_te_state_dict(sd: Mapping[str, Any]) -> bool:
    return any(k.endswith("layer_norm_weight") for k in sd)


# --------------------------------------------------------------------------------------------
# HF <-> megatron full state dict
# --------------------------------------------------------------------------------------------


def _check_shape(name: str, t: Tensor, want: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(want):
        raise ValueError(
            f"tensor {name!r} has shape {tuple(t.shape)}, the config expects {tuple(want)}"
        )


def hf_to_megatron(
    hf_sd: Mapping[str, Tensor], preset: ModelPreset, *, te_spec: bool = False
) -> StateDict:
    """HF Nemotron-H state dict (prefix ``backbone.`` or ``model.``) -> megatron MambaModel full
    state dict (TP=1, all layers).

    Every tensor's shape is checked against the preset (the error names the tensor and both
    shapes).  With tied embeddings ``lm_head.weight`` may be absent, or must equal the embedding.
    Unknown HF keys raise."""
    pattern = check_nemotron_h_preset(preset)
    prefix = detect_hf_prefix(hf_sd)
    shapes = expected_hf_shapes(preset, prefix)
    src = dict(hf_sd)
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in src:
            raise KeyError(f"HF state dict lacks {name!r} (expected shape {shapes[name]})")
        used.add(name)
        _check_shape(name, src[name], shapes[name])
        return src[name]

    out: StateDict = {}
    embed = take(f"{prefix}embeddings.weight")
    out["embedding.word_embeddings.weight"] = embed
    hd, ng = preset.kv_channels, preset.num_query_groups
    for i, kind in enumerate(pattern):
        h = f"{prefix}layers.{i}."
        m = f"decoder.layers.{i}."
        for hf_name, mc_name in megatron_layer_names(kind, te_spec).items():
            out[m + mc_name] = take(h + hf_name)
        if kind == ATTENTION:
            out[m + "self_attention.linear_qkv.weight"] = fuse_qkv(
                take(h + "mixer.q_proj.weight"),
                take(h + "mixer.k_proj.weight"),
                take(h + "mixer.v_proj.weight"),
                ng,
                hd,
            )
    out["decoder.final_norm.weight"] = take(f"{prefix}norm_f.weight")
    if preset.tie_embeddings:
        if "lm_head.weight" in src:
            lm_head = take("lm_head.weight")
            if not torch.equal(lm_head, embed):
                raise ValueError("preset ties embeddings but HF lm_head.weight != embeddings.weight")
    else:
        out["output_layer.weight"] = take("lm_head.weight")
    unknown = sorted(set(src) - used)
    if unknown:
        raise KeyError(f"unmapped HF keys (layers beyond the pattern? MoE? biases?): {unknown[:8]}")
    return out


def megatron_to_hf(
    mcore_sd: Mapping[str, Any],
    preset: ModelPreset,
    *,
    prefix: str = DEFAULT_HF_PREFIX,
    te_spec: Optional[bool] = None,
) -> dict[str, Tensor]:
    """Megatron MambaModel full state dict (TP=1, all layers) -> HF Nemotron-H state dict.

    ``lm_head.weight`` is always written (transformers' NemotronH does not tie it; with a tied
    preset it is a copy of the embedding).  ``_extra_state`` entries are ignored, any other
    unknown key raises; shapes are checked against the preset."""
    pattern = check_nemotron_h_preset(preset)
    if prefix not in HF_PREFIXES:
        raise ValueError(f"prefix must be one of {HF_PREFIXES}, got {prefix!r}")
    src = {k: v for k, v in mcore_sd.items() if not k.endswith(EXTRA_STATE_SUFFIX)}
    if te_spec is None:
        te_spec = is_te_state_dict(src)
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in src:
            raise KeyError(f"megatron state dict lacks {name!r}")
        used.add(name)
        return src[name]

    out: dict[str, Tensor] = {}
    embed = take("embedding.word_embeddings.weight")
    out[f"{prefix}embeddings.weight"] = embed
    hd, ng, nh = preset.kv_channels, preset.num_query_groups, preset.num_attention_heads
    for i, kind in enumerate(pattern):
        h = f"{prefix}layers.{i}."
        m = f"decoder.layers.{i}."
        for hf_name, mc_name in megatron_layer_names(kind, te_spec).items():
            out[h + hf_name] = take(m + mc_name)
        if kind == ATTENTION:
            q, k, v = split_qkv(take(m + "self_attention.linear_qkv.weight"), nh, ng, hd)
            out[h + "mixer.q_proj.weight"] = q
            out[h + "mixer.k_proj.weight"] = k
            out[h + "mixer.v_proj.weight"] = v
    out[f"{prefix}norm_f.weight"] = take("decoder.final_norm.weight")
    if preset.tie_embeddings:
        if "output_layer.weight" in src:  # a pipeline last stage's copy of the embedding
            used.add("output_layer.weight")
        out["lm_head.weight"] = embed.clone()
    else:
        out["lm_head.weight"] = take("output_layer.weight")
    unknown = sorted(set(src) - used)
    if unknown:
        raise KeyError(f"unmapped megatron keys: {unknown[:8]}")
    for name, shape in expected_hf_shapes(preset, prefix).items():
        _check_shape(name, out[name], shape)
    return {k: t.contiguous() for k, t in out.items()}


# --------------------------------------------------------------------------------------------
# Tensor parallelism
# --------------------------------------------------------------------------------------------

_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_REPLICATED = re.compile(
    r"(^|\.)(norm|input_layernorm|pre_mlp_layernorm|final_norm|q_layernorm|k_layernorm)"
    r"\.weight$|(^|\.)layer_norm_weight$"
)


def _tp_rule(name: str) -> tuple[str, int]:
    """(kind, dim) for a megatron hybrid key: kind is extra / replicated / split / in_proj /
    conv."""
    if name.endswith(EXTRA_STATE_SUFFIX):
        return "extra", 0
    if name.endswith("mixer.in_proj.weight"):
        return "in_proj", 0
    if name.endswith("mixer.conv1d.weight") or name.endswith("mixer.conv1d.bias"):
        return "conv", 0
    if re.search(r"mixer\.(A_log|D|dt_bias|norm\.weight)$", name):
        return "split", 0
    if name.endswith("mixer.out_proj.weight"):
        return "split", 1
    if _REPLICATED.search(name):
        return "replicated", 0
    if re.search(r"(^|\.)(embedding\.word_embeddings|output_layer|linear_qkv|linear_fc1)\.weight$",
                 name):
        return "split", 0
    if re.search(r"(^|\.)(linear_proj|linear_fc2)\.weight$", name):
        return "split", 1
    raise KeyError(f"no tensor-parallel rule for megatron hybrid key {name!r}")


def _chunk(t: Tensor, parts: int, dim: int, name: str) -> list[Tensor]:
    if t.shape[dim] % parts:
        raise ValueError(f"{name}: dim {dim} of size {t.shape[dim]} not divisible by TP={parts}")
    return list(torch.chunk(t, parts, dim=dim))


def _sections(t: Tensor, sizes: Sequence[int], name: str) -> list[Tensor]:
    if t.shape[0] != sum(sizes):
        raise ValueError(f"{name}: {t.shape[0]} rows, expected sections {list(sizes)}")
    return list(torch.split(t, list(sizes), dim=0))


def check_hybrid_tp(preset: ModelPreset, tp_size: int) -> None:
    problems = []
    for what, n in (
        ("attention heads", preset.num_attention_heads),
        ("KV groups", preset.num_query_groups),
        ("Mamba heads", preset.mamba_num_heads),
        ("Mamba groups", preset.mamba_num_groups),
    ):
        if n % tp_size:
            problems.append(f"TP={tp_size} does not divide the {n} {what}")
    if problems:
        raise ValueError("; ".join(problems))


def shard_hybrid_state_dict(
    full_sd: Mapping[str, Any], tp_rank: int, tp_size: int, preset: ModelPreset
) -> StateDict:
    """TP rank ``tp_rank``'s shard of a full (TP=1) megatron MambaModel state dict (any subset of
    its keys, e.g. one pipeline stage's)."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} outside [0, {tp_size})")
    check_hybrid_tp(preset, tp_size)
    in_proj, conv = mamba_in_proj_sections(preset), mamba_conv_sections(preset)
    out: StateDict = {}
    for name, t in full_sd.items():
        kind, dim = _tp_rule(name)
        if kind == "extra":
            out[name] = t
        elif kind == "replicated" or tp_size == 1:
            out[name] = t.clone()
        elif kind in ("in_proj", "conv"):
            parts = _sections(t, in_proj if kind == "in_proj" else conv, name)
            out[name] = torch.cat([_chunk(p, tp_size, 0, name)[tp_rank] for p in parts], dim=0)
        else:
            out[name] = _chunk(t, tp_size, dim, name)[tp_rank].clone()
    return out


def gather_hybrid_state_dict(
    shards: Sequence[Mapping[str, Any]], preset: ModelPreset, *, check_replicated: bool = True
) -> StateDict:
    """Inverse of :func:`shard_hybrid_state_dict`: TP shards in rank order -> full state dict."""
    if not shards:
        raise ValueError("no shards given")
    tp = len(shards)
    names = list(shards[0])
    for r, s in enumerate(shards[1:], start=1):
        if set(s) != set(names):
            raise KeyError(f"shard {r} has different keys than shard 0: {sorted(set(s) ^ set(names))[:8]}")
    local = [n // tp for n in mamba_in_proj_sections(preset)]
    local_conv = [n // tp for n in mamba_conv_sections(preset)]
    out: StateDict = {}
    for name in names:
        parts = [s[name] for s in shards]
        kind, dim = _tp_rule(name)
        if kind == "extra":
            out[name] = parts[0]
        elif kind == "replicated" or tp == 1:
            if check_replicated and any(not torch.equal(parts[0], p) for p in parts[1:]):
                raise ValueError(f"replicated tensor {name!r} differs across TP ranks")
            out[name] = parts[0].clone()
        elif kind in ("in_proj", "conv"):
            sizes = local if kind == "in_proj" else local_conv
            per_rank = [_sections(p, sizes, name) for p in parts]
            out[name] = torch.cat(
                [per_rank[r][s] for s in range(len(sizes)) for r in range(tp)], dim=0
            )
        else:
            out[name] = torch.cat(parts, dim=dim)
    return out
