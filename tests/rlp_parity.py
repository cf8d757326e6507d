"""One RLP iteration through the megatron path vs the independent plain-PyTorch reference.

Shared by tests/unit (TP=1) and tests/distributed (TP=2, PP=2): the same given thoughts, the same
weights (layout-invariant init), Adam without weight decay or clipping on both sides.
"""

from __future__ import annotations

import copy
import os

import torch.distributed as dist

import torch

from megatron_rlp.models.hf_qwen3 import shard_megatron_state_dict, slice_pipeline_stage
from megatron_rlp.rlp.config import RLPConfig
from megatron_rlp.rlp.step import RLPObjective
from megatron_rlp.sampling.thoughts import STOP_CLOSE, STOP_LENGTH, ThoughtBatch
from megatron_rlp.training import loop, parallel
from megatron_rlp.training.checkpoint import unwrap_model
from megatron_rlp.training.loop import RunConfig
from megatron_rlp.data.documents import DocumentStream, open_indexed_dataset
from reference.rlp_reference import (
    RefConfig,
    RefDecoderLM,
    load_from_megatron_state_dict,
    megatron_state_dict_from_reference,
    reference_rlp_iteration,
)

OPEN, CLOSE, EOD = 501, 502, 500
TOL = 1e-5
G = 3
LR = 0.5
LOGIT_SCALE = 3.0  # the policy entropy falls from ~log V to ~0.7 nats: softmax(z / T) and softmax(z) differ clearly


class MarkerTokenizer:
    eod = EOD
    vocab_size = CLOSE + 1  # ids 0..502; the tiny model's embedding is padded to 512

    def token_to_id(self, piece):
        return {"<think>": OPEN, "</think>": CLOSE}.get(piece)


def given_thoughts(num_contexts: int, cap: int = 4):
    """Deterministic thoughts (without markers) and which ones were closed by force."""
    gen = torch.Generator().manual_seed(5)
    thoughts, forced = [], []
    for c in range(num_contexts):
        row_t, row_f = [], []
        for i in range(G):
            n = int(torch.randint(1, cap + 1, (1,), generator=gen))
            row_t.append(torch.randint(0, 400, (n,), generator=gen).tolist())
            row_f.append(n == cap)  # hit the cap: the close marker is forced
        thoughts.append(row_t)
        forced.append(row_f)
    return thoughts, forced


class GivenThoughtSource:
    """A thought source that returns fixed thoughts (the step must not care who sampled them)."""

    def __init__(self, thoughts, forced, cap):
        self.thoughts, self.forced, self.cap = thoughts, forced, cap
        self.calls = []

    def __call__(self, model, documents, positions, num_thoughts, max_thought_len, open_id, close_id, eod_id,
                 temperature, seed, max_sequence_length, micro_batch_size=None, vocab_size=None):
        # The step must restrict sampling to the tokenizer's ids, not the padded embedding.
        assert vocab_size == MarkerTokenizer.vocab_size, vocab_size
        self.calls.append(([d.clone() for d in documents], [list(p) for p in positions]))
        contexts = [(b, t) for b, pos in enumerate(positions) for t in pos]
        n, length = len(contexts), self.cap
        tokens = torch.zeros(n, num_thoughts, length, dtype=torch.int64)
        lengths = torch.zeros(n, num_thoughts, dtype=torch.int64)
        forced = torch.zeros(n, num_thoughts, dtype=torch.bool)
        for c in range(n):
            for i in range(num_thoughts):
                seq = list(self.thoughts[c][i]) + ([] if self.forced[c][i] else [close_id])
                tokens[c, i, : len(seq)] = torch.tensor(seq)
                lengths[c, i] = len(seq)
                forced[c, i] = self.forced[c][i]
        return ThoughtBatch(
            tokens=tokens, logprobs=torch.zeros(n, num_thoughts, length), tempered_logprobs=torch.zeros(n, num_thoughts, length),
            lengths=lengths, forced=forced, stop_reason=torch.where(forced, STOP_LENGTH, STOP_CLOSE),
            doc_index=torch.tensor([b for b, _ in contexts]), position=torch.tensor([t for _, t in contexts]),
            open_id=open_id, close_id=close_id, eod_id=eod_id, temperature=temperature, seed=seed,
        )


