"""Nemotron-H hybrid model: megatron-core's ``MambaModel`` with a layer spec that also runs on CPU.

megatron-core 0.16.1 can build ``MambaModel`` only with Transformer Engine and ``mamba_ssm``: its
Mamba specs use TE layers, ``MambaStack`` hard-codes ``TENorm`` as the final norm, and
``MambaMixer`` refuses to start without ``mamba_ssm`` (the chunked SSD scan and the gated RMSNorm
come from there; the conv1d and single-token decode already have torch fallbacks in the mixer).
What this module changes, and nothing more:

* :func:`install_torch_mamba_ops` — only when ``mamba_ssm`` did not import — fills the names the
  mixer module imports from it (``mamba_chunk_scan_combined``, the gated ``RMSNorm``) with the
  pure-torch versions in :mod:`megatron_rlp.models.mamba_torch`, and marks ``HAVE_MAMBA_SSM``.
  Those names are otherwise missing (or a ``MagicMock``) in ``megatron.core.ssm.mamba_mixer``, so
  nothing working is replaced.  The torch path has no ``mamba_split_conv1d_scan_combined``, so
  :func:`build_hybrid_model` sets ``use_mamba_mem_eff_path=False`` when the torch ops are in use
  (the mixer then runs conv1d, scan and gated norm as separate steps; same math).
* :class:`HybridMambaStack` — ``MambaStack`` whose final norm is a spec'd class instead of the
  hard-coded ``TENorm``.
* :class:`HybridMambaMixer` — ``MambaMixer`` whose static-batching SSM states belong to the
  inference context, not to the module: it reuses the context's conv/SSM states whenever their batch
  size matches, so a context whose rows were forked (:func:`fork_inference_state`), or several
  contexts used in turn, keep their states.  (Stock ``MambaMixer`` remembers one
  ``cached_batch_size`` per module and silently re-allocates zero states when it differs.)  It
  also continues a multi-token chunk from those states (:meth:`HybridMambaMixer.ssm_continue`).
* :class:`HybridSelfAttention` — ``SelfAttention`` whose multi-token call at a non-zero cache
  offset is causal (megatron drops the mask there).
* :func:`hybrid_stack_spec` — the TE-free spec: megatron's local ``ColumnParallelLinear`` /
  ``RowParallelLinear``, ``DotProductAttention``, :class:`~megatron_rlp.models.norm.ConfigRMSNorm`
  (``torch.nn.RMSNorm``, sequence-parallel capable) for every pre-norm and the final norm,
  ``MLP`` with the config's activation (squared ReLU for Nemotron-H).  With CUDA and TE it
  returns megatron's TE spec with the mixer swapped for :class:`HybridMambaMixer` and the stack
  for :class:`HybridMambaStack` (final norm ``TENorm``, as megatron's).  The local spec maps its
  separate norms onto the TE spec's fused ``layer_norm_weight`` names in sharded (distributed)
  checkpoints, so checkpoints move between the two.

Inference state (``StaticInferenceContext.key_value_memory_dict``, keyed by global layer number):

* Mamba layer ``n``: ``(conv_state, ssm_state)``; ``conv_state`` [batch, conv_dim, d_conv] holds the
  last ``d_conv`` pre-convolution inputs (x, B, C channels of this TP rank), ``ssm_state``
  [batch, heads_local, head_dim, d_state].  Batch is dim 0; the tensors are sized to the batch of
  the prefill.
* Attention layer ``n``: ``(key, value)`` buffers [max_sequence_length, max_batch_size,
  kv_groups_local, kv_channels]; batch is dim 1, rows ``batch_size_offset : +batch``.
* A call at ``sequence_len_offset > 0`` continues the sequence: one token is megatron's decode
  step; several tokens (a chunk, e.g. the sampler's prefill from one sampled position to the next)
  run :meth:`HybridMambaMixer.ssm_continue` in the Mamba layers (convolution and scan from the
  held conv/SSM states) and :class:`HybridSelfAttention`'s causal append in the attention layers,
  where megatron-core 0.16.1 supports only one token.  Keep ``batch_size_offset = 0`` (the Mamba
  states ignore it).  :func:`inference_state_layout` names the kind of every key,
  :func:`fork_inference_state` re-indexes all of them at once.

Chunk continuation, what ran where.  Checked on CPU only: in fp32, the conv/SSM states after
every chunk, the attention caches and the logits against megatron's one-token decode path and a
plain forward (the torch scan and ``torch.nn.Conv1d``; megatron's local attention, and a stand-in
core attention that, like Transformer Engine's, applies the mask type it is handed and ignores
explicit masks); in bf16, megatron's fused-softmax dispatch with CPU stand-ins for the CUDA
softmax kernels.  Not run (no GPU): the kernels this path selects when they import — mamba-ssm's
``mamba_chunk_scan_combined`` with ``initial_states`` (the kernel the mixer's own prefill calls),
causal-conv1d's ``causal_conv1d_fn`` with ``initial_states``, Transformer Engine's attention with
``causal_bottom_right``.  In bf16 the chunked path keeps the SSM state in fp32 within a chunk while
one-token decoding rounds it to the state's dtype (megatron allocates it in the parameters' dtype)
after every token, so the two differ by that rounding, the chunked path being the more accurate.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch

from megatron.core import parallel_state, tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.mamba.mamba_model import MambaModel
from megatron.core.ssm import mamba_mixer as _mixer_module
from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
from megatron.core.ssm.mamba_hybrid_layer_allocation import Symbols
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import Attention, SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)
from megatron.core.utils import WrappedTensor, make_viewless_tensor

from megatron_rlp.models import mamba_torch
from megatron_rlp.models.norm import ConfigRMSNorm
from megatron_rlp.models.shared_prefix import shared_prefix_core_attention
from megatron_rlp.models.presets import ModelPreset

__all__ = [
    "ConfigRMSNorm",
    "ShardedGatedRMSNorm",
    "HybridMambaMixer",
    "HybridSelfAttention",
    "HybridMambaStack",
    "install_torch_mamba_ops",
    "hybrid_transformer_config",
    "hybrid_stack_spec",
    "build_hybrid_model",
    "inference_state_layout",
    "fork_inference_state",
]


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class ShardedGatedRMSNorm(mamba_torch.GatedRMSNorm):
    """The mixer's gated norm with megatron's distributed-checkpoint sharding (weight split over TP
    along dim 0, like megatron's ``ExtendedRMSNorm``)."""

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        tp_group = getattr(self, "tp_group", None)
        if tp_group is None:
            tp_group = parallel_state.get_tensor_model_parallel_group()
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            {"weight": 0},
            sharded_offsets,
            tp_group=tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )


