"""Phase timers: when they synchronize the device, what they report."""

import time

import pytest

from megatron_rlp.training.timers import Timers


class CountingSync:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


def _iterations(timers, logged_flags, sleep=0.002):
    for logged in logged_flags:
        timers.start_iteration(logged)
        with timers("forward-backward"):
            time.sleep(sleep)
        with timers("optimizer"):
            pass
        timers.add("rlp-sampling-prefill", 0.5)


def test_level_1_times_and_synchronizes_only_the_logged_iterations():
    sync = CountingSync()
    timers = Timers(1, synchronize=sync)
    _iterations(timers, [False, False])
    assert sync.calls == 0  # an unlogged iteration never waits for the GPU
    assert timers.collect() == {}
    _iterations(timers, [True])
    assert sync.calls == 4  # start and stop of each of the two phases
    ms = timers.collect()
    assert list(ms) == ["forward-backward", "optimizer", "rlp-sampling-prefill"]
    assert ms["forward-backward"] >= 2.0 and ms["rlp-sampling-prefill"] == pytest.approx(500.0)
    assert timers.collect() == {}  # reset after collecting


def test_level_2_reports_the_mean_over_the_interval_and_level_0_nothing():
    sync = CountingSync()
    timers = Timers(2, synchronize=sync)
    _iterations(timers, [False, False, True])
    assert sync.calls == 12
    assert timers.collect()["rlp-sampling-prefill"] == pytest.approx(500.0)  # 3 x 0.5 s / 3
    off = Timers(0, synchronize=sync)
    _iterations(off, [True])
    assert sync.calls == 12 and off.collect() == {}
    with pytest.raises(ValueError, match="--timing-log-level"):
        Timers(3)


def test_flags_parse():
    from megatron_rlp.pretrain import parse_run_config

    run = parse_run_config(["--timing-log-level", "2", "--no-log-timers-to-tensorboard", "--rlp",
                            "--rlp-untempered-ratio"])
    assert run.logging.timing_log_level == 2 and run.logging.log_timers_to_tensorboard is False
    assert run.extra["rlp"].rlp_untempered_ratio is True
    default = parse_run_config(["--rlp"])
    assert default.logging.timing_log_level == 1 and default.extra["rlp"].rlp_untempered_ratio is False
    with pytest.raises(SystemExit):
        parse_run_config(["--timing-log-level", "3"])
