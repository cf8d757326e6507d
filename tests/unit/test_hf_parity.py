"""HF Qwen3 <-> megatron GPTModel: logits parity at TP=1 and bitwise weight round trips.

Every model is built offline from a config with random weights (norm weights randomised too,
so a swapped norm would show up in the logits).
"""
import pytest
import torch

from megatron_rlp.models import hf_qwen3 as hq
from megatron_rlp.models.builder import build_gpt_model, transformer_config
from megatron_rlp.models.presets import ModelPreset, get_preset
from megatron_rlp.training import parallel

from transformers import Qwen3ForCausalLM

TOL = 1e-4

BASE = get_preset("tiny").replace(
    name="parity", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
    num_query_groups=2, kv_channels=16, vocab_size=256, rotary_base=10_000.0,
)
CONFIGS = {
    "tied": BASE,
    "untied": BASE.replace(tie_embeddings=False, rotary_base=1_000_000.0),
    # head_dim 24 != hidden/heads = 16
    "head_dim_24": BASE.replace(kv_channels=24, tie_embeddings=False),
    # GQA ratio 4: 8 query heads share 2 KV groups
    "gqa4": BASE.replace(num_attention_heads=8, num_query_groups=2, kv_channels=8),
}


def build_hf(preset: ModelPreset, seed: int = 0) -> Qwen3ForCausalLM:
    cfg = hq.hf_config_from_preset(preset)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(autouse=True)
def _fresh_parallel_state():
    yield
    parallel.destroy()


def build_megatron(preset: ModelPreset):
    parallel.init_distributed()
    parallel.init_model_parallel(1, 1)
    parallel.set_seed(123)
    return build_gpt_model(preset, transformer_config(preset)).eval()


def inputs(preset: ModelPreset, b: int = 2, s: int = 48, seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, preset.vocab_size, (b, s), generator=gen)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    return ids, pos


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_logits_match_hf_tp1(case):
    preset = CONFIGS[case]
    hf = build_hf(preset)
    model = build_megatron(preset)
    hq.load_megatron_state_dict(model, hq.hf_to_megatron(hf.state_dict(), preset))
    ids, pos = inputs(preset)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = model(ids, pos, None)
    assert got.shape == ref.shape
    diff = (got - ref).abs().max().item()
    print(f"\n[hf-parity tp=1 {case}] max|logits diff| = {diff:.3e}")
    assert diff <= TOL
    # The comparison is sensitive: a mis-ordered QKV would be far outside the tolerance.
    assert ref.abs().max().item() > 100 * TOL


