"""The checkpoint converter inside a 2-rank job: every rank converts its part collectively, the
training loop's checkpoint loader reads the result at the written layout and at another one,
and logits match the Hugging Face model.

Run: torchrun --nproc_per_node 2 -m pytest -q tests/distributed/test_convert_parallel.py
"""
import os
import shutil
import tempfile

import pytest
import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing, parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_rlp import convert
from megatron_rlp.models import hf_nemotron_h as hn
from megatron_rlp.models import hf_qwen3 as hq
from megatron_rlp.models.builder import build_model, transformer_config
from megatron_rlp.models.presets import ModelPreset, get_preset
from megatron_rlp.training import checkpoint as ckpt
from megatron_rlp.training.checkpoint import iteration_dir

from transformers import NemotronHForCausalLM, Qwen3ForCausalLM

TOL = 2e-5

QWEN = get_preset("tiny").replace(
    name="conv-qwen3", num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
    num_query_groups=2, kv_channels=16, vocab_size=256, max_position_embeddings=512,
)
NEMOTRON = get_preset("tiny-hybrid").replace(
    name="conv-nemotron-h", vocab_size=256, max_position_embeddings=512,
)
MODELS = {
    "qwen3_tied": QWEN,
    # GQA ratio 4 and head_dim 24 != hidden / heads
    "qwen3_untied_gqa4_hd24": QWEN.replace(tie_embeddings=False, num_attention_heads=8,
                                          num_query_groups=2, kv_channels=24),
    "nemotron_h": NEMOTRON,
}


