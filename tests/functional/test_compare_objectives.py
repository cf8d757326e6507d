"""tools/compare_objectives.py at toy length: CPT, RLP and RPT-style from one checkpoint, matched
in model FLOPs, evaluated on held-out documents."""

import json
import os

import pytest

from megatron_rlp.pretrain import parse_run_config, run_training
from megatron_rlp.training import parallel
from megatron_rlp.training.checkpoint import available_iterations, consumed_model_flops
from tools import compare_objectives
from training_fixtures import NULL_VOCAB, tiny_run_args, write_corpus

OBJECTIVES = "cpt,rlp,rpt"
RLP_FLAGS = dict(rlp_num_thoughts=2, rlp_thought_len=3, rlp_min_context=2, rlp_positions_per_doc=1,
                 rlp_think_open=NULL_VOCAB - 2, rlp_think_close=NULL_VOCAB - 1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    train = write_corpus(str(root / "data" / "train"), num_docs=60)
    heldout = write_corpus(str(root / "data" / "heldout"), num_docs=8, seed=5)
    base = str(root / "base")
    try:
        run_training(parse_run_config(tiny_run_args(train, iters=2, save=base)))
    finally:
        parallel.destroy()
    return root, train, heldout, base


def _training_flags(train):
    args = tiny_run_args(train, iters=1, **RLP_FLAGS)
    i = args.index("--train-iters")  # the tool sets it per run
    return args[:i] + args[i + 2:]


def test_cpt_rlp_rpt_at_matched_flops(setup, capsys):
    root, train, heldout, base = setup
    out = str(root / "cmp")
    rc = compare_objectives.main([
        "--load", base, "--rlp-iters", "2", "--out", out, "--eval-points", "2",
        "--eval-data-path", heldout, "--eval-docs", "3", "--eval-thoughts", "2", "--objectives", OBJECTIVES,
        *_training_flags(train),
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.strip().splitlines()[-1])
    budget = result["flops_budget"]
    runs = result["objectives"]
    assert sorted(runs) == sorted(OBJECTIVES.split(","))
    # RLP set the budget: what its two iterations cost, as saved with its last checkpoint.
    assert runs["rlp"]["iteration"] == 2
    assert budget == pytest.approx(consumed_model_flops(os.path.join(out, "rlp"), 2))
    # CPT and RPT stop at the first iteration that reaches the budget.
    for name in set(runs) - {"rlp"}:
        steps = available_iterations(os.path.join(out, name))
        spent = [consumed_model_flops(os.path.join(out, name), s) for s in steps]
        assert spent[-1] >= budget
        assert name == "rpt" or len(steps) == 1 or spent[-2] < budget
    for name, point in runs.items():
        for key in ("info_gain", "acc_think", "acc_plain", "info_gain_change", "acc_think_change"):
            assert key in point and point[key] == point[key], (name, key)
    assert os.path.getsize(os.path.join(out, "compare_objectives.png")) > 1000
    assert "base" in printed and "cpt" in printed


def test_a_budget_below_one_rlp_iteration_is_refused(setup, capsys):
    root, train, heldout, base = setup
    rc = compare_objectives.main([
        "--load", base, "--flops-budget", "1e3", "--out", str(root / "small"),
        "--eval-data-path", heldout, *_training_flags(train),
    ])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--flops-budget 1000 is smaller than one RLP iteration" in err and "--rlp-iters" in err


def test_flags_the_tool_sets_are_refused(setup):
    root, train, heldout, base = setup
    with pytest.raises(SystemExit):
        compare_objectives.parse_args(["--load", base, "--rlp-iters", "1", "--out", "x", "--eval-data-path", heldout,
                                       *_training_flags(train), "--save", "elsewhere"])
    with pytest.raises(SystemExit):
        compare_objectives.parse_args(["--load", base, "--rlp-iters", "1", "--out", "x", "--eval-data-path", heldout,
                                       "--objectives", "cpt,sft", *_training_flags(train)])
