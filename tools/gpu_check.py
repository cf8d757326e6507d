"""The GPU check kit: ``make gpu-check`` (README, "Checking a GPU machine").

On any CUDA machine with torch and triton, in one command:

1. installs what is missing of the project's pure-python dependencies (megatron-core 0.16.1,
   numpy, einops, pytest, ...) from the wheel folder carried with the tree (``make gpu-wheels``
   fills it; no network: ``pip install --no-index --no-deps --target build/gpu_deps``);
2. runs the ``cuda``-marked tests in tests/gpu (Triton kernel vs reference, the bf16 sampler,
   one next-token and one RLP iteration of tiny and tiny-hybrid with the local spec and with
   Transformer Engine when it imports, a one-rank NCCL group, two GPUs where present);
3. runs the kernel and sampler benchmarks at GPU shapes;
4. writes ONE JSON report: ``--out PATH`` (a directory gets ``gpu_check.json``), by default
   ``$OUT/gpu_check.json`` when ``$OUT`` is set, else ``build/gpu_check.json``.

With ``--budget S`` every phase is cut to fit S seconds; the report is rewritten after each phase.

Exit status: 0 every test that ran passed (tests skipped for want of TE or a second GPU are
listed with their reason, never counted as passed) and every benchmark ran; 1 something failed;
2 no CUDA device — the report is still written, with every test skipped.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPS_DIR = os.path.join(ROOT, "build", "gpu_deps")

# (distribution, exact version or None) that a bare torch + triton machine lacks; `make
# gpu-wheels` downloads exactly these (py3.12, manylinux x86_64).  torch, triton and their own
# dependencies are the machine's.  tensorboard (only with --tensorboard-dir), sentencepiece and
# transformers (only for real tokenizers / conversion) are not needed by the kit.
REQUIREMENTS = [
    ("megatron-core", "0.16.1"),
    ("numpy", None),
    ("packaging", None),
    ("einops", None),
    ("psutil", None),
    ("tqdm", None),
    ("pytest", None),
    ("iniconfig", None),
    ("pluggy", None),
    ("pygments", None),
]
OPTIONAL = ("transformer_engine", "mamba_ssm", "causal_conv1d", "apex", "scaled_masked_softmax_cuda",
            "flash_attn")  # flash_attn: the cascade sampler layout's GPU attention

# tools/bench_logprob.py's GPU shape (its docstring) and a Qwen3-1.7B sampler setting.
BENCHMARKS = {
    "bench_logprob": ["tools/bench_logprob.py", "--num-tokens", "16384", "--hidden", "4096",
                      "--vocab", "151936", "--dtype", "bf16", "--repeats", "3",
                      "--impls", "naive,reference,triton"],
    "bench_sampler": ["tools/bench_sampler.py", "--preset", "qwen3-1.7b", "--bf16", "--num-docs", "4",
                      "--positions-per-doc", "4", "--num-thoughts", "16", "--prefix", "512",
                      "--thought-len", "64"],
}


# The machine the wheels are for: CPython 3.12 on x86-64 Linux (the lent GPU machines).
WHEEL_TARGET = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
                "--abi", "none", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                "--platform", "manylinux2014_x86_64", "--platform", "any"]


def download_wheels(wheel_dir: str) -> int:
    """``make gpu-wheels``: fetch REQUIREMENTS as Python 3.12 wheels (needs network)."""
    specs = [f"{d}=={v}" if v else d for d, v in REQUIREMENTS]
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps", *WHEEL_TARGET,
           "-d", wheel_dir, *specs]
    print(" ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed_version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_requirements() -> list:
    """Requirements not satisfied in this interpreter (plus build/gpu_deps when on sys.path)."""
    importlib.invalidate_caches()
    missing = []
    for dist, version in REQUIREMENTS:
        have = _installed_version(dist)
        if have is None or (version is not None and have != version):
            missing.append((dist, version))
    return missing


def find_wheel(wheel_dir: str, dist: str, version) -> str | None:
    """The wheel of ``dist`` (at ``version`` when given) in ``wheel_dir``."""
    if not os.path.isdir(wheel_dir):
        return None
    for name in sorted(os.listdir(wheel_dir)):
        if not name.endswith(".whl"):
            continue
        wheel_dist, wheel_version = name.split("-")[:2]
        if _norm(wheel_dist) == _norm(dist) and (version is None or wheel_version == version):
            return os.path.join(wheel_dir, name)
    return None


def install_from_wheels(wheel_dir: str, target: str = DEPS_DIR) -> dict:
    """Install the missing requirements from ``wheel_dir`` into ``target`` (offline)."""
    if os.path.isdir(target) and target not in sys.path:  # installed by an earlier run
        sys.path.insert(0, target)
    missing = missing_requirements()
    record = {"wheel_dir": wheel_dir, "target": target, "needed": [d for d, _ in missing], "installed": []}
    if not missing:
        return record
    files, absent = [], []
    for dist, version in missing:
        path = find_wheel(wheel_dir, dist, version)
        (files.append(path) if path else absent.append(f"{dist}{'==' + version if version else ''}"))
    if absent:
        record["error"] = (
            f"no wheel in {wheel_dir} for {', '.join(absent)}: run `make gpu-wheels` on a machine "
            "with network (any OS; it downloads the Python 3.12 wheels) and carry the folder along"
        )
        return record
    os.makedirs(target, exist_ok=True)
    if target not in sys.path:
        sys.path.insert(0, target)
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--upgrade",
           "--target", target, *files]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        # A bare interpreter without pip: a wheel is a zip archive of an installed tree.
        for path in files:
            with zipfile.ZipFile(path) as zf:
                zf.extractall(target)
        record["method"] = "unzip (pip failed: " + (out.stderr.strip().splitlines() or ["?"])[-1] + ")"
    else:
        record["method"] = "pip --no-index"
    record["installed"] = [os.path.basename(f) for f in files]
    still = missing_requirements()
    if still:
        record["error"] = "still missing after install: " + ", ".join(d for d, _ in still)
    return record


def environment() -> dict:
    import torch

    cuda = torch.cuda.is_available() and os.environ.get("MEGATRON_RLP_FORCE_CPU", "0") != "1"
    env = {
        "host": platform.node(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "packages": {d: _installed_version(d) for d, _ in REQUIREMENTS + [("triton", None)]},
        "optional": {},
    }
    if cuda:
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    for module in OPTIONAL:
        try:
            importlib.import_module(module)
            env["optional"][module] = "imports"
        except Exception as e:  # noqa: BLE001 - any failure means "not usable here"
            env["optional"][module] = f"absent ({type(e).__name__})"
    return env


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, DEPS_DIR, env.get("PYTHONPATH", "")) if p)
    env["TRITON_INTERPRET"] = "0"
    return env


def parse_junit(path: str) -> dict:
    """Per-test outcomes from pytest's JUnit XML; skipped tests keep their reason."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        rec = {"test": f"{case.get('classname')}::{case.get('name')}", "seconds": float(case.get("time", 0))}
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                rec["outcome"] = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                rec["message"] = (node.get("message") or "")[:500]
                if tag != "skipped":
                    rec["details"] = (node.text or "")[-4000:]
                break
        else:
            rec["outcome"] = "passed"
        tests.append(rec)
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "tests": tests}


