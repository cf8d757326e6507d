"""tools/bench_rlp.py's running mode and the straightforward baseline it compares against; the
output layer's rows in a real iteration against the cost model's count."""

import json

import pytest
import torch

from megatron_rlp.training import cost_model as cm
from rlp_parity import G, _close
from training_fixtures import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("bench") / "corpus"), num_docs=16, seed=4)


def test_straightforward_baseline_equals_rows_path(corpus):
    """Same thoughts (T = 0.7, logits large enough that T matters): S_pred from the separate
    no-grad scoring pass gives the rows path's rewards, advantages, loss, every rlp/* metric and
    gradient (fp32, 1e-5)."""
    from rlp_parity import run_parity

    rows, _ = run_parity(corpus, tp=1, pp=1, layout="rows", with_reference=False)
    straight, _ = run_parity(corpus, tp=1, pp=1, layout="rows", with_reference=False, straightforward=True)
    assert all("s_pred_scored" in mb for mb in straight["microbatches"])
    assert not any("s_pred_scored" in mb for mb in rows["microbatches"])
    assert "rlp-scoring" in straight["history"]["timers_ms"]
    for key in ("s_pred", "rewards", "advantages"):
        _close(torch.cat([mb[key] for mb in straight["microbatches"]]),
               torch.cat([mb[key] for mb in rows["microbatches"]]), key)
    _close(torch.cat([mb["s_pred_scored"] for mb in straight["microbatches"]]),
           torch.cat([mb["s_pred"] for mb in rows["microbatches"]]), "scored S_pred")
    assert set(straight["metrics"]) == set(rows["metrics"])
    for name, value in rows["metrics"].items():
        _close(straight["metrics"][name], value, f"metric {name}")
    for name, value in rows["grads"].items():
        _close(straight["grads"][name], value, f"grad {name}")
    assert any(v.abs().max() > 0 for v in rows["grads"].values())


def test_straightforward_needs_the_rows_layout(corpus):
    from rlp_parity import run_parity

    with pytest.raises(ValueError, match="straightforward baseline updates one row per thought"):
        run_parity(corpus, tp=1, pp=1, layout="shared", with_reference=False, straightforward=True)


@pytest.mark.parametrize("variant,layout,ntp", [
    ("shared_prefix", "shared", False), ("rows", "rows", False), ("straightforward", "rows", False),
    ("shared_prefix", "shared", True), ("rows", "rows", True),
])
def test_output_layer_rows_are_those_the_cost_model_counts(corpus, monkeypatch, variant, layout, ntp):
    """Every row the iteration sends through the fused output-layer kernel (teacher, update, the
    straightforward scoring pass) is a real one, and their number is the cost model's logit rows:
    the thoughts are uneven (1..4 tokens under a cap of 4), so padded thought slots or, with the
    NTP term, non-context slots reaching the kernel would be counted here."""
    from megatron_rlp.rlp import step
    from rlp_parity import run_parity

    kernel, rows_seen = step.linear_logprob, []

    def counting(hidden, weight, targets, *args, **kwargs):
        rows_seen.append((hidden.shape[0], int((targets != step.IGNORE).sum())))
        return kernel(hidden, weight, targets, *args, **kwargs)

    monkeypatch.setattr(step, "linear_logprob", counting)
    overrides = {"rlp_ntp_weight": 0.5} if ntp else None
    mega, _ = run_parity(corpus, tp=1, pp=1, layout=layout, with_reference=False, rlp_overrides=overrides,
                         straightforward=variant == "straightforward")
    docs, positions = mega["source"].calls[0]
    contexts = [t for pos in positions for t in pos]
    lengths = [[len(c) for c in mega["source"].thoughts[i]] for i in range(len(contexts))]
    assert len({n for row in lengths for n in row}) > 1  # uneven thoughts
    sent = sum(n for n, _ in rows_seen)
    assert sent == sum(real for _, real in rows_seen)  # no padded or ignored row reaches the kernel
    # By hand: the teacher's k rows per document; per thought its tokens, the close and x_t; the
    # straightforward scoring pass one row per thought; NTP the t context slots of every row run.
    hand = 2 * len(docs) + sum(n + 2 for row in lengths for n in row)
    if variant == "straightforward":
        hand += G * len(contexts)
    if ntp:
        hand += sum(t * (1 if layout == "shared" else G) for t in contexts)
    assert sent == hand
    modelled = sum(w.logit_rows for c, row in zip(contexts, lengths)
                   for k, w in cm._context_work(variant, c, row, ntp).items() if k in ("update", "scoring"))
    assert sent == modelled + 2 * len(docs)


