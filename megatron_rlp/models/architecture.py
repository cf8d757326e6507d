"""A run's model architecture from a preset, Megatron-LM's architecture flags, or a checkpoint.

* ``--model-preset NAME`` is a shorthand: each architecture flag given explicitly replaces that
  field of the preset (a flag left out is None, "not given").
* Without a preset the flags define the model, with Megatron-LM's defaults for the rest.
* ``--use-checkpoint-args`` reads the architecture that the converter or a training run stored in
  the ``--load`` checkpoint (its common state's ``model_args``: the flags below, by their
  ModelConfig / Megatron-LM names); as in Megatron-LM, the checkpoint's values override the
  corresponding flags and the preset.

Everything here is pure except :func:`read_checkpoint_args`, a rank-local file read (no
collectives), so it can run before torch.distributed is initialised.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

from megatron_rlp.models.presets import PRESETS, ModelPreset, get_preset

# ModelConfig fields that describe the architecture, with their command-line flags.
ARCHITECTURE_FLAGS = {
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "ffn_hidden_size": "--ffn-hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "group_query_attention": "--group-query-attention",
    "num_query_groups": "--num-query-groups",
    "kv_channels": "--kv-channels",
    "max_position_embeddings": "--max-position-embeddings",
    "rotary_base": "--rotary-base",
    "norm_epsilon": "--norm-epsilon",
    "swiglu": "--swiglu",
    "squared_relu": "--squared-relu",
    "qk_layernorm": "--qk-layernorm",
    "untie_embeddings_and_output_weights": "--untie-embeddings-and-output-weights",
    "hybrid_override_pattern": "--hybrid-override-pattern",
    "mamba_num_heads": "--mamba-num-heads",
    "mamba_head_dim": "--mamba-head-dim",
    "mamba_state_dim": "--mamba-state-dim",
    "mamba_num_groups": "--mamba-num-groups",
    "model_vocab_size": "--model-vocab-size",
}
_MAMBA_FIELDS = ("mamba_num_heads", "mamba_head_dim", "mamba_state_dim", "mamba_num_groups")
_HYBRID_SYMBOLS = {"M": "Mamba", "*": "attention", "-": "MLP"}

# Megatron-LM's defaults where neither a preset nor a flag gives a value.
DEFAULT_ROTARY_BASE = 10_000.0
DEFAULT_NORM_EPSILON = 1e-5
DEFAULT_MAMBA_HEAD_DIM = 64
DEFAULT_MAMBA_STATE_DIM = 128
DEFAULT_MAMBA_NUM_GROUPS = 8
# Hybrid models have no position embedding; their rotary_base is unused but part of the checkpoint
# signature, where presets and the converter record ModelPreset's default.
_UNUSED_ROTARY_BASE = next(f.default for f in dataclasses.fields(ModelPreset) if f.name == "rotary_base")


class ArchitectureError(ValueError):
    pass


def given_flags(model_config: Any) -> dict[str, Any]:
    """The architecture flags given explicitly (not None) in a ModelConfig."""
    return {k: getattr(model_config, k) for k in ARCHITECTURE_FLAGS if getattr(model_config, k) is not None}


def architecture_args(preset: ModelPreset) -> dict[str, Any]:
    """The complete architecture as flag values (what checkpoints store as ``model_args``):
    ``build_architecture(architecture_args(p), None, p.name)`` rebuilds ``p``."""
    hybrid = preset.family == "hybrid"
    return {
        "num_layers": preset.num_layers,
        "hidden_size": preset.hidden_size,
        "ffn_hidden_size": preset.ffn_hidden_size,
        "num_attention_heads": preset.num_attention_heads,
        "group_query_attention": preset.num_query_groups != preset.num_attention_heads,
        "num_query_groups": preset.num_query_groups,
        "kv_channels": preset.kv_channels,
        "max_position_embeddings": preset.max_position_embeddings,
        "rotary_base": float(preset.rotary_base),
        "norm_epsilon": float(preset.norm_epsilon),
        "swiglu": preset.activation == "swiglu",
        "squared_relu": preset.activation == "squared_relu",
        "qk_layernorm": preset.qk_layernorm,
        "untie_embeddings_and_output_weights": not preset.tie_embeddings,
        "hybrid_override_pattern": preset.hybrid_pattern if hybrid else None,
        **{k: (getattr(preset, k) if hybrid else None) for k in _MAMBA_FIELDS},
        "model_vocab_size": preset.vocab_size,
    }


def args_from_signature(signature: Mapping[str, Any]) -> dict[str, Any]:
    """Architecture flags from a checkpoint's ``model_signature`` (checkpoints written before
    ``model_args`` existed; the signature lacks only ``max_position_embeddings``)."""
    try:
        preset = ModelPreset(name="signature", max_position_embeddings=1, **signature)
    except TypeError as e:
        raise ArchitectureError(f"the checkpoint's model_signature is not one this version reads: {e}") from None
    args = architecture_args(preset)
    args["max_position_embeddings"] = None
    return args


def _flag_list(names) -> str:
    return ", ".join(ARCHITECTURE_FLAGS[n] for n in names)


def _activation(flags: Mapping[str, Any], base: Optional[ModelPreset]) -> str:
    swiglu, squared = flags.get("swiglu"), flags.get("squared_relu")
    if swiglu and squared:
        raise ArchitectureError("--swiglu and --squared-relu both given; an MLP has one activation, pass one of them")
    if swiglu:
        return "swiglu"
    if squared:
        return "squared_relu"
    if base is not None and flags.get(base.activation) is not False:
        return base.activation
    raise ArchitectureError(
        "no supported MLP activation: pass --swiglu (Qwen3-style) or --squared-relu "
        "(Nemotron-H-style); Megatron-LM's default GELU MLP is not supported"
    )


def _layers_and_pattern(flags, base, where) -> tuple[int, Optional[str]]:
    layers = flags.get("num_layers")
    pattern = flags.get("hybrid_override_pattern")
    if pattern is not None:
        bad = sorted(set(pattern) - set(_HYBRID_SYMBOLS))
        if not pattern or bad:
            raise ArchitectureError(
                f"--hybrid-override-pattern {pattern!r}: " + (f"unsupported layer symbols {bad}" if bad else "empty")
                + "; use one symbol per layer: " + ", ".join(f"{s} = {n}" for s, n in _HYBRID_SYMBOLS.items())
            )
        if layers is not None and layers != len(pattern):
            raise ArchitectureError(
                f"--hybrid-override-pattern {pattern!r} has {len(pattern)} layers but --num-layers is "
                f"{layers}: pass --num-layers {len(pattern)} (or leave it out), or a pattern of {layers} symbols"
            )
        return len(pattern), pattern
    pattern = base.hybrid_pattern if base is not None and base.family == "hybrid" else None
    if layers is None:
        if base is None:
            raise ArchitectureError("the model needs --num-layers (or --hybrid-override-pattern for a hybrid model)")
        return base.num_layers, pattern
    if pattern is not None and layers != len(pattern):
        raise ArchitectureError(
            f"--num-layers {layers} does not match the {len(pattern)}-layer hybrid pattern {pattern!r} of "
            f"{where}: pass --hybrid-override-pattern with {layers} layer symbols (M = Mamba, * = "
            f"attention, - = MLP), or drop --num-layers"
        )
    return layers, pattern


def _query_groups(flags, base, heads: int) -> int:
    gqa, groups = flags.get("group_query_attention"), flags.get("num_query_groups")
    base_gqa = base is not None and base.num_query_groups != base.num_attention_heads
    if gqa is True:
        if groups is not None:
            return groups
        if base_gqa:
            return base.num_query_groups
        raise ArchitectureError("--group-query-attention needs --num-query-groups (the number of KV groups)")
    if gqa is False or not base_gqa:
        if groups is not None and groups != heads:
            raise ArchitectureError(
                f"--num-query-groups {groups} takes effect only with --group-query-attention (Megatron-LM "
                "ignores it otherwise): add --group-query-attention"
            )
        return heads
    return groups if groups is not None else base.num_query_groups


def _vocab(flags, base, tokenizer_vocab, divisible_by, tp) -> int:
    if flags.get("model_vocab_size") is not None:
        return flags["model_vocab_size"]
    if base is not None:
        return base.vocab_size
    if tokenizer_vocab is None:
        raise ArchitectureError("a model defined by flags needs --model-vocab-size (or a tokenizer to pad)")
    if divisible_by < 1:
        raise ArchitectureError(f"--make-vocab-size-divisible-by must be >= 1, got {divisible_by}")
    multiple = divisible_by * tp
    return -(-tokenizer_vocab // multiple) * multiple


def build_architecture(
    flags: Mapping[str, Any],
    base: Optional[ModelPreset],
    name: str,
    *,
    tokenizer_vocab: Optional[int] = None,
    tp: int = 1,
    seq_length: Optional[int] = None,
    make_vocab_size_divisible_by: int = 128,
) -> ModelPreset:
    """The ModelPreset that ``flags`` (architecture flag -> value; None or absent = not given)
    describe on top of ``base`` (a preset, or None: Megatron-LM's defaults).  Raises
    ArchitectureError naming the flag to change for any inconsistent combination."""
    flags = {k: v for k, v in flags.items() if v is not None}
    unknown = sorted(set(flags) - set(ARCHITECTURE_FLAGS))
    if unknown:
        raise ArchitectureError(f"not architecture flags: {unknown}")
    where = f"preset {base.name!r}" if base is not None else "the flags"
    if base is None:
        missing = [k for k in ("hidden_size", "num_attention_heads") if k not in flags]
        if "num_layers" not in flags and "hybrid_override_pattern" not in flags:
            missing.insert(0, "num_layers")
        if missing:
            raise ArchitectureError(
                f"a model without --model-preset needs {_flag_list(missing)}; or pass --model-preset "
                f"({', '.join(sorted(PRESETS))}) or --use-checkpoint-args with --load"
            )

    def pick(key: str, default: Any) -> Any:
        if key in flags:
            return flags[key]
        return getattr(base, key) if base is not None else default

    activation = _activation(flags, base)
    num_layers, pattern = _layers_and_pattern(flags, base, where)
    hidden, heads = pick("hidden_size", None), pick("num_attention_heads", None)
    for key, value in (("num_layers", num_layers), ("hidden_size", hidden), ("num_attention_heads", heads)):
        if value < 1:
            raise ArchitectureError(f"{ARCHITECTURE_FLAGS[key]} must be >= 1, got {value}")
    if "kv_channels" in flags or base is not None:
        kv_channels = pick("kv_channels", None)
    elif hidden % heads:
        raise ArchitectureError(
            f"--hidden-size {hidden} is not divisible by --num-attention-heads {heads}; pass "
            "--kv-channels (the head dimension) or change one of them"
        )
    else:
        kv_channels = hidden // heads
    if activation == "swiglu":  # Megatron-LM: 8/3 h rounded down to a multiple of 64
        default_ffn = int(4 * hidden * 2 / 3 / 64) * 64
    else:
        default_ffn = 4 * hidden
    ffn = pick("ffn_hidden_size", default_ffn)
    groups = _query_groups(flags, base, heads)
    if groups < 1 or heads % groups:
        raise ArchitectureError(
            f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}; "
            "every KV group serves the same number of query heads"
        )

    mamba = dict.fromkeys(_MAMBA_FIELDS, 0)
    if pattern is None:
        stray = [k for k in _MAMBA_FIELDS if k in flags]
        if stray:
            raise ArchitectureError(
                f"{_flag_list(stray)} apply only to hybrid (Mamba) models: add --hybrid-override-pattern "
                "or use a hybrid --model-preset"
            )
    else:
        hybrid_base = base if base is not None and base.family == "hybrid" else None

        def pick_mamba(key: str, default: int) -> int:
            if key in flags:
                return flags[key]
            return getattr(hybrid_base, key) if hybrid_base is not None else default

        mamba["mamba_head_dim"] = pick_mamba("mamba_head_dim", DEFAULT_MAMBA_HEAD_DIM)
        mamba["mamba_state_dim"] = pick_mamba("mamba_state_dim", DEFAULT_MAMBA_STATE_DIM)
        mamba["mamba_num_groups"] = pick_mamba("mamba_num_groups", DEFAULT_MAMBA_NUM_GROUPS)
        for key in ("mamba_head_dim", "mamba_state_dim", "mamba_num_groups"):
            if mamba[key] < 1:
                raise ArchitectureError(f"{ARCHITECTURE_FLAGS[key]} must be >= 1, got {mamba[key]}")
        if "mamba_num_heads" in flags or hybrid_base is not None:
            mamba["mamba_num_heads"] = pick_mamba("mamba_num_heads", None)
        elif (2 * hidden) % mamba["mamba_head_dim"]:
            raise ArchitectureError(
                f"Mamba width 2 x --hidden-size = {2 * hidden} is not divisible by --mamba-head-dim "
                f"{mamba['mamba_head_dim']}; pass --mamba-num-heads or change --mamba-head-dim"
            )
        else:
            mamba["mamba_num_heads"] = 2 * hidden // mamba["mamba_head_dim"]
        if mamba["mamba_num_heads"] < 1 or mamba["mamba_num_heads"] % mamba["mamba_num_groups"]:
            raise ArchitectureError(
                f"--mamba-num-heads {mamba['mamba_num_heads']} is not a positive multiple of "
                f"--mamba-num-groups {mamba['mamba_num_groups']}"
            )

    max_positions = pick("max_position_embeddings", seq_length)
    if max_positions is None:
        raise ArchitectureError("the model needs --max-position-embeddings (or --seq-length)")
    untie = flags.get("untie_embeddings_and_output_weights")
    preset = ModelPreset(
        name=name,
        family="hybrid" if pattern is not None else "gpt",
        num_layers=num_layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=kv_channels,
        vocab_size=_vocab(flags, base, tokenizer_vocab, make_vocab_size_divisible_by, tp),
        max_position_embeddings=max_positions,
        tie_embeddings=(not untie) if untie is not None else (base.tie_embeddings if base else True),
        rotary_base=float(pick("rotary_base", DEFAULT_ROTARY_BASE if pattern is None else _UNUSED_ROTARY_BASE)),
        qk_layernorm=bool(pick("qk_layernorm", False)),
        norm_epsilon=float(pick("norm_epsilon", DEFAULT_NORM_EPSILON)),
        activation=activation,
        hybrid_pattern=pattern,
        **mamba,
    )
    for key in ("ffn_hidden_size", "kv_channels", "max_position_embeddings", "vocab_size"):
        if getattr(preset, key) < 1:
            flag = ARCHITECTURE_FLAGS.get(key, "--model-vocab-size")
            raise ArchitectureError(f"{flag} must be >= 1, got {getattr(preset, key)} (on {where})")
    if preset.norm_epsilon <= 0 or preset.rotary_base <= 0:
        raise ArchitectureError("--norm-epsilon and --rotary-base must be > 0")
    return preset


def _describe(base_name: Optional[str], flags: Mapping[str, Any]) -> str:
    """A readable name for error messages: the preset plus the flags that changed it."""
    if base_name is None:
        family = "hybrid" if flags.get("hybrid_override_pattern") else "gpt"
        return f"{family} model from flags"
    if not flags:
        return base_name
    return f"{base_name} + {_flag_list(flags)}"


def resolve_architecture(
    model_config: Any,
    tokenizer_vocab: Optional[int] = None,
    *,
    tp: int = 1,
    seq_length: Optional[int] = None,
    load: Optional[str] = None,
) -> ModelPreset:
    """The architecture a ModelConfig describes (see the module docstring for the order)."""
    flags = given_flags(model_config)
    base = get_preset(model_config.model_preset) if model_config.model_preset else None
    name = _describe(base.name if base else None, flags)
    if model_config.use_checkpoint_args:
        if not load:
            raise ArchitectureError("--use-checkpoint-args reads the architecture from --load; pass --load")
        ckpt_dir, ckpt_args = read_checkpoint_args(load)
        if base is not None and "max_position_embeddings" not in flags:
            flags["max_position_embeddings"] = base.max_position_embeddings
        flags = apply_checkpoint_args(flags, ckpt_args, ckpt_dir)
        base, name = None, f"checkpoint {ckpt_dir}"
    elif base is None and not flags:
        raise ArchitectureError(
            "no model architecture given: pass --model-preset "
            f"({', '.join(sorted(PRESETS))}), Megatron-LM's architecture flags (--num-layers, "
            "--hidden-size, --num-attention-heads, ...), or --use-checkpoint-args with --load"
        )
    return build_architecture(
        flags, base, name, tokenizer_vocab=tokenizer_vocab, tp=tp, seq_length=seq_length,
        make_vocab_size_divisible_by=model_config.make_vocab_size_divisible_by,
    )


def apply_checkpoint_args(flags: Mapping[str, Any], ckpt_args: Mapping[str, Any], where: str) -> dict:
    """Megatron-LM's --use-checkpoint-args: the checkpoint's architecture replaces the flags (a
    note names each explicit flag it overrides).  Only ``max_position_embeddings``, which older
    checkpoints do not record, may still come from the flags."""
    merged = {}
    overridden = []
    for key in ARCHITECTURE_FLAGS:
        value, given = ckpt_args.get(key), flags.get(key)
        if value is None and key == "max_position_embeddings":
            value = given
        elif given is not None and given != value:
            overridden.append(f"{ARCHITECTURE_FLAGS[key]} {given!r} -> {value!r}")
        if value is not None:
            merged[key] = value
    if overridden and os.environ.get("RANK", "0") == "0":
        print(f"note: --use-checkpoint-args: {where} overrides " + "; ".join(overridden), flush=True)
    return merged


def read_checkpoint_args(load: str) -> tuple[str, dict[str, Any]]:
    """(iteration directory, architecture flags) of the latest checkpoint under ``load`` (a
    --save / converter output directory, or an iteration directory).  Reads only this rank's
    files: safe before torch.distributed is initialised."""
    from megatron.core import dist_checkpointing

    from megatron_rlp.training.checkpoint import TRACKER, iteration_dir, read_tracker

    if not os.path.isdir(load):
        raise ArchitectureError(f"--use-checkpoint-args: --load {load!r} is not a directory")
    iteration = read_tracker(load)
    ckpt_dir = iteration_dir(load, iteration) if iteration is not None else load
    if not os.path.isfile(os.path.join(ckpt_dir, "common.pt")):
        raise ArchitectureError(
            f"--use-checkpoint-args: {load!r} holds no checkpoint ({TRACKER} or {ckpt_dir}/common.pt "
            "missing); point --load at a directory written by --save or the converter"
        )
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    if "model_args" in common:
        return ckpt_dir, dict(common["model_args"])
    if "model_signature" in common:
        return ckpt_dir, args_from_signature(common["model_signature"])
    raise ArchitectureError(
        f"--use-checkpoint-args: {ckpt_dir} records no architecture (not written by megatron_rlp's "
        "training loop or converter); pass the architecture flags or --model-preset instead"
    )
