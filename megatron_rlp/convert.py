"""Convert checkpoints between Hugging Face (safetensors) and megatron-core dist checkpoints.

Architectures: Qwen3 (``model_type`` ``qwen3``, megatron family ``gpt``, tied or untied) and
Nemotron-H (``nemotron_h``, family ``hybrid``).  The weight mappings live in
:mod:`megatron_rlp.models.hf_qwen3` and :mod:`megatron_rlp.models.hf_nemotron_h`; this module
reads and writes the files.

* ``hf_to_megatron`` reads ``config.json`` and ``model.safetensors`` (or the shards listed in
  ``model.safetensors.index.json``), checks every tensor name and shape against the config, and
  writes a weights-only checkpoint in the project's layout (``latest_checkpointed_iteration.txt``
  + ``iter_0000000/``, see :mod:`megatron_rlp.training.checkpoint`) at the target TP x PP.  The
  training loop's ``--load`` accepts it and starts at iteration 0; the checkpoint records the
  architecture as flag values (``model_args``), so ``--use-checkpoint-args`` trains a model that
  is not a preset without repeating its flags.  The source ``config.json`` and
  the tokenizer / generation files are kept under ``hf_metadata/`` so the way back restores them.
* ``megatron_to_hf`` reads the model weights of any checkpoint in that layout (weights-only, or a
  full training checkpoint: only the ``model`` part is requested), at whatever layout it was
  saved, and writes ``config.json`` + safetensors (sharded with an index above
  ``max_shard_size``).  The architecture comes from the checkpoint's saved ``model_signature``
  (family ``gpt`` -> Qwen3, ``hybrid`` -> Nemotron-H).  Config fields the signature does not
  record (``max_position_embeddings``, token ids, Mamba ``chunk_size`` / time-step fields, ...)
  come from ``hf_metadata/config.json`` or ``--hf-config`` when they describe the same model,
  else from the checkpoint's ``model_args`` (``max_position_embeddings``) and a named preset with
  the same signature, else transformers' defaults (``max_position_embeddings`` 4096 unless given).
* ``megatron_to_megatron`` re-lays out a checkpoint's weights at another TP x PP.

How the megatron side is written.  megatron-core itself writes and reads the dist checkpoint:
for a target layout TP x PP the converter starts TP*PP worker processes (``spawn``, gloo over a
file store, CPU only), each builds its pipeline stage of the model with the local layer spec
(no weight initialisation), loads its TP shard of its stage's weights (each worker reads only its
stage's tensors from the safetensors files) and calls
:func:`megatron_rlp.training.checkpoint.save_model_checkpoint` collectively.  The files are
therefore exactly what the training loop writes at that layout, with global shapes and sharding
metadata, so they load at that layout and at any other.  Reading goes the other way: one worker
builds the whole model at TP=1, PP=1 and asks dist_checkpointing for it (resharding on load).
Where the ranks come from:

* called inside a multi-rank torch.distributed job (e.g. the CLI under ``torchrun``, or a
  distributed test), every rank of the job takes part: all ranks must call the same conversion,
  the world size must be a multiple of TP*PP (extra ranks are data-parallel replicas);
* otherwise a one-rank job on a machine without GPU runs in the calling process;
* otherwise the converter spawns its TP*PP CPU workers itself.

In-process runs re-create megatron's parallel state and destroy it afterwards.  Memory: a worker
holds its stage's full-width tensors plus its shard, and reads the embedding / final norm /
output layer whatever its stage; reading back holds the whole model once.

Safety.  Output goes to ``<out>.tmp-XXXX`` next to ``<out>`` and is renamed into place only when
complete; a failure removes it.  An existing ``<out>`` is replaced only with ``overwrite=True``.
Problems the user can fix (unknown architecture, weights that do not match the config, a layout
that does not divide the model, an existing output) raise :class:`ConversionError`, which the CLI
(``tools/convert_checkpoint.py``) reports with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch

from megatron_rlp.models import hf_nemotron_h as hn
from megatron_rlp.models import hf_qwen3 as hq
from megatron_rlp.models.architecture import architecture_args, args_from_signature
from megatron_rlp.models.presets import PRESETS, ModelPreset

__all__ = [
    "ConversionError",
    "SUPPORTED_MODEL_TYPES",
    "hf_to_megatron",
    "megatron_to_hf",
    "megatron_to_megatron",
    "read_hf_checkpoint",
    "write_safetensors",
    "parse_size",
    "main",
]

EXIT_USER_ERROR = 2
_WORKER_USER_ERROR_EXIT = 3
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
HF_METADATA_DIR = "hf_metadata"
DEFAULT_MAX_SHARD_SIZE = "2GB"
_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                       "F64": torch.float64}


class ConversionError(Exception):
    """A problem with the inputs or the request (the CLI exits with code 2)."""


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------


def _qwen3_hf_shapes(preset: ModelPreset, keys: Sequence[str]) -> dict[str, tuple[int, ...]]:
    h, f, v = preset.hidden_size, preset.ffn_hidden_size, preset.vocab_size
    hd = preset.kv_channels
    q, kv = preset.num_attention_heads * hd, preset.num_query_groups * hd
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    out = {"model.embed_tokens.weight": (v, h)}
    for i in range(preset.num_layers):
        for name, shape in per_layer.items():
            out[f"model.layers.{i}.{name}"] = shape
    out["model.norm.weight"] = (h,)
    if not preset.tie_embeddings or "lm_head.weight" in keys:
        out["lm_head.weight"] = (v, h)
    return out


def _nemotron_h_hf_shapes(preset: ModelPreset, keys: Sequence[str]) -> dict[str, tuple[int, ...]]:
    try:
        prefix = hn.detect_hf_prefix(keys)
    except KeyError as e:
        raise ConversionError(f"Nemotron-H checkpoint: {e.args[0]}") from None
    include_lm_head = not preset.tie_embeddings or "lm_head.weight" in keys
    return hn.expected_hf_shapes(preset, prefix, include_lm_head=include_lm_head)


def _qwen3_to_hf(sd: Mapping[str, Any], preset: ModelPreset) -> dict[str, torch.Tensor]:
    return hq.megatron_to_hf(sd, preset, include_tied_lm_head=False)


def _qwen3_shard(sd: Mapping[str, Any], rank: int, tp: int, preset: ModelPreset) -> dict:
    return hq.shard_megatron_state_dict(sd, rank, tp, preset.num_query_groups)


def _hybrid_stage_preset(preset: ModelPreset, layers: range) -> ModelPreset:
    return preset.replace(
        num_layers=len(layers), hybrid_pattern=preset.hybrid_pattern[layers.start : layers.stop]
    )


@dataclass(frozen=True)
class Architecture:
    """How one HF ``model_type`` maps onto a megatron model family."""

    model_type: str
    family: str
    hf_class: str  # transformers class name, for config.json "architectures"
    preset_from_config: Callable[[Any], ModelPreset]
    config_from_preset: Callable[..., Any]
    hf_shapes: Callable[[ModelPreset, Sequence[str]], dict]
    to_megatron: Callable[..., dict]  # (hf_sd, preset, te_spec) -> megatron state dict
    to_hf: Callable[[Mapping[str, Any], ModelPreset], dict]
    shard: Callable[[Mapping[str, Any], int, int, ModelPreset], dict]
    stage_preset: Callable[[ModelPreset, range], ModelPreset]
    final_norm_key: str


ARCHITECTURES: dict[str, Architecture] = {
    "qwen3": Architecture(
        model_type="qwen3",
        family="gpt",
        hf_class="Qwen3ForCausalLM",
        preset_from_config=lambda cfg: hq.preset_from_hf_config(cfg, name="hf-qwen3"),
        config_from_preset=hq.hf_config_from_preset,
        hf_shapes=_qwen3_hf_shapes,
        to_megatron=lambda sd, p, te: hq.hf_to_megatron(sd, p, te_spec=te),
        to_hf=_qwen3_to_hf,
        shard=_qwen3_shard,
        stage_preset=lambda p, layers: p.replace(num_layers=len(layers)),
        final_norm_key="decoder.final_layernorm.weight",
    ),
    "nemotron_h": Architecture(
        model_type="nemotron_h",
        family="hybrid",
        hf_class="NemotronHForCausalLM",
        preset_from_config=lambda cfg: hn.preset_from_hf_config(cfg, name="hf-nemotron-h"),
        config_from_preset=hn.hf_config_from_preset,
        hf_shapes=_nemotron_h_hf_shapes,
        to_megatron=lambda sd, p, te: hn.hf_to_megatron(sd, p, te_spec=te),
        to_hf=lambda sd, p: hn.megatron_to_hf(sd, p),
        shard=hn.shard_hybrid_state_dict,
        stage_preset=_hybrid_stage_preset,
        final_norm_key="decoder.final_norm.weight",
    ),
}
SUPPORTED_MODEL_TYPES = tuple(sorted(ARCHITECTURES))
_FAMILY_TO_MODEL_TYPE = {a.family: a.model_type for a in ARCHITECTURES.values()}


def architecture_for_model_type(model_type: Any) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise ConversionError(
            f"unsupported architecture: config.json has model_type={model_type!r}; supported "
            f"model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return ARCHITECTURES[model_type]


def architecture_for_family(family: Any, where: str) -> Architecture:
    if family not in _FAMILY_TO_MODEL_TYPE:
        raise ConversionError(
            f"{where}: the saved model family {family!r} has no Hugging Face converter; supported "
            f"families: " + ", ".join(f"{f} -> {t}" for f, t in sorted(_FAMILY_TO_MODEL_TYPE.items()))
        )
    return ARCHITECTURES[_FAMILY_TO_MODEL_TYPE[family]]


def model_signature(preset: ModelPreset) -> dict:
    """The training loop's checkpoint signature (imported lazily: the loop pulls in a lot)."""
    from megatron_rlp.training.loop import model_signature as signature

    return signature(preset)


