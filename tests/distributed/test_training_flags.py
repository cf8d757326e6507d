"""Megatron-LM flags a 12B run needs, each against the run without it (fp32, 1e-5):
--overlap-grad-reduce / --overlap-param-gather, --decoder-first/last-pipeline-num-layers and
--check-for-nan-in-loss-and-grad."""

import os

import pytest
import torch
import torch.distributed as dist

from megatron.core import parallel_state

from megatron_rlp.pretrain import build_objective, parse_run_config, setup_run
from megatron_rlp.training import checkpoint, loop, parallel
from megatron_rlp.training.checkpoint import unwrap_model
from training_fixtures import tiny_run_args, write_corpus

TOL = 1e-5
DIST_OPT = {"use_distributed_optimizer": True}
OVERLAP = {"use_distributed_optimizer": True, "overlap_grad_reduce": True, "overlap_param_gather": True}


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
    box = [str(tmp_path_factory.mktemp("flags")) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@pytest.fixture(scope="module")
def corpus(shared_dir):
    prefix = os.path.join(shared_dir, "data", "corpus")
    if dist.get_rank() == 0:
        write_corpus(prefix)
    dist.barrier()
    return prefix


def _params(state) -> dict:
    return {n: p.detach().clone() for n, p in unwrap_model(state.model[0]).named_parameters()}


def _run(argv, wrap_objective=None):
    """Train in this process; returns (history, this rank's parameters after training)."""
    run = parse_run_config(argv)
    try:
        state, tokenizer, stream = setup_run(run)
        objective = build_objective(run, state, tokenizer, stream)
        if wrap_objective is not None:
            objective = wrap_objective(objective, state)
        history = loop.train(state, objective)
        return history, _params(state)
    finally:
        parallel.destroy()


def _assert_same_history(a, b, keys=("lm loss", "grad_norm")):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        for k in keys:
            assert abs(x[k] - y[k]) <= TOL, f"iteration {i + 1} {k}: {x[k]} vs {y[k]}"


def _assert_same_params(a: dict, b: dict, what: str):
    """Checked on every rank at once (a failure on one rank only would leave the others hanging
    in the next test's collectives)."""
    assert set(a) == set(b)
    diff, name = max(((a[n] - b[n]).abs().max().item(), n) for n in a)
    worst = torch.tensor([diff], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # stages hold different parameters: one scalar
    assert worst.item() <= TOL, f"{what}: {name if diff == worst.item() else 'a parameter on another rank'} differs by {worst.item():.3e}"


def _assert_replicas_equal(params: dict, stage: int, what: str):
    """The parameters are identical on every rank that holds the same pipeline stage (checked on
    all ranks at once, over an all-gather)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (stage, params))
    worst, where = 0.0, ""
    for rank, (other_stage, other) in enumerate(gathered):
        if other_stage == stage:
            for name in params:
                diff = (params[name] - other[name]).abs().max().item()
                if diff > worst:
                    worst, where = diff, f"{name} differs from rank {rank}"
    flag = torch.tensor([worst], dtype=torch.float64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    assert flag.item() == 0, f"{what}: {where or 'another rank differs'} by {flag.item():.3e}"


# ---------------------------------------------------------------------------------------------
# --overlap-grad-reduce / --overlap-param-gather
# ---------------------------------------------------------------------------------------------
@pytest.mark.world_size(2)
def test_overlap_flags_match_the_run_without_them(corpus, shared_dir):
    """DP=2 with the distributed optimizer (each rank updates half of θ), two micro-batches per
    rank (so the deferred reduction matters): losses, gradient norms and the final θ equal the run
    without overlap; θ is the same on both ranks after training; a checkpoint saved under
    --overlap-param-gather holds the updated θ (not the shards a rank did not update) and resumes
    the same trajectory."""
    ref_history, ref_params = _run(tiny_run_args(corpus, iters=4, **DIST_OPT))
    grad_history, grad_params = _run(tiny_run_args(corpus, iters=4, overlap_grad_reduce=True, **DIST_OPT))
    _assert_same_history(grad_history, ref_history)
    _assert_same_params(grad_params, ref_params, "--overlap-grad-reduce")

    history, params = _run(tiny_run_args(corpus, iters=4, **OVERLAP))
    _assert_same_history(history, ref_history)
    _assert_same_params(params, ref_params, "--overlap-param-gather")
    _assert_replicas_equal(params, 0, "--overlap-param-gather after training")

    save = os.path.join(shared_dir, "ckpt_overlap")
    _, at_two = _run(tiny_run_args(corpus, iters=2, save=save, **DIST_OPT))
    _run(tiny_run_args(corpus, iters=2, save=save, **OVERLAP))  # overwrites iteration 2
    # The saved model weights alone (a --finetune load) are the gathered θ_2.
    run = parse_run_config(tiny_run_args(corpus, iters=2, load=save, finetune=True))
    try:
        state, tokenizer, stream = setup_run(run)
        checkpoint.load_checkpoint(save, state.model, state.optimizer, state.scheduler,
                                   build_objective(run, state, tokenizer, stream),
                                   loop.model_signature(state.preset), finetune=True)
        loaded = _params(state)
    finally:
        parallel.destroy()
    _assert_same_params(loaded, at_two, "model weights saved under --overlap-param-gather")
    resumed, _ = _run(tiny_run_args(corpus, iters=4, load=save, **OVERLAP))
    _assert_same_history(resumed, ref_history[2:])


def _rlp_run(corpus, num_layers=2, pp=1, global_batch=4, **parallel_flags):
    """A few real RLP iterations (sampled thoughts, EMA teacher); returns (history, this rank's EMA
    teacher, this rank's θ, its pipeline stage)."""
    from rlp_parity import MarkerTokenizer

    from megatron_rlp.data.documents import DocumentStream, open_indexed_dataset
    from megatron_rlp.rlp.config import RLPConfig
    from megatron_rlp.rlp.step import RLPObjective

    run = loop.RunConfig()
    run.model.model_preset, run.model.num_layers, run.model.layout_invariant_init = "tiny", num_layers, True
    run.parallel.pipeline_model_parallel_size = pp
    for name, value in parallel_flags.items():
        setattr(run.parallel, name, value)
    t = run.training
    t.micro_batch_size, t.global_batch_size, t.train_iters, t.lr, t.seed = 1, global_batch, 3, 1e-2, 5
    t.lr_decay_style = "constant"
    try:
        state = loop.setup(run, loop.resolve_preset(run.model))
        stream = DocumentStream(open_indexed_dataset(corpus), state.preset.vocab_size, seed=5)
        config = RLPConfig(rlp_num_thoughts=2, rlp_thought_len=3, rlp_positions_per_doc=1,
                           rlp_min_context=2, rlp_ema_decay=0.5, rlp_temperature=1.0)
        objective = RLPObjective(config, state, MarkerTokenizer(), stream)
        history = loop.train(state, objective)
        ema = {n: objective.teacher.shadow(f"0.{n}").clone()
               for n, _ in unwrap_model(state.model[0]).named_parameters()}
        return history, ema, _params(state), parallel_state.get_pipeline_model_parallel_rank()
    finally:
        parallel.destroy()


@pytest.mark.parametrize("pp", [pytest.param(1, marks=pytest.mark.world_size(2)),
                                pytest.param(2, marks=pytest.mark.world_size(4))])
def test_overlap_param_gather_rlp_ema_and_thoughts_use_the_gathered_weights(corpus, pp):
    """RLP at DP=2 (and DP=2 x PP=2) with the real sampler: under --overlap-param-gather the step
    leaves each rank's other half of θ stale, so without a forced gather the EMA teacher averages
    stale weights (the replicas' teachers differ) and the next batch's thoughts come from a stale
    policy."""
    ref_history, ref_ema, ref_params, _ = _rlp_run(corpus, pp=pp, **DIST_OPT)
    history, ema, params, stage = _rlp_run(corpus, pp=pp, **OVERLAP)
    _assert_replicas_equal(ema, stage, "EMA teacher under --overlap-param-gather")
    _assert_same_params(ema, ref_ema, "EMA teacher under --overlap-param-gather")
    _assert_same_history(history, ref_history, keys=("rlp loss", "grad_norm", "rlp/thought_len_mean"))
    _assert_same_params(params, ref_params, "θ under --overlap-param-gather")


# ---------------------------------------------------------------------------------------------
# --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers
# ---------------------------------------------------------------------------------------------
@pytest.mark.world_size(2)
def test_uneven_pipeline_stages_match_pp1_and_checkpoints_move_between_splits(corpus, shared_dir):
    """3 layers on PP=2 as 1+2 and 2+1 give the PP=1 (DP=2) trajectory; a checkpoint saved at 1+2
    resumes at 2+1, and one saved at PP=1 resumes at 1+2."""
    three = {"num_layers": 3}
    ref_history, _ = _run(tiny_run_args(corpus, iters=4, **three))
    first, _ = _run(tiny_run_args(corpus, pp=2, iters=4, decoder_first_pipeline_num_layers=1, **three))
    _assert_same_history(first, ref_history)
    last, _ = _run(tiny_run_args(corpus, pp=2, iters=2, decoder_last_pipeline_num_layers=1, **three))
    _assert_same_history(last, ref_history[:2])

    save = os.path.join(shared_dir, "ckpt_uneven")
    _run(tiny_run_args(corpus, pp=2, iters=2, save=save, decoder_first_pipeline_num_layers=1, **three))
    resumed, _ = _run(tiny_run_args(corpus, pp=2, iters=3, load=save, save=save,
                                    decoder_last_pipeline_num_layers=1, **three))
    _assert_same_history(resumed, ref_history[2:3])
    resumed, _ = _run(tiny_run_args(corpus, pp=1, iters=4, load=save, **three))
    _assert_same_history(resumed, ref_history[3:4])


@pytest.mark.world_size(2)
def test_uneven_pipeline_stages_hybrid_checkpoint_resumes(corpus, shared_dir):
    """tiny-hybrid (pattern M*-M*-): a PP=1 checkpoint resumes at PP=2 split 2+4 (Mamba, attention
    and MLP layers on the stage megatron assigns them) on the PP=1 trajectory."""
    hybrid = {"model_preset": "tiny-hybrid", "num_layers": 6}
    ref_history, _ = _run(tiny_run_args(corpus, iters=3, **hybrid))
    save = os.path.join(shared_dir, "ckpt_hybrid_uneven")
    _run(tiny_run_args(corpus, iters=2, save=save, **hybrid))
    resumed, _ = _run(tiny_run_args(corpus, pp=2, iters=3, load=save, decoder_first_pipeline_num_layers=2,
                                    **hybrid))
    _assert_same_history(resumed, ref_history[2:3])


@pytest.mark.world_size(2)
@pytest.mark.parametrize("first,last", [(1, None), (None, 1)])
def test_uneven_pipeline_rlp_matches_reference(corpus, first, last):
    """One RLP iteration at PP=2 with 3 layers split unevenly: loss, rewards, gradients, θ and the
    EMA teacher equal the plain-PyTorch reference (which equals PP=1)."""
    from rlp_parity import check_against_reference, run_parity

    mega, ref = run_parity(corpus, tp=1, pp=2, num_layers=3, first_stage_layers=first, last_stage_layers=last)
    check_against_reference(mega, ref)


@pytest.mark.world_size(2)
@pytest.mark.parametrize("split", [{"decoder_first_pipeline_num_layers": 1}, {"decoder_last_pipeline_num_layers": 1}])
def test_uneven_pipeline_rlp_with_the_sampler_matches_the_even_split(corpus, split):
    """Real RLP iterations (the pipelined thought sampler, the EMA teacher) with 4 layers on PP=2
    split 1+3 / 3+1 give the thoughts, losses, teacher and θ of the even 2+2 split."""
    ref_history, ref_ema, ref_params, ref_stage = _rlp_run(corpus, num_layers=4, pp=2, global_batch=2)
    history, ema, params, stage = _rlp_run(corpus, num_layers=4, pp=2, global_batch=2, **split)
    _assert_same_history(history, ref_history, keys=("rlp loss", "grad_norm", "rlp/thought_len_mean",
                                                     "rlp/reward_mean", "rlp/ema_gap"))
    # Both splits' stages together hold the same model: compare the gathered global layers.
    _assert_same_params(_global_layers(ema, 4, split), _global_layers(ref_ema, 4, {}), "EMA teacher")
    _assert_same_params(_global_layers(params, 4, split), _global_layers(ref_params, 4, {}), "θ")


def _global_layers(stage_params: dict, num_layers: int, split: dict) -> dict:
    """Every stage's parameters, gathered, with decoder layers renumbered globally (the tied
    output-layer copy of the last stage dropped)."""
    from megatron_rlp.models.hf_qwen3 import merge_pipeline_stages

    stages = [None] * dist.get_world_size()
    dist.all_gather_object(stages, stage_params)
    return merge_pipeline_stages(
        stages, num_layers, tie_embeddings=True,
        num_layers_in_first_stage=split.get("decoder_first_pipeline_num_layers"),
        num_layers_in_last_stage=split.get("decoder_last_pipeline_num_layers"),
    )


# ---------------------------------------------------------------------------------------------
# --check-for-nan-in-loss-and-grad
# ---------------------------------------------------------------------------------------------
class _NaNGradientAt:
    """Wraps an objective: from iteration ``at`` on, the embedding's gradient is NaN."""

    def __init__(self, objective, state, at: int):
        self.inner, self.at = objective, at
        self.param = unwrap_model(state.model[0]).embedding.word_embeddings.weight
        self.hook = None

    def microbatches(self, iteration, num_microbatches, model_chunks):
        if iteration + 1 == self.at and self.hook is None:
            self.hook = self.param.register_hook(lambda g: g * float("nan"))
        return self.inner.microbatches(iteration, num_microbatches, model_chunks)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.world_size(2)
@pytest.mark.parametrize("extra", [{}, {"overlap_grad_reduce": True}])
def test_nan_gradient_is_caught_before_the_reduction(corpus, extra):
    args = tiny_run_args(corpus, iters=3, **extra)
    with pytest.raises(loop.TrainingError, match=r"iteration 2: rank \d's gradients hold NaN before the data-parallel"):
        _run(args, wrap_objective=lambda obj, state: _NaNGradientAt(obj, state, at=2))


@pytest.mark.world_size(2)
def test_nan_gradient_check_can_be_turned_off(corpus):
    """Without the check the NaN crosses the data-parallel reduction and only the loop's
    gradient-norm guard after it stops the run (no rank named)."""
    args = tiny_run_args(corpus, iters=3) + ["--no-check-for-nan-in-loss-and-grad"]
    with pytest.raises(loop.TrainingError, match="iteration 2: gradient norm is nan") as caught:
        _run(args, wrap_objective=lambda obj, state: _NaNGradientAt(obj, state, at=2))
    assert "before the data-parallel" not in str(caught.value)
    # What the message says is true: the step was applied, the weights are not finite any more.
    assert "step was applied" in str(caught.value) and "no longer finite" in str(caught.value)
    assert "skipped" not in str(caught.value)
