"""The checkpoint converter (megatron_rlp.convert, tools/convert_checkpoint.py) on one process.

HF directories are written with ``save_pretrained`` from random models built offline.  Round
trips must give bitwise-identical tensors; the training loop must load what the converter writes
and its checkpoints must convert back.  Multi-rank layouts written collectively are in
tests/distributed/test_convert_parallel.py; here one conversion goes through the tool's own
spawned workers (TP=2).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron.core import dist_checkpointing

from megatron_rlp import convert
from megatron_rlp.models import hf_nemotron_h as hn
from megatron_rlp.models import hf_qwen3 as hq
from megatron_rlp.models.presets import ModelPreset, get_preset
from megatron_rlp.training import parallel
from megatron_rlp.training.checkpoint import iteration_dir, read_tracker

from transformers import NemotronHForCausalLM, Qwen3ForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QWEN = get_preset("tiny").replace(
    name="conv-qwen3", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
    num_query_groups=2, kv_channels=16, vocab_size=256, max_position_embeddings=512,
)
NEMOTRON = get_preset("tiny-hybrid").replace(
    name="conv-nemotron-h", vocab_size=256, max_position_embeddings=512,
)
MODELS = {
    "qwen3_tied": QWEN,
    "qwen3_untied": QWEN.replace(tie_embeddings=False),
    "nemotron_h": NEMOTRON,
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty(p.shape).uniform_(1.0, 16.0, generator=gen)))
            elif name.endswith("dt_bias"):
                dt = torch.empty(p.shape).uniform_(0.02, 0.1, generator=gen)
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif "norm" in name or name.endswith(".D"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def build_hf(preset: ModelPreset, seed: int = 0):
    if preset.family == "gpt":
        cfg = hq.hf_config_from_preset(preset)
        cls = Qwen3ForCausalLM
    else:
        cfg = hn.hf_config_from_preset(preset, chunk_size=16)
        cls = NemotronHForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    randomize(model, seed + 1)
    return model


def save_hf(preset: ModelPreset, path: str, seed: int = 0):
    model = build_hf(preset, seed)
    model.save_pretrained(path)
    return model


def hf_tensors(path: str) -> dict:
    return convert.read_hf_checkpoint(path)[1]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, preset) in enumerate(MODELS.items()):
        out[name] = str(root / name)
        save_hf(preset, out[name], seed=10 * i)
    return out


@pytest.fixture(autouse=True)
def _fresh_parallel_state():
    yield
    parallel.destroy()


def logits_of_hf_dir(path: str, ids: torch.Tensor) -> torch.Tensor:
    cfg = json.load(open(os.path.join(path, "config.json")))
    cls = Qwen3ForCausalLM if cfg["model_type"] == "qwen3" else NemotronHForCausalLM
    model = cls.from_pretrained(path, attn_implementation="eager").float().eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hf_megatron_hf_bitwise(hf_dirs, tmp_path, name):
    mc, back = str(tmp_path / "mc"), str(tmp_path / "hf")
    preset = convert.hf_to_megatron(hf_dirs[name], mc, progress=False)
    assert read_tracker(mc) == 0
    common = dist_checkpointing.load_common_state_dict(iteration_dir(mc, 0))
    assert common["weights_only"] and common["parallel_layout"] == {"tp": 1, "pp": 1, "dp": 1}
    assert common["model_signature"]["family"] == MODELS[name].family
    assert preset.tie_embeddings == MODELS[name].tie_embeddings

    convert.megatron_to_hf(mc, back, progress=False)
    assert_same_tensors(hf_tensors(hf_dirs[name]), hf_tensors(back))
    src = json.load(open(os.path.join(hf_dirs[name], "config.json")))
    out = json.load(open(os.path.join(back, "config.json")))
    for key in ("model_type", "hidden_size", "vocab_size", "tie_word_embeddings",
                "max_position_embeddings", "num_attention_heads", "num_key_value_heads", "head_dim"):
        assert out.get(key) == src.get(key), key
    assert out["dtype"] == "float32"
    # transformers loads the written directory to the same model
    ids = torch.randint(0, MODELS[name].vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    assert torch.equal(logits_of_hf_dir(back, ids), logits_of_hf_dir(hf_dirs[name], ids))


def test_tp2_through_spawned_workers(hf_dirs, tmp_path):
    """HF -> megatron at TP=2 written by the tool's own two worker processes -> HF, bitwise
    (Nemotron-H: the packed Mamba tensors go through megatron's own TP sharding)."""
    mc, back = str(tmp_path / "mc_tp2"), str(tmp_path / "hf")
    convert.hf_to_megatron(hf_dirs["nemotron_h"], mc, target_tp=2, progress=False)
    common = dist_checkpointing.load_common_state_dict(iteration_dir(mc, 0))
    assert common["parallel_layout"] == {"tp": 2, "pp": 1, "dp": 1}
    convert.megatron_to_hf(mc, back, progress=False)
    assert_same_tensors(hf_tensors(hf_dirs["nemotron_h"]), hf_tensors(back))


def test_sharded_safetensors_both_ways(hf_dirs, tmp_path):
    name = "qwen3_untied"
    mc, sharded = str(tmp_path / "mc"), str(tmp_path / "sharded")
    convert.hf_to_megatron(hf_dirs[name], mc, progress=False)
    convert.megatron_to_hf(mc, sharded, max_shard_size="40KB", progress=False)
    index = json.load(open(os.path.join(sharded, convert.SAFE_WEIGHTS_INDEX_NAME)))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and not os.path.exists(os.path.join(sharded, "model.safetensors"))
    assert all(os.path.getsize(os.path.join(sharded, f)) < 40_000 + 64 * 1024 for f in files)
    ids = torch.randint(0, QWEN.vocab_size, (1, 16), generator=torch.Generator().manual_seed(4))
    assert torch.equal(logits_of_hf_dir(sharded, ids), logits_of_hf_dir(hf_dirs[name], ids))
    # and the sharded directory converts back
    mc2, single = str(tmp_path / "mc2"), str(tmp_path / "single")
    convert.hf_to_megatron(sharded, mc2, progress=False)
    convert.megatron_to_hf(mc2, single, progress=False)
    assert os.listdir(single).count("model.safetensors") == 1
    assert_same_tensors(hf_tensors(hf_dirs[name]), hf_tensors(single))


def test_bf16_conversion(hf_dirs, tmp_path):
    mc, back = str(tmp_path / "mc"), str(tmp_path / "hf")
    convert.hf_to_megatron(hf_dirs["nemotron_h"], mc, dtype="bfloat16", progress=False)
    convert.megatron_to_hf(mc, back, progress=False)
    src = hf_tensors(hf_dirs["nemotron_h"])
    got = hf_tensors(back)
    assert_same_tensors({k: v.to(torch.bfloat16) for k, v in src.items()}, got)
    assert json.load(open(os.path.join(back, "config.json")))["dtype"] == "bfloat16"
    fp32 = str(tmp_path / "fp32")
    convert.megatron_to_hf(mc, fp32, dtype="float32", progress=False)
    assert_same_tensors({k: v.to(torch.bfloat16).float() for k, v in src.items()}, hf_tensors(fp32))


# --------------------------------------------------------------------------------------------
# The training loop loads what the converter writes; its checkpoints convert back
# --------------------------------------------------------------------------------------------


def write_corpus(prefix: str, vocab: int, num_docs: int = 40) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(0)
    for _ in range(num_docs):
        ids = rng.integers(0, vocab, size=int(rng.integers(10, 40))).tolist() + [vocab]
        builder.add_item(torch.tensor(ids))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.mark.parametrize("preset_name", ["tiny", "tiny-hybrid"])
def test_training_loop_loads_converted_and_its_checkpoint_converts_back(tmp_path, preset_name):
    from megatron_rlp import pretrain
    from megatron_rlp.training import checkpoint as ckpt
    from megatron_rlp.training import loop

    preset = get_preset(preset_name).replace(num_layers=4 if preset_name == "tiny" else 6)
    hf_dir, mc, saved, back = (str(tmp_path / n) for n in ("hf", "mc", "saved", "back"))
    hf = save_hf(preset, hf_dir, seed=5)
    convert.hf_to_megatron(hf_dir, mc, progress=False)

    data = write_corpus(str(tmp_path / "corpus"), vocab=500)
    args = [
        "--model-preset", preset_name, "--num-layers", str(preset.num_layers),
        "--micro-batch-size", "2", "--global-batch-size", "2", "--seq-length", "16",
        "--train-iters", "1", "--lr", "0", "--min-lr", "0", "--lr-decay-style", "constant",
        "--data-path", data, "--tokenizer-type", "NullTokenizer", "--vocab-size", "500",
        "--load", mc, "--save", saved, "--seed", "3",
    ]
    run = pretrain.parse_run_config(args)
    loop_preset = loop.resolve_preset(run.model, 501)
    state = loop.setup(run, loop_preset)
    assert ckpt.load_checkpoint(mc, state.model, state.optimizer, state.scheduler, None,
                                loop.model_signature(loop_preset)) == 0
    ids = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(6))
    pos = torch.arange(20).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        got = state.model[0](ids, pos, None)
        ref = hf(input_ids=ids).logits
    diff = (got - ref).abs().max().item()
    print(f"\n[convert -> loop --load, {preset_name}] max|logits diff| vs HF = {diff:.2e}")
    assert diff <= 1e-5 and ref.abs().max().item() > 0.1
    del state
    parallel.destroy()

    # --load the converted checkpoint, take one optimizer step (lr 0), --save a full training
    # checkpoint (optimizer state and all) and convert that back
    history = pretrain.run_training(pretrain.parse_run_config(args))
    assert len(history) == 1
    common = dist_checkpointing.load_common_state_dict(iteration_dir(saved, 1))
    assert "weights_only" not in common and "scheduler" in common  # a full training checkpoint
    assert os.path.isfile(os.path.join(iteration_dir(saved, 1), "metadata.json"))
    convert.megatron_to_hf(saved, back, progress=False)
    assert_same_tensors(hf_tensors(hf_dir), hf_tensors(back))
    assert json.load(open(os.path.join(back, "config.json")))["model_type"] == (
        "qwen3" if preset.family == "gpt" else "nemotron_h"
    )
    # a training checkpoint carries no HF config: --hf-config supplies the fields it lacks
    with_cfg = str(tmp_path / "with_cfg")
    convert.megatron_to_hf(saved, with_cfg, hf_config=hf_dir, max_position_embeddings=777,
                           progress=False)
    cfg = json.load(open(os.path.join(with_cfg, "config.json")))
    src_cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    assert cfg["max_position_embeddings"] == 777
    assert {k: v for k, v in cfg.items() if k not in ("max_position_embeddings", "transformers_version")} \
        == {k: v for k, v in src_cfg.items() if k not in ("max_position_embeddings", "transformers_version")}


