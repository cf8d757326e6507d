"""`make demo` end to end at toy length: every phase runs and the JSON line has every field."""

import json
import math

from megatron_rlp import demo

REQUIRED = ("info_gain_before", "info_gain_after", "stderr_before", "stderr_after", "acc_think_before",
            "acc_think_after", "acc_stderr_before", "acc_stderr_after")


def test_demo_runs_every_phase(tmp_path, capsys):
    rc = demo.main(["--out", str(tmp_path / "demo"), "--warmup-iters", "10", "--rlp-iters", "3", "--eval-docs", "8"])
    assert rc == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    for key in REQUIRED + ("control_acc_think", "worked_thought_match_after"):
        assert math.isfinite(result[key]), key
    assert 0.0 <= result["acc_think_after"] <= 1.0
    for line in ("information gain (nats)", "accuracy with a thought", "closed by the model",
                 "control (next-token training", "sampled thought exactly the worked thought"):
        assert line in out
    for ckpt in ("ckpt_warmup", "ckpt_rlp", "ckpt_ntp_control"):
        assert (tmp_path / "demo" / ckpt / "latest_checkpointed_iteration.txt").exists()