class HybridMambaMixer(MambaMixer):
    """``MambaMixer`` whose static-batching states are owned by the inference context.

    Before the stock lookup, the module's ``cached_batch_size`` is synchronised with the states the
    context already holds for this layer, so states of the right batch size are always reused (and
    zeroed only at ``sequence_len_offset == 0``, as before).
    """

    def forward(self, hidden_states, inference_context=None, *, inference_params=None, packed_seq_params=None):
        from megatron_rlp.models.shared_prefix import SharedPrefixLayout, shared_prefix_ssm

        if hasattr(packed_seq_params, "mamba_decode"):  # sampling.cascade: per-branch states
            return packed_seq_params.mamba_decode(self, hidden_states)
        if isinstance(packed_seq_params, SharedPrefixLayout):  # the RLP update's packed rows
            zxBCdt, _ = self.in_proj(hidden_states)
            return self.out_proj(shared_prefix_ssm(self, zxBCdt, packed_seq_params))
        context = inference_context if inference_context is not None else inference_params
        if _continues_chunk(context, self.training, hidden_states.shape[0]):
            conv_state, ssm_state = self._states_to_continue(context, hidden_states.shape[1])
            zxBCdt, _ = self.in_proj(hidden_states)
            return self.out_proj(self.ssm_continue(zxBCdt, conv_state, ssm_state))
        return super().forward(hidden_states, inference_context, inference_params=inference_params,
                               packed_seq_params=packed_seq_params)

    def _states_to_continue(self, context, batch_size):
        states = context.key_value_memory_dict.get(self.layer_number)
        if states is None or states[0].shape[0] != batch_size:
            have = "none" if states is None else f"batch {states[0].shape[0]}"
            raise ValueError(
                f"Mamba layer {self.layer_number}: a {batch_size}-row chunk at sequence offset "
                f"{context.sequence_len_offset} continues the conv/SSM states of an earlier call, "
                f"but the inference context holds {have}; run the sequence from offset 0 with the "
                "same batch first (or fork the context with fork_inference_state)"
            )
        return states

    def ssm_continue(self, zxBCdt: torch.Tensor, conv_state: torch.Tensor,
                     ssm_state: torch.Tensor) -> torch.Tensor:
        """Convolution + scan + gated norm of a multi-token chunk that continues a sequence: the
        chunk's input projection ``zxBCdt`` [L, b, D] starts from ``conv_state`` [b, conv_dim,
        d_conv] (the last d_conv inputs of the convolution; the newest d_conv - 1 of them are the
        window the chunk's first outputs read) and ``ssm_state`` [b, heads, head_dim, d_state]
        (the scan's initial state).  Both are updated in place to the states after the chunk's
        last token, what L one-token decode steps leave there.  Returns y [L, b, d_inner] for
        ``out_proj``.

        Kernels: the scan is the mixer module's ``mamba_chunk_scan_combined`` with
        ``initial_states`` and ``return_final_states`` (mamba-ssm's Triton kernel on a GPU, the
        torch scan of :mod:`~megatron_rlp.models.mamba_torch` without it); the convolution is
        causal-conv1d's ``causal_conv1d_fn`` with ``initial_states`` when it imports (channels-last
        inputs, as that kernel requires), else the mixer's ``torch.nn.Conv1d`` over the window
        followed by the chunk.  The new conv state is the last d_conv columns of
        [old state | chunk inputs] (chunks shorter than d_conv keep part of the old window).
        """
        if self.cp.cp_size != 1:
            raise NotImplementedError("continuing a Mamba chunk from a state needs context parallelism off")
        length = zxBCdt.shape[0]
        d_inner, ngroups, nheads = self.cp.d_inner_local_tpcp, self.cp.ngroups_local_tpcp, self.cp.nheads_local_tpcp
        z, xBC, dt = torch.split(
            zxBCdt.transpose(0, 1), [d_inner, d_inner + 2 * ngroups * self.d_state, nheads], dim=-1
        )  # [b, L, ...]
        xBC = xBC.contiguous().transpose(1, 2)  # [b, conv_dim, L], channels-last in memory
        window = conv_state[:, :, 1:]  # the last d_conv - 1 inputs
        conv_fn = _mixer_module.causal_conv1d_fn
        if conv_fn is not None and self.activation in ("silu", "swish"):
            conv_out = conv_fn(
                x=xBC,
                weight=self.cp.get_conv1d_weight().squeeze(1),
                bias=self.cp.get_conv1d_bias(),
                activation=self.activation,
                initial_states=window.transpose(1, 2).contiguous().transpose(1, 2),
            )
        else:
            width = self.d_conv - 1
            conv_in = torch.cat([window.to(xBC.dtype), xBC], dim=-1)
            conv_out = self.act(self.cp.conv1d(conv_in)[..., width : width + length])
        conv_state.copy_(torch.cat([conv_state, xBC.to(conv_state.dtype)], dim=-1)[..., -self.d_conv :])

        x, B, C = torch.split(
            conv_out.transpose(1, 2), [d_inner, ngroups * self.d_state, ngroups * self.d_state], dim=-1
        )
        p, n = self.headdim, self.d_state
        D = self.cp.get_D()
        if self.D_has_hdim:
            D = D.float().view(nheads, p)
        y, final_state = _mixer_module.mamba_chunk_scan_combined(
            x.reshape(*x.shape[:2], nheads, p).contiguous(),
            dt.contiguous(),
            -torch.exp(self.cp.get_A_log().float()),
            B.reshape(*B.shape[:2], ngroups, n).contiguous(),
            C.reshape(*C.shape[:2], ngroups, n).contiguous(),
            self.chunk_size,
            D=D,
            z=None if self.rmsnorm else z.reshape(*z.shape[:2], nheads, p).contiguous(),
            dt_bias=self.cp.get_dt_bias().float(),
            dt_softplus=True,
            initial_states=ssm_state,
            return_final_states=True,
        )
        ssm_state.copy_(final_state)
        y = y.reshape(*y.shape[:2], nheads * p).transpose(0, 1).contiguous()  # [L, b, d_inner]
        if self.rmsnorm:
            y = self.norm(y, z.transpose(0, 1).contiguous())
        return y

    def _get_states_from_cache(self, inference_context, batch_size, *, inference_params=None):
        context = inference_context if inference_context is not None else inference_params
        states = None
        if context is not None and context.is_static_batching():
            states = context.key_value_memory_dict.get(self.layer_number)
        if states is not None and states[0].shape[0] == batch_size:
            self.cached_batch_size = batch_size
        return super()._get_states_from_cache(
            inference_context, batch_size, inference_params=inference_params
        )


