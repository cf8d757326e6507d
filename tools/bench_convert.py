"""Time the checkpoint converter on a random Qwen3-shaped model (not part of the test suite).

    python tools/bench_convert.py                       # ~100M parameters, TP=1, float32
    python tools/bench_convert.py --target-tp 2 --dtype bfloat16 --cli

Builds a random ``Qwen3ForCausalLM`` offline (hidden 768, 12 layers, 12 heads / 4 KV groups,
FFN 2048, vocab 32000, tied: ~101M parameters by default), ``save_pretrained`` to a temporary
directory, then times hf-to-megatron and megatron-to-hf and checks the round trip is bitwise.
``--cli`` runs the two conversions through tools/convert_checkpoint.py in fresh processes (the
times then include interpreter start and imports, as a user sees them).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=768)
    p.add_argument("--num-layers", type=int, default=12)
    p.add_argument("--num-heads", type=int, default=12)
    p.add_argument("--num-kv-heads", type=int, default=4)
    p.add_argument("--ffn-hidden-size", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--untied", action="store_true")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--target-tp", type=int, default=1)
    p.add_argument("--target-pp", type=int, default=1)
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--cli", action="store_true", help="time the CLI in fresh processes")
    p.add_argument("--workdir", default=None, help="keep the files here (default: a temp dir)")
    return p.parse_args(argv)


def run_cli(*argv: str) -> float:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), *argv,
                    "--no-progress"], check=True, env=env)
    return time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, ROOT)
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from megatron_rlp import convert

    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    hf_dir, mc_dir, back_dir = (os.path.join(work, n) for n in ("hf", "megatron", "hf_back"))
    for d in (mc_dir, back_dir):
        shutil.rmtree(d, ignore_errors=True)
    config = Qwen3Config(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size,
        intermediate_size=args.ffn_hidden_size, num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
        head_dim=args.hidden_size // args.num_heads, tie_word_embeddings=not args.untied,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    start = time.perf_counter()
    model = Qwen3ForCausalLM(config).to(getattr(torch, args.dtype))
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(hf_dir)
    del model
    size = sum(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir))
    print(f"model: {params / 1e6:.1f}M parameters, {args.dtype}, {size / 2**20:.0f} MiB on disk "
          f"(built and saved in {time.perf_counter() - start:.1f} s); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    if args.cli:
        t_in = run_cli("hf-to-megatron", "--hf-dir", hf_dir, "--megatron-dir", mc_dir,
                       "--target-tp", str(args.target_tp), "--target-pp", str(args.target_pp))
        t_out = run_cli("megatron-to-hf", "--megatron-dir", mc_dir, "--hf-dir", back_dir,
                        "--max-shard-size", args.max_shard_size)
    else:
        start = time.perf_counter()
        convert.hf_to_megatron(hf_dir, mc_dir, args.target_tp, args.target_pp, progress=False)
        t_in = time.perf_counter() - start
        start = time.perf_counter()
        convert.megatron_to_hf(mc_dir, back_dir, max_shard_size=args.max_shard_size,
                               progress=False)
        t_out = time.perf_counter() - start
    src = convert.read_hf_checkpoint(hf_dir)[1]
    got = convert.read_hf_checkpoint(back_dir)[1]
    same = set(src) == set(got) and all(torch.equal(src[k], got[k]) for k in src)
    how = "CLI, fresh processes" if args.cli else "in-process API"
    print(f"hf-to-megatron (TP={args.target_tp}, PP={args.target_pp}): {t_in:.1f} s   "
          f"megatron-to-hf: {t_out:.1f} s   ({how}); round trip bitwise identical: {same}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