def test_bench_rlp_running_mode_reports_every_phase_of_three_variants(capsys):
    """A very small run of all three variants: the table and the JSON line with every phase."""
    from tools import bench_rlp

    bench_rlp.main(["--context-len", "24", "--num-thoughts", "2", "--positions-per-doc", "1", "--thought-len", "3",
                    "--docs", "2", "--iters", "1", "--warmup-iters", "0", "--threads", str(torch.get_num_threads())])
    out = capsys.readouterr().out.splitlines()
    record = json.loads(out[-1])
    assert {"flops_ratio", "time_ratio", "flops_ratio_straightforward", "time_ratio_straightforward",
            "phases"} <= set(record)
    assert set(record["phases"]) == set(cm.VARIANTS)
    phases = record["phases"]
    for variant, by_phase in phases.items():
        assert set(by_phase) == set(bench_rlp.RUN_PHASES) | {"total"}
        assert all(set(p) == {"ms", "tokens", "gflop"} for p in by_phase.values())
        assert by_phase["total"]["ms"] > 0
        for key in ("tokens", "gflop"):
            parts = sum(p[key] for name, p in by_phase.items() if name != "total")
            assert by_phase["total"][key] == pytest.approx(parts)
        for name in ("teacher", "sampling_prefill", "sampling_decode", "update", "optimizer", "ema"):
            assert by_phase[name]["ms"] > 0 and by_phase[name]["gflop"] > 0, (variant, name)
    # Only the straightforward baseline has a scoring pass; it re-prefills every thought.
    assert phases["straightforward"]["scoring"]["gflop"] > 0 and phases["straightforward"]["scoring"]["ms"] > 0
    assert phases["rows"]["scoring"]["gflop"] == phases["shared_prefix"]["scoring"]["gflop"] == 0
    assert phases["straightforward"]["sampling_prefill"]["tokens"] > phases["rows"]["sampling_prefill"]["tokens"]
    # Same documents and seeds: the same thoughts, so sampling and teacher cost the same in
    # shared_prefix and rows, and the shared update has fewer tokens.
    assert record["same_first_thoughts"]["rows"] == 1.0
    assert record["same_first_thoughts"]["straightforward"] >= 0.9
    for name in ("teacher", "sampling_prefill", "sampling_decode"):
        assert phases["shared_prefix"][name]["gflop"] == pytest.approx(phases["rows"][name]["gflop"])
    assert phases["shared_prefix"]["update"]["tokens"] < phases["rows"]["update"]["tokens"]
    totals = {v: phases[v]["total"] for v in phases}
    assert record["flops_ratio"] == pytest.approx(totals["shared_prefix"]["gflop"] / totals["rows"]["gflop"])
    assert record["time_ratio"] == pytest.approx(totals["shared_prefix"]["ms"] / totals["rows"]["ms"])
    assert record["flops_ratio_straightforward"] == pytest.approx(
        totals["shared_prefix"]["gflop"] / totals["straightforward"]["gflop"])
    assert 0 < record["flops_ratio_straightforward"] < record["flops_ratio"] < 1
    assert any(line.strip().startswith("sampling_decode") for line in out)