def _continues_chunk(context, training: bool, length: int) -> bool:
    """Whether a forward of ``length`` tokens continues a sequence held in a static inference
    context with more than one token: megatron-core 0.16.1 handles a call at a non-zero
    ``sequence_len_offset`` only as a one-token decode (the mixer asserts one token; the attention
    drops its causal mask)."""
    return (
        context is not None
        and not training
        and context.is_static_batching()
        and context.sequence_len_offset > 0
        and length > 1
    )


class HybridSelfAttention(SelfAttention):
    """``SelfAttention`` that appends a multi-token chunk to a static KV cache causally.

    At ``sequence_len_offset > 0`` megatron's attention stores the chunk's K/V at slots
    ``offset : offset + s`` and attends over slots ``0 : offset + s`` with ``no_mask``: right for
    one query token, wrong for s > 1 (every chunk token would see the later ones).  When such a
    call carries no ``attention_mask`` of its own, this class makes it causal with the keys
    right-aligned to the queries (query i sees slots up to ``offset + i``):

    * the mask type handed to the core attention becomes ``causal_bottom_right`` — what Transformer
      Engine's ``DotProductAttention`` applies (flash-attention / cuDNN kernels);
    * megatron's local ``DotProductAttention`` ignores the mask type and reads an explicit mask, so
      it gets the [1, 1, s, offset + s] bottom-right causal mask, with its softmax switched to
      ``padding`` for the call (its causal variant takes the fused upper-triangular kernel, which
      asserts queries == keys, wherever that kernel qualifies).

    Calls with a mask (the sampler's decode steps), at offset 0, or in training are unchanged.
    """

    _chunk_after_cache = False

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        context = kwargs.get("inference_context")
        if context is None:
            context = kwargs.get("inference_params")
        length = hidden_states.shape[0]
        if attention_mask is not None or not _continues_chunk(context, self.training, length):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        softmax = None
        if isinstance(self.core_attention, DotProductAttention):
            keys = context.sequence_len_offset + length
            query_slot = torch.arange(keys - length, keys, device=hidden_states.device)
            key_slot = torch.arange(keys, device=hidden_states.device)
            attention_mask = (key_slot[None, :] > query_slot[:, None]).view(1, 1, length, keys)
            softmax = self.core_attention.scale_mask_softmax
            saved_type = softmax.attn_mask_type
            softmax.attn_mask_type = AttnMaskType.padding
        self._chunk_after_cache = True
        try:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        finally:
            self._chunk_after_cache = False
            if softmax is not None:
                softmax.attn_mask_type = saved_type

    def _adjust_key_value_for_inference(self, *args, **kwargs):
        adjusted = super()._adjust_key_value_for_inference(*args, **kwargs)
        if not self._chunk_after_cache:
            return adjusted
        query, key, value, rotary_pos_emb, _, block_table = adjusted
        return query, key, value, rotary_pos_emb, AttnMaskType.causal_bottom_right, block_table


