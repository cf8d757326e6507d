"""Architecture from Megatron-LM's flags, presets as shorthands, and the clear errors for bad
combinations (megatron_rlp.models.architecture through the real command-line parser)."""

import pytest

from megatron_rlp.models.architecture import (
    ArchitectureError,
    apply_checkpoint_args,
    architecture_args,
    args_from_signature,
    build_architecture,
)
from megatron_rlp.models.builder import validate_parallel_layout
from megatron_rlp.models.presets import PRESETS, get_preset
from megatron_rlp.pretrain import parse_run_config
from megatron_rlp.training import loop


def resolve(argv, tokenizer_vocab=None, **kwargs):
    run = parse_run_config(argv)
    return loop.resolve_preset(run.model, tokenizer_vocab, **kwargs)


def same_architecture(a, b) -> bool:
    return a.replace(name="") == b.replace(name="")


# Megatron-LM command lines for the released models, as a Megatron-LM user writes them.
QWEN3_1_7B_FLAGS = (
    "--num-layers 28 --hidden-size 2048 --ffn-hidden-size 6144 --num-attention-heads 16 "
    "--group-query-attention --num-query-groups 8 --kv-channels 128 --max-position-embeddings 40960 "
    "--rotary-base 1000000 --norm-epsilon 1e-6 --swiglu --qk-layernorm --model-vocab-size 151936"
).split()
NEMOTRON_NANO_12B_FLAGS = (
    "--num-layers 62 --hidden-size 5120 --ffn-hidden-size 20480 --num-attention-heads 40 "
    "--group-query-attention --num-query-groups 8 --kv-channels 128 --max-position-embeddings 131072 "
    "--hybrid-override-pattern M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M- "
    "--mamba-num-heads 128 --mamba-head-dim 80 --mamba-state-dim 128 --mamba-num-groups 8 "
    "--squared-relu --untie-embeddings-and-output-weights --norm-epsilon 1e-5 --model-vocab-size 131072"
).split()


@pytest.mark.parametrize("name,argv", [("qwen3-1.7b", QWEN3_1_7B_FLAGS),
                                       ("nemotron-nano-12b-v2", NEMOTRON_NANO_12B_FLAGS)])
def test_megatron_flags_reproduce_the_released_presets(name, argv):
    got = resolve(argv)
    assert same_architecture(got, get_preset(name)), got
    assert got.name == f"{get_preset(name).family} model from flags"


def as_argv(args: dict) -> list[str]:
    argv = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + key.replace("_", "-"))
        elif value is not None:
            argv += [flag, str(value)]
    return argv


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_its_flags(name):
    preset = get_preset(name)
    # Through the parser (what a checkpoint's model_args means as a command line) ...
    assert same_architecture(resolve(as_argv(architecture_args(preset))), preset)
    # ... and through the checkpoint path, which keeps the name.
    assert build_architecture(architecture_args(preset), None, preset.name) == preset


def test_flags_override_only_the_fields_given():
    tiny = get_preset("tiny")
    assert resolve(["--model-preset", "tiny"]) == tiny
    got = resolve(["--model-preset", "tiny", "--num-layers", "2", "--no-qk-layernorm",
                   "--untie-embeddings-and-output-weights", "--rotary-base", "500"])
    assert same_architecture(got, tiny.replace(num_layers=2, qk_layernorm=False, tie_embeddings=False,
                                               rotary_base=500.0))
    assert got.name == ("tiny + --num-layers, --rotary-base, --qk-layernorm, "
                        "--untie-embeddings-and-output-weights")
    # A hybrid preset with another layer pattern: the pattern sets the number of layers.
    got = resolve(["--model-preset", "tiny-hybrid", "--hybrid-override-pattern", "M*-M"])
    assert same_architecture(got, get_preset("tiny-hybrid").replace(num_layers=4, hybrid_pattern="M*-M"))
    # GQA off on a GQA preset: one KV group per head.
    assert resolve(["--model-preset", "tiny", "--no-group-query-attention"]).num_query_groups == 4
    assert resolve(["--model-preset", "tiny", "--num-query-groups", "1"]).num_query_groups == 1


def test_megatron_defaults_for_flags_left_out():
    got = resolve(["--num-layers", "2", "--hidden-size", "96", "--num-attention-heads", "4", "--swiglu"],
                  tokenizer_vocab=501, tp=2, seq_length=64)
    assert (got.family, got.kv_channels, got.num_query_groups, got.ffn_hidden_size) == ("gpt", 24, 4, 256)
    assert (got.max_position_embeddings, got.rotary_base, got.norm_epsilon) == (64, 10_000.0, 1e-5)
    assert got.tie_embeddings and not got.qk_layernorm
    assert got.vocab_size == 512  # 501 padded to a multiple of 128 x TP
    assert resolve(["--num-layers", "2", "--hidden-size", "96", "--num-attention-heads", "4",
                    "--squared-relu"], tokenizer_vocab=501, tp=3, seq_length=64).vocab_size == 768
    hybrid = resolve(["--hybrid-override-pattern", "M*-", "--hidden-size", "64", "--num-attention-heads", "4",
                      "--squared-relu", "--model-vocab-size", "256", "--mamba-num-groups", "2"], seq_length=64)
    assert (hybrid.family, hybrid.num_layers, hybrid.ffn_hidden_size) == ("hybrid", 3, 256)
    # Mamba heads: 2 x hidden / head dim (64); state 128
    assert (hybrid.mamba_num_heads, hybrid.mamba_head_dim, hybrid.mamba_state_dim) == (2, 64, 128)

