"""--sequence-parallel and --recompute-* (Megatron-LM semantics) change no number: every run with a
flag matches the same layout without it (losses, metrics and this rank's gradients to 1e-5, fp32),
for next-token training and RLP, on the GPT and the hybrid model, at TP=2 and PP=2.

Each test also checks that the flag took effect (a sequence-parallel norm sees S/TP rows; a
recomputed layer runs its forward twice), so a flag that is silently dropped fails too.  These
runs need the CPU shim inside autograd's backward (megatron allocates on
``torch.cuda.current_device()`` in the sequence-parallel collectives' and recompute's backward).
"""

import os

import pytest
import torch
import torch.distributed as dist

from megatron_rlp.data.documents import DocumentStream, open_indexed_dataset
from megatron_rlp.models.norm import ConfigRMSNorm
from megatron_rlp.rlp.config import RLPConfig
from megatron_rlp.rlp.step import RLPObjective
from megatron_rlp.training import loop, parallel
from megatron_rlp.training.checkpoint import unwrap_model
from megatron_rlp.training.ntp import NextTokenObjective
from rlp_parity import GivenThoughtSource, MarkerTokenizer, given_thoughts
from training_fixtures import write_corpus

TOL = 1e-5
SEQ = 32
FULL_UNIFORM = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
FULL_BLOCK = {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1}
SELECTIVE = {"recompute_granularity": "selective"}
SP = {"sequence_parallel": True}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    box = [str(tmp_path_factory.mktemp("flags")) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    prefix = os.path.join(box[0], "corpus")
    if dist.get_rank() == 0:
        write_corpus(prefix, num_docs=24, seed=2)
    dist.barrier()
    return prefix


def _layer_of(name: str) -> str:
    return name.split(".layers.")[1].split(".")[0]


def _run(corpus, objective, preset="tiny", tp=1, pp=1, iters=2, layers=2, sampler=False, **flags):
    """Train ``iters`` steps; returns the history, this rank's gradients per step, how often each
    layer's recomputable block ran forward, and the sequence lengths the norms saw (training)."""
    run = loop.RunConfig()
    run.model.model_preset, run.model.layout_invariant_init = preset, True
    if preset == "tiny":
        run.model.num_layers = layers
    run.parallel.tensor_model_parallel_size, run.parallel.pipeline_model_parallel_size = tp, pp
    run.parallel.sequence_parallel = flags.pop("sequence_parallel", False)
    t = run.training
    t.micro_batch_size, t.global_batch_size, t.train_iters, t.seq_length = 1, 2, iters, SEQ
    t.lr, t.seed, t.lr_decay_style = 1e-3, 3, "constant"
    for key, value in flags.items():
        setattr(t, key, value)
    try:
        state = loop.setup(run, loop.resolve_preset(run.model))
        stream = DocumentStream(open_indexed_dataset(corpus), state.preset.vocab_size, seed=3, shuffle=False)
        if objective == "ntp":
            obj = NextTokenObjective(stream, SEQ, 1)
        else:
            config = RLPConfig(rlp_num_thoughts=3, rlp_thought_len=4, rlp_positions_per_doc=2, rlp_min_context=3,
                               rlp_temperature=0.7, rlp_kl_beta=0.05, rlp_ntp_weight=0.3)
            source = None
            if not sampler:
                thoughts, forced = given_thoughts(4, cap=config.rlp_thought_len)
                source = GivenThoughtSource(thoughts, forced, config.rlp_thought_len)
            obj = RLPObjective(config, state, MarkerTokenizer(), stream, thought_source=source)
        model = unwrap_model(state.model[0])
        calls, rows = {}, set()

        def count(name):
            def hook(module, args, output):
                if module.training:  # the update (the sampler and the scoring passes run in eval mode)
                    calls[name] = calls.get(name, 0) + 1
            return hook

        def seq_rows(module, args, output):
            if module.training and args[0].dim() == 3:
                rows.add(args[0].shape[0])

        for name, module in model.named_modules():
            if name.endswith("core_attention") or name.endswith("mixer"):
                module.register_forward_hook(count(_layer_of(name)))
            if isinstance(module, ConfigRMSNorm):
                module.register_forward_hook(seq_rows)
        grads = []
        step = state.optimizer.step

        def step_and_capture():
            grads.append({n: p.main_grad.detach().clone() for n, p in model.named_parameters()})
            return step()

        state.optimizer.step = step_and_capture
        history = loop.train(state, obj)
        thoughts = [mb["tokens"].clone() for mb in obj._cached] if objective == "rlp" else None
        return {"history": history, "grads": grads, "calls": calls, "rows": rows, "tokens": thoughts}
    finally:
        parallel.destroy()


_BASELINES = {}


def _baseline(corpus, objective, **layout):
    key = (objective, tuple(sorted(layout.items())))
    if key not in _BASELINES:
        _BASELINES[key] = _run(corpus, objective, **layout)
    return _BASELINES[key]


def _assert_same_run(got, want):
    assert len(got["history"]) == len(want["history"])
    for i, (a, b) in enumerate(zip(got["history"], want["history"])):
        for key, value in b.items():
            if key in ("elapsed_ms", "tflops_per_gpu") or not isinstance(value, float):
                continue
            assert abs(a[key] - value) <= TOL * max(1.0, abs(value)), f"iteration {i + 1} {key}: {a[key]} vs {value}"
    for i, (ga, gb) in enumerate(zip(got["grads"], want["grads"])):
        assert set(ga) == set(gb)
        for name in gb:
            diff = (ga[name] - gb[name]).abs().max().item()
            assert diff <= TOL * max(1.0, gb[name].abs().max().item()), f"iteration {i + 1} grad {name}: {diff:.2e}"


def _assert_sequence_parallel(got, want, tp):
    """The norms saw sequences split over TP (padded to a multiple of TP), the run without the flag
    whole ones."""
    assert got["rows"] and want["rows"]
    assert {-(-w // tp) for w in want["rows"]} == got["rows"], (got["rows"], want["rows"])


def _assert_recomputed(got, want, layers):
    """The chosen layers ran their forward twice per micro-batch, the others once."""
    for layer, n in want["calls"].items():
        assert got["calls"][layer] == (2 * n if layer in layers else n), (layer, got["calls"], want["calls"])


# -- next-token training ------------------------------------------------------------------------
@pytest.mark.world_size(2)
@pytest.mark.parametrize("preset,flags,recomputed", [
    ("tiny", SP, None),
    ("tiny", SELECTIVE, {"0", "1"}),
    ("tiny-hybrid", SP, None),
    ("tiny-hybrid", SELECTIVE, {"1", "4"}),  # the attention layers of M*-M*-; Mamba has no core attention
])
def test_next_token_tp2(corpus, preset, flags, recomputed):
    want = _baseline(corpus, "ntp", preset=preset, tp=2)
    got = _run(corpus, "ntp", preset=preset, tp=2, **flags)
    _assert_same_run(got, want)
    if flags is SP:
        _assert_sequence_parallel(got, want, 2)
    else:
        _assert_recomputed(got, want, recomputed)


@pytest.mark.world_size(2)
@pytest.mark.parametrize("preset,flags,recomputed", [
    ("tiny", FULL_BLOCK, {"0"}),  # block: the first layer of each 2-layer stage
    ("tiny", FULL_UNIFORM, {"0", "1"}),
    ("tiny-hybrid", dict(FULL_UNIFORM, recompute_num_layers=2), {"0", "1", "2"}),  # 3 layers a stage
])
def test_next_token_pp2_full_recompute(corpus, preset, flags, recomputed):
    want = _baseline(corpus, "ntp", preset=preset, pp=2, layers=4)
    got = _run(corpus, "ntp", preset=preset, pp=2, layers=4, **flags)
    _assert_same_run(got, want)
    _assert_recomputed(got, want, recomputed)


# -- RLP (fixed thoughts; teacher, KL-reference and next-token terms on) -------------------------
@pytest.mark.world_size(2)
@pytest.mark.parametrize("preset,flags", [
    ("tiny", SP), ("tiny", FULL_UNIFORM), ("tiny", SELECTIVE), ("tiny-hybrid", SP),
])
def test_rlp_tp2(corpus, preset, flags):
    want = _baseline(corpus, "rlp", preset=preset, tp=2)
    got = _run(corpus, "rlp", preset=preset, tp=2, **flags)
    _assert_same_run(got, want)
    if flags is SP:
        _assert_sequence_parallel(got, want, 2)
        width = got["tokens"][0].shape[1]
        assert width % 2 == 0 and width >= want["tokens"][0].shape[1]  # rows padded to a multiple of TP
    else:
        _assert_recomputed(got, want, layers=set(want["calls"]))


@pytest.mark.world_size(2)
@pytest.mark.parametrize("preset,flags,recomputed", [
    ("tiny", FULL_BLOCK, {"0"}),
    ("tiny-hybrid", dict(FULL_UNIFORM, recompute_num_layers=2), {"0", "1", "2"}),
])
def test_rlp_pp2_full_recompute(corpus, preset, flags, recomputed):
    want = _baseline(corpus, "rlp", preset=preset, pp=2, layers=4)
    got = _run(corpus, "rlp", preset=preset, pp=2, layers=4, **flags)
    _assert_same_run(got, want)
    _assert_recomputed(got, want, recomputed)


def _assert_same_thoughts(got, want):
    # Rows are wider under sequence parallelism (padding); each micro-batch has its own width.
    assert all(torch.equal(a[:, : b.shape[1]], b) for a, b in zip(got["tokens"], want["tokens"]))


@pytest.mark.world_size(2)
@pytest.mark.parametrize("preset", ["tiny", "tiny-hybrid"])
def test_rlp_sequence_parallel_with_the_sampler(corpus, preset):
    """The real sampler decodes with sequence parallelism off on the same weights (so it draws the
    same thoughts), and the update after it runs sequence-parallel again."""
    want = _run(corpus, "rlp", preset=preset, tp=2, sampler=True)
    got = _run(corpus, "rlp", preset=preset, tp=2, sampler=True, **SP)
    _assert_same_run(got, want)
    _assert_sequence_parallel(got, want, 2)
    _assert_same_thoughts(got, want)


@pytest.mark.world_size(4)
def test_rlp_tp2_pp2_sequence_parallel_and_recompute_with_the_sampler(corpus):
    want = _run(corpus, "rlp", tp=2, pp=2, layers=4, sampler=True)
    got = _run(corpus, "rlp", tp=2, pp=2, layers=4, sampler=True, **SP, **FULL_UNIFORM)
    _assert_same_run(got, want)
    _assert_sequence_parallel(got, want, 2)
    _assert_recomputed(got, want, {"0", "1"})
    _assert_same_thoughts(got, want)


# -- bad combinations ---------------------------------------------------------------------------
@pytest.mark.world_size(2)
def test_bad_flag_combinations_are_rejected(corpus):
    with pytest.raises(ValueError, match="--seq-length 31 must be a multiple of --tensor-model-parallel-size 2"):
        run = loop.RunConfig()
        run.model.model_preset, run.model.num_layers = "tiny", 2
        run.parallel.tensor_model_parallel_size, run.parallel.sequence_parallel = 2, True
        run.training.seq_length, run.training.global_batch_size = 31, 1
        try:
            loop.setup(run, loop.resolve_preset(run.model))
        finally:
            parallel.destroy()
    with pytest.raises(ValueError, match="--recompute-num-layers 2 must divide the 3 layers of pipeline stage"):
        _run(corpus, "ntp", pp=2, layers=6, recompute_granularity="full", recompute_method="uniform",
             recompute_num_layers=2)


# -- decoding and evaluation switch sequence parallelism off and back ---------------------------
def _sp_attributes(model):
    names = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")
    state = {(name, attr): getattr(m, attr) for name, m in model.named_modules() for attr in names if hasattr(m, attr)}
    return model.config.sequence_parallel, state


@pytest.mark.world_size(2)
def test_evaluation_runs_without_sequence_parallel_and_restores_it(model_parallel):
    import numpy as np

    from megatron_rlp.models.builder import build_model, transformer_config
    from megatron_rlp.models.init import initialize_layout_invariant
    from megatron_rlp.models.presets import get_preset
    from megatron_rlp.rlp.evaluate import evaluate_thinking
    from megatron_rlp.sampling import sample_thoughts

    preset = get_preset("tiny").replace(num_layers=2)
    model_parallel(2, 1)
    models = {}
    for sp in (False, True):
        models[sp] = build_model(preset, transformer_config(preset, tp=2, sequence_parallel=sp))
        initialize_layout_invariant(models[sp], 7, preset.num_layers)
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 500, (n,), generator=gen) for n in (19, 24)]
    positions = [[4, 11], [17]]
    args = dict(num_thoughts=2, thought_len=3, temperature=0.8, open_id=509, close_id=510, eod_id=511,
                seed=5, max_sequence_length=64)
    before = _sp_attributes(models[True])
    assert before[0] and any(v for v in before[1].values())
    want = evaluate_thinking(models[False], docs, positions, sample_thoughts, **args)
    got = evaluate_thinking(models[True], docs, positions, sample_thoughts, **args)
    assert got.thought_ids == want.thought_ids
    for key in ("gain", "acc_think", "acc_plain", "logp_plain"):
        np.testing.assert_allclose(getattr(got, key), getattr(want, key), rtol=0, atol=1e-5)
    assert _sp_attributes(models[True]) == before
    with pytest.raises(ValueError, match="outside"):  # an error inside the sampler: restored too
        sample_thoughts(models[True], docs, [[0], [3]], 2, 3, 509, 510, 511, 0.8, 5, 64)
    assert _sp_attributes(models[True]) == before