def run_tests(pytest_args: list, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "tests/gpu", "-q", "-rs", "--strict-markers",
               f"--junitxml={xml}", *pytest_args]
        t0 = time.time()
        try:
            out = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                                 timeout=timeout)
        except subprocess.TimeoutExpired as e:
            tail = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            return {"error": f"pytest ran past {timeout} s", "output_tail": tail[-4000:]}
        result = {"command": " ".join(cmd[1:]), "returncode": out.returncode, "seconds": round(time.time() - t0, 1),
                  "output_tail": (out.stdout + out.stderr)[-4000:]}
        if os.path.exists(xml):
            result.update(parse_junit(xml))
        else:
            result["error"] = "pytest wrote no JUnit report (collection or import failure?)"
        return result


def run_benchmark(name: str, args: list, timeout: int) -> dict:
    cmd = [sys.executable, *args]
    t0 = time.time()
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(args), "error": f"ran past {timeout} s"}
    rec = {"command": " ".join(args), "returncode": out.returncode, "seconds": round(time.time() - t0, 1)}
    results = []
    for line in out.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    rec["results"] = results
    rec["log"] = [l for l in out.stdout.splitlines() if not l.strip().startswith("{")][-40:]
    if out.returncode != 0:
        rec["error"] = out.stderr[-4000:]
    return rec