class HybridMambaStack(MambaStack):
    """``MambaStack`` with the final norm built from ``final_norm`` (a module spec or class called
    as ``final_norm(config=, hidden_size=, eps=)``) instead of the hard-coded ``TENorm``, and with
    full activation recompute (``recompute_granularity='full'``), which megatron-core 0.16.1's
    ``MambaStack`` silently ignores.  Same semantics as ``TransformerBlock``: "uniform" checkpoints
    chunks of ``recompute_num_layers`` layers, "block" the first ``recompute_num_layers`` layers of
    the stage.  (Selective recompute acts in the attention layers, as megatron's ``Attention``
    implements it.)"""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MambaStackSubmodules,
        *args,
        final_norm: Union[ModuleSpec, type] = ConfigRMSNorm,
        post_layer_norm: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and self.post_layer_norm:
            self.final_norm = build_module(
                final_norm,
                config=self.config,
                hidden_size=self.config.hidden_size,
                eps=self.config.layernorm_epsilon,
            )

    def forward(self, hidden_states, attention_mask, inference_context=None, rotary_pos_emb=None,
                *, inference_params=None, packed_seq_params=None, padding_mask=None):
        recompute = (
            self.config.recompute_granularity == "full"
            and self.training
            and inference_context is None
            and inference_params is None
        )
        if not recompute:
            return super().forward(
                hidden_states, attention_mask, inference_context, rotary_pos_emb,
                inference_params=inference_params, packed_seq_params=packed_seq_params,
                padding_mask=padding_mask,
            )
        if not self.pre_process:
            hidden_states = self.input_tensor
        if isinstance(hidden_states, WrappedTensor):
            hidden_states = hidden_states.unwrap()

        def run_layers(start: int, end: int):
            def forward(hidden_states, attention_mask, rotary_pos_emb):
                for layer in self.layers[start:end]:
                    if isinstance(layer, TransformerLayer):
                        hidden_states = layer(
                            hidden_states=hidden_states, attention_mask=attention_mask,
                            rotary_pos_emb=rotary_pos_emb, packed_seq_params=packed_seq_params,
                            padding_mask=padding_mask,
                        )
                    else:
                        hidden_states = layer(
                            hidden_states=hidden_states, attention_mask=attention_mask,
                            packed_seq_params=packed_seq_params,
                        )
                    if isinstance(hidden_states, tuple):  # attention / MLP layers: (hidden, context)
                        hidden_states = hidden_states[0]
                return hidden_states

            return forward

        def checkpointed(start: int, end: int, hidden_states):
            return tensor_parallel.checkpoint(
                run_layers(start, end), self.config.distribute_saved_activations,
                hidden_states, attention_mask, rotary_pos_emb,
            )

        n, k = len(self.layers), self.config.recompute_num_layers
        if self.config.recompute_method == "uniform":
            for start in range(0, n, k):
                hidden_states = checkpointed(start, min(start + k, n), hidden_states)
        elif self.config.recompute_method == "block":
            for i in range(n):
                if i < k:
                    hidden_states = checkpointed(i, i + 1, hidden_states)
                else:
                    hidden_states = run_layers(i, i + 1)(hidden_states, attention_mask, rotary_pos_emb)
        else:
            raise ValueError(f"invalid recompute_method {self.config.recompute_method!r}")

        if self.post_process and self.post_layer_norm:
            hidden_states = self.final_norm(hidden_states)
        return make_viewless_tensor(
            inp=hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True
        )


# --------------------------------------------------------------------------------------------
# Torch fallbacks for mamba_ssm
# --------------------------------------------------------------------------------------------


def install_torch_mamba_ops() -> bool:
    """Give ``megatron.core.ssm.mamba_mixer`` the pure-torch scan and gated norm when ``mamba_ssm``
    is not importable (idempotent).  Returns True when the torch ops are what the mixer uses."""
    if getattr(_mixer_module, "_MEGATRON_RLP_TORCH_OPS", False):
        return True
    if _mixer_module.HAVE_MAMBA_SSM:
        return False
    _mixer_module.mamba_chunk_scan_combined = mamba_torch.mamba_chunk_scan_combined
    _mixer_module.RMSNormGated = mamba_torch.GatedRMSNorm
    _mixer_module.ExtendedRMSNorm = ShardedGatedRMSNorm
    _mixer_module.HAVE_MAMBA_SSM = True
    _mixer_module._MEGATRON_RLP_TORCH_OPS = True
    return True


# --------------------------------------------------------------------------------------------
# Config, spec, model
# --------------------------------------------------------------------------------------------


def _validate_pattern(preset: ModelPreset, config: TransformerConfig) -> str:
    if preset.family != "hybrid":
        raise ValueError(f"preset {preset.name!r} is family {preset.family!r}, not 'hybrid'")
    pattern = preset.hybrid_pattern
    if not pattern:
        raise ValueError(f"hybrid preset {preset.name!r} has no hybrid_pattern")
    supported = {Symbols.MAMBA, Symbols.ATTENTION, Symbols.MLP}
    bad = sorted(set(pattern) - supported)
    if bad:
        raise ValueError(
            f"hybrid_pattern of {preset.name!r} has layer symbols {bad}; supported: "
            f"{sorted(supported)} (M = Mamba, * = attention, - = MLP)"
        )
    if len(pattern) != config.num_layers:
        raise ValueError(
            f"hybrid_pattern of {preset.name!r} has {len(pattern)} layers, config has "
            f"{config.num_layers}"
        )
    pp = config.pipeline_model_parallel_size
    uneven = (
        config.num_layers_in_first_pipeline_stage is not None
        or config.num_layers_in_last_pipeline_stage is not None
    )
    if pp > 1 and not uneven and config.num_layers % pp:
        # MambaStack would silently drop the remainder layers.
        raise ValueError(
            f"--pipeline-model-parallel-size {pp} does not divide the {config.num_layers} layers "
            f"of {preset.name!r}; set --decoder-first-pipeline-num-layers / "
            "--decoder-last-pipeline-num-layers for an uneven split"
        )
    return pattern


