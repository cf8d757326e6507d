"""An independent, single-process, plain-PyTorch implementation of RLP (RLP_SPEC.md, Algorithm 1).

Written from the spec alone, to check the project's code against: it imports neither megatron-core
nor ``megatron_rlp``.  Nothing here is vectorised cleverly — one forward per sequence, one loop per
thought — so that it is easy to read and different in structure from the production code.

Contents
- ``RefConfig`` / ``RefDecoderLM``: a tiny Qwen3-shaped decoder (RMSNorm with eps, SwiGLU MLP, GQA
  attention with per-head RMSNorm on q and k, RoPE rotate-half convention, no biases, tied or
  untied output), every layer's math written out here.
- ``load_from_megatron_state_dict`` / ``megatron_state_dict_from_reference``: map megatron-core
  GPTModel names and the fused QKV / fc1 layouts to and from the reference's separate projections
  (works for parameters and for gradients).
- ``token_logprobs``: log p of chosen tokens under a model.
- ``reference_information_gain``, ``reference_advantages``, ``reference_thought_loss``,
  ``reference_k3_kl``: the objective's pieces, one thought at a time.
- ``reference_rlp_iteration``: one full RLP iteration with given thoughts (steps 3–6).

Thought convention used by ``reference_rlp_iteration``: ``thoughts[b][i]`` lists the thought tokens
c_i *without* the markers; the sequence is (x_<t, <open>, c_i, <close>, x_t).  The policy terms are
the tokens of c_i and the close marker, except that a close marker forced at the length cap
(``forced_mask[b][i]`` True) is not a sampled token and is left out: |c| = len(c_i) + (0 if forced
else 1).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

# --------------------------------------------------------------------------------------- model


@dataclass
class RefConfig:
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    rotary_base: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    qk_norm: bool = True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x²) + eps) · w over the last dimension."""
    xf = x.float()
    inv = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * inv).to(x.dtype) * weight


class RefRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope_angles(positions: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """Angles [S, head_dim]: θ_j = pos · base^(−2j/d), duplicated over both halves (rotate-half)."""
    j = torch.arange(0, head_dim, 2, dtype=torch.float32)
    inv_freq = 1.0 / (base ** (j / head_dim))
    ang = positions.float()[:, None] * inv_freq[None, :]
    return torch.cat([ang, ang], dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [..., S, H, D]: x·cos + rotate_half(x)·sin with rotate_half([a, b]) = [−b, a]."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    rotated = torch.cat([-b, a], dim=-1)
    cos = torch.cos(angles)[:, None, :].to(x.dtype)
    sin = torch.sin(angles)[:, None, :].to(x.dtype)
    return x * cos + rotated * sin


class RefAttention(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Parameter(torch.empty(cfg.num_heads * d, h))
        self.k_proj = nn.Parameter(torch.empty(cfg.num_query_groups * d, h))
        self.v_proj = nn.Parameter(torch.empty(cfg.num_query_groups * d, h))
        self.o_proj = nn.Parameter(torch.empty(h, cfg.num_heads * d))
        if cfg.qk_norm:
            self.q_norm = RefRMSNorm(d, cfg.norm_eps)
            self.k_norm = RefRMSNorm(d, cfg.norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [S, hidden] (one sequence).
        cfg = self.cfg
        s = x.shape[0]
        d, nh, ng = cfg.head_dim, cfg.num_heads, cfg.num_query_groups
        q = (x @ self.q_proj.t()).view(s, nh, d)
        k = (x @ self.k_proj.t()).view(s, ng, d)
        v = (x @ self.v_proj.t()).view(s, ng, d)
        if cfg.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        ang = rope_angles(positions, d, cfg.rotary_base)
        q = apply_rope(q, ang)
        k = apply_rope(k, ang)
        # Query head h reads KV group h // (nh / ng).
        per_group = nh // ng
        group_of_head = torch.arange(nh) // per_group
        k = k[:, group_of_head, :]
        v = v[:, group_of_head, :]
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = torch.einsum("hqk,khd->qhd", probs, v).reshape(s, nh * d)
        return out @ self.o_proj.t()


class RefMLP(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn_hidden_size
        self.gate_proj = nn.Parameter(torch.empty(f, h))
        self.up_proj = nn.Parameter(torch.empty(f, h))
        self.down_proj = nn.Parameter(torch.empty(h, f))

    def forward(self, x):
        gate = x @ self.gate_proj.t()
        up = x @ self.up_proj.t()
        act = gate * torch.sigmoid(gate)  # SiLU written out
        return (act * up) @ self.down_proj.t()


class RefBlock(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.attn_norm = RefRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = RefAttention(cfg)
        self.mlp_norm = RefRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = RefMLP(cfg)

    def forward(self, x, positions):
        x = x + self.attn(self.attn_norm(x), positions)
        return x + self.mlp(self.mlp_norm(x))


class RefDecoderLM(nn.Module):
    """Pre-norm decoder: embed → L × (x + attn(norm x); x + mlp(norm x)) → norm → output layer."""

    def __init__(self, cfg: RefConfig, init_std: float = 0.02, seed: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.blocks = nn.ModuleList(RefBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = RefRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Parameter(
            torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        gen = torch.Generator().manual_seed(0 if seed is None else seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("weight"):  # norm weights
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, init_std, generator=gen)

    def output_weight(self) -> torch.Tensor:
        return self.embed if self.lm_head is None else self.lm_head

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [S] → logits [S, V], or tokens [B, S] → logits [B, S, V] (sequences run one by one)."""
        if tokens.dim() == 2:
            return torch.stack(
                [self.forward(t, None if positions is None else positions[i]) for i, t in enumerate(tokens)]
            )
        if positions is None:
            positions = torch.arange(tokens.shape[0])
        x = self.embed[tokens]
        for block in self.blocks:
            x = block(x, positions)
        x = self.final_norm(x)
        return x @ self.output_weight().t()


# --------------------------------------------------------------------- megatron name mapping


def _split_fused_qkv(w: torch.Tensor, num_heads: int, num_groups: int, head_dim: int):
    """Megatron's fused QKV rows: per query group g, [q heads of g (np/ng of them), k_g, v_g]."""
    per_group = num_heads // num_groups
    blocks = w.view(num_groups, per_group + 2, head_dim, *w.shape[1:])
    q = blocks[:, :per_group].reshape(num_heads * head_dim, *w.shape[1:])
    k = blocks[:, per_group].reshape(num_groups * head_dim, *w.shape[1:])
    v = blocks[:, per_group + 1].reshape(num_groups * head_dim, *w.shape[1:])
    return q, k, v


def _fuse_qkv(q, k, v, num_heads: int, num_groups: int, head_dim: int) -> torch.Tensor:
    per_group = num_heads // num_groups
    rest = q.shape[1:]
    qg = q.reshape(num_groups, per_group, head_dim, *rest)
    kg = k.reshape(num_groups, 1, head_dim, *rest)
    vg = v.reshape(num_groups, 1, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(num_groups * (per_group + 2) * head_dim, *rest)


def _first_present(sd, names):
    for n in names:
        if n in sd:
            return sd[n]
    raise KeyError(f"none of {names} in the megatron state dict")


def load_from_megatron_state_dict(
    ref_model: RefDecoderLM,
    sd: dict,
    num_query_groups: Optional[int] = None,
    num_heads: Optional[int] = None,
    head_dim: Optional[int] = None,
    prefix: str = "",
) -> None:
    """Copy a megatron-core GPTModel state dict (TP = PP = 1) into ``ref_model``.

    Accepts the local layer spec (``input_layernorm.weight``, ``pre_mlp_layernorm.weight``) and the
    Transformer Engine spec (``linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``).
    linear_fc1 holds [gate; up] stacked along dim 0.  Every reference parameter must be assigned.
    """
    cfg = ref_model.cfg
    ng = num_query_groups or cfg.num_query_groups
    nh = num_heads or cfg.num_heads
    d = head_dim or cfg.head_dim
    if (ng, nh, d) != (cfg.num_query_groups, cfg.num_heads, cfg.head_dim):
        raise ValueError(
            f"shape arguments (groups={ng}, heads={nh}, head_dim={d}) disagree with the reference "
            f"config ({cfg.num_query_groups}, {cfg.num_heads}, {cfg.head_dim})"
        )
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not k.endswith("_extra_state")}
    assigned = set()

    def put(param: nn.Parameter, value: torch.Tensor, name: str):
        if param.shape != value.shape:
            raise ValueError(f"{name}: reference {tuple(param.shape)} vs megatron {tuple(value.shape)}")
        with torch.no_grad():
            param.copy_(value)
        assigned.add(id(param))

    put(ref_model.embed, sd["embedding.word_embeddings.weight"], "embedding")
    for i, blk in enumerate(ref_model.blocks):
        p = f"decoder.layers.{i}."
        put(
            blk.attn_norm.weight,
            _first_present(sd, [p + "input_layernorm.weight", p + "self_attention.linear_qkv.layer_norm_weight"]),
            p + "input_layernorm",
        )
        q, k, v = _split_fused_qkv(sd[p + "self_attention.linear_qkv.weight"], nh, ng, d)
        put(blk.attn.q_proj, q, p + "q")
        put(blk.attn.k_proj, k, p + "k")
        put(blk.attn.v_proj, v, p + "v")
        if cfg.qk_norm:
            put(blk.attn.q_norm.weight, sd[p + "self_attention.q_layernorm.weight"], p + "q_layernorm")
            put(blk.attn.k_norm.weight, sd[p + "self_attention.k_layernorm.weight"], p + "k_layernorm")
        put(blk.attn.o_proj, sd[p + "self_attention.linear_proj.weight"], p + "linear_proj")
        put(
            blk.mlp_norm.weight,
            _first_present(sd, [p + "pre_mlp_layernorm.weight", p + "mlp.linear_fc1.layer_norm_weight"]),
            p + "pre_mlp_layernorm",
        )
        fc1 = sd[p + "mlp.linear_fc1.weight"]
        gate, up = fc1.chunk(2, dim=0)
        put(blk.mlp.gate_proj, gate, p + "gate")
        put(blk.mlp.up_proj, up, p + "up")
        put(blk.mlp.down_proj, sd[p + "mlp.linear_fc2.weight"], p + "linear_fc2")
    put(ref_model.final_norm.weight, sd["decoder.final_layernorm.weight"], "final_layernorm")
    if ref_model.lm_head is not None:
        put(ref_model.lm_head, sd["output_layer.weight"], "output_layer")
    elif "output_layer.weight" in sd and not torch.equal(sd["output_layer.weight"], sd["embedding.word_embeddings.weight"]):
        raise ValueError("reference is tied but the megatron output_layer.weight differs from the embedding")
    missing = [n for n, prm in ref_model.named_parameters() if id(prm) not in assigned]
    if missing:
        raise KeyError(f"reference parameters not assigned: {missing}")


def megatron_state_dict_from_reference(
    tensors: dict, cfg: RefConfig, local_spec: bool = True
) -> dict:
    """Map reference-named tensors (``dict(ref_model.named_parameters())`` or gradients keyed the same
    way) to megatron-core GPTModel names and fused layouts — e.g. to compare gradients."""
    nh, ng, d = cfg.num_heads, cfg.num_query_groups, cfg.head_dim
    out = {"embedding.word_embeddings.weight": tensors["embed"]}
    for i in range(cfg.num_layers):
        r = f"blocks.{i}."
        p = f"decoder.layers.{i}."
        in_norm = "input_layernorm.weight" if local_spec else "self_attention.linear_qkv.layer_norm_weight"
        mlp_norm = "pre_mlp_layernorm.weight" if local_spec else "mlp.linear_fc1.layer_norm_weight"
        out[p + in_norm] = tensors[r + "attn_norm.weight"]
        out[p + "self_attention.linear_qkv.weight"] = _fuse_qkv(
            tensors[r + "attn.q_proj"], tensors[r + "attn.k_proj"], tensors[r + "attn.v_proj"], nh, ng, d
        )
        if cfg.qk_norm:
            out[p + "self_attention.q_layernorm.weight"] = tensors[r + "attn.q_norm.weight"]
            out[p + "self_attention.k_layernorm.weight"] = tensors[r + "attn.k_norm.weight"]
        out[p + "self_attention.linear_proj.weight"] = tensors[r + "attn.o_proj"]
        out[p + mlp_norm] = tensors[r + "mlp_norm.weight"]
        out[p + "mlp.linear_fc1.weight"] = torch.cat([tensors[r + "mlp.gate_proj"], tensors[r + "mlp.up_proj"]], 0)
        out[p + "mlp.linear_fc2.weight"] = tensors[r + "mlp.down_proj"]
    out["decoder.final_layernorm.weight"] = tensors["final_norm.weight"]
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = tensors["lm_head"]
    return out


# -------------------------------------------------------------------------- objective pieces


def token_logprobs(model: nn.Module, sequence: Sequence[int], vocab_size: Optional[int] = None,
                   temperature: float = 1.0) -> torch.Tensor:
    """[len − 1]: entry j is log p(sequence[j + 1] | sequence[: j + 1]) under softmax(logits / T).
    With ``vocab_size`` the softmax runs over the tokenizer's ids only (the model's embedding may be
    padded past them)."""
    seq = torch.as_tensor(list(sequence), dtype=torch.long)
    logits = model(seq[:-1]).float() / temperature
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    logz = torch.logsumexp(logits, dim=-1)
    return logits.gather(-1, seq[1:, None])[:, 0] - logz


def reference_information_gain(s_pred: Sequence[float], s_ema: float) -> list[float]:
    """r(c^(i)) = S_pred(c^(i)) − S_ema for one context."""
    return [float(sp) - float(s_ema) for sp in s_pred]


def reference_prefix_match(predicted: Sequence[Sequence[int]], continuation: Sequence[int]) -> list[float]:
    """RPT's sparse reward for one context: 1 for a thought whose N predicted tokens are the text's
    next N tokens, else 0."""
    return [1.0 if [int(x) for x in p] == [int(x) for x in continuation] else 0.0 for p in predicted]


def reference_entropies(model: nn.Module, tokens: Sequence[int], vocab_size: Optional[int] = None) -> list[float]:
    """[len]: entry j is the entropy (nats) of p(· | tokens[: j + 1]) over the tokenizer's ids."""
    with torch.no_grad():
        logits = model(torch.as_tensor(list(tokens), dtype=torch.long)).float()
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    logp = torch.log_softmax(logits, dim=-1)
    return (-(logp.exp() * logp).sum(dim=-1)).tolist()


def reference_advantages(rewards: Sequence[float]) -> list[float]:
    """A(i) = r(i) − mean of the other G − 1 rewards  (= G/(G−1)·(r(i) − inclusive mean))."""
    g = len(rewards)
    if g < 2:
        raise ValueError("G >= 2 required")
    total = sum(rewards)
    return [r - (total - r) / (g - 1) for r in rewards]


def reference_thought_loss(
    logp_new: torch.Tensor, logp_old: torch.Tensor, advantage: float, clip_low: float, clip_high: float
) -> torch.Tensor:
    """L_clip for one thought: −(1/|c|) Σ_u min(ρ_u A, clip(ρ_u, 1−ε_low, 1+ε_high) A).

    ``logp_new`` / ``logp_old`` [|c|] hold only the thought's policy tokens (no padding).
    """
    terms = []
    for u in range(logp_new.shape[0]):
        rho = torch.exp(logp_new[u] - logp_old[u].detach())
        plain = rho * advantage
        clipped = torch.clamp(rho, 1.0 - clip_low, 1.0 + clip_high) * advantage
        terms.append(torch.minimum(plain, clipped))
    if not terms:
        return logp_new.sum() * 0.0
    return -torch.stack(terms).sum() / len(terms)


def reference_thought_clipped_count(
    logp_new: torch.Tensor, logp_old: torch.Tensor, advantage: float, clip_low: float, clip_high: float
) -> int:
    """Number of tokens of one thought where the clipped branch is strictly the smaller one."""
    n = 0
    for u in range(logp_new.shape[0]):
        rho = math.exp(float(logp_new[u]) - float(logp_old[u]))
        clipped = min(max(rho, 1.0 - clip_low), 1.0 + clip_high) * advantage
        n += int(clipped < rho * advantage)
    return n


def reference_k3_kl(logp_new: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Mean over one thought's tokens of exp(ref − new) − (ref − new) − 1."""
    if logp_new.shape[0] == 0:
        return logp_new.sum() * 0.0
    d = logp_ref.detach() - logp_new
    return (torch.exp(d) - d - 1.0).mean()


# -------------------------------------------------------------------------- one iteration


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """φ ← τφ + (1 − τ)θ, parameter by parameter, in fp32."""
    params = dict(model.named_parameters())
    for name, phi in ema_model.named_parameters():
        phi.copy_(decay * phi.float() + (1.0 - decay) * params[name].detach().float())


def reference_rlp_iteration(
    model: RefDecoderLM,
    ema_model: Optional[RefDecoderLM],
    optimizer: torch.optim.Optimizer,
    contexts: Sequence[Sequence[int]],
    thoughts: Sequence[Sequence[Sequence[int]]],
    next_tokens: Sequence[int],
    open_id: int,
    close_id: int,
    G: int,
    clip_low: float,
    clip_high: float,
    ema_decay: float,
    forced_mask: Optional[Sequence[Sequence[bool]]] = None,
    vocab_size: Optional[int] = None,
    temperature: float = 1.0,
    predictions: Optional[Sequence[Sequence[Sequence[int]]]] = None,
    continuations: Optional[Sequence[Sequence[int]]] = None,
) -> dict:
    """One RLP iteration (RLP_SPEC.md, Algorithm steps 3–6) for given thoughts.

    ``predictions[b][i]`` / ``continuations[b]``: the prefix-match reward (RPT-style) instead of
    the information gain — the N tokens predicted after thought i and the text's next N tokens.

    ``vocab_size``: the tokenizer's ids; every probability is a softmax over them only.
    ``temperature``: T of the policy that drew the thoughts; the policy terms (ρ and its gradient)
    use log softmax(logits / T) of the thought tokens, S_pred and S_ema log-probs at T = 1.

    θ_old = θ (one update per sample batch), so logp_old = logp_new.detach() and ρ = 1 in value.
    ``ema_model=None`` means φ is uninitialised: it is created as a copy of θ (lazy init).

    Returns a dict with
        s_pred [B, G], s_ema [B], rewards [B, G], advantages [B, G], loss (scalar tensor),
        clip_frac (float), logp_new (list of lists of [|c|] detached tensors), policy_lengths [B, G],
        grads {name: tensor} (before the step; zeros where no gradient), ema_model, ema_params
        {name: tensor} after the update, params {name: tensor} after the step.
    """
    B = len(contexts)
    if len(thoughts) != B or len(next_tokens) != B:
        raise ValueError("contexts, thoughts and next_tokens need one entry per context")
    if forced_mask is None:
        forced_mask = [[False] * G for _ in range(B)]
    for b in range(B):
        if len(thoughts[b]) != G or len(forced_mask[b]) != G:
            raise ValueError(f"context {b}: expected {G} thoughts")

    # Step 3: lazy EMA initialisation φ ← θ.
    if ema_model is None:
        ema_model = copy.deepcopy(model)
        for p in ema_model.parameters():
            p.requires_grad_(False)

    s_ema = torch.zeros(B)
    s_pred = torch.zeros(B, G)
    rewards = torch.zeros(B, G)
    advantages = torch.zeros(B, G)
    lengths = torch.zeros(B, G, dtype=torch.long)
    logp_new: list[list[torch.Tensor]] = []
    total_loss = torch.zeros(())
    clipped_tokens = 0
    policy_tokens = 0

    optimizer.zero_grad(set_to_none=True)
    for b in range(B):
        ctx = list(contexts[b])
        x_t = int(next_tokens[b])
        # Step 4a: no-think baseline from the teacher, S_ema = log p̄_φ(x_t | x_<t).
        with torch.no_grad():
            s_ema[b] = token_logprobs(ema_model, ctx + [x_t], vocab_size)[-1]
        row_logps = []
        for i in range(G):
            c = [int(tok) for tok in thoughts[b][i]]
            seq = ctx + [open_id] + c + [close_id] + [x_t]
            # Step 4b: S_pred = log p_θ(x_t | x_<t, open, c, close) at T = 1, no gradient.
            with torch.no_grad():
                s_pred[b, i] = token_logprobs(model, seq, vocab_size)[-1]
            # Policy tokens: c (positions len(ctx)+1 ...) and the close marker unless forced,
            # scored by the sampling policy softmax(logits / T); a second pass keeps the two apart.
            lp = token_logprobs(model, seq, vocab_size, temperature)  # lp[j] = log π(seq[j+1] | seq[:j+1])
            first = len(ctx) + 1  # index in seq of the first thought token
            n_policy = len(c) + (0 if forced_mask[b][i] else 1)
            row_logps.append(lp[first - 1 : first - 1 + n_policy])
            lengths[b, i] = n_policy
        if predictions is not None:
            r = reference_prefix_match(predictions[b], continuations[b])
        else:
            r = reference_information_gain(s_pred[b].tolist(), float(s_ema[b]))
        a = reference_advantages(r)
        rewards[b] = torch.tensor(r)
        advantages[b] = torch.tensor(a)
        # Step 5: clipped surrogate on thought tokens with θ_old = θ.
        for i in range(G):
            new = row_logps[i]
            old = new.detach()
            total_loss = total_loss + reference_thought_loss(new, old, a[i], clip_low, clip_high)
            clipped_tokens += reference_thought_clipped_count(new.detach(), old, a[i], clip_low, clip_high)
            policy_tokens += new.shape[0]
        logp_new.append([t.detach() for t in row_logps])

    loss = total_loss / (B * G)
    loss.backward()
    grads = {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }
    optimizer.step()
    # Step 6: EMA update.
    ema_update(ema_model, model, ema_decay)
    return {
        "s_pred": s_pred,
        "s_ema": s_ema,
        "rewards": rewards,
        "advantages": advantages,
        "loss": loss.detach(),
        "clip_frac": clipped_tokens / max(policy_tokens, 1),
        "logp_new": logp_new,
        "policy_lengths": lengths,
        "grads": grads,
        "ema_model": ema_model,
        "ema_params": {n: p.detach().clone() for n, p in ema_model.named_parameters()},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }
