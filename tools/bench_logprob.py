"""Benchmark: per-token log-prob of ``hidden @ weight.T`` three ways.

* ``naive``      materialise the [N, V] logits, log_softmax, gather (what a model usually does);
* ``reference``  the chunked torch reference (``megatron_rlp.kernels.reference_linear_logprob``);
* ``triton``     the fused Triton kernel (deterministic backward); ``triton-atomic`` is the
  atomic-add backward.  Triton runs only with CUDA: on CPU it is reported as skipped (the
  TRITON_INTERPRET interpreter is a correctness tool, many orders of magnitude slower).

Passes: ``fwd`` (forward under no_grad, as for the information-gain reward) and ``fwd+bwd``
(forward with grad, backward of ``logp.sum()``, gradients for hidden and weight).

Each (implementation, pass) runs in a fresh subprocess.  The first call measures peak memory:
on CPU the process RSS high-water mark above the RSS just before the call (VmHWM reset via
``/proc/self/clear_refs``; tracemalloc cannot see torch), on CUDA ``torch.cuda.max_memory_allocated``
above the allocation before the call.  Then ``--repeats`` timed calls; the fastest is reported
(the least disturbed by other processes on a shared machine; the median is in the JSON too).
Ratios are against ``naive`` of the same pass in the same run.

FLOP convention: "useful" FLOPs are the three matmuls any implementation has to do,
``2 N D V`` for the forward and ``6 N D V`` for forward+backward; TFLOP/s and the share of the
bf16 roofline (``--peak-tflops``, default 790) use them for every implementation.  Executed FLOPs
differ: forward+backward recomputes the logits, ``8 N D V`` for the reference and triton-atomic,
``10 N D V`` for the deterministic Triton backward (two recomputes); the table shows them.

The last lines are one JSON object per implementation and pass.

    .venv/bin/python tools/bench_logprob.py            # CPU target shape N=4096 D=256 V=32000 fp32
    .venv/bin/python tools/bench_logprob.py --num-tokens 16384 --hidden 4096 --vocab 151936 \\
        --dtype bf16 --impls naive,reference,triton,triton-atomic    # on a GPU
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
IMPLS = ("naive", "reference", "triton", "triton-atomic")
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
EXECUTED_FLOPS = {  # multiples of N*D*V
    ("naive", "fwd"): 2, ("naive", "fwd+bwd"): 6,
    ("reference", "fwd"): 2, ("reference", "fwd+bwd"): 8,
    ("triton", "fwd"): 2, ("triton", "fwd+bwd"): 10,
    ("triton-atomic", "fwd"): 2, ("triton-atomic", "fwd+bwd"): 8,
}
USEFUL_FLOPS = {"fwd": 2, "fwd+bwd": 6}


# ------------------------------------------------------------------------------------ worker


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


def worker(args) -> dict:
    import torch

    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from megatron_rlp import platform

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype])
    n, d, v = args.num_tokens, args.hidden, args.vocab
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(n, d, generator=g, device=dev, dtype=dtype)
    w = torch.randn(v, d, generator=g, device=dev, dtype=dtype).mul_(d ** -0.5)
    t = torch.randint(0, v, (n,), generator=g, device=dev)
    backward = args.pass_ == "fwd+bwd"
    if backward:
        h.requires_grad_()
        w.requires_grad_()

    from megatron_rlp.kernels import linear_logprob, reference_linear_logprob

    def naive():
        logits = (h @ w.t()).float()
        return torch.log_softmax(logits, dim=-1).gather(1, t[:, None]).squeeze(1)

    fns = {
        "naive": naive,
        "reference": lambda: reference_linear_logprob(
            h, w, t, chunk_size=args.chunk_size, vocab_chunk=args.vocab_chunk
        ),
        "triton": lambda: linear_logprob(h, w, t, impl="triton"),
        "triton-atomic": lambda: linear_logprob(h, w, t, impl="triton", deterministic=False),
    }
    fn = fns[args.impl]

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

    # peak memory of the first call
    if cuda:
        if args.impl.startswith("triton"):
            call()  # autotuning allocates; keep it out of the memory measurement
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        peak = torch.cuda.max_memory_allocated() - base
        how = "cuda max_memory_allocated"
    else:
        exact = _reset_hwm()
        base = platform.cpu_rss_bytes()
        call()
        if exact:
            peak = _read_hwm_bytes() - base
            how = "RSS high-water mark (clear_refs)"
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
            how = "ru_maxrss (upper bound)"
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {
        "time_s": min(times),
        "time_median_s": statistics.median(times),
        "peak_bytes": int(peak),
        "memory_method": how,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------ driver


def _run_worker(args, impl: str, pass_: str) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker",
        "--impl", impl, "--pass", pass_,
        "--num-tokens", str(args.num_tokens), "--hidden", str(args.hidden),
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
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cuda_available() -> bool:
    code = "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", code]).returncode == 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impls", default="naive,reference,triton",
                   help=f"comma-separated subset of {','.join(IMPLS)} (naive is always run)")
    p.add_argument("--passes", default=",".join(PASSES), help="comma-separated subset of fwd,fwd+bwd")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="reference: token rows per logits block (default 4096)")
    p.add_argument("--vocab-chunk", type=int, default=None,
                   help="reference: vocabulary columns per logits block (default 256)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 dense roofline for the share")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--pass", dest="pass_", choices=PASSES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
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
    n, d, v = args.num_tokens, args.hidden, args.vocab
    print(f"shape N={n} D={d} V={v} dtype={args.dtype} repeats={args.repeats} "
          f"device={'cuda' if cuda else 'cpu'}")
    print("FLOP convention: useful = 2NDV (fwd) / 6NDV (fwd+bwd) for every implementation; "
          "executed includes the logits recompute of the backward")
    results = []
    for pass_ in passes:
        base = None
        for impl in impls:
            rec = {"impl": impl, "pass": pass_}
            if impl.startswith("triton") and not cuda:
                rec["skipped"] = ("no CUDA device: Triton kernels are timed only on a GPU "
                                  "(the CPU interpreter is for correctness tests)")
                results.append(rec)
                continue
            out = _run_worker(args, impl, pass_)
            if "error" in out:
                rec["error"] = out["error"]
                results.append(rec)
                continue
            rec.update(
                time_s=round(out["time_s"], 4),
                time_median_s=round(out["time_median_s"], 4),
                peak_mib=round(out["peak_bytes"] / 2**20, 1),
            )
            if impl == "naive":
                base = out
            if base is not None:
                rec["time_ratio"] = round(out["time_s"] / base["time_s"], 3)
                rec["peak_ratio"] = round(out["peak_bytes"] / max(1, base["peak_bytes"]), 4)
            rec["executed_flops_ndv"] = EXECUTED_FLOPS[(impl, pass_)]
            if cuda:
                tflops = USEFUL_FLOPS[pass_] * n * d * v / out["time_s"] / 1e12
                rec["tflops"] = round(tflops, 1)
                rec["roofline_share"] = round(tflops / args.peak_tflops, 3)
            rec["memory_method"] = out["memory_method"]
            rec["device"] = out["device"]
            results.append(rec)
            _print_row(rec)
    for rec in results:
        if "skipped" in rec or "error" in rec:
            print(f"{rec['impl']:>14} {rec['pass']:>8}  {rec.get('skipped') or rec.get('error')}")
    for rec in results:
        print(json.dumps(rec))
    return 0


def _print_row(rec: dict) -> None:
    extra = ""
    if "tflops" in rec:
        extra = f"  {rec['tflops']:7.1f} TFLOP/s  {100 * rec['roofline_share']:5.1f}% of roofline"
    print(
        f"{rec['impl']:>14} {rec['pass']:>8}  time {rec['time_s']:8.4f} s ({rec['time_ratio']:.3f}x naive)"
        f"  peak {rec['peak_mib']:9.1f} MiB ({rec['peak_ratio']:.4f}x naive)"
        f"  executed {rec['executed_flops_ndv']}NDV{extra}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