def build_hf(preset: ModelPreset, seed: int = 0):
    if preset.family == "gpt":
        cfg, cls = hq.hf_config_from_preset(preset), Qwen3ForCausalLM
    else:
        cfg, cls = hn.hf_config_from_preset(preset, chunk_size=16), NemotronHForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty(p.shape).uniform_(1.0, 16.0, generator=gen)))
            elif name.endswith("dt_bias"):
                dt = torch.empty(p.shape).uniform_(0.02, 0.1, generator=gen)
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif "norm" in name or name.endswith(".D"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name == "lm_head.weight":
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        if preset.tie_embeddings and preset.family == "hybrid":
            model.lm_head.weight.copy_(model.model.embeddings.weight)
    return model


@pytest.fixture(scope="module")
def workdir():
    path = [tempfile.mkdtemp(prefix="convert_dist_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    yield path[0]
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(path[0], ignore_errors=True)


@pytest.fixture(scope="module")
def hf_models(workdir):
    """name -> (HF model, its save_pretrained directory); the same model on every rank."""
    out = {}
    for i, (name, preset) in enumerate(MODELS.items()):
        model = build_hf(preset, seed=10 * i)
        path = os.path.join(workdir, "hf_" + name)
        if dist.get_rank() == 0:
            model.save_pretrained(path)
        out[name] = (model, path)
    dist.barrier()
    return out


def inputs(preset: ModelPreset, b: int = 2, s: int = 40, seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, preset.vocab_size, (b, s), generator=gen)
    return ids, torch.arange(s).unsqueeze(0).expand(b, s)


def global_max(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def load_with_loop_loader(preset: ModelPreset, root: str, tp: int, pp: int):
    """A model at (tp, pp) filled by the training loop's checkpoint loader (what --load does)."""
    model = build_model(preset, transformer_config(preset, tp=tp, pp=pp)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # everything must come from the checkpoint
    assert ckpt.load_checkpoint(root, [model], None, None, None,
                                convert.model_signature(preset)) == 0
    return model


def max_logit_diff(model, hf, preset: ModelPreset) -> float:
    """max |megatron - HF| logits over all ranks (TP: gathered vocab; PP: stage 0 sends its
    hidden states to stage 1)."""
    ids, pos = inputs(preset)
    b, s = ids.shape
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    diff = 0.0
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        if pp == 1:
            got = gather_from_tensor_model_parallel_region(model(ids, pos, None))
            diff = (got - ref).abs().max().item()
        elif parallel_state.is_pipeline_first_stage():
            hidden = model(ids, pos, None)
            dist.send(hidden.contiguous(), parallel_state.get_pipeline_model_parallel_next_rank())
        else:
            hidden = torch.empty(s, b, preset.hidden_size)
            dist.recv(hidden, parallel_state.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
            got = model(ids, pos, None)
            assert got.shape == ref.shape
            diff = (got - ref).abs().max().item()
    return global_max(diff)


def report(tag: str, diff: float) -> None:
    if dist.get_rank() == 0:
        print(f"\n[convert parity {tag}] max|logits diff| vs HF = {diff:.2e}")


def layout_of(root: str) -> dict:
    return dist_checkpointing.load_common_state_dict(iteration_dir(root, 0))["parallel_layout"]


CASES = [
    # (model, written at (tp, pp), loaded at [(tp, pp), ...])
    ("qwen3_untied_gqa4_hd24", (2, 1), [(2, 1), (1, 2)]),
    ("qwen3_tied", (1, 2), [(1, 2), (2, 1)]),
    ("nemotron_h", (2, 1), [(2, 1), (1, 2), (1, 1)]),
]


@pytest.mark.parametrize("name, written, loads", CASES, ids=[c[0] for c in CASES])
def test_converted_checkpoint_matches_hf_at_several_layouts(model_parallel, workdir, hf_models,
                                                            name, written, loads):
    hf, hf_dir = hf_models[name]
    root = os.path.join(workdir, f"mc_{name}_tp{written[0]}pp{written[1]}")
    preset = convert.hf_to_megatron(hf_dir, root, target_tp=written[0], target_pp=written[1],
                                    progress=False)
    assert layout_of(root) == {"tp": written[0], "pp": written[1], "dp": 1}
    for tp, pp in loads:
        model_parallel(tp=tp, pp=pp)
        model = load_with_loop_loader(preset, root, tp, pp)
        diff = max_logit_diff(model, hf, preset)
        report(f"{name} written tp={written[0]} pp={written[1]}, loaded tp={tp} pp={pp}", diff)
        assert diff <= TOL


def test_hybrid_tp_shards_load_into_megatron_tp2(model_parallel, hf_models):
    """shard_hybrid_state_dict gives each rank exactly the tensors megatron's TP=2 MambaModel
    holds (packed in_proj / conv1d sections, A_log, D, dt_bias, gated norm, attention, MLP)."""
    hf, _ = hf_models["nemotron_h"]
    model_parallel(tp=2, pp=1)
    full = hn.hf_to_megatron(hf.state_dict(), NEMOTRON)
    shard = hn.shard_hybrid_state_dict(full, parallel_state.get_tensor_model_parallel_rank(), 2,
                                       NEMOTRON)
    model = build_model(NEMOTRON, transformer_config(NEMOTRON, tp=2)).eval()
    hq.load_megatron_state_dict(model, shard)
    diff = max_logit_diff(model, hf, NEMOTRON)
    report("nemotron_h direct TP=2 shards", diff)
    assert diff <= TOL
    mine = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    shards = [None, None]
    dist.all_gather_object(shards, mine, group=parallel_state.get_tensor_model_parallel_group())
    back = hn.gather_hybrid_state_dict(shards, NEMOTRON)
    assert set(back) == set(full) and all(torch.equal(back[k], full[k]) for k in full)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_round_trip_through_tp2_and_tp1_is_bitwise(workdir, hf_models, name):
    """HF -> megatron (TP=2) -> megatron (TP=1) -> HF gives the original tensors bit for bit."""
    _, hf_dir = hf_models[name]
    tp2, tp1, back = (os.path.join(workdir, f"rt_{name}_{s}") for s in ("tp2", "tp1", "hf"))
    convert.hf_to_megatron(hf_dir, tp2, target_tp=2, progress=False)
    convert.megatron_to_megatron(tp2, tp1, target_tp=1, progress=False)
    assert layout_of(tp2)["tp"] == 2 and layout_of(tp1)["tp"] == 1
    convert.megatron_to_hf(tp1, back, progress=False)
    if dist.get_rank() == 0:
        src, got = convert.read_hf_checkpoint(hf_dir)[1], convert.read_hf_checkpoint(back)[1]
        assert set(src) == set(got)
        for k in src:
            assert src[k].dtype == got[k].dtype and torch.equal(src[k], got[k]), k
    dist.barrier()