# --------------------------------------------------------------------------------------------
# Refusals (exit code 2, a clear message, nothing half-written)
# --------------------------------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = convert.main([*argv, "--no-progress"])
    return code, capsys.readouterr().err


def copy_dir(src: str, dst: str) -> str:
    import shutil

    shutil.copytree(src, dst)
    return dst


def leftovers(parent: str, name: str) -> list[str]:
    return [n for n in os.listdir(parent) if n.startswith(name + ".tmp-") or n.startswith(name + ".old-")]


def test_unknown_architecture(hf_dirs, tmp_path, capsys):
    src = copy_dir(hf_dirs["qwen3_tied"], str(tmp_path / "llama"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["model_type"] = "llama"
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    code, err = run_cli(capsys, "hf-to-megatron", "--hf-dir", src, "--megatron-dir",
                        str(tmp_path / "out"))
    assert code == 2
    assert "model_type='llama'" in err and "nemotron_h, qwen3" in err
    assert not os.path.exists(tmp_path / "out") and not leftovers(str(tmp_path), "out")


def _rewrite_tensor(directory: str, name: str, value) -> None:
    from safetensors.torch import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    save_file(tensors, path, metadata={"format": "pt"})


def test_weights_that_do_not_match_the_config(hf_dirs, tmp_path, capsys):
    src = copy_dir(hf_dirs["qwen3_untied"], str(tmp_path / "bad"))
    _rewrite_tensor(src, "model.layers.1.mlp.up_proj.weight", torch.zeros(95, 64))
    code, err = run_cli(capsys, "hf-to-megatron", "--hf-dir", src, "--megatron-dir",
                        str(tmp_path / "out"))
    assert code == 2
    assert "'model.layers.1.mlp.up_proj.weight' has shape (95, 64)" in err
    assert "config expects (96, 64)" in err

    _rewrite_tensor(src, "model.layers.1.mlp.up_proj.weight", None)
    code, err = run_cli(capsys, "hf-to-megatron", "--hf-dir", src, "--megatron-dir",
                        str(tmp_path / "out"))
    assert code == 2 and "'model.layers.1.mlp.up_proj.weight' is missing" in err
    assert not os.path.exists(tmp_path / "out") and not leftovers(str(tmp_path), "out")


@pytest.mark.parametrize("name, tp, pp, message", [
    ("qwen3_tied", 3, 1, "does not divide the 4 attention heads"),
    ("qwen3_tied", 1, 3, "does not divide the 2 layers"),
    ("nemotron_h", 4, 1, "does not divide the 2 KV groups"),
    ("nemotron_h", 1, 4, "does not divide the 6 layers"),
])
def test_target_layout_that_does_not_divide_the_model(hf_dirs, tmp_path, capsys, name, tp, pp,
                                                      message):
    code, err = run_cli(capsys, "hf-to-megatron", "--hf-dir", hf_dirs[name], "--megatron-dir",
                        str(tmp_path / "out"), "--target-tp", str(tp), "--target-pp", str(pp))
    assert code == 2 and message in err, err
    assert not os.path.exists(tmp_path / "out")


def test_existing_output_needs_overwrite(hf_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, "hf-to-megatron", "--hf-dir", hf_dirs["qwen3_tied"],
                        "--megatron-dir", str(out))
    assert code == 2 and "already exists; pass --overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, err = run_cli(capsys, "hf-to-megatron", "--hf-dir", hf_dirs["qwen3_tied"],
                        "--megatron-dir", str(out), "--overwrite")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and read_tracker(str(out)) == 0
    assert not leftovers(str(tmp_path), "out")
    # the output may not be the input
    code, err = run_cli(capsys, "megatron-to-hf", "--megatron-dir", str(out), "--hf-dir",
                        str(out), "--overwrite")
    assert code == 2 and "is the input directory" in err


def test_failure_during_conversion_leaves_nothing(hf_dirs, tmp_path, capsys):
    """Shapes pass the up-front check, the mapping then finds the tied lm_head differs from the
    embedding: exit 2, no output, no staging directory left behind."""
    src = copy_dir(hf_dirs["qwen3_tied"], str(tmp_path / "untied_weights"))
    _rewrite_tensor(src, "lm_head.weight", torch.ones(256, 64))
    code, err = run_cli(capsys, "hf-to-megatron", "--hf-dir", src, "--megatron-dir",
                        str(tmp_path / "out"))
    assert code == 2 and "lm_head.weight != embed_tokens" in err
    assert not os.path.exists(tmp_path / "out") and not leftovers(str(tmp_path), "out")


def test_megatron_side_refusals(hf_dirs, tmp_path, capsys):
    code, err = run_cli(capsys, "megatron-to-hf", "--megatron-dir", hf_dirs["qwen3_tied"],
                        "--hf-dir", str(tmp_path / "out"))
    assert code == 2 and "is not a megatron checkpoint" in err
    mc = str(tmp_path / "mc")
    convert.hf_to_megatron(hf_dirs["nemotron_h"], mc, progress=False)
    code, err = run_cli(capsys, "megatron-to-megatron", "--megatron-dir", mc, "--target-dir",
                        str(tmp_path / "re"), "--target-tp", "4")
    assert code == 2 and "does not divide the 2 KV groups" in err
    code, err = run_cli(capsys, "megatron-to-hf", "--megatron-dir", mc, "--hf-dir",
                        str(tmp_path / "out"), "--hf-config", hf_dirs["qwen3_tied"])
    assert code == 2 and "does not match the checkpoint's architecture 'nemotron_h'" in err
    assert not os.path.exists(tmp_path / "out")


def test_cli_exit_code_in_a_fresh_process(hf_dirs, tmp_path):
    src = copy_dir(hf_dirs["qwen3_tied"], str(tmp_path / "gpt2"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["model_type"] = "gpt2"
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "hf-to-megatron",
         "--hf-dir", src, "--megatron-dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "unsupported architecture" in out.stderr and "model_type='gpt2'" in out.stderr
    assert not os.path.exists(tmp_path / "out")


def test_parse_size():
    assert convert.parse_size("2GB") == 2 * 10**9
    assert convert.parse_size("1GiB") == 2**30
    assert convert.parse_size("500kb") == 500_000
    assert convert.parse_size(123) == 123
    with pytest.raises(convert.ConversionError):
        convert.parse_size("lots")