class GivenPredictionSource:
    """A prefix-match prediction source with fixed answers: after thought i of context n the
    prediction is, by (n + i) mod 3, the text's continuation (reward 1), the continuation with its
    last token changed (reward 0; for N > 1 the first N − 1 tokens still match), or with its first
    token changed (reward 0).  Every group of G = 3 has one match: the advantages are not 0."""

    def __init__(self):
        self.calls = []

    def __call__(self, documents, doc_index, position, closed_tokens, closed_lengths, num_tokens, temperature, seed):
        n, g = closed_lengths.shape
        out = torch.zeros(n, g, num_tokens, dtype=torch.int64)
        for c in range(n):
            cont = documents[int(doc_index[c])][int(position[c]) : int(position[c]) + num_tokens]
            for i in range(g):
                pred = cont.clone()
                kind = (c + i) % 3
                if kind:
                    j = num_tokens - 1 if kind == 1 else 0
                    pred[j] = (pred[j] + 1) % 400
                out[c, i] = pred
        self.calls.append({"temperature": temperature, "seed": seed, "num_tokens": num_tokens, "predicted": out})
        return out


def run_parity(data_prefix: str, tp: int, pp: int, tie: bool = True, teacher_noise: float = 0.0,
               skip_baseline: bool = False, num_layers: int = 2, first_stage_layers=None,
               last_stage_layers=None, temperature: float = 0.7, untempered_ratio: bool = False,
               logit_scale: float = LOGIT_SCALE, kl_beta: float = 0.0, reference: bool = True,
               iters: int = 1, updates_per_batch: int = 1, layout=None, rlp_overrides=None,
               with_reference=True, sequence_parallel=False, preset_name="tiny", reward="info-gain",
               match_tokens=1, predictions="given", position_filter="none", entropy_top_frac=0.5,
               straightforward=False):
    """Returns (megatron results, reference results, local shard of the reference tensors).
    ``first/last_stage_layers``: an uneven pipeline split (--decoder-first/last-pipeline-num-layers).
    ``temperature``: --rlp-temperature (the reference scores the thought tokens at it, or at 1 with
    ``untempered_ratio``).  ``logit_scale`` multiplies the final norm's weight, so the logits are
    large enough (|z| of several nats) that softmax(z / T) and softmax(z) differ clearly.
    ``kl_beta``: --rlp-kl-beta; the frozen reference is θ itself at this first iteration, so the KL
    and its gradient are 0 and the parity holds; ``logp_ref`` of each micro-batch is returned.
    ``reference=False`` / ``with_reference=False``: the megatron run only (e.g. at DP > 1, which the
    reference does not split, or with the NTP/KL terms it does not model); ``iters`` > 1 and
    ``updates_per_batch`` only then (the reference runs one iteration).  ``layout``:
    --rlp-update-layout; ``rlp_overrides``: other RLPConfig fields.  ``reward``/``match_tokens``:
    --rlp-reward / --rlp-reward-match-tokens; with prefix-match ``predictions`` "given" injects
    :class:`GivenPredictionSource`, "sampled" keeps the objective's own sampler, and the reference
    then draws its own predictions with the same noise (returned as ref["predicted"]).
    ``position_filter``/``entropy_top_frac``: --rlp-position-filter / --rlp-entropy-top-frac.
    ``straightforward``: the benchmark's baseline (a separate S_pred scoring pass; needs layout="rows")."""
    reference = reference and with_reference
    run = RunConfig()
    run.model.model_preset = preset_name
    if preset_name == "tiny":
        run.model.num_layers, run.model.layout_invariant_init = num_layers, True
    run.parallel.decoder_first_pipeline_num_layers = first_stage_layers
    run.parallel.decoder_last_pipeline_num_layers = last_stage_layers
    split = {"num_layers_in_first_stage": first_stage_layers, "num_layers_in_last_stage": last_stage_layers}
    run.model.untie_embeddings_and_output_weights = not tie
    run.parallel.tensor_model_parallel_size, run.parallel.pipeline_model_parallel_size = tp, pp
    run.parallel.sequence_parallel = sequence_parallel
    t = run.training
    t.micro_batch_size, t.global_batch_size, t.train_iters, t.lr, t.seed = 1, 2, iters, LR, 3
    # SGD: Adam's first step is lr * sign(g), which turns 1e-9 gradient noise into lr-sized steps.
    t.weight_decay, t.clip_grad, t.lr_decay_style, t.optimizer, t.sgd_momentum = 0.0, 0.0, "constant", "sgd", 0.0
    rlp = RLPConfig(**dict(dict(
        rlp_num_thoughts=G, rlp_thought_len=4, rlp_positions_per_doc=2, rlp_min_context=3,
        rlp_ema_decay=0.9, rlp_clip_low=0.2, rlp_clip_high=0.28,
        rlp_baseline_interval=1000 if skip_baseline else 1, rlp_temperature=temperature,
        rlp_untempered_ratio=untempered_ratio, rlp_kl_beta=kl_beta,
        rlp_updates_per_batch=updates_per_batch, rlp_update_layout=layout, rlp_reward=reward,
        rlp_reward_match_tokens=match_tokens, rlp_position_filter=position_filter,
        rlp_entropy_top_frac=entropy_top_frac,
    ), **(rlp_overrides or {})))
    preset = loop.resolve_preset(run.model)
    state = loop.setup(run, preset)
    stream = DocumentStream(open_indexed_dataset(data_prefix), preset.vocab_size, seed=3, shuffle=False)
    thoughts, forced = given_thoughts(4, cap=rlp.rlp_thought_len)
    source = GivenThoughtSource(thoughts, forced, rlp.rlp_thought_len)
    given = GivenPredictionSource() if reward == "prefix-match" and predictions == "given" else None
    objective = RLPObjective(rlp, state, MarkerTokenizer(), stream, thought_source=source, prediction_source=given,
                             straightforward=straightforward)
    prediction_calls = []
    if reward == "prefix-match" and predictions == "sampled":
        sample = objective.prediction_source

        def recorded(*args, **kwargs):
            out = sample(*args, **kwargs)
            prediction_calls.append(dict(kwargs, predicted=out))
            return out

        objective.prediction_source = recorded
    model = unwrap_model(state.model[0])
    if model.post_process and logit_scale != 1.0:
        final_norm = getattr(model.decoder, "final_layernorm", None) or getattr(model.decoder, "final_norm", None)
        with torch.no_grad():
            final_norm.weight.mul_(logit_scale)
    if skip_baseline:
        objective.sample_batches = 1  # 1 % 1000 != 0: no teacher forward in this batch
    if teacher_noise:
        objective.teacher.maybe_initialize(objective.models)
        gen = torch.Generator().manual_seed(11)
        for name, _ in model.named_parameters():
            shadow = objective.teacher.shadow(f"0.{name}")
            shadow.add_(teacher_noise * torch.randn(shadow.shape, generator=gen))

    # Full weights on every rank (gathered through a TP=1-equivalent init: layout-invariant).
    full = _full_state_dict(model, tp, pp, preset, split) if reference else None
    captured = {}
    orig_step = state.optimizer.step

    def step_and_capture():
        captured["grads"] = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
        return orig_step()

    state.optimizer.step = step_and_capture
    history = loop.train(state, objective)
    mega = {
        "loss": history[0]["rlp loss"],
        "metrics": {k: v for k, v in history[0].items() if k.startswith("rlp")},
        "layout": objective.update_layout,
        "reward_mean": history[0].get("rlp/reward_mean"),
        "grads": captured["grads"],
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "ema": {n: objective.teacher.shadow(f"0.{n}") for n, _ in model.named_parameters()},
        "microbatches": objective._cached,
        "history": history[0],
        "all_history": history,
        "source": source,  # the contexts it was asked for and the thoughts it gave
        "prediction_calls": given.calls if given is not None else prediction_calls,
        "objective": objective,
        "preset": preset,
        "last_stage": state.model[0].module.post_process if hasattr(state.model[0].module, "post_process") else model.post_process,
    }

    if not reference:
        parallel.destroy()
        return mega, None
    # The reference: same weights, same contexts, same thoughts.
    cfg = RefConfig(vocab_size=preset.vocab_size, hidden_size=preset.hidden_size, ffn_hidden_size=preset.ffn_hidden_size,
                    num_layers=preset.num_layers, num_heads=preset.num_attention_heads,
                    num_query_groups=preset.num_query_groups, head_dim=preset.kv_channels,
                    rotary_base=preset.rotary_base, norm_eps=preset.norm_epsilon, tie_embeddings=tie)
    ref = RefDecoderLM(cfg)
    load_from_megatron_state_dict(ref, full, num_query_groups=preset.num_query_groups,
                                  num_heads=preset.num_attention_heads, head_dim=preset.kv_channels)
    ref_at_start = copy.deepcopy(ref)  # θ_0 (= φ at the first batch), before the reference's step
    optimizer = torch.optim.SGD(ref.parameters(), lr=LR)
    docs, positions = source.calls[0]
    contexts, next_tokens, continuations = [], [], []
    for d, pos in zip(docs, positions):
        for p in pos:
            contexts.append(d[:p].tolist())
            next_tokens.append(int(d[p]))
            continuations.append(d[p : p + match_tokens].tolist())
    predicted = None
    if reward == "prefix-match":
        call = mega["prediction_calls"][0]
        if predictions == "given":
            predicted = call["predicted"].tolist()
        else:
            predicted = reference_predictions(ref, contexts, thoughts, continuations, call["temperature"], call["seed"])
    out = reference_rlp_iteration(ref, None, optimizer, contexts, thoughts, next_tokens, OPEN, CLOSE, G,
                                  rlp.rlp_clip_low, rlp.rlp_clip_high, rlp.rlp_ema_decay, forced_mask=forced,
                                  vocab_size=MarkerTokenizer.vocab_size,
                                  temperature=1.0 if untempered_ratio else temperature,
                                  predictions=predicted, continuations=continuations if predicted else None)
    reference = {
        "model_at_start": ref_at_start,
        "predicted": predicted,
        "contexts": contexts,
        "loss": float(out["loss"]),
        "rewards": out["rewards"],
        "advantages": out["advantages"],
        "logp_thought": out["logp_new"],  # [context][thought] -> [|c|] policy log-probs at θ_0
        "grads": _local(megatron_state_dict_from_reference(out["grads"], cfg), tp, pp, preset, tie, split),
        "params": _local(megatron_state_dict_from_reference(out["params"], cfg), tp, pp, preset, tie, split),
        "ema": _local(megatron_state_dict_from_reference(out["ema_params"], cfg), tp, pp, preset, tie, split),
    }
    parallel.destroy()
    return mega, reference


