"""HF Nemotron-H <-> megatron MambaModel: logits parity at TP=1, bitwise round trips, TP split.

Every HF model is built offline from a NemotronHConfig with random weights (norm weights, D,
A_log and dt_bias randomised too, so a swapped or misplaced tensor shows up in the logits).
transformers runs its pure-torch Mamba path here (no mamba_ssm / causal_conv1d on CPU).
"""
import pytest
import torch
import torch.nn.functional as F

from megatron_rlp.models import hf_nemotron_h as hn
from megatron_rlp.models.builder import transformer_config
from megatron_rlp.models.hf_qwen3 import load_megatron_state_dict
from megatron_rlp.models.hybrid import build_hybrid_model
from megatron_rlp.models.presets import ModelPreset, get_preset
from megatron_rlp.training import parallel

from transformers import NemotronHForCausalLM

TOL = 1e-5  # measured 4e-6 at max|logit| ~10, i.e. ~4e-7 relative (fp32 rounding; see printout)

BASE = get_preset("tiny-hybrid").replace(
    name="nh-parity", vocab_size=256, max_position_embeddings=256, hybrid_pattern="M*-M*-",
    num_layers=6,
)
CONFIGS = {
    "base": BASE,
    # head_dim 24 != hidden / heads = 16
    "head_dim_24": BASE.replace(kv_channels=24),
    # GQA ratio 4: 8 query heads share 2 KV groups; Mamba: 16 heads in 4 groups
    "gqa4": BASE.replace(num_attention_heads=8, num_query_groups=2, kv_channels=8,
                         mamba_num_heads=16, mamba_head_dim=8, mamba_num_groups=4),
    "tied": BASE.replace(tie_embeddings=True, hybrid_pattern="MM*-", num_layers=4),
}


def build_hf(preset: ModelPreset, seed: int = 0, chunk_size: int = 16) -> NemotronHForCausalLM:
    cfg = hn.hf_config_from_preset(preset, chunk_size=chunk_size)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty(p.shape).uniform_(1.0, 16.0, generator=gen)))
            elif name.endswith("dt_bias"):  # softplus(dt_bias) in [0.02, 0.1]
                dt = torch.empty(p.shape).uniform_(0.02, 0.1, generator=gen)
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif name.endswith(".D") or name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "conv1d" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif name == "lm_head.weight":
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        if preset.tie_embeddings:
            model.lm_head.weight.copy_(model.model.embeddings.weight)
    return model


@pytest.fixture(autouse=True)
def _fresh_parallel_state():
    yield
    parallel.destroy()


def build_megatron(preset: ModelPreset):
    parallel.init_distributed()
    parallel.init_model_parallel(1, 1)
    parallel.set_seed(123)
    return build_hybrid_model(preset, transformer_config(preset)).eval()


def inputs(preset: ModelPreset, b: int = 2, s: int = 45, seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, preset.vocab_size, (b, s), generator=gen)
    return ids, torch.arange(s).unsqueeze(0).expand(b, s)


def min_dt(hf: NemotronHForCausalLM, ids: torch.Tensor) -> float:
    """Smallest softplus(dt + dt_bias) any HF Mamba mixer sees on these inputs: transformers
    clamps it from below at time_step_min, megatron does not."""
    seen = []

    def hook(mixer, args):
        proj = mixer.in_proj(args[0])
        seen.append(F.softplus(proj[..., -mixer.num_heads:] + mixer.dt_bias).min().item())

    handles = [m.register_forward_pre_hook(hook) for m in hf.modules()
               if type(m).__name__ == "NemotronHMamba2Mixer"]
    with torch.no_grad():
        hf(input_ids=ids)
    for h in handles:
        h.remove()
    assert seen
    return min(seen)


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_logits_match_hf_tp1(case):
    preset = CONFIGS[case]
    hf = build_hf(preset)
    model = build_megatron(preset)
    load_megatron_state_dict(model, hn.hf_to_megatron(hf.state_dict(), preset))
    ids, pos = inputs(preset)
    assert min_dt(hf, ids) > hf.config.time_step_min  # the HF-only clamp is inactive
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = model(ids, pos, None)
    assert got.shape == ref.shape
    diff = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"\n[nemotron-h parity tp=1 {case}] max|logits diff| = {diff:.2e} (max|logit| {scale:.1f})")
    assert diff <= TOL
    assert scale > 1000 * TOL  # a comparison that can fail


def test_chunk_size_only_changes_rounding():
    """HF's chunk_size is not carried over (megatron's mixer uses 128): summation order only."""
    preset = CONFIGS["base"]
    hf = build_hf(preset, chunk_size=8)
    model = build_megatron(preset)
    load_megatron_state_dict(model, hn.hf_to_megatron(hf.state_dict(), preset))
    ids, pos = inputs(preset, s=40)
    with torch.no_grad():
        diff = (model(ids, pos, None) - hf(input_ids=ids).logits).abs().max().item()
    assert diff <= TOL