def hybrid_transformer_config(
    preset: ModelPreset, config: TransformerConfig, torch_ops: bool
) -> TransformerConfig:
    """A copy of ``config`` with the Mamba fields of the preset (``is_hybrid_model``, heads, head
    dim, state, groups) and, with the torch ops, ``use_mamba_mem_eff_path=False``."""
    changes = dict(
        is_hybrid_model=True,
        mamba_num_heads=preset.mamba_num_heads,
        mamba_head_dim=preset.mamba_head_dim,
        mamba_state_dim=preset.mamba_state_dim,
        mamba_num_groups=preset.mamba_num_groups,
    )
    if torch_ops:
        changes["use_mamba_mem_eff_path"] = False
    if not config.is_hybrid_model:
        # Recomputed in __post_init__ with the hybrid multiplier (one residual branch per layer).
        changes["output_layer_init_method"] = None
    return dataclasses.replace(config, **changes)


def _te_available() -> bool:
    from megatron_rlp.models.builder import transformer_engine_available

    return transformer_engine_available()


def hybrid_stack_spec(preset: ModelPreset, use_te: Optional[bool] = None) -> ModuleSpec:
    """The ``mamba_stack_spec`` for ``MambaModel``: TE layers when ``use_te`` (default: CUDA and TE
    import), megatron-core's local layers and ``torch.nn.RMSNorm`` otherwise."""
    if use_te is None:
        use_te = _te_available()
    if use_te:
        from megatron.core.models.mamba.mamba_layer_specs import mamba_stack_spec

        from megatron.core.extensions.transformer_engine import TENorm

        # Copies along the changed path only (megatron's spec is shared, and deep-copying it
        # fails where TE is absent): our mixer, and our stack (full recompute) with the final norm
        # megatron's MambaStack hard-codes.
        replace = dataclasses.replace
        stack = mamba_stack_spec.submodules
        layer = stack.mamba_layer
        mixer = replace(layer.submodules.mixer, module=HybridMambaMixer)
        layer = replace(layer, submodules=replace(layer.submodules, mixer=mixer))
        attention = stack.attention_layer
        self_attention = attention.submodules.self_attention
        self_attention = replace(self_attention, module=HybridSelfAttention, submodules=replace(
            self_attention.submodules,
            core_attention=shared_prefix_core_attention(self_attention.submodules.core_attention)))
        attention = replace(attention, submodules=replace(attention.submodules, self_attention=self_attention))
        return replace(
            mamba_stack_spec,
            module=HybridMambaStack,
            submodules=replace(stack, mamba_layer=layer, attention_layer=attention),
            params=dict(mamba_stack_spec.params or {}, final_norm=TENorm),
        )

    norm = ConfigRMSNorm
    mamba_layer = ModuleSpec(
        module=MambaLayer,
        submodules=MambaLayerSubmodules(
            norm=norm,
            mixer=ModuleSpec(
                module=HybridMambaMixer,
                submodules=MambaMixerSubmodules(
                    in_proj=ColumnParallelLinear, out_proj=RowParallelLinear
                ),
            ),
            mamba_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"},
        ),
    )
    attention_layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=HybridSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=shared_prefix_core_attention(DotProductAttention),
                    linear_proj=RowParallelLinear,
                    q_layernorm=norm if preset.qk_layernorm else IdentityOp,
                    k_layernorm=norm if preset.qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_"
            },
        ),
    )
    mlp_layer = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
                ),
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        ),
    )
    return ModuleSpec(
        module=HybridMambaStack,
        submodules=MambaStackSubmodules(
            mamba_layer=mamba_layer, attention_layer=attention_layer, mlp_layer=mlp_layer
        ),
        params={"final_norm": norm},
    )


