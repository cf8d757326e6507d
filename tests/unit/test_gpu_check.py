"""The CPU side of the GPU check kit (tools/gpu_check.py): report, skips, verdict, wheels."""

import json
import os
import subprocess
import sys

import pytest

from tools import gpu_check

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.gpu.test_gpu" name="test_a" time="1.5"/>
<testcase classname="tests.gpu.test_gpu" name="test_b" time="0.1"><failure message="boom">trace</failure></testcase>
<testcase classname="tests.gpu.test_gpu" name="test_c" time="0"><skipped type="pytest.skip" message="needs 2 CUDA device(s)"/></testcase>
</testsuite></testsuites>"""


def test_junit_outcomes_keep_skips_apart_from_passes(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    parsed = gpu_check.parse_junit(str(path))
    assert parsed["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    skipped = next(t for t in parsed["tests"] if t["outcome"] == "skipped")
    assert skipped["message"] == "needs 2 CUDA device(s)"


@pytest.mark.parametrize("cuda,counts,bench_error,want", [
    (False, {"passed": 0, "failed": 0, "error": 0, "skipped": 14}, False, 2),
    (False, {"passed": 0, "failed": 1, "error": 0, "skipped": 13}, False, 1),
    (True, {"passed": 0, "failed": 0, "error": 0, "skipped": 14}, False, 1),  # all skipped is no pass
    (True, {"passed": 10, "failed": 0, "error": 0, "skipped": 4}, False, 0),
    (True, {"passed": 10, "failed": 0, "error": 0, "skipped": 4}, True, 1),
    (True, {"passed": 9, "failed": 0, "error": 1, "skipped": 4}, False, 1),
])
def test_verdict(cuda, counts, bench_error, want):
    report = {"install": {}, "environment": {"cuda_available": cuda}, "tests": {"counts": counts},
              "benchmarks": {"bench_logprob": {"error": "x"} if bench_error else {"results": []}}}
    assert gpu_check.verdict(report)[1] == want


def test_report_path_and_wheel_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.report_path(None) == str(tmp_path / "gpu_check.json")
    assert gpu_check.report_path(str(tmp_path / "r.json")) == str(tmp_path / "r.json")
    wheel = tmp_path / "megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"")
    assert gpu_check.find_wheel(str(tmp_path), "megatron-core", "0.16.1") == str(wheel)
    assert gpu_check.find_wheel(str(tmp_path), "megatron-core", "0.15.0") is None
    record = gpu_check.install_from_wheels(str(tmp_path / "none"), target=str(tmp_path / "deps"))
    assert record["needed"] == [] or "make gpu-wheels" in record["error"]


def test_gpu_check_without_cuda_reports_every_test_skipped(tmp_path):
    """The whole command on this CPU machine: exit 2, a JSON report, every cuda test skipped
    with its reason, none passed (and the cuda marker is registered: --strict-markers)."""
    env = {**os.environ, "MEGATRON_RLP_FORCE_CPU": "1"}
    out = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600, cwd=gpu_check.ROOT)
    assert out.returncode == 2, out.stdout + out.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["verdict"].startswith("no CUDA device")
    tests = report["tests"]
    assert tests["returncode"] == 0 and tests["counts"]["passed"] == 0
    assert tests["counts"]["skipped"] == len(tests["tests"]) >= 10
    assert all("CUDA device" in t["message"] or "Transformer Engine" in t["message"] for t in tests["tests"])
    assert report["benchmarks"]["bench_logprob"] == {"skipped": "no CUDA device"}
