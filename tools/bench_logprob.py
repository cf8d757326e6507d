"""Benchmark: per-token log-prob of ``hidden @ weight.T`` three ways.

* ``naive``      materialise the [N, V] logits, log_softmax, gather (what a model usually does);
* ``reference``  the blocked torch reference (``megatron_rlp.kernels.reference_linear_logprob``);
* ``triton``     the fused Triton kernel (vocabulary-split forward, chunked d_logits backward with
  cuBLAS GEMMs).  Triton runs only with CUDA: on CPU it is reported as skipped (the
  TRITON_INTERPRET interpreter is a correctness tool, many orders of magnitude slower).

Passes: ``fwd`` (forward under no_grad), ``fwd+bwd`` (forward with grad, backward of
``logp.sum()``, gradients for hidden and weight), and ``score``: a forward under no_grad at
``--score-tokens`` rows (default 256), the shape of RLP's reward / teacher scoring calls, where
the Triton forward splits the vocabulary across programs to fill the GPU.

Peak memory: one fresh subprocess per (implementation, pass) measures its first call.  On CPU
that is the process RSS high-water mark above the RSS just before the call (VmHWM reset through
``/proc/self/clear_refs``; tracemalloc cannot see torch); on CUDA
``torch.cuda.max_memory_allocated`` above the allocation before the call (after one warm-up
call, so Triton's autotuning is not counted).  Gradients and outputs count; the inputs do not.

Time: one subprocess per pass runs all implementations round-robin (``--repeats`` rounds after
a warm-up round) and keeps each one's fastest call, so that load from other processes on a
shared machine hits every implementation alike; the median is in the JSON too.  Ratios are
against ``naive`` of the same pass in the same run.

FLOP convention: the counted FLOPs are ``2 N D V`` for a forward and ``8 N D V`` for
forward+backward (the forward, a recompute of the logits and the two gradient matmuls: what a
fused kernel that keeps no logits has to do), for every implementation; TFLOP/s and the share of
the GPU's bf16 dense peak use them.  The peak comes from a table of known devices
(``BF16_PEAK_TFLOPS``, matched on the CUDA device name) or ``--peak-tflops``; on CPU, or on a
device the table does not know, the share is null with a note.  Executed FLOPs (the table shows
them): ``6 N D V`` for naive forward+backward (it keeps the logits), ``8 N D V`` for the others.

The last line is one JSON object: the shape, the device, the peak used, and one record per
implementation and pass.

    .venv/bin/python tools/bench_logprob.py            # CPU target shape N=4096 D=256 V=32000 fp32
    .venv/bin/python tools/bench_logprob.py --num-tokens 16384 --hidden 4096 --vocab 151936 \\
        --dtype bf16 --impls naive,reference,triton    # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("naive", "reference", "triton")
PASSES = ("fwd", "fwd+bwd", "score")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
COUNTED_FLOPS = {"fwd": 2, "fwd+bwd": 8, "score": 2}  # multiples of N*D*V
EXECUTED_FLOPS = {("naive", "fwd+bwd"): 6}  # where an implementation differs from the count
# bf16 dense tensor-core peaks (TFLOP/s, no sparsity), matched in order on the CUDA device name.
BF16_PEAK_TFLOPS = [
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("B200", 2250.0),
]
SKIP_TRITON = ("no CUDA device: Triton kernels are timed only on a GPU "
               "(the CPU interpreter is for correctness tests)")


# ------------------------------------------------------------------------------------ workers


def _read_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _setup(args):
    """Inputs on the device and a call() per implementation for this pass."""
    import torch

    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from megatron_rlp.kernels import linear_logprob, reference_linear_logprob

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype])
    n, d, v = _rows(args, args.pass_), args.hidden, args.vocab
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(n, d, generator=g, device=dev, dtype=dtype)
    w = torch.randn(v, d, generator=g, device=dev, dtype=dtype).mul_(d ** -0.5)
    t = torch.randint(0, v, (n,), generator=g, device=dev)
    backward = args.pass_ == "fwd+bwd"
    if backward:
        h.requires_grad_()
        w.requires_grad_()

    def naive():
        logits = (h @ w.t()).float()
        return torch.log_softmax(logits, dim=-1).gather(1, t[:, None]).squeeze(1)

    fns = {
        "naive": naive,
        "reference": lambda: reference_linear_logprob(
            h, w, t, chunk_size=args.chunk_size, vocab_chunk=args.vocab_chunk
        ),
        "triton": lambda: linear_logprob(h, w, t, impl="triton"),
    }

    def make_call(fn):
        def call():
            if backward:
                h.grad = None
                w.grad = None
                fn().sum().backward()
            else:
                with torch.no_grad():
                    fn()
            if cuda:
                torch.cuda.synchronize()

        return call

    return torch, cuda, {name: make_call(fn) for name, fn in fns.items()}


def memory_worker(args) -> dict:
    torch, cuda, calls = _setup(args)
    call = calls[args.impl]
    if cuda:
        call()  # warm-up: autotuning and the CUDA context stay out of the measurement
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - base,
                "memory_method": "cuda max_memory_allocated",
                "device": torch.cuda.get_device_name()}
    from megatron_rlp import platform

    exact = _reset_hwm()
    base = platform.cpu_rss_bytes()
    call()
    if exact:
        peak, how = _read_hwm_bytes() - base, "RSS high-water mark (clear_refs)"
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        how = "ru_maxrss (upper bound)"
    return {"peak_bytes": int(peak), "memory_method": how, "device": "cpu"}


def time_worker(args) -> dict:
    torch, cuda, calls = _setup(args)
    impls = args.impls.split(",")
    for name in impls:
        calls[name]()  # warm-up (and autotuning on CUDA)
    times = {name: [] for name in impls}
    for _ in range(args.repeats):
        for name in impls:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: {"time_s": min(ts), "time_median_s": statistics.median(ts)}
            for name, ts in times.items()} | {"_threads": torch.get_num_threads(),
                                              "_vocab_splits": _triton_splits(args, cuda)}


def _triton_splits(args, cuda: bool):
    """Vocabulary splits the Triton forward runs at this pass's row count (None without CUDA)."""
    if not cuda:
        return None
    import torch
    from megatron_rlp.kernels.triton_linear_logprob import vocab_splits

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return vocab_splits(_rows(args, args.pass_), args.vocab, sms)