def preset_from_signature(signature: Mapping[str, Any], name: str,
                          max_position_embeddings: int) -> ModelPreset:
    fields = {f.name for f in dataclasses.fields(ModelPreset)} - {"name", "max_position_embeddings"}
    unknown = sorted(set(signature) - fields)
    missing = sorted(fields - set(signature))
    if unknown or missing:
        raise ConversionError(
            f"{name}: the saved model_signature does not describe a ModelPreset "
            f"(unknown fields {unknown}, missing fields {missing})"
        )
    return ModelPreset(name=name, max_position_embeddings=max_position_embeddings, **signature)


def validate_target_layout(preset: ModelPreset, tp: int, pp: int) -> None:
    """builder.validate_parallel_layout plus the checks the hybrid model and the loop add."""
    from megatron_rlp.models.builder import validate_parallel_layout

    try:
        validate_parallel_layout(preset, tp, pp, tp * pp)
    except ValueError as e:
        raise ConversionError(f"target layout TP={tp} PP={pp}: {e}") from None
    problems = []
    if preset.family == "hybrid":
        if preset.mamba_num_groups % tp:
            problems.append(
                f"--target-tp {tp} does not divide the {preset.mamba_num_groups} Mamba groups"
            )
        if preset.num_layers % pp:
            problems.append(
                f"--target-pp {pp} does not divide the {preset.num_layers} layers of the hybrid model"
            )
    if preset.vocab_size % tp:
        problems.append(f"--target-tp {tp} does not divide the vocabulary size {preset.vocab_size}")
    if problems:
        raise ConversionError(f"target layout TP={tp} PP={pp}: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# Hugging Face files
# --------------------------------------------------------------------------------------------


class HFCheckpoint:
    """A local HF model directory: ``config.json`` and lazily read safetensors tensors."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        self.directory = directory
        if not os.path.isdir(directory):
            raise ConversionError(f"--hf-dir {directory!r} is not a directory")
        config_path = os.path.join(directory, "config.json")
        if not os.path.isfile(config_path):
            raise ConversionError(f"{directory} has no config.json")
        self.config = _read_config_json(config_path)
        index_path = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
        single = os.path.join(directory, SAFE_WEIGHTS_NAME)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index_path} has no weight_map")
            self.files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            weight_map = None
            self.files = [SAFE_WEIGHTS_NAME]
        else:
            others = [n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth"))]
            hint = f" (found {others[:3]}: only safetensors are supported)" if others else ""
            raise ConversionError(
                f"{directory} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}{hint}"
            )
        self._handles = {}
        self._where: dict[str, str] = {}
        for name in self.files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise ConversionError(f"{directory}: shard {name} listed in the index is missing")
            handle = safe_open(path, framework="pt")
            self._handles[name] = handle
            for key in handle.keys():
                if key in self._where:
                    raise ConversionError(f"{directory}: tensor {key!r} appears in two shards")
                self._where[key] = name
        if weight_map is not None:
            missing = sorted(k for k, f in weight_map.items() if self._where.get(k) != f)
            if missing:
                raise ConversionError(
                    f"{index_path} lists tensors its shards do not hold: {missing[:5]}"
                )

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._handles[self._where[name]].get_slice(name).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise ConversionError(f"tensor {name!r} has dtype {code}; expected a float type")
        return _SAFETENSORS_DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)


def read_hf_checkpoint(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, full state dict) of a local HF safetensors directory."""
    ckpt = HFCheckpoint(directory)
    return ckpt.config, {k: ckpt.get(k) for k in ckpt.keys()}


def check_hf_weights(ckpt: HFCheckpoint, arch: Architecture, preset: ModelPreset) -> None:
    """Every expected tensor present with its shape, nothing else."""
    keys = ckpt.keys()
    expected = arch.hf_shapes(preset, keys)
    problems = []
    for name, shape in expected.items():
        if name not in ckpt:
            problems.append(f"tensor {name!r} is missing (the config expects shape {shape})")
        elif ckpt.shape(name) != tuple(shape):
            problems.append(
                f"tensor {name!r} has shape {ckpt.shape(name)} but the config expects {tuple(shape)}"
            )
    unexpected = sorted(set(keys) - set(expected))
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensor(s) the config has no place for, e.g. {unexpected[:3]}"
        )
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ConversionError(
            f"{ckpt.directory}: weights do not match config.json ({arch.model_type}, "
            f"{preset.num_layers} layers): " + "; ".join(problems[:5]) + more
        )


