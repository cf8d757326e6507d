"""Convert checkpoints between Hugging Face (safetensors) and megatron-core dist checkpoints.

    python tools/convert_checkpoint.py hf-to-megatron --hf-dir Qwen3-1.7B-Base \
        --megatron-dir ckpt/qwen3-1.7b-tp2 --target-tp 2 --target-pp 1
    python tools/convert_checkpoint.py megatron-to-hf --megatron-dir runs/rlp/ckpt \
        --hf-dir out/qwen3-rlp [--max-shard-size 2GB] [--hf-config Qwen3-1.7B-Base]
    python tools/convert_checkpoint.py megatron-to-megatron --megatron-dir ckpt/tp2 \
        --target-dir ckpt/tp1pp2 --target-tp 1 --target-pp 2

Model types: qwen3 and nemotron_h (from config.json; the other way from the checkpoint's saved
model signature).  The output is written next to its final path and renamed into place when
complete; an existing output is replaced only with --overwrite.  Input problems (unknown
architecture, weights that do not match the config, a layout that does not divide the model)
exit with code 2.  The tool starts TP*PP CPU worker processes itself; under torchrun with a
world size that is a multiple of TP*PP every rank converts its part instead.

Everything lives in megatron_rlp.convert; this file only keeps the spawned workers' import of
the main module cheap.
"""

import os
import sys

if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun: convert on the CPU over gloo (the workers never need a GPU).
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["MEGATRON_RLP_FORCE_CPU"] = "1"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_rlp.convert import main

    sys.exit(main(own_process=True))
