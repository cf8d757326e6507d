"""Turn jsonl into a Megatron .bin/.idx dataset.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod

Writes ``{output-prefix}_{key}_document.bin/.idx`` for each --json-keys key (Megatron-LM's
naming).  Output goes to temporary files that replace the targets only when the whole input
was read without error: a bad line never clobbers an existing dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder


class InputError(ValueError):
    pass


def output_prefix_for(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


def preprocess(
    input_path: str,
    output_prefix: str,
    tokenizer,
    json_keys=("text",),
    append_eod: bool = False,
    skip_empty: bool = False,
    show_progress: bool = True,
) -> dict[str, str]:
    """Tokenize ``input_path`` (jsonl) into one .bin/.idx dataset per key; returns key -> prefix."""
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"--input {input_path!r} does not exist")
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    targets = {key: output_prefix_for(output_prefix, key) for key in json_keys}
    tmp = {key: prefix + ".tmp" for key, prefix in targets.items()}
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    builders = {key: IndexedDatasetBuilder(tmp[key] + ".bin", dtype=dtype) for key in json_keys}
    counts = {key: 0 for key in json_keys}
    try:
        size = os.path.getsize(input_path)
        with open(input_path, "rb") as f, tqdm(
            total=size, unit="B", unit_scale=True, desc="preprocess", disable=not show_progress,
            file=sys.stderr,
        ) as bar:
            for line_no, raw in enumerate(f, start=1):
                bar.update(len(raw))
                if not raw.strip():
                    continue
                where = f"{input_path}:{line_no}"
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise InputError(
                        f"{where}: malformed JSON ({e.msg} at column {e.colno}); each line must be "
                        "one JSON object such as {\"text\": \"...\"} — fix or remove that line"
                    ) from None
                if not isinstance(record, dict):
                    raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
                for key in json_keys:
                    if key not in record:
                        raise InputError(
                            f"{where}: no key {key!r} (keys: {sorted(record)}); choose the field with --json-keys"
                        )
                    text = record[key]
                    if not isinstance(text, str):
                        raise InputError(f"{where}: field {key!r} is {type(text).__name__}, not a string")
                    ids = tokenizer.tokenize(text) if text.strip() else []
                    if not ids:
                        if skip_empty:
                            continue
                        raise InputError(
                            f"{where}: field {key!r} is an empty document (no tokens); remove it or "
                            "pass --skip-empty to drop empty documents"
                        )
                    if append_eod:
                        ids = list(ids) + [tokenizer.eod]
                    builders[key].add_item(torch.tensor(ids, dtype=torch.int64))
                    builders[key].end_document()
                    counts[key] += 1
        for key in json_keys:
            if counts[key] == 0:
                raise InputError(f"{input_path}: no documents found for key {key!r}")
            builders[key].finalize(tmp[key] + ".idx")
    except BaseException:
        for key in json_keys:
            for ext in (".bin", ".idx"):
                if os.path.exists(tmp[key] + ext):
                    os.remove(tmp[key] + ext)
        raise
    for key in json_keys:
        os.replace(tmp[key] + ".bin", targets[key] + ".bin")
        os.replace(tmp[key] + ".idx", targets[key] + ".idx")
    return targets


def main(argv=None) -> int:
    from megatron_rlp.data.tokenizer import build_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="jsonl file, one JSON object per line")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--append-eod", action="store_true", help="append the end-of-document token")
    parser.add_argument("--skip-empty", action="store_true", help="drop empty documents instead of failing")
    parser.add_argument("--tokenizer-type", default="SentencePieceTokenizer")
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
        targets = preprocess(
            args.input, args.output_prefix, tokenizer, args.json_keys, args.append_eod,
            args.skip_empty, show_progress=not args.no_progress,
        )
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for key, prefix in targets.items():
        print(f"wrote {prefix}.bin / {prefix}.idx ({key})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