def test_misplaced_in_proj_section_is_detected():
    """Guard: swapping the z and x sections of in_proj must break parity by far."""
    preset = CONFIGS["base"]
    hf = build_hf(preset)
    model = build_megatron(preset)
    sd = hn.hf_to_megatron(hf.state_dict(), preset)
    z, x, rest = torch.split(sd["decoder.layers.0.mixer.in_proj.weight"],
                             [128, 128, sd["decoder.layers.0.mixer.in_proj.weight"].shape[0] - 256])
    sd["decoder.layers.0.mixer.in_proj.weight"] = torch.cat([x, z, rest])
    load_megatron_state_dict(model, sd)
    ids, pos = inputs(preset)
    with torch.no_grad():
        diff = (model(ids, pos, None) - hf(input_ids=ids).logits).abs().max().item()
    assert diff > 1000 * TOL


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_hf_megatron_hf_round_trip_bitwise(case):
    preset = CONFIGS[case]
    hf_sd = build_hf(preset).state_dict()  # "model." prefix (the loaded module's names)
    mc = hn.hf_to_megatron(hf_sd, preset)
    back = hn.megatron_to_hf(mc, preset, prefix="model.")
    assert set(back) == set(hf_sd)
    for k, v in hf_sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # the on-disk prefix ("backbone.") maps the same way
    disk = hn.megatron_to_hf(mc, preset)
    assert all(k.startswith("backbone.") or k == "lm_head.weight" for k in disk)
    again = hn.hf_to_megatron(disk, preset)
    assert set(again) == set(mc) and all(torch.equal(again[k], mc[k]) for k in mc)


def test_te_spec_names_round_trip():
    preset = CONFIGS["base"]
    hf_sd = build_hf(preset).state_dict()
    te = hn.hf_to_megatron(hf_sd, preset, te_spec=True)
    assert "decoder.layers.0.mixer.in_proj.layer_norm_weight" in te
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.2.mlp.linear_fc1.layer_norm_weight" in te
    back = hn.megatron_to_hf(te, preset, prefix="model.")
    assert all(torch.equal(back[k], v) for k, v in hf_sd.items())


@pytest.mark.parametrize("case", ["base", "gqa4"])
def test_state_dict_names_and_shapes_match_megatron(case):
    preset = CONFIGS[case]
    model = build_megatron(preset)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not k.endswith("_extra_state")}
    got = {k: tuple(v.shape) for k, v in hn.hf_to_megatron(build_hf(preset).state_dict(),
                                                            preset).items()}
    assert got == expected


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_shard_gather_round_trip(tp):
    preset = CONFIGS["gqa4"].replace(num_query_groups=4)  # 4 Mamba groups, 4 KV groups
    full = hn.hf_to_megatron(build_hf(preset).state_dict(), preset)
    shards = [hn.shard_hybrid_state_dict(full, r, tp, preset) for r in range(tp)]
    d_inner = preset.mamba_num_heads * preset.mamba_head_dim
    gn = preset.mamba_num_groups * preset.mamba_state_dim
    in_proj = shards[1]["decoder.layers.0.mixer.in_proj.weight"]
    assert in_proj.shape[0] == (2 * d_inner + 2 * gn + preset.mamba_num_heads) // tp
    # rank 1's z rows are the second 1/tp of the full z section, its dt rows the second 1/tp of dt
    z_full = full["decoder.layers.0.mixer.in_proj.weight"][:d_inner]
    assert torch.equal(in_proj[: d_inner // tp], z_full.chunk(tp)[1])
    dt_full = full["decoder.layers.0.mixer.in_proj.weight"][-preset.mamba_num_heads:]
    assert torch.equal(in_proj[-preset.mamba_num_heads // tp:], dt_full.chunk(tp)[1])
    assert shards[1]["decoder.layers.0.mixer.norm.weight"].shape == (d_inner // tp,)
    assert shards[1]["decoder.layers.0.mixer.out_proj.weight"].shape == (preset.hidden_size,
                                                                         d_inner // tp)
    back = hn.gather_hybrid_state_dict(shards, preset)
    assert set(back) == set(full) and all(torch.equal(back[k], full[k]) for k in full)


def test_tp_that_splits_a_mamba_group_is_refused():
    with pytest.raises(ValueError, match="Mamba groups"):
        hn.shard_hybrid_state_dict({}, 0, 4, CONFIGS["base"])


def test_config_round_trip():
    for case, preset in CONFIGS.items():
        cfg = hn.hf_config_from_preset(preset)
        assert cfg.hybrid_override_pattern == preset.hybrid_pattern
        back = hn.preset_from_hf_config(cfg.to_dict(), name=preset.name)
        assert back == preset, case
        assert hn.preset_from_hf_config(cfg, name=preset.name) == preset


def test_legacy_config_fields():
    """Configs written by NVIDIA's original code: hybrid_override_pattern, mamba_n_groups,
    attention_head_dim."""
    cfg = hn.hf_config_from_preset(CONFIGS["base"]).to_dict()
    cfg.pop("layers_block_type")
    cfg.pop("n_groups")
    cfg.pop("head_dim")
    cfg.update(hybrid_override_pattern="M*-M*-", mamba_n_groups=2, attention_head_dim=16,
               num_hidden_layers=6)
    assert hn.preset_from_hf_config(cfg, name="nh-parity") == CONFIGS["base"]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hybrid_override_pattern="M*E-", num_hidden_layers=4), "E = MoE"),
        (dict(mlp_hidden_act="silu"), "mlp_hidden_act='silu'"),
        (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon"),
        (dict(conv_kernel=3), "conv_kernel=3"),
        (dict(num_nextn_predict_layers=1), "num_nextn_predict_layers"),
        (dict(model_type="qwen3"), "model_type='qwen3'"),
    ],
)
def test_unsupported_configs_are_refused(change, message):
    cfg = hn.hf_config_from_preset(CONFIGS["base"]).to_dict()
    if "hybrid_override_pattern" in change:
        cfg.pop("layers_block_type")
    cfg.update(change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
        hn.preset_from_hf_config(cfg)


def test_wrong_shape_names_the_tensor():
    preset = CONFIGS["base"]
    sd = dict(build_hf(preset).state_dict())
    sd["model.layers.0.mixer.conv1d.weight"] = torch.zeros(10, 1, 4)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mixer\.conv1d\.weight.*\(10, 1, 4\)"
                       r".*\(192, 1, 4\)"):
        hn.hf_to_megatron(sd, preset)
