"""--dry-run: parameters per distinct rank from megatron-core models built on the meta device in a
fake process group, the cost model's memory check, and the refusal of invalid layouts."""

import os
import re
import subprocess

import pytest
import torch
import torch.distributed as dist

from megatron_rlp.models.presets import get_preset
from megatron_rlp.pretrain import main, parse_run_config
from megatron_rlp.training import cost_model as cm
from megatron_rlp.training import dry_run, parallel

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")

# The RLP recipe's flags around a model and a layout (no file is read by the dry run).
RECIPE = [
    "--bf16", "--micro-batch-size", "1", "--seq-length", "4096", "--lr", "1e-6",
    "--data-path", "/nonexistent/data", "--tokenizer-type", "HuggingFaceTokenizer",
    "--tokenizer-model", "/nonexistent/tokenizer",
    "--rlp", "--rlp-num-thoughts", "16", "--rlp-thought-len", "2048",
]


def _flags(preset, tp, pp, gbs, *extra):
    return ["--model-preset", preset, "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp), "--global-batch-size", str(gbs),
            *RECIPE, *extra]


@pytest.fixture
def no_process_group(monkeypatch):
    """The dry run simulates ranks in its own fake process group: leave none from other tests.
    hide_gpus() edits the environment; monkeypatch puts it back."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    monkeypatch.setenv("MEGATRON_RLP_FORCE_CPU", os.environ.get("MEGATRON_RLP_FORCE_CPU", "0"))
    parallel.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()
    yield
    assert not dist.is_initialized()  # the dry run tore its fake group down


def _ranks(preset, tp, pp, world):
    run = parse_run_config(_flags(preset, tp, pp, world // (tp * pp)))
    return dry_run.build_rank_models(run, get_preset(preset), world)


@pytest.mark.parametrize("tp,pp", [(8, 1), (4, 2)])
def test_nemotron_12b_parameters_per_rank_from_the_meta_build(no_process_group, tp, pp):
    preset = get_preset("nemotron-nano-12b-v2")
    ranks = _ranks(preset.name, tp, pp, world=2 * tp * pp)  # DP 2: replicas are not rebuilt
    assert [(r.stage, r.tp_rank) for r in ranks] == [(s, t) for s in range(pp) for t in range(tp)]
    expected = cm.stage_parameters(preset, tp=tp, pp=pp)
    assert [r.parameters for r in ranks] == [expected[r.stage] for r in ranks]
    # Summed over the distinct ranks: TP shards added up, replicated norms counted once.
    assert dry_run.unique_parameters(ranks) == 12_310_001_152
    assert all(r.weight_bytes == 2 * r.parameters for r in ranks)  # --bf16
    assert sum(r.layers for r in ranks if r.tp_rank == 0) == preset.num_layers
    # Simulated ranks follow megatron's order (TP fastest, DP, then pipeline).
    assert [r.rank for r in ranks] == [t + 2 * tp * s for s in range(pp) for t in range(tp)]


def test_tied_embedding_copy_on_the_last_stage_is_counted_once(no_process_group):
    preset = get_preset("qwen3-1.7b")  # tied embeddings: the last stage holds a copy at PP > 1
    ranks = _ranks(preset.name, 2, 2, world=4)
    assert [r.parameters for r in ranks] == [cm.stage_parameters(preset, 2, 2)[r.stage] for r in ranks]
    assert all(r.tied_copy > 0 for r in ranks if r.stage == 1)
    assert dry_run.unique_parameters(ranks) == cm.total_parameters(preset) == preset.num_parameters()


@pytest.mark.parametrize("name", ["tiny", "tiny-hybrid"])
def test_meta_build_equals_a_real_cpu_build(no_process_group, name):
    """The same parameter count, bytes and TP-shard marks as the model a real run builds on CPU."""
    from megatron_rlp.models.builder import build_model, transformer_config

    preset = get_preset(name)
    parallel.init_distributed()
    try:
        parallel.init_model_parallel(1, 1)
        parallel.set_seed(1)
        from megatron.core.transformer.module import Float16Module

        config = transformer_config(preset, params_dtype=torch.bfloat16)
        real = Float16Module(config, build_model(preset, config)).module  # as the loop builds it
        assert all(p.device.type == "cpu" for p in real.parameters())
    finally:
        parallel.destroy()
        dist.destroy_process_group()
    (rank,) = _ranks(name, 1, 1, world=1)
    assert rank.parameters == sum(p.numel() for p in real.parameters())
    assert rank.weight_bytes == sum(p.numel() * p.element_size() for p in real.parameters())
    assert rank.tp_sharded == sum(p.numel() for p in real.parameters() if getattr(p, "tensor_model_parallel", False))
    assert rank.tp_sharded > 0 and rank.parameters == cm.total_parameters(preset)


def test_layout_that_does_not_fit_is_refused_naming_rank_and_term(no_process_group, capsys):
    # 12B at TP 4 x PP 2 without recompute: 16 rows of 4096 tokens per micro-batch through 31 layers.
    code = main(_flags("nemotron-nano-12b-v2", 4, 2, 8) + ["--dry-run", "--world-size", "8"])
    out, err = capsys.readouterr()
    assert code == 3
    assert "ESTIMATE" in out and "12,310,001,152" in out
    assert re.search(r"stage 0: DOES NOT FIT", out)
    assert "layout does not fit: rank 0 (pipeline stage 0" in err
    assert "largest term: update activations" in err and "--recompute-granularity full" in err
    # The same layout with recompute and sequence parallelism fits, and the limit is the flag's.
    fixed = ["--recompute-granularity", "full", "--recompute-method", "uniform",
             "--recompute-num-layers", "1", "--sequence-parallel"]
    assert main(_flags("nemotron-nano-12b-v2", 4, 2, 8, *fixed) + ["--dry-run", "--world-size", "8"]) == 0
    assert main(_flags("nemotron-nano-12b-v2", 4, 2, 8, *fixed)
                + ["--dry-run", "--world-size", "8", "--dry-run-gpu-memory-gb", "20"]) == 3
    assert "--dry-run-gpu-memory-gb 20" in capsys.readouterr().err


def test_sampler_cache_is_named_when_it_is_the_culprit(no_process_group, capsys):
    # qwen3-1.7b on 8 GPUs with 256 documents: 32 documents x 16 thoughts decoded at once per GPU
    # (the default sampler micro-batch is every row); 64 rows per micro-batch fit.
    fixed = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    assert main(_flags("qwen3-1.7b", 1, 1, 256, *fixed) + ["--dry-run", "--world-size", "8"]) == 3
    err = capsys.readouterr().err
    assert "largest term: sampler KV cache + Mamba states" in err and "--rlp-sampler-micro-batch-size" in err
    assert main(_flags("qwen3-1.7b", 1, 1, 256, *fixed, "--rlp-sampler-micro-batch-size", "64")
                + ["--dry-run", "--world-size", "8"]) == 0


@pytest.mark.parametrize("flags,world,message", [
    (_flags("nemotron-nano-12b-v2", 3, 1, 8), 24, "does not divide the 40 attention heads"),
    (_flags("qwen3-1.7b", 2, 2, 8), 6, "world size 6 is not a multiple"),
    (_flags("nemotron-nano-12b-v2", 1, 4, 8), 4, "does not divide the 62 layers"),
    (_flags("qwen3-1.7b", 1, 1, 12), 8, "--global-batch-size 12 is not a multiple"),
    (_flags("qwen3-1.7b", 1, 1, 8, "--seq-length", "2048"), 8, "cannot hold an RLP row"),
    (_flags("qwen3-1.7b", 2, 1, 8, "--recompute-granularity", "full"), 8, "--recompute-method"),
    (["--model-preset", "tiny", "--global-batch-size", "8"], 8, "--dry-run models RLP iterations"),
])
def test_invalid_layout_is_refused(no_process_group, capsys, flags, world, message):
    assert main(flags + ["--dry-run", "--world-size", str(world)]) == 2
    out, err = capsys.readouterr()
    assert message in err and out == ""  # refused before anything is built or printed


def test_world_size_is_required(capsys):
    assert main(_flags("tiny", 1, 1, 8) + ["--dry-run"]) == 2
    assert "--world-size" in capsys.readouterr().err


def _example(script):
    path = os.path.join(EXAMPLES, script, "rlp.sbatch")
    show = 'eval "$(sed -n "/^TRAIN_ARGS=(/,/^)/p" "$0")"; printf "%s\\n" "${TRAIN_ARGS[@]}"'
    env = dict(os.environ, DATA="/d", HF_DIR="/hf", BASE_CKPT="/base", RUN_DIR="/run")
    flags = subprocess.run(["bash", "-c", show, path], capture_output=True, text=True, env=env,
                           check=True).stdout.splitlines()
    text = open(path).read()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)", text, re.M).group(1))
    gpus = int(re.search(r"^#SBATCH --gpus-per-node=(\d+)", text, re.M).group(1))
    return flags, nodes * gpus


@pytest.mark.parametrize("script", ["qwen3_1.7b", "nemotron_nano_12b_v2"])
def test_example_scripts_fit_in_80_gb(no_process_group, capsys, script):
    flags, world = _example(script)
    assert main(flags + ["--dry-run", "--world-size", str(world)]) == 0, capsys.readouterr().err
    assert "DOES NOT FIT" not in capsys.readouterr().out


def test_cost_model_memory_takes_the_built_parameter_counts():
    preset = get_preset("qwen3-1.7b")
    settings = cm.RLPSettings(contexts=8, context_len=64, num_thoughts=4, thought_len=16)
    layout = cm.Layout(pp=2, dp=1)
    built = [1000, 3000]
    memory = cm.stage_memory(preset, layout, settings, parameters=built)
    assert [m.parameters for m in memory] == built
    assert [m.terms["weights"] for m in memory] == [2000, 6000]       # bf16
    assert [m.terms["ema_teacher"] for m in memory] == [4000, 12000]  # fp32
    default = cm.stage_memory(preset, layout, settings)
    assert [m.parameters for m in default] == cm.stage_parameters(preset, pp=2)
    with pytest.raises(ValueError, match="1 stage parameter counts for 2 pipeline stages"):
        cm.stage_memory(preset, layout, settings, parameters=[5])


def test_block_and_chunked_recompute_keep_more_than_one_layer_at_a_time():
    """--recompute-method block K keeps everything of the stage's other layers; uniform K rebuilds
    K layers at once.  Both hold more than uniform 1; block over every layer equals uniform 1."""
    preset = get_preset("tiny")  # 4 GPT layers, all alike: per-layer activations a, layer input h
    settings = cm.RLPSettings(contexts=2, context_len=60, num_thoughts=2, thought_len=2)

    def act(method, k):
        layout = cm.Layout(recompute="full", recompute_method=method, recompute_num_layers=k)
        return cm.stage_memory(preset, layout, settings)[0].terms["activations"]

    none = cm.stage_memory(preset, cm.Layout(), settings)[0].terms["activations"]
    one = act("uniform", 1)                   # 4 h + a
    assert act("block", 4) == one
    a, h = (none / 4, (one - none / 4) / 4)   # solve for the per-layer terms
    assert act("block", 1) == pytest.approx(h + 3 * a, rel=1e-9)
    assert act("uniform", 2) == pytest.approx(2 * h + 2 * a, rel=1e-9)
    assert one < act("uniform", 2) < act("block", 1) < none
    with pytest.raises(ValueError, match="recompute_method"):
        cm.Layout(recompute="full", recompute_method="selective")