FLAGS_ONLY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--swiglu",
              "--model-vocab-size", "256", "--max-position-embeddings", "64"]


@pytest.mark.parametrize("argv,message", [
    (["--model-preset", "tiny-hybrid", "--num-layers", "4"],
     r"--num-layers 4 does not match the 6-layer hybrid pattern 'M\*-M\*-' of preset 'tiny-hybrid': "
     r"pass --hybrid-override-pattern with 4 layer symbols"),
    (["--model-preset", "tiny-hybrid", "--hybrid-override-pattern", "M*-", "--num-layers", "4"],
     r"--hybrid-override-pattern 'M\*-' has 3 layers but --num-layers is 4: pass --num-layers 3"),
    (["--model-preset", "tiny-hybrid", "--hybrid-override-pattern", "M*E"], r"unsupported layer symbols \['E'\]"),
    (FLAGS_ONLY + ["--group-query-attention"], r"--group-query-attention needs --num-query-groups"),
    (FLAGS_ONLY + ["--num-query-groups", "2"], r"takes effect only with --group-query-attention"),
    (FLAGS_ONLY + ["--group-query-attention", "--num-query-groups", "3"],
     r"--num-attention-heads 4 is not divisible by --num-query-groups 3"),
    (["--num-layers", "2", "--hidden-size", "66", "--num-attention-heads", "4", "--swiglu"],
     r"--hidden-size 66 is not divisible by --num-attention-heads 4; pass --kv-channels"),
    (FLAGS_ONLY + ["--squared-relu"], r"--swiglu and --squared-relu both given"),
    (["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"],
     r"pass --swiglu .* or --squared-relu .*GELU MLP is not supported"),
    (["--model-preset", "tiny", "--no-swiglu"], r"pass --swiglu .* or --squared-relu"),
    (FLAGS_ONLY + ["--mamba-num-heads", "8"], r"--mamba-num-heads apply only to hybrid .* --hybrid-override-pattern"),
    (["--num-layers", "2", "--swiglu"], r"without --model-preset needs --hidden-size, --num-attention-heads"),
    ([], r"no model architecture given: pass --model-preset"),
    (["--hybrid-override-pattern", "M*-", "--hidden-size", "64", "--num-attention-heads", "4", "--squared-relu"],
     r"--mamba-num-heads 2 is not a positive multiple of --mamba-num-groups 8"),
    (["--model-preset", "tiny-hybrid", "--mamba-num-heads", "5"],
     r"--mamba-num-heads 5 is not a positive multiple of --mamba-num-groups 2"),
    (["--model-preset", "tiny", "--use-checkpoint-args"], r"--use-checkpoint-args .* pass --load"),
    (["--model-preset", "tiny", "--model-vocab-size", "128"],
     r"the tokenizer has 501 tokens but model 'tiny \+ --model-vocab-size' has a vocabulary of 128; "
     r"pass --model-vocab-size 501"),
])
def test_bad_combinations_name_the_flag_to_change(argv, message):
    with pytest.raises(ValueError, match=message):
        resolve(argv, tokenizer_vocab=501, seq_length=64)


def test_architecture_error_names_the_flag_defined_model():
    flags_model = resolve(FLAGS_ONLY + ["--num-attention-heads", "6", "--kv-channels", "16"])
    with pytest.raises(ValueError, match=r"does not divide the 6 attention heads of preset 'gpt model from flags'"):
        validate_parallel_layout(flags_model, 4, 1, 4)
    overridden = resolve(["--model-preset", "tiny", "--num-layers", "3"])
    with pytest.raises(ValueError, match=r"does not divide the 3 layers.*\(preset 'tiny \+ --num-layers'\)"):
        validate_parallel_layout(overridden, 1, 2, 2)


def test_checkpoint_args_override_the_flags(capsys):
    stored = architecture_args(get_preset("tiny-hybrid").replace(max_position_embeddings=96))
    flags = {"num_layers": 4, "hidden_size": 32, "swiglu": True, "mamba_num_heads": 4, "rotary_base": 5.0}
    merged = apply_checkpoint_args(flags, stored, "ckpt/iter_0000000")
    assert build_architecture(merged, None, "c") == get_preset("tiny-hybrid").replace(name="c", max_position_embeddings=96)
    note = capsys.readouterr().out
    assert "ckpt/iter_0000000 overrides --num-layers 4 -> 6; --hidden-size 32 -> 64" in note
    # A GPT checkpoint drops the hybrid flags instead of mixing them in.
    gpt = architecture_args(get_preset("tiny"))
    merged = apply_checkpoint_args({"hybrid_override_pattern": "M*", "mamba_num_heads": 4}, gpt, "c")
    assert build_architecture(merged, None, "c") == get_preset("tiny").replace(name="c")


def test_checkpoints_without_model_args_take_the_length_from_the_flags():
    """Checkpoints written before ``model_args`` record only the signature (no max length)."""
    preset = get_preset("qwen3-1.7b")
    stored = args_from_signature(loop.model_signature(preset))
    assert stored["max_position_embeddings"] is None
    merged = apply_checkpoint_args({"max_position_embeddings": 2048, "num_layers": 3}, stored, "old")
    assert build_architecture(merged, None, "old") == preset.replace(name="old", max_position_embeddings=2048)
    with pytest.raises(ArchitectureError, match="--max-position-embeddings"):
        build_architecture(apply_checkpoint_args({}, stored, "old"), None, "old")
