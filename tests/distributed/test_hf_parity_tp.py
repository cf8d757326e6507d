"""HF Qwen3 -> megatron GPTModel parity under TP=2 and PP=2 (world size 2, one torchrun launch).

Every rank builds the same random HF model (same seed), converts it to the full megatron state
dict, takes its own TP shard / pipeline stage and loads it strictly.
"""
import pytest
import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_rlp.models import hf_qwen3 as hq
from megatron_rlp.models.builder import build_gpt_model, transformer_config
from megatron_rlp.models.presets import ModelPreset, get_preset

from transformers import Qwen3ForCausalLM

TOL = 1e-4

BASE = get_preset("tiny").replace(
    name="parity", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
    num_query_groups=2, kv_channels=16, vocab_size=256, rotary_base=10_000.0,
)
TP_CASES = {
    "tied": BASE,
    "untied": BASE.replace(tie_embeddings=False, rotary_base=1_000_000.0),
    "gqa4_head_dim_24": BASE.replace(num_attention_heads=8, num_query_groups=2, kv_channels=24),
    # one KV group on two TP ranks: megatron splits the single group across ranks
    "mqa_groups_lt_tp": BASE.replace(num_query_groups=1, tie_embeddings=False),
}


def build_hf(preset: ModelPreset, seed: int = 0) -> Qwen3ForCausalLM:
    cfg = hq.hf_config_from_preset(preset)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def inputs(preset: ModelPreset, b: int = 2, s: int = 48, seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, preset.vocab_size, (b, s), generator=gen)
    return ids, torch.arange(s).unsqueeze(0).expand(b, s)


def global_max(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


@pytest.mark.parametrize("case", sorted(TP_CASES))
def test_tp2_logits_match_hf(model_parallel, case):
    model_parallel(tp=2, pp=1)
    preset = TP_CASES[case]
    hf = build_hf(preset)
    full = hq.hf_to_megatron(hf.state_dict(), preset)
    rank = parallel_state.get_tensor_model_parallel_rank()
    shard = hq.shard_megatron_state_dict(full, rank, 2, preset.num_query_groups)
    model = build_gpt_model(preset, transformer_config(preset, tp=2)).eval()
    hq.load_megatron_state_dict(model, shard)

    ids, pos = inputs(preset)
    with torch.no_grad():
        local = model(ids, pos, None)
        assert local.shape[-1] == preset.vocab_size // 2
        got = gather_from_tensor_model_parallel_region(local)
        ref = hf(input_ids=ids).logits
    diff = global_max((got - ref).abs().max().item())
    if dist.get_rank() == 0:
        print(f"\n[hf-parity tp=2 {case}] max|logits diff| = {diff:.3e}")
    assert diff <= TOL

    # The loaded model's own shards gather back to the full state dict, bitwise.
    mine = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    shards = [None, None]
    dist.all_gather_object(shards, mine, group=parallel_state.get_tensor_model_parallel_group())
    back = hq.gather_megatron_state_dict(shards)
    assert set(back) == set(full)
    assert all(torch.equal(back[k], full[k]) for k in full)
    assert hq.megatron_to_hf(back, preset).keys() == hf.state_dict().keys()


@pytest.mark.parametrize("case", ["tied", "untied"])
def test_pp2_logits_match_hf(model_parallel, case):
    model_parallel(tp=1, pp=2)
    preset = TP_CASES[case].replace(num_layers=4)
    hf = build_hf(preset)
    full = hq.hf_to_megatron(hf.state_dict(), preset)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    stage = hq.slice_pipeline_stage(full, pp_rank, 2, preset.num_layers, preset.tie_embeddings)
    model = build_gpt_model(preset, transformer_config(preset, pp=2)).eval()
    assert len(model.decoder.layers) == 2
    hq.load_megatron_state_dict(model, stage)

    ids, pos = inputs(preset)
    b, s = ids.shape
    diff = 0.0
    with torch.no_grad():
        if pp_rank == 0:
            hidden = model(ids, pos, None)  # [s, b, h]: sequence-first between stages
            assert hidden.shape == (s, b, preset.hidden_size)
            dist.send(hidden.contiguous(), parallel_state.get_pipeline_model_parallel_next_rank())
            # stage 0's output is HF's hidden state after its last layer
            ref_h = hf(input_ids=ids, output_hidden_states=True).hidden_states[2]
            diff = (hidden.transpose(0, 1) - ref_h).abs().max().item()
        else:
            hidden = torch.empty(s, b, preset.hidden_size)
            dist.recv(hidden, parallel_state.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
            got = model(ids, pos, None)
            ref = hf(input_ids=ids).logits
            assert got.shape == ref.shape
            diff = (got - ref).abs().max().item()
    diff = global_max(diff)
    if dist.get_rank() == 0:
        print(f"\n[hf-parity pp=2 {case}] max|diff| (stage-0 hidden, stage-1 logits) = {diff:.3e}")
    assert diff <= TOL

    mine = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    stages = [None, None]
    dist.all_gather_object(stages, mine, group=parallel_state.get_pipeline_model_parallel_group())
    back = hq.merge_pipeline_stages(stages, preset.num_layers, preset.tie_embeddings)
    assert set(back) == set(full)
    assert all(torch.equal(back[k], full[k]) for k in full)
