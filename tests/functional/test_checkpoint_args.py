"""A converted model that is no preset trains with --use-checkpoint-args (RLP, single process).

Each HF model is built offline from a transformers config whose every size differs from the
presets (Qwen3: 3 layers, head_dim 12 != hidden / heads, GQA 3:1, untied, RoPE base 5000;
Nemotron-H: the 4-layer pattern M-*M, 6 Mamba heads in 3 groups), converted with the project's
converter, then trained for two RLP iterations whose only model flag is --use-checkpoint-args.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron.core import dist_checkpointing

from megatron_rlp import convert
from megatron_rlp.data import demo_corpus
from megatron_rlp.data.tokenizer import build_tokenizer, train_sentencepiece
from megatron_rlp.models import hf_nemotron_h as hn
from megatron_rlp.models import hf_qwen3 as hq
from megatron_rlp.models.presets import PRESETS
from megatron_rlp.pretrain import parse_run_config, run_training
from megatron_rlp.training import parallel
from megatron_rlp.training.checkpoint import iteration_dir, read_tracker
from tools.preprocess_data import preprocess

from transformers import NemotronHConfig, NemotronHForCausalLM, Qwen3Config, Qwen3ForCausalLM

VOCAB = 160  # the tokenizer below has at most 128 ids; not a multiple of 128 (no padding rule)


def qwen3_model():
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=12, max_position_embeddings=192,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    return Qwen3ForCausalLM(config)


def nemotron_h_model():
    config = NemotronHConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80,
        layers_block_type=["linear_attention", "mlp", "full_attention", "linear_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=12,
        mamba_num_heads=6, mamba_head_dim=8, ssm_state_size=8, n_groups=3, chunk_size=16,
        conv_kernel=4, mlp_hidden_act="relu2", layer_norm_epsilon=1e-5, max_position_embeddings=192,
        tie_word_embeddings=False, num_nextn_predict_layers=0,
    )
    return NemotronHForCausalLM(config)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A SentencePiece tokenizer with the thought markers and a small .bin/.idx corpus."""
    root = str(tmp_path_factory.mktemp("ckpt_args"))
    docs = demo_corpus.generate_documents(60, seed=1, with_thoughts=True)
    model = train_sentencepiece([d.text for d in docs], os.path.join(root, "tok"), vocab_size=128)
    tok = build_tokenizer("SentencePieceTokenizer", model)
    jsonl = demo_corpus.write_jsonl(docs[:8], os.path.join(root, "docs.jsonl"), tokenizer=tok)
    data = preprocess(jsonl, os.path.join(root, "docs"), tok, append_eod=True, show_progress=False)["text"]
    return model, data


def common_state(root: str) -> dict:
    return dist_checkpointing.load_common_state_dict(iteration_dir(root, read_tracker(root)))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (HF directory, converted megatron checkpoint, the architecture HF's config says)."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for family, build, reader in (("qwen3", qwen3_model, hq.preset_from_hf_config),
                                  ("nemotron_h", nemotron_h_model, hn.preset_from_hf_config)):
        torch.manual_seed(0)
        hf = build()
        hf_dir, megatron_dir = str(root / f"{family}_hf"), str(root / f"{family}_megatron")
        hf.save_pretrained(hf_dir)
        convert.hf_to_megatron(hf_dir, megatron_dir, progress=False)
        expected = reader(hf.config)
        assert all(expected.replace(name=p.name, max_position_embeddings=p.max_position_embeddings) != p
                   for p in PRESETS.values()), "the test model must not be a preset"
        out[family] = (hf_dir, megatron_dir, expected)
    return out


@pytest.mark.parametrize("family", ["qwen3", "nemotron_h"])
def test_rlp_trains_a_converted_non_preset_model_from_checkpoint_args(family, corpus, converted, tmp_path, capsys):
    tokenizer_model, data = corpus
    hf_dir, megatron_dir, expected = converted[family]
    saved = str(tmp_path / "saved")

    # The converter records the whole architecture, max_position_embeddings included.
    stored = common_state(megatron_dir)["model_args"]
    assert stored["max_position_embeddings"] == 192 and stored["model_vocab_size"] == VOCAB

    argv = [
        "--use-checkpoint-args", "--load", megatron_dir, "--save", saved,
        # A model flag that disagrees with the checkpoint: the checkpoint's value wins.
        "--num-layers", "7",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer_model,
        "--data-path", data, "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--train-iters", "2", "--lr", "1e-4", "--lr-decay-style", "constant", "--seed", "5",
        "--rlp", "--rlp-num-thoughts", "2", "--rlp-thought-len", "4", "--rlp-positions-per-doc", "1",
        "--rlp-min-context", "4",
    ]
    try:
        history = run_training(parse_run_config(argv))
    finally:
        parallel.destroy()
    assert [h["iteration"] for h in history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["rlp/reward_mean"])) for h in history)
    assert "overrides --num-layers 7 -> " + str(expected.num_layers) in capsys.readouterr().out

    # The training checkpoint records the same architecture; its weights moved from the converted.
    assert common_state(saved)["model_args"] == stored
    assert common_state(saved)["model_signature"] == common_state(megatron_dir)["model_signature"]
    before = convert.read_hf_checkpoint(hf_dir)[1]
    back = str(tmp_path / "back")
    convert.megatron_to_hf(saved, back, progress=False)
    after = convert.read_hf_checkpoint(back)[1]
    assert set(after) == set(before)
    assert any(not torch.equal(after[k], before[k]) for k in before)


def test_checkpoint_args_are_read_before_any_process_group_exists(converted):
    """What every rank of a torchrun job does before initialisation: a fresh process resolves the
    architecture from the checkpoint with no process group (a collective would raise)."""
    code = (
        "import dataclasses, json, sys\n"
        "import torch.distributed as dist\n"
        "from megatron_rlp.pretrain import parse_run_config\n"
        "from megatron_rlp.training import loop\n"
        "out = {}\n"
        "for load in sys.argv[1:]:\n"
        "    run = parse_run_config(['--use-checkpoint-args', '--load', load])\n"
        "    out[load] = dataclasses.asdict(loop.resolve_preset(run.model, load=load))\n"
        "assert not dist.is_initialized()\n"
        "print('PRESETS=' + json.dumps(out))\n"
    )
    loads = [megatron_dir for _, megatron_dir, _ in converted.values()]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", code, *loads], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("PRESETS="))[len("PRESETS="):])
    for _, megatron_dir, expected in converted.values():
        assert got[megatron_dir] == dataclasses.asdict(
            expected.replace(name=f"checkpoint {iteration_dir(megatron_dir, 0)}"))