def reference_predictions(ref, contexts, thoughts, continuations, temperature, seed, feed="own"):
    """The N tokens the reference model draws after each thought and its close marker with the
    sampler's noise keys: Gumbel-max over softmax(z / T) with the noise of (seed, step j, row n·G + i,
    token id).  ``feed`` "own": autoregressive decoding (its own earlier predictions fed back);
    "text": the text's continuation fed instead (teacher forcing)."""
    from megatron_rlp.sampling import gumbel_noise

    vocab = MarkerTokenizer.vocab_size
    out = []
    for n, (ctx, cont) in enumerate(zip(contexts, continuations)):
        row_preds = []
        for i, c in enumerate(thoughts[n]):
            seq = list(ctx) + [OPEN] + list(c) + [CLOSE]
            pred = []
            for j in range(len(cont)):
                before = pred if feed == "own" else list(cont[:j])
                with torch.no_grad():
                    z = ref(torch.tensor(seq + before))[-1, :vocab].float()
                noise = gumbel_noise(seed, j, torch.tensor([n * G + i]), 0, vocab)[0]
                pred.append(int(torch.argmax(z / temperature + noise)))
            row_preds.append(pred)
        out.append(row_preds)
    return out


def _full_state_dict(model, tp, pp, preset, split=None):
    """The unsharded (TP=1, PP=1) state dict, gathered from every rank's shard."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_rlp.models.hf_qwen3 import gather_megatron_state_dict, merge_pipeline_stages

    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    if tp > 1:
        shards = [None] * tp
        dist.all_gather_object(shards, sd, group=ps.get_tensor_model_parallel_group())
        sd = gather_megatron_state_dict(shards)
    if pp > 1:
        stages = [None] * pp
        dist.all_gather_object(stages, sd, group=ps.get_pipeline_model_parallel_group())
        sd = merge_pipeline_stages(stages, preset.num_layers, preset.tie_embeddings, **(split or {}))
    return sd


def _local(full: dict, tp: int, pp: int, preset, tie: bool, split=None) -> dict:
    from megatron.core import parallel_state as ps

    sd = full
    if pp > 1:
        sd = slice_pipeline_stage(sd, ps.get_pipeline_model_parallel_rank(), pp, preset.num_layers, tie,
                                  **(split or {}))
    if tp > 1:
        sd = shard_megatron_state_dict(sd, ps.get_tensor_model_parallel_rank(), tp, preset.num_query_groups)
    return sd


def check_layouts_agree(shared, rows, tol=TOL):
    """The shared-prefix update against the one-row-per-thought update: loss, every rlp/* metric,
    every gradient."""
    assert shared["layout"] == "shared" and rows["layout"] == "rows"
    assert all("layout" in mb for mb in shared["microbatches"])
    assert not any("layout" in mb for mb in rows["microbatches"])
    assert set(shared["metrics"]) == set(rows["metrics"])
    for name, value in rows["metrics"].items():
        _close(shared["metrics"][name], value, f"metric {name}", tol)
    if shared["last_stage"]:
        for key in ("advantages", "rewards", "s_pred"):
            if key in rows["microbatches"][0]:
                _close(torch.cat([mb[key] for mb in shared["microbatches"]]),
                       torch.cat([mb[key] for mb in rows["microbatches"]]), key, tol)
    assert set(shared["grads"]) == set(rows["grads"])
    for name, value in rows["grads"].items():
        _close(shared["grads"][name], value, f"grad {name}", tol)
    assert any(v.abs().max() > 0 for v in rows["grads"].values())


def _close(a, b, what, tol=TOL):
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    diff = (a - b).abs().max().item()
    assert diff <= tol * max(1.0, b.abs().max().item()), f"{what}: max |diff| {diff:.3e}"


def check_against_reference(mega, ref, check_stage_values=True):
    if mega["last_stage"]:
        _close(mega["loss"], ref["loss"], "loss")
        rewards = torch.cat([mb["rewards"] for mb in mega["microbatches"]])
        advantages = torch.cat([mb["advantages"] for mb in mega["microbatches"]])
        _close(rewards, ref["rewards"].reshape(-1), "rewards")
        _close(advantages, ref["advantages"].reshape(-1), "advantages")
    for what in ("grads", "params", "ema"):
        assert set(mega[what]) == set(ref[what]), f"{what}: names differ"
        for name, value in mega[what].items():
            _close(value, ref[what][name], f"{what} {name}")


def run_short_rlp(corpus, preset, tp, pp, tmp_path_factory, rlp_overrides=None):
    from megatron_rlp.rlp.config import RLPConfig
    from megatron_rlp.rlp.step import RLPObjective
    from megatron_rlp.data.documents import DocumentStream, open_indexed_dataset
    from megatron_rlp.training import checkpoint, loop, parallel

    box = [str(tmp_path_factory.mktemp("rlpck")) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    save = box[0]

    def build(iters, load=None):
        run = loop.RunConfig()
        run.model.model_preset = preset
        if preset == "tiny":
            run.model.num_layers, run.model.layout_invariant_init = 2, True
        run.parallel.tensor_model_parallel_size, run.parallel.pipeline_model_parallel_size = tp, pp
        t = run.training
        t.micro_batch_size, t.global_batch_size, t.train_iters, t.lr, t.seed = 1, 2, iters, 1e-3, 5
        t.lr_decay_style = "constant"  # resumed with more --train-iters: the same schedule
        run.checkpoint.save, run.checkpoint.load = save, load
        state = loop.setup(run, loop.resolve_preset(run.model))
        stream = DocumentStream(open_indexed_dataset(corpus), state.preset.vocab_size, seed=5)
        config = RLPConfig(rlp_num_thoughts=2, rlp_thought_len=3, rlp_positions_per_doc=1, rlp_min_context=2,
                           **(rlp_overrides or {}))
        return state, RLPObjective(config, state, MarkerTokenizer(), stream)

    try:
        state, objective = build(2)
        history = loop.train(state, objective)
        assert all(torch.isfinite(torch.tensor(h["rlp loss"])) for h in history)
        assert history[-1]["rlp/ema_gap"] > 0
        assert 1 <= history[-1]["rlp/thought_len_mean"] <= 4
        assert history[-1]["rlp/sample_logprob_drift"] < 1e-4  # sampler and update agree (both at T)
        # The logged iteration's phase timers, the sampler's prefill and decode included.
        assert {"rlp-teacher", "rlp-sampling", "rlp-sampling-prefill", "rlp-sampling-decode", "forward-backward",
                "optimizer", "rlp-ema"} <= set(history[-1]["timers_ms"])
        if (rlp_overrides or {}).get("rlp_reward") == "prefix-match":
            assert "rlp-prediction" in history[-1]["timers_ms"]
            assert 0 <= history[-1]["rlp/reward_mean"] <= 1 and "rlp/matched_prefix_len" in history[-1]
        assert checkpoint.read_tracker(save) == 2
        saved_teacher = {k: v.clone() for k, v in objective.teacher.state_dict().items()}
        parallel.destroy()
        state, objective = build(3)
        state.iteration = checkpoint.load_checkpoint(save, state.model, state.optimizer, state.scheduler,
                                                     objective, loop.model_signature(state.preset))
        assert state.iteration == 2
        loaded_teacher = objective.teacher.state_dict()  # the fp32 EMA teacher came back exactly
        assert set(loaded_teacher) == set(saved_teacher)
        assert all(torch.equal(loaded_teacher[k], saved_teacher[k]) for k in saved_teacher)
        resumed = loop.train(state, objective)
        assert [h["iteration"] for h in resumed] == [3]
    finally:
        parallel.destroy()