class RLPMambaModel(MambaModel):
    """megatron-core's MambaModel that can hand back its final (normed) hidden states.

    Same switch as the GPT builder's model: with ``return_hidden = True`` a forward without an
    inference context returns [s, b, h] hidden states instead of logits, for the fused
    linear log-prob kernel.  (The stack applies the final norm; only the output layer is skipped.)
    """

    return_hidden = False

    def forward(self, *args, **kwargs):
        if not (self.return_hidden and self.post_process and kwargs.get("inference_context") is None):
            return super().forward(*args, **kwargs)
        self.post_process = False
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.post_process = True


def build_hybrid_model(
    preset: ModelPreset,
    config: TransformerConfig,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    use_te: Optional[bool] = None,
) -> MambaModel:
    """megatron-core ``MambaModel`` for this pipeline stage (parallel_state must be initialised):
    ``preset.hybrid_pattern`` layers, no position embedding, untied (or tied, as the preset says)
    embeddings, vocab-parallel logits (``parallel_output=True``)."""
    pattern = _validate_pattern(preset, config)
    torch_ops = install_torch_mamba_ops()
    config = hybrid_transformer_config(preset, config, torch_ops)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    return RLPMambaModel(
        config=config,
        mamba_stack_spec=hybrid_stack_spec(preset, use_te=use_te),
        vocab_size=preset.vocab_size,
        max_sequence_length=preset.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        hybrid_override_pattern=pattern,
        parallel_output=True,
        share_embeddings_and_output_weights=preset.tie_embeddings,
        position_embedding_type="none",
    )


# --------------------------------------------------------------------------------------------
# Inference state
# --------------------------------------------------------------------------------------------


def inference_state_layout(model: torch.nn.Module) -> dict[int, str]:
    """``{layer_number: "mamba" | "attention"}`` for the keys this model (stage) writes into a
    ``StaticInferenceContext.key_value_memory_dict``."""
    layout: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, MambaMixer):
            layout[module.layer_number] = "mamba"
        elif isinstance(module, Attention):
            layout[module.layer_number] = "attention"
    return layout


def fork_inference_state(
    model: torch.nn.Module,
    context: StaticInferenceContext,
    rows: Union[torch.Tensor, Sequence[int]],
) -> None:
    """Re-index the batch of a static inference context in place: new row ``i`` continues from old
    row ``rows[i]`` (rows may repeat, so one prefilled row can fan out into K branches).

    Mamba conv/SSM states become new tensors with ``len(rows)`` rows.  Attention KV buffers keep
    their [max_sequence_length, max_batch_size, ...] shape with rows ``0 : len(rows)`` rewritten
    (they grow, and ``context.max_batch_size`` with them, when ``len(rows)`` exceeds it).
    ``sequence_len_offset`` is unchanged; the next call decodes ``len(rows)`` sequences.
    """
    if context.batch_size_offset != 0:
        raise ValueError("fork_inference_state needs context.batch_size_offset == 0")
    if not context.key_value_memory_dict:
        raise ValueError("fork_inference_state needs a prefilled context")
    layout = inference_state_layout(model)
    index = torch.as_tensor(rows, dtype=torch.long)
    if index.dim() != 1 or index.numel() == 0:
        raise ValueError("rows must be a non-empty 1-D sequence of row indices")
    new_batch = index.numel()
    for layer_number, state in list(context.key_value_memory_dict.items()):
        kind = layout.get(layer_number)
        if kind == "mamba":
            conv_state, ssm_state = state
            idx = index.to(conv_state.device)
            context.key_value_memory_dict[layer_number] = (conv_state[idx], ssm_state[idx])
        elif kind == "attention":
            key, value = state
            idx = index.to(key.device)
            picked_k, picked_v = key[:, idx], value[:, idx]  # copies (advanced indexing)
            if new_batch > key.shape[1]:
                key = key.new_empty(key.shape[0], new_batch, *key.shape[2:])
                value = value.new_empty(value.shape[0], new_batch, *value.shape[2:])
            key[:, :new_batch] = picked_k
            value[:, :new_batch] = picked_v
            context.key_value_memory_dict[layer_number] = (key, value)
        else:
            raise ValueError(
                f"inference state of layer {layer_number} belongs to no Mamba or attention layer "
                "of this model"
            )
    context.max_batch_size = max(context.max_batch_size, new_batch)
    for module in model.modules():
        if isinstance(module, MambaMixer):
            # Stock MambaMixer keys its state reuse on this; HybridMambaMixer re-derives it anyway.
            module.cached_batch_size = new_batch