# ------------------------------------------------------------------------------------ driver


def _rows(args, pass_: str) -> int:
    return args.score_tokens if pass_ == "score" else args.num_tokens


def bf16_peak(device: str, override=None) -> tuple:
    """(peak TFLOP/s or None, note) for a device name ("cpu" for no GPU)."""
    if override is not None:
        return override, "--peak-tflops"
    if device == "cpu":
        return None, "CPU: no tensor-core peak, share not reported"
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in device.lower():
            return peak, f"bf16 dense peak of {key} (table)"
    return None, f"unknown device {device!r}: pass --peak-tflops for a share"



def _run_worker(args, mode: str, pass_: str, impls: list[str]) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker", mode, "--pass", pass_,
        "--impls", ",".join(impls), "--impl", impls[0],
        "--num-tokens", str(args.num_tokens), "--score-tokens", str(args.score_tokens),
        "--hidden", str(args.hidden),
        "--vocab", str(args.vocab), "--dtype", args.dtype, "--repeats", str(args.repeats),
    ]
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    if args.vocab_chunk is not None:
        cmd += ["--vocab-chunk", str(args.vocab_chunk)]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cuda_available() -> bool:
    code = "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", code]).returncode == 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--num-tokens", type=int, default=4096)
    p.add_argument("--score-tokens", type=int, default=256,
                   help="rows of the score pass (a forward at RLP's scoring shape)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    p.add_argument("--impls", default="naive,reference,triton",
                   help=f"comma-separated subset of {','.join(IMPLS)} (naive is always run)")
    p.add_argument("--passes", default=",".join(PASSES),
                   help="comma-separated subset of " + ",".join(PASSES))
    p.add_argument("--chunk-size", type=int, default=None,
                   help="reference: token rows per logits block (default 2048)")
    p.add_argument("--vocab-chunk", type=int, default=None,
                   help="reference: vocabulary columns per logits block "
                        "(default 2**23 // rows, at least 256)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="bf16 dense peak for the share (default: the device's, from a table)")
    p.add_argument("--worker", choices=("memory", "time"), help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--pass", dest="pass_", choices=PASSES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker == "memory":
        print(json.dumps(memory_worker(args)))
        return 0
    if args.worker == "time":
        print(json.dumps(time_worker(args)))
        return 0

    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for i in impls:
        if i not in IMPLS:
            p.error(f"unknown impl {i!r}; choose from {IMPLS}")
    if "naive" not in impls:
        impls.insert(0, "naive")
    passes = [x.strip() for x in args.passes.split(",") if x.strip()]
    for x in passes:
        if x not in PASSES:
            p.error(f"unknown pass {x!r}; choose from {PASSES}")
    cuda = _cuda_available()
    runnable = [i for i in impls if cuda or not i.startswith("triton")]
    d, v = args.hidden, args.vocab
    print(f"shape N={args.num_tokens} (score: {args.score_tokens}) D={d} V={v} dtype={args.dtype} "
          f"repeats={args.repeats} device={'cuda' if cuda else 'cpu'}")
    print("FLOP convention: counted = 2NDV (fwd, score) / 8NDV (fwd+bwd) for every implementation")
    results, device = [], "cpu"
    for pass_ in passes:
        n = _rows(args, pass_)
        timing = _run_worker(args, "time", pass_, runnable)
        mem = {impl: _run_worker(args, "memory", pass_, [impl]) for impl in runnable}
        for impl in impls:
            rec = {"impl": impl, "pass": pass_, "num_tokens": n}
            if impl not in runnable:
                rec["skipped"] = SKIP_TRITON
            elif "error" in timing or "error" in mem[impl]:
                rec["error"] = timing.get("error") or mem[impl]["error"]
            else:
                t, m = timing[impl], mem[impl]
                t0, m0 = timing["naive"], mem["naive"]
                device = m["device"]
                peak, _ = bf16_peak(device, args.peak_tflops)
                tflops = COUNTED_FLOPS[pass_] * n * d * v / t["time_s"] / 1e12
                rec.update(
                    time_s=round(t["time_s"], 4),
                    time_median_s=round(t["time_median_s"], 4),
                    peak_mib=round(m["peak_bytes"] / 2**20, 1),
                    time_ratio=round(t["time_s"] / t0["time_s"], 3),
                    peak_ratio=round(m["peak_bytes"] / max(1, m0["peak_bytes"]), 4),
                    counted_flops_ndv=COUNTED_FLOPS[pass_],
                    executed_flops_ndv=EXECUTED_FLOPS.get((impl, pass_), COUNTED_FLOPS[pass_]),
                    tflops=round(tflops, 3 if tflops < 10 else 1),
                    peak_share=None if peak is None else round(tflops / peak, 3),
                )
                if impl == "triton":
                    rec["vocab_splits"] = timing["_vocab_splits"]
                rec.update(memory_method=m["memory_method"], device=device,
                           threads=timing["_threads"])
                _print_row(rec)
            results.append(rec)
    for rec in results:
        if "skipped" in rec or "error" in rec:
            print(f"{rec['impl']:>10} {rec['pass']:>8}  {rec.get('skipped') or rec.get('error')}")
    peak, note = bf16_peak(device, args.peak_tflops)
    print(json.dumps({
        "bench": "logprob", "num_tokens": args.num_tokens, "score_tokens": args.score_tokens,
        "hidden": d, "vocab": v, "dtype": args.dtype, "device": device,
        "bf16_peak_tflops": peak, "peak_note": note, "results": results,
    }))
    return 0


def _print_row(rec: dict) -> None:
    extra = f"  {rec['tflops']:8.3f} TFLOP/s"
    if rec["peak_share"] is not None:
        extra += f"  {100 * rec['peak_share']:5.1f}% of bf16 peak"
    print(
        f"{rec['impl']:>10} {rec['pass']:>8}  time {rec['time_s']:8.4f} s "
        f"({rec['time_ratio']:.3f}x naive)"
        f"  peak {rec['peak_mib']:9.1f} MiB ({rec['peak_ratio']:.4f}x naive)"
        f"  executed {rec['executed_flops_ndv']}NDV{extra}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