def parse_size(text: str | int) -> int:
    """'2GB' -> 2_000_000_000 (also KB/MB/GB/TB, KiB/MiB/GiB/TiB, plain bytes)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ConversionError(f"cannot parse size {text!r} (use e.g. 500MB, 2GB, 1GiB)")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    size = int(value * powers[unit])
    if size < 1:
        raise ConversionError(f"size {text!r} must be positive")
    return size


def write_safetensors(
    tensors: Mapping[str, torch.Tensor],
    directory: str,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = False,
) -> list[str]:
    """Write ``tensors`` (in their order) as ``model.safetensors``, or as
    ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` when they exceed
    ``max_shard_size`` (a single tensor larger than the limit gets a shard of its own)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    total = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        total += nbytes
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    names = [SAFE_WEIGHTS_NAME] if n == 1 else [
        f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
    ]
    bar = tqdm(total=len(tensors), desc="writing safetensors", unit="tensor", disable=not progress,
               file=sys.stderr)
    weight_map = {}
    for file_name, members in zip(names, shards):
        seen_storage: set[int] = set()
        shard = {}
        for name in members:
            t = tensors[name].detach().contiguous()
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_storage:
                t = t.clone()
            seen_storage.add(t.untyped_storage().data_ptr())
            shard[name] = t
            weight_map[name] = file_name
        save_file(shard, os.path.join(directory, file_name), metadata={"format": "pt"})
        bar.update(len(members))
    bar.close()
    if n > 1:
        with open(os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def _copy_hf_metadata(src: str, dst: str) -> None:
    """Copy the small non-weight files of an HF directory (config, tokenizer, generation
    config, ...)."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        path = os.path.join(src, name)
        if not os.path.isfile(path) or name == SAFE_WEIGHTS_INDEX_NAME:
            continue
        if name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")):
            continue
        if os.path.getsize(path) > 64 * 2**20:
            continue
        shutil.copy2(path, os.path.join(dst, name))


# --------------------------------------------------------------------------------------------
# Output directories
# --------------------------------------------------------------------------------------------


def _collective() -> bool:
    """True inside a multi-rank torch.distributed job (every rank runs the conversion)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not _collective() or dist.get_rank() == 0


def _broadcast(value: Any) -> Any:
    """Rank 0's value on every rank (identity outside a multi-rank job)."""
    if not _collective():
        return value
    from megatron_rlp import collectives

    return collectives.broadcast_object(value, src=0)


def _barrier() -> None:
    if _collective():
        from megatron_rlp import collectives

        collectives.barrier()


def _make_staging_dir(final: str, overwrite: bool, inputs: Sequence[str]) -> str:
    for src in inputs:
        if os.path.realpath(src) == os.path.realpath(final):
            raise ConversionError(f"the output {final} is the input directory")
    if os.path.lexists(final):
        if not overwrite:
            raise ConversionError(f"output {final} already exists; pass --overwrite to replace it")
        if not os.path.isdir(final):
            raise ConversionError(f"output {final} exists and is not a directory")
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=parent)


@contextlib.contextmanager
def staged_output(final: str, overwrite: bool, inputs: Sequence[str] = ()) -> Iterator[str]:
    """Yield a fresh ``<final>.tmp-XXXX`` directory; on success rename it to ``final`` (replacing
    an existing ``final`` only with ``overwrite``), on failure remove it.  In a multi-rank job
    rank 0 creates and renames it and every rank gets the same path."""
    final = os.path.abspath(final)
    made: tuple[Optional[str], Optional[str]] = (None, None)
    if _is_rank0():
        try:
            made = (_make_staging_dir(final, overwrite, inputs), None)
        except ConversionError as e:
            made = (None, str(e))
    tmp, error = _broadcast(made)
    if error is not None:
        raise ConversionError(error)
    try:
        yield tmp
        _barrier()
    except BaseException:
        if _is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _is_rank0():
        parent = os.path.dirname(final)
        if os.path.lexists(final):
            old = tempfile.mkdtemp(prefix=os.path.basename(final) + ".old-", dir=parent)
            os.rmdir(old)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    _barrier()


# --------------------------------------------------------------------------------------------
# Workers (one process per target rank)
# --------------------------------------------------------------------------------------------


@dataclass
class _Job:
    kind: str  # "hf_to_megatron" | "megatron_to_hf" | "megatron_to_megatron"
    model_type: str
    preset: ModelPreset
    tp: int
    pp: int
    dtype: str
    source: str
    output: str
    signature: Optional[dict] = None
    model_args: Optional[dict] = None  # the architecture as flags, for --use-checkpoint-args
    max_shard_size: int = 0
    progress: bool = True
    extra: dict = field(default_factory=dict)


def _init_parallel(job: _Job) -> None:
    from megatron_rlp.training import parallel

    parallel.init_model_parallel(job.tp, job.pp)
    parallel.set_seed(1234)


def _build_model(preset: ModelPreset, tp: int, pp: int, dtype: torch.dtype):
    """This rank's stage of the model, with uninitialised weights, all parameters in ``dtype``
    (as the training loop's Float16Module casts them)."""
    from megatron_rlp.models.builder import build_model, transformer_config

    config = transformer_config(preset, tp=tp, pp=pp, params_dtype=dtype)
    config = dataclasses.replace(config, perform_initialization=False)
    model = build_model(preset, config)
    return model.to(dtype).eval()


def _progress_enabled(job: _Job) -> bool:
    import torch.distributed as dist

    return job.progress and dist.get_rank() == 0


def _read_stage(job: _Job, arch: Architecture, layers: range) -> dict[str, torch.Tensor]:
    """The HF tensors of this stage's layers (renumbered from 0) plus the global tensors."""
    from tqdm import tqdm

    ckpt = HFCheckpoint(job.source)
    layer_key = re.compile(r"^(.*?layers\.)(\d+)\.(.+)$")
    wanted: dict[str, str] = {}
    for key in ckpt.keys():
        m = layer_key.match(key)
        if m is None:
            wanted[key] = key
        elif int(m.group(2)) in layers:
            wanted[key] = f"{m.group(1)}{int(m.group(2)) - layers.start}.{m.group(3)}"
    dtype = _DTYPES[job.dtype]
    out = {}
    for key in tqdm(wanted, desc="reading HF weights", unit="tensor",
                    disable=not _progress_enabled(job), file=sys.stderr):
        out[wanted[key]] = ckpt.get(key).to(dtype)
    return out


def _stage_state_dict(job: _Job, arch: Architecture, pp_rank: int, te_spec: bool) -> dict:
    """This pipeline stage's full-width (TP=1) megatron state dict, layers numbered locally."""
    layers = hq.pipeline_layer_range(job.preset.num_layers, pp_rank, job.pp)
    stage = arch.to_megatron(
        _read_stage(job, arch, layers), arch.stage_preset(job.preset, layers), te_spec
    )
    first, last = pp_rank == 0, pp_rank == job.pp - 1
    out = {}
    for name, t in stage.items():
        if name.startswith("embedding.") and not first:
            continue
        if (name == arch.final_norm_key or name.startswith("output_layer.")) and not last:
            continue
        out[name] = t
    if job.preset.tie_embeddings and last and not first:
        out["output_layer.weight"] = stage["embedding.word_embeddings.weight"]
    return out


def _save_weights(job: _Job, model) -> None:
    from megatron_rlp.training.checkpoint import save_model_checkpoint

    if _progress_enabled(job):
        print(f"writing megatron checkpoint (TP={job.tp}, PP={job.pp}) ...", file=sys.stderr,
              flush=True)
    save_model_checkpoint(job.output, [model], job.signature, iteration=0, model_args=job.model_args)


def _hf_to_megatron_job(job: _Job) -> None:
    from megatron.core import parallel_state

    arch = ARCHITECTURES[job.model_type]
    _init_parallel(job)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    model = _build_model(job.preset, job.tp, job.pp, _DTYPES[job.dtype])
    te_spec = any(k.endswith("layer_norm_weight") for k in model.state_dict())
    try:
        stage = _stage_state_dict(job, arch, pp_rank, te_spec)
        shard = arch.shard(stage, tp_rank, job.tp, job.preset)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{job.source}: {e.args[0] if e.args else e}") from None
    del stage
    hq.load_megatron_state_dict(model, shard)
    del shard
    _save_weights(job, model)


def _stored_dtype(ckpt_dir: str) -> str:
    """The dtype a checkpoint stores the word embedding in (torch.distributed initialised)."""
    from megatron.core import dist_checkpointing

    embed = dist_checkpointing.load_tensors_metadata(ckpt_dir).get("embedding.word_embeddings.weight")
    if embed is None:
        raise ConversionError(f"{ckpt_dir} holds no model weights (no word embedding tensor)")
    for name, value in _DTYPES.items():
        if value == embed.dtype:
            return name
    raise ConversionError(f"{ckpt_dir}: model weights are {embed.dtype}; pass --dtype")


def _load_megatron_model(job: _Job, tp: int, pp: int):
    """Build this rank's model at (tp, pp) and fill it from the checkpoint ``job.source`` (an
    iteration directory); only the model's tensors are requested.  ``job.dtype`` "auto" becomes
    the checkpoint's dtype."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    if job.dtype == "auto":
        job.dtype = _stored_dtype(job.source)
    model = _build_model(job.preset, tp, pp, _DTYPES[job.dtype])
    try:
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, job.source)
    except CheckpointingException as e:
        raise ConversionError(f"{job.source}: cannot read the model weights: {e}") from None
    model.load_state_dict(loaded["model"], strict=True)
    return model


def _config_from_dict(model_type: str, values: Mapping[str, Any]):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type].from_dict(dict(values))


def _megatron_to_hf_job(job: _Job) -> None:
    arch = ARCHITECTURES[job.model_type]
    _init_parallel(job)
    model = _load_megatron_model(job, 1, 1)
    if _progress_enabled(job):
        print(f"read {job.source}; converting to {arch.hf_class}", file=sys.stderr, flush=True)
    sd = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    del model
    if not _is_rank0():  # data-parallel replicas in a multi-rank job: rank 0 writes
        return
    try:
        hf_sd = arch.to_hf(sd, job.preset)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{job.source}: {e.args[0] if e.args else e}") from None
    out_dtype = job.dtype if job.extra["hf_dtype"] == "auto" else job.extra["hf_dtype"]
    hf_sd = {k: v.to(_DTYPES[out_dtype]) for k, v in hf_sd.items()}
    write_safetensors(hf_sd, job.output, job.max_shard_size, progress=_progress_enabled(job))
    config = _config_from_dict(arch.model_type, job.extra["config"])
    config.architectures = [arch.hf_class]
    config.dtype = _DTYPES[out_dtype]
    config.save_pretrained(job.output)


def _megatron_to_megatron_job(job: _Job) -> None:
    _init_parallel(job)
    model = _load_megatron_model(job, job.tp, job.pp)
    _save_weights(job, model)


_JOBS = {
    "hf_to_megatron": _hf_to_megatron_job,
    "megatron_to_hf": _megatron_to_hf_job,
    "megatron_to_megatron": _megatron_to_megatron_job,
}


_OWN_PROCESS = False  # set by the CLI and the spawned workers: processes the converter owns


def _collect_write_results_in_process() -> None:
    """megatron-core's torch_dist writer hands the results of a *synchronous* save back through a
    ``multiprocessing.Manager`` queue, whose server process takes seconds to start on the first
    save of every process.  The processes the converter owns (the CLI, its spawned workers) only
    save synchronously, where a plain in-process queue does the same job.  Not used when the
    converter runs inside someone else's process."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is None:
        filesystem_async._results_queue = queue.Queue()


def _worker_main(rank: int, job: _Job, world_size: int, init_file: str, err_dir: str) -> None:
    """Entry point of a spawned worker process."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    from megatron_rlp import platform

    platform.setup_platform()
    global _OWN_PROCESS
    _OWN_PROCESS = True
    _collect_write_results_in_process()
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        _JOBS[job.kind](job)
    except ConversionError as e:
        with open(os.path.join(err_dir, f"rank{rank}.txt"), "w") as f:
            f.write(str(e))
        sys.exit(_WORKER_USER_ERROR_EXIT)
    finally:
        from megatron_rlp.training import parallel

        parallel.destroy()
    from megatron_rlp import collectives

    collectives.barrier()
    dist.destroy_process_group()


def _run_in_process(job: _Job, scratch: str) -> None:
    """Run the job in this process: every rank of a multi-rank job, or alone (then a one-rank
    gloo group is created for the job and destroyed after it).  megatron's parallel state is
    re-created for the job and destroyed afterwards; the global RNG states are restored."""
    import numpy as np
    import torch.distributed as dist

    from megatron_rlp import platform
    from megatron_rlp.training import parallel

    platform.setup_platform()
    if _OWN_PROCESS:
        _collect_write_results_in_process()
    created = False
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(scratch, 'store')}",
                                rank=0, world_size=1)
        created = True
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        _JOBS[job.kind](job)
    finally:
        parallel.destroy()
        if created:
            dist.destroy_process_group()
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _spawn(job: _Job, world_size: int, scratch: str) -> None:
    import torch.multiprocessing as mp

    err_dir = os.path.join(scratch, "errors")
    os.makedirs(err_dir)
    try:
        # Workers convert on the CPU: hide GPUs (keeps their memory free and the local spec).
        with _environment(CUDA_VISIBLE_DEVICES="", MEGATRON_RLP_FORCE_CPU="1"):
            mp.start_processes(
                _worker_main,
                args=(job, world_size, os.path.join(scratch, "store"), err_dir),
                nprocs=world_size,
                join=True,
                start_method="spawn",
            )
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
        messages = []
        for name in sorted(os.listdir(err_dir)):
            with open(os.path.join(err_dir, name)) as f:
                messages.append(f.read())
        if messages:
            raise ConversionError(messages[0]) from None
        raise RuntimeError(f"a conversion worker failed:\n{e}") from None


def _run_job(job: _Job, ranks_needed: int) -> None:
    """Run ``job`` at its layout.

    * Inside a multi-rank torch.distributed job: collectively on all ranks (the world size must be
      a multiple of ``ranks_needed``; extra ranks are data-parallel replicas).
    * Otherwise, one rank on a machine without GPU: in this process.
    * Otherwise: in ``ranks_needed`` spawned CPU worker processes.
    """
    import torch.distributed as dist

    if _collective():
        world = dist.get_world_size()
        if world % ranks_needed:
            raise ConversionError(
                f"this job has {world} ranks; TP={job.tp} x PP={job.pp} needs a multiple of "
                f"{ranks_needed} (or run the converter outside torchrun: it starts its own workers)"
            )
        _run_in_process(job, "")
        return
    scratch = tempfile.mkdtemp(prefix="megatron_rlp_convert_")
    try:
        if ranks_needed == 1 and not torch.cuda.is_available():
            _run_in_process(job, scratch)
        else:
            _spawn(job, ranks_needed, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------------


def _hf_dtype(ckpt: HFCheckpoint, requested: str) -> str:
    if requested != "auto":
        return requested
    dtypes = {ckpt.dtype(k) for k in ckpt.keys()}
    if len(dtypes) == 1:
        dtype = dtypes.pop()
    else:  # mixed: the embedding's (what the bulk of the model is stored in)
        embed = [k for k in ckpt.keys() if "embed" in k]
        dtype = ckpt.dtype(embed[0]) if embed else torch.float32
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ConversionError(f"{ckpt.directory}: weights are {dtype}; pass --dtype")


def _check_dtype_name(dtype: str) -> str:
    if dtype != "auto" and dtype not in _DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose auto, {', '.join(_DTYPES)}")
    return dtype


def hf_to_megatron(
    hf_dir: str,
    megatron_dir: str,
    target_tp: int = 1,
    target_pp: int = 1,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> ModelPreset:
    """HF directory -> weights-only megatron checkpoint at TP x PP; returns the model's preset."""
    _check_dtype_name(dtype)
    ckpt = HFCheckpoint(hf_dir)
    arch = architecture_for_model_type(ckpt.config.get("model_type"))
    try:
        preset = arch.preset_from_config(ckpt.config)
    except (ValueError, TypeError, KeyError) as e:
        raise ConversionError(f"{hf_dir}/config.json: {e}") from None
    validate_target_layout(preset, target_tp, target_pp)
    check_hf_weights(ckpt, arch, preset)
    job = _Job(
        kind="hf_to_megatron",
        model_type=arch.model_type,
        preset=preset,
        tp=target_tp,
        pp=target_pp,
        dtype=_hf_dtype(ckpt, dtype),
        source=os.path.abspath(hf_dir),
        output="",
        signature=model_signature(preset),
        model_args=architecture_args(preset),
        progress=progress,
    )
    del ckpt
    start = time.perf_counter()
    with staged_output(megatron_dir, overwrite, inputs=[hf_dir]) as tmp:
        job.output = tmp
        _run_job(job, target_tp * target_pp)
        if _is_rank0():
            _copy_hf_metadata(hf_dir, os.path.join(tmp, HF_METADATA_DIR))
    if progress and _is_rank0():
        print(f"wrote {megatron_dir} ({arch.model_type}, TP={target_tp}, PP={target_pp}, "
              f"{job.dtype}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return preset


def resolve_megatron_checkpoint(path: str) -> tuple[str, dict]:
    """(iteration directory, common state) of a checkpoint root (with the tracker file) or of an
    iteration directory itself."""
    from megatron.core import dist_checkpointing

    from megatron_rlp.training.checkpoint import TRACKER, iteration_dir, read_tracker

    if not os.path.isdir(path):
        raise ConversionError(f"--megatron-dir {path!r} is not a directory")
    iteration = read_tracker(path)
    ckpt = iteration_dir(path, iteration) if iteration is not None else path
    if not os.path.isdir(ckpt):
        raise ConversionError(f"{path}/{TRACKER} names iteration {iteration} but {ckpt} is missing")
    if not os.path.isfile(os.path.join(ckpt, "metadata.json")):
        raise ConversionError(
            f"{path} is not a megatron checkpoint (no {TRACKER} and no dist-checkpoint "
            "metadata.json)"
        )
    try:
        common = dist_checkpointing.load_common_state_dict(ckpt)
    except Exception as e:  # noqa: BLE001 - any unreadable common state is a user-facing problem
        raise ConversionError(f"{ckpt}: cannot read the checkpoint's common state: {e}") from None
    if "model_signature" not in common:
        raise ConversionError(
            f"{ckpt} has no model_signature (not written by megatron_rlp's training loop or "
            "converter)"
        )
    return ckpt, common


def _named_preset_for(signature: Mapping[str, Any]) -> Optional[ModelPreset]:
    for preset in PRESETS.values():
        if model_signature(preset) == dict(signature):
            return preset
    return None


def _decode_special_floats(obj: Any) -> Any:
    """transformers writes inf / nan in config.json as ``{"__float__": "Infinity"}``."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"} and obj["__float__"] in ("Infinity", "-Infinity", "NaN"):
            return float(obj["__float__"].replace("Infinity", "inf"))
        return {k: _decode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_special_floats(v) for v in obj]
    return obj


def _read_config_json(path: str) -> dict:
    with open(path) as f:
        return _decode_special_floats(json.load(f))


def _load_config_template(path: str, arch: Architecture) -> dict:
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ConversionError(f"--hf-config {path!r}: no config.json there")
    config = _read_config_json(file)
    if config.get("model_type") != arch.model_type:
        raise ConversionError(
            f"--hf-config {file}: model_type {config.get('model_type')!r} does not match the "
            f"checkpoint's architecture {arch.model_type!r}"
        )
    return config


def _signature_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def _hf_config_for(
    arch: Architecture,
    signature: Mapping[str, Any],
    template: Optional[dict],
    template_is_explicit: bool,
    max_position_embeddings: Optional[int],
    stored_max_position_embeddings: Optional[int] = None,
) -> tuple[ModelPreset, Any]:
    """The preset and the transformers config to write: the template's fields where it matches
    the checkpoint, the architecture from the signature."""
    if template is not None:
        try:
            tpl_preset = arch.preset_from_config(template)
            diff = _signature_diff(model_signature(tpl_preset), signature)
        except (ValueError, TypeError, KeyError) as e:
            diff = [str(e)]
        if diff:
            if template_is_explicit:
                raise ConversionError(
                    "--hf-config does not describe the checkpoint's model (" + "; ".join(diff) + ")"
                )
            print(f"note: ignoring {HF_METADATA_DIR}/config.json, it does not match the "
                  f"checkpoint ({'; '.join(diff[:3])})", file=sys.stderr)
            template = None
    if template is not None:
        mpe = max_position_embeddings or tpl_preset.max_position_embeddings
        preset = preset_from_signature(signature, "converted", mpe)
        config_dict = dict(template)
        if max_position_embeddings:
            config_dict["max_position_embeddings"] = max_position_embeddings
        return preset, _config_from_dict(arch.model_type, config_dict)
    named = _named_preset_for(signature)
    mpe = (max_position_embeddings or stored_max_position_embeddings
           or (named.max_position_embeddings if named else 4096))
    preset = preset_from_signature(signature, named.name if named else "converted", mpe)
    try:
        config = arch.config_from_preset(preset)
    except ValueError as e:
        raise ConversionError(f"the checkpoint's model has no {arch.model_type} equivalent: {e}") \
            from None
    return preset, config


def megatron_to_hf(
    megatron_dir: str,
    hf_dir: str,
    *,
    dtype: str = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    hf_config: Optional[str] = None,
    max_position_embeddings: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ModelPreset:
    """Megatron checkpoint (weights-only or training) -> HF directory; returns the preset."""
    _check_dtype_name(dtype)
    limit = parse_size(max_shard_size)
    ckpt_dir, common = resolve_megatron_checkpoint(megatron_dir)
    signature = common["model_signature"]
    arch = architecture_for_family(signature.get("family"), ckpt_dir)
    metadata_dir = os.path.join(megatron_dir, HF_METADATA_DIR)
    template, explicit = None, hf_config is not None
    if hf_config is not None:
        template = _load_config_template(hf_config, arch)
    elif os.path.isfile(os.path.join(metadata_dir, "config.json")):
        template = _read_config_json(os.path.join(metadata_dir, "config.json"))
        if template.get("model_type") != arch.model_type:
            template = None
    stored_mpe = common.get("model_args", {}).get("max_position_embeddings")
    preset, config = _hf_config_for(arch, signature, template, explicit, max_position_embeddings,
                                    stored_mpe)
    job = _Job(
        kind="megatron_to_hf",
        model_type=arch.model_type,
        preset=preset,
        tp=1,
        pp=1,
        dtype="auto",
        source=os.path.abspath(ckpt_dir),
        output="",
        max_shard_size=limit,
        progress=progress,
        extra={"hf_dtype": dtype, "config": config.to_dict()},
    )
    start = time.perf_counter()
    with staged_output(hf_dir, overwrite, inputs=[megatron_dir]) as tmp:
        job.output = tmp
        _run_job(job, 1)
        if _is_rank0() and os.path.isdir(metadata_dir) and template is not None and not explicit:
            for name in os.listdir(metadata_dir):  # tokenizer, generation config, ...
                if name != "config.json":
                    shutil.copy2(os.path.join(metadata_dir, name), os.path.join(tmp, name))
    if progress and _is_rank0():
        print(f"wrote {hf_dir} ({arch.hf_class}) in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return preset


def megatron_to_megatron(
    megatron_dir: str,
    target_dir: str,
    target_tp: int = 1,
    target_pp: int = 1,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> ModelPreset:
    """Re-lay out a checkpoint's model weights at TP x PP (a weights-only checkpoint)."""
    _check_dtype_name(dtype)
    ckpt_dir, common = resolve_megatron_checkpoint(megatron_dir)
    signature = common["model_signature"]
    named = _named_preset_for(signature)
    model_args = common.get("model_args") or args_from_signature(signature)
    preset = preset_from_signature(
        signature, named.name if named else "converted",
        model_args["max_position_embeddings"] or (named.max_position_embeddings if named else 4096),
    )
    validate_target_layout(preset, target_tp, target_pp)
    model_type = _FAMILY_TO_MODEL_TYPE.get(preset.family, preset.family)
    job = _Job(
        kind="megatron_to_megatron",
        model_type=model_type,
        preset=preset,
        tp=target_tp,
        pp=target_pp,
        dtype=dtype,
        source=os.path.abspath(ckpt_dir),
        output="",
        signature=dict(signature),
        model_args=dict(model_args),
        progress=progress,
    )
    start = time.perf_counter()
    with staged_output(target_dir, overwrite, inputs=[megatron_dir]) as tmp:
        job.output = tmp
        _run_job(job, target_tp * target_pp)
        metadata_dir = os.path.join(megatron_dir, HF_METADATA_DIR)
        if _is_rank0() and os.path.isdir(metadata_dir):
            shutil.copytree(metadata_dir, os.path.join(tmp, HF_METADATA_DIR))
    if progress and _is_rank0():
        print(f"wrote {target_dir} (TP={target_tp}, PP={target_pp}) in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return preset


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description="Convert Hugging Face (safetensors) <-> megatron-core dist checkpoints "
        f"(model types: {', '.join(SUPPORTED_MODEL_TYPES)}).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    dtypes = ["auto", *_DTYPES]

    p = sub.add_parser("hf-to-megatron", help="HF directory -> weights-only megatron checkpoint")
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--megatron-dir", required=True, help="output checkpoint directory (--load it)")
    p.add_argument("--target-tp", type=int, default=1, help="tensor-parallel size to write at")
    p.add_argument("--target-pp", type=int, default=1, help="pipeline-parallel size to write at")
    p.add_argument("--dtype", choices=dtypes, default="auto",
                   help="parameter dtype of the checkpoint (auto: the HF weights' dtype)")

    p = sub.add_parser("megatron-to-hf", help="megatron checkpoint -> HF directory")
    p.add_argument("--megatron-dir", required=True,
                   help="checkpoint root (with latest_checkpointed_iteration.txt) or an iter_* dir")
    p.add_argument("--hf-dir", required=True, help="output HF directory")
    p.add_argument("--dtype", choices=dtypes, default="auto",
                   help="dtype of the written tensors (auto: the checkpoint's)")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help="split the safetensors above this size (e.g. 500MB, 2GB)")
    p.add_argument("--hf-config", default=None,
                   help="config.json (or HF directory) to take non-architecture fields from "
                   f"(default: the checkpoint's {HF_METADATA_DIR}/config.json when present)")
    p.add_argument("--max-position-embeddings", type=int, default=None,
                   help="max_position_embeddings of the written config (not in the checkpoint)")

    p = sub.add_parser("megatron-to-megatron", help="re-lay out a megatron checkpoint at TP x PP")
    p.add_argument("--megatron-dir", required=True, help="source checkpoint root or iter_* dir")
    p.add_argument("--target-dir", required=True, help="output checkpoint directory")
    p.add_argument("--target-tp", type=int, default=1)
    p.add_argument("--target-pp", type=int, default=1)
    p.add_argument("--dtype", choices=dtypes, default="auto")

    for p in sub.choices.values():
        p.add_argument("--overwrite", action="store_true", help="replace an existing output")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Optional[Sequence[str]] = None, *, own_process: bool = False) -> int:
    """The command line; returns the exit code (2 for a :class:`ConversionError`).

    Under torchrun (``WORLD_SIZE`` > 1) every rank takes part in the conversion (the process
    group is created here when it does not exist yet).  ``own_process``: this process exists only
    for the conversion (tools/convert_checkpoint.py), which allows a faster checkpoint writer
    set-up (see :func:`_collect_write_results_in_process`)."""
    import torch.distributed as dist

    global _OWN_PROCESS
    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    created = False
    if launched and not dist.is_initialized():
        from megatron_rlp.training import parallel

        parallel.init_distributed()
        created = True
    previous, _OWN_PROCESS = _OWN_PROCESS, own_process or _OWN_PROCESS
    try:
        if args.command == "hf-to-megatron":
            hf_to_megatron(args.hf_dir, args.megatron_dir, args.target_tp, args.target_pp,
                           dtype=args.dtype, overwrite=args.overwrite, progress=progress)
        elif args.command == "megatron-to-hf":
            megatron_to_hf(args.megatron_dir, args.hf_dir, dtype=args.dtype,
                           max_shard_size=args.max_shard_size, hf_config=args.hf_config,
                           max_position_embeddings=args.max_position_embeddings,
                           overwrite=args.overwrite, progress=progress)
        else:
            megatron_to_megatron(args.megatron_dir, args.target_dir, args.target_tp,
                                 args.target_pp, dtype=args.dtype, overwrite=args.overwrite,
                                 progress=progress)
    except ConversionError as e:
        where = f"[rank {dist.get_rank()}] " if _collective() else ""
        print(f"{where}error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        _OWN_PROCESS = previous
        if created and dist.is_initialized():
            dist.destroy_process_group()
    return 0