def report_path(out: str | None) -> str:
    out = out or os.environ.get("OUT") or os.path.join(ROOT, "build")
    if out.endswith(os.sep) or os.path.isdir(out) or not out.endswith(".json"):
        return os.path.join(out, "gpu_check.json")
    return out


def verdict(report: dict) -> tuple[str, int]:
    if report.get("install", {}).get("error"):
        return "fail: dependencies", 1
    tests = report.get("tests", {})
    counts = tests.get("counts", {})
    if tests.get("error") or counts.get("failed") or counts.get("error"):
        return "fail: tests", 1
    if not report["environment"]["cuda_available"]:
        return "no CUDA device: nothing was checked (every cuda test skipped)", 2
    if not counts.get("passed"):
        return "fail: no test ran", 1
    if any("error" in b for b in report.get("benchmarks", {}).values()):
        return "fail: benchmarks", 1
    return "pass", 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="report file or directory (default: $OUT, else build/)")
    p.add_argument("--wheels", default=os.path.join(ROOT, "wheels"), help="wheel folder (make gpu-wheels)")
    p.add_argument("--skip-bench", action="store_true", help="tests only")
    p.add_argument("--test-timeout", type=int, default=1500, help="seconds for the whole pytest run")
    p.add_argument("--bench-timeout", type=int, default=420, help="seconds per benchmark")
    p.add_argument("--budget", type=int, default=0,
                   help="seconds for the whole check (phases are cut to fit; 0: no limit)")
    p.add_argument("--download-wheels", metavar="DIR", help="only download the wheels into DIR (make gpu-wheels)")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments after --, e.g. -- -k kernel")
    args = p.parse_args(argv)
    if args.download_wheels:
        return download_wheels(args.download_wheels)

    try:
        import torch  # noqa: F401
    except ImportError:
        print(f"gpu-check: torch does not import in {sys.executable}; run it with the interpreter that "
              "has torch and triton: make gpu-check GPU_PYTHON=/path/to/python", file=sys.stderr)
        return 1
    t0 = time.time()
    path = report_path(args.out)

    def left(limit: int) -> int:
        """A phase's timeout: its own limit, cut to what is left of --budget."""
        if not args.budget:
            return limit
        return max(1, min(limit, int(args.budget - (time.time() - t0) - 15)))

    def write(report: dict) -> None:
        # After every phase, so a run killed from outside still leaves what it found.
        report["seconds"] = round(time.time() - t0, 1)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)

    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "root": ROOT,
              "verdict": "incomplete (the check was stopped before its end)"}
    report["install"] = install_from_wheels(os.path.abspath(args.wheels))
    report["environment"] = environment()
    write(report)
    if not report["install"].get("error"):
        report["tests"] = run_tests(args.pytest_args, left(args.test_timeout))
        write(report)
        report["benchmarks"] = {}
        for name, bench_args in BENCHMARKS.items():
            if args.skip_bench or not report["environment"]["cuda_available"]:
                report["benchmarks"][name] = {"skipped": "--skip-bench" if args.skip_bench else "no CUDA device"}
                continue
            report["benchmarks"][name] = run_benchmark(name, bench_args, left(args.bench_timeout))
            write(report)
    report["verdict"], code = verdict(report)
    write(report)
    counts = report.get("tests", {}).get("counts")
    print(f"gpu-check: {report['verdict']}; tests {counts}; report {path}")
    for t in report.get("tests", {}).get("tests", []):
        if t["outcome"] != "passed":
            print(f"  {t['outcome']:>7}  {t['test']}  {t.get('message', '')[:160]}")
    if report["install"].get("error"):
        print("  " + report["install"]["error"])
    return code


if __name__ == "__main__":
    sys.exit(main())