def test_wrong_qkv_layout_is_detected():
    """Guard against a test that cannot fail: plain [q; k; v] concatenation must not match."""
    preset = CONFIGS["gqa4"]
    hf = build_hf(preset)
    model = build_megatron(preset)
    sd = hq.hf_to_megatron(hf.state_dict(), preset)
    for i in range(preset.num_layers):
        p = f"model.layers.{i}.self_attn."
        h = hf.state_dict()
        sd[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = torch.cat(
            [h[p + "q_proj.weight"], h[p + "k_proj.weight"], h[p + "v_proj.weight"]]
        )
    hq.load_megatron_state_dict(model, sd)
    ids, pos = inputs(preset)
    with torch.no_grad():
        diff = (model(ids, pos, None) - hf(input_ids=ids).logits).abs().max().item()
    assert diff > 100 * TOL


def test_padded_vocab_logits_match():
    preset = BASE.replace(vocab_size=250, tie_embeddings=False)
    padded = hq.padded_vocab_size(250, tp_size=2, divisible_by=8)
    assert padded == 256
    hf = build_hf(preset)
    model = build_megatron(preset.replace(vocab_size=padded))
    sd = hq.hf_to_megatron(hf.state_dict(), preset, padded_vocab_size=padded)
    assert sd["embedding.word_embeddings.weight"].shape[0] == padded
    hq.load_megatron_state_dict(model, sd)
    ids, pos = inputs(preset)
    with torch.no_grad():
        diff = (model(ids, pos, None)[..., :250] - hf(input_ids=ids).logits).abs().max().item()
    print(f"\n[hf-parity tp=1 padded vocab 250->256] max|logits diff| = {diff:.3e}")
    assert diff <= TOL
    back = hq.megatron_to_hf(sd, preset)
    for k, v in hf.state_dict().items():
        assert torch.equal(back[k], v), k


@pytest.mark.parametrize("te_spec", [False, True])
@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_hf_megatron_hf_round_trip_bitwise(case, te_spec):
    preset = CONFIGS[case]
    hf_sd = build_hf(preset).state_dict()
    mc = hq.hf_to_megatron(hf_sd, preset, te_spec=te_spec)
    assert hq.is_te_state_dict(mc) == te_spec
    back = hq.megatron_to_hf(mc, preset)  # naming auto-detected
    assert set(back) == set(hf_sd)
    for k, v in hf_sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    if preset.tie_embeddings:
        assert "lm_head.weight" not in hq.megatron_to_hf(mc, preset, include_tied_lm_head=False)


def test_state_dict_names_match_megatron_local_spec():
    for case in ("tied", "untied"):
        preset = CONFIGS[case]
        model = build_megatron(preset)
        expected = {k for k in model.state_dict() if not k.endswith("_extra_state")}
        got = set(hq.hf_to_megatron(build_hf(preset).state_dict(), preset))
        assert got == expected


def test_te_spec_names_fuse_the_layernorms():
    preset = CONFIGS["untied"]
    hf_sd = build_hf(preset).state_dict()
    local = hq.hf_to_megatron(hf_sd, preset)
    te = hq.hf_to_megatron(hf_sd, preset, te_spec=True)
    renamed = {
        k.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
        .replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"): v
        for k, v in local.items()
    }
    assert set(te) == set(renamed)
    assert all(torch.equal(te[k], renamed[k]) for k in te)
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in te
    assert torch.equal(
        te["decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"],
        hf_sd["model.layers.1.input_layernorm.weight"],
    )


def test_fused_qkv_is_grouped_per_kv_head():
    nh, ng, hd, h = 8, 2, 3, 5
    q = torch.randn(nh * hd, h)
    k = torch.randn(ng * hd, h)
    v = torch.randn(ng * hd, h)
    qkv = hq.fuse_qkv(q, k, v, ng, hd)
    per = nh // ng
    block = (per + 2) * hd
    for g in range(ng):
        rows = qkv[g * block : (g + 1) * block]
        assert torch.equal(rows[: per * hd], q[g * per * hd : (g + 1) * per * hd])
        assert torch.equal(rows[per * hd : per * hd + hd], k[g * hd : (g + 1) * hd])
        assert torch.equal(rows[per * hd + hd :], v[g * hd : (g + 1) * hd])
    assert all(torch.equal(a, b) for a, b in zip(hq.split_qkv(qkv, nh, ng, hd), (q, k, v)))
    bias = hq.fuse_qkv(q[:, 0], k[:, 0], v[:, 0], ng, hd)  # 1-D (bias) layout too
    assert torch.equal(bias, qkv[:, 0])


@pytest.mark.parametrize("te_spec", [False, True])
@pytest.mark.parametrize("case,tp", [("tied", 2), ("untied", 2), ("gqa4", 2), ("head_dim_24", 2),
                                     ("tied", 4), ("untied", 1)])
def test_shard_gather_round_trip_bitwise(case, tp, te_spec):
    preset = CONFIGS[case]
    full = hq.hf_to_megatron(build_hf(preset).state_dict(), preset, te_spec=te_spec)
    shards = [hq.shard_megatron_state_dict(full, r, tp, preset.num_query_groups) for r in range(tp)]
    qkv_name = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert shards[0][qkv_name].shape[0] * tp == full[qkv_name].shape[0]
    assert shards[0]["embedding.word_embeddings.weight"].shape[0] * tp == preset.vocab_size
    proj = "decoder.layers.0.self_attention.linear_proj.weight"
    assert shards[0][proj].shape[1] * tp == full[proj].shape[1]
    back = hq.gather_megatron_state_dict(shards)
    assert set(back) == set(full)
    for k, v in full.items():
        assert torch.equal(back[k], v), k


def test_shard_contents_are_whole_groups_and_split_swiglu():
    preset = CONFIGS["gqa4"]  # 8 heads, 2 groups, head_dim 8
    hf_sd = build_hf(preset).state_dict()
    full = hq.hf_to_megatron(hf_sd, preset)
    hd, per = preset.kv_channels, preset.num_attention_heads // preset.num_query_groups
    f = preset.ffn_hidden_size
    for r in range(2):
        shard = hq.shard_megatron_state_dict(full, r, 2, preset.num_query_groups)
        p = "model.layers.1."
        q = hf_sd[p + "self_attn.q_proj.weight"][r * per * hd : (r + 1) * per * hd]
        k = hf_sd[p + "self_attn.k_proj.weight"][r * hd : (r + 1) * hd]
        v = hf_sd[p + "self_attn.v_proj.weight"][r * hd : (r + 1) * hd]
        assert torch.equal(
            shard["decoder.layers.1.self_attention.linear_qkv.weight"], torch.cat([q, k, v])
        )
        half = slice(r * f // 2, (r + 1) * f // 2)
        assert torch.equal(
            shard["decoder.layers.1.mlp.linear_fc1.weight"],
            torch.cat(
                [hf_sd[p + "mlp.gate_proj.weight"][half], hf_sd[p + "mlp.up_proj.weight"][half]]
            ),
        )
        assert torch.equal(
            shard["decoder.layers.1.mlp.linear_fc2.weight"],
            hf_sd[p + "mlp.down_proj.weight"][:, half],
        )
        assert torch.equal(
            shard["decoder.layers.1.self_attention.q_layernorm.weight"],
            hf_sd[p + "self_attn.q_norm.weight"],
        )


def test_shard_rejects_indivisible_vocab_and_gather_detects_divergent_replicas():
    preset = BASE.replace(vocab_size=250)
    full = hq.hf_to_megatron(build_hf(preset).state_dict(), preset)
    with pytest.raises(ValueError, match="padded_vocab_size"):
        hq.shard_megatron_state_dict(full, 0, 4, preset.num_query_groups)
    with pytest.raises(ValueError, match="num_query_groups"):
        hq.shard_megatron_state_dict(full, 0, 3, 2)
    shards = [hq.shard_megatron_state_dict(full, r, 2, 2) for r in range(2)]
    shards[1]["decoder.final_layernorm.weight"] = shards[1]["decoder.final_layernorm.weight"] + 1
    with pytest.raises(ValueError, match="differs"):
        hq.gather_megatron_state_dict(shards)


@pytest.mark.parametrize(
    "num_layers,pp,first,last",
    [(8, 2, None, None), (8, 4, None, None), (10, 4, 1, 3), (9, 4, 3, None), (7, 3, None, 1),
     (6, 2, 2, None)],
)
def test_pipeline_layer_range_matches_megatron(num_layers, pp, first, last):
    import dataclasses

    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    preset = BASE.replace(num_layers=num_layers)
    cfg = dataclasses.replace(
        transformer_config(preset, pp=pp),
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
    )
    covered = []
    for r in range(pp):
        got = hq.pipeline_layer_range(num_layers, r, pp, first, last)
        assert got.start == get_transformer_layer_offset(cfg, pp_rank=r)
        assert len(got) == get_num_layers_to_build(cfg, pp_rank=r)
        covered.extend(got)
    assert covered == list(range(num_layers))


@pytest.mark.parametrize("case", ["tied", "untied"])
def test_pipeline_slice_merge_round_trip(case):
    preset = CONFIGS[case].replace(num_layers=4)
    full = hq.hf_to_megatron(build_hf(preset).state_dict(), preset)
    stages = [hq.slice_pipeline_stage(full, r, 2, 4, preset.tie_embeddings) for r in range(2)]
    assert "embedding.word_embeddings.weight" in stages[0]
    assert "embedding.word_embeddings.weight" not in stages[1]
    assert "decoder.final_layernorm.weight" in stages[1]
    assert "decoder.final_layernorm.weight" not in stages[0]
    assert torch.equal(stages[1]["output_layer.weight"], full["embedding.word_embeddings.weight"]
                       if preset.tie_embeddings else full["output_layer.weight"])
    # layers renumbered locally: global layer 2 is stage 1's layer 0
    assert torch.equal(stages[1]["decoder.layers.0.mlp.linear_fc1.weight"],
                       full["decoder.layers.2.mlp.linear_fc1.weight"])
    assert not any(k.startswith("decoder.layers.2.") for s in stages for k in s)
    back = hq.merge_pipeline_stages(stages, 4, preset.tie_embeddings)
    assert set(back) == set(full)
    assert all(torch.equal(back[k], full[k]) for k in full)


def test_config_mapping_round_trip():
    for preset in list(CONFIGS.values()) + [get_preset("qwen3-1.7b")]:
        cfg = hq.hf_config_from_preset(preset)
        assert cfg.head_dim == preset.kv_channels
        assert hq.preset_from_hf_config(cfg, name=preset.name) == preset
        assert hq.preset_from_hf_config(cfg.to_dict(), name=preset.name) == preset


def test_preset_from_qwen3_1p7b_style_config():
    from transformers import Qwen3Config

    cfg = Qwen3Config(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )
    assert hq.preset_from_hf_config(cfg, name="qwen3-1.7b") == get_preset("qwen3-1.7b")
    d = cfg.to_dict()
    d.pop("head_dim")
    d.pop("rope_parameters")
    d["rope_theta"] = 5e5
    p = hq.preset_from_hf_config(d)
    assert p.kv_channels == 2048 // 16 and p.rotary_base == 5e5
    with pytest.raises(ValueError, match="yarn"):
        hq.preset_from_hf_config(dict(d, rope_parameters={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="attention_bias"):
        hq.preset_from_hf_config(dict(d, attention_bias=True))


def test_unmapped_keys_raise():
    preset = CONFIGS["tied"]
    hf_sd = dict(build_hf(preset).state_dict())
    hf_sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    with pytest.raises(KeyError, match="q_proj.bias"):
        hq.hf_to_megatron(hf_sd, preset)
    with pytest.raises(KeyError, match="lacks"):
        hq.hf_to_megatron(hf_sd, preset.replace(num_layers=3))
