"""Entry point: ``python -m megatron_rlp.pretrain [Megatron-LM flags] [--rlp --rlp-* flags]``.

Launch several ranks with torchrun, e.g.
``torchrun --nproc_per_node 8 -m megatron_rlp.pretrain --tensor-model-parallel-size 2 ...``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_rlp import config as cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron_rlp.pretrain",
        description="Pretraining (next-token) and RLP on Megatron-Core.",
        allow_abbrev=False,
    )
    for title, cls in cfg.CONFIG_GROUPS.items():
        cfg.add_dataclass_args(parser, cls, title)
    _add_objective_args(parser)
    _add_dry_run_args(parser)
    return parser


def _add_dry_run_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dry run")
    group.add_argument(
        "--dry-run", action="store_true",
        help="Run nothing: validate the layout, build every distinct rank's model chunk on the meta "
        "device and print its parameters, estimated memory per GPU and FLOPs per iteration; exit "
        "non-zero if a GPU would need more than --dry-run-gpu-memory-gb. Needs --world-size.",
    )
    group.add_argument("--world-size", type=int, default=None,
                       help="Number of GPUs the planned job runs on (nodes x GPUs per node), for --dry-run.")
    group.add_argument("--dry-run-gpu-memory-gb", type=float, default=80.0,
                       help="Memory of one GPU in GiB for --dry-run's check (default 80).")


def _add_objective_args(parser: argparse.ArgumentParser) -> None:
    try:
        from megatron_rlp.rlp.config import RLPConfig
    except ImportError:
        return
    parser.add_argument("--rlp", action="store_true", help="Train with the RLP objective instead of next-token prediction.")
    cfg.add_dataclass_args(parser, RLPConfig, "rlp")


def parse_run_config(argv: Optional[Sequence[str]] = None):
    return _run_config(build_parser().parse_args(argv))


def _run_config(ns: argparse.Namespace):
    from megatron_rlp.training.loop import RunConfig

    run = RunConfig(**{name: cfg.from_namespace(cls, ns) for name, cls in cfg.CONFIG_GROUPS.items()})
    if getattr(ns, "rlp", False):
        from megatron_rlp.rlp.config import RLPConfig

        run.extra["rlp"] = cfg.from_namespace(RLPConfig, ns)
    return run


def build_objective(run, state, tokenizer, stream):
    if "rlp" in run.extra:
        from megatron_rlp.rlp.step import RLPObjective

        return RLPObjective(run.extra["rlp"], state, tokenizer, stream)
    from megatron_rlp.training.ntp import NextTokenObjective

    return NextTokenObjective(stream, run.training.seq_length, run.training.micro_batch_size)


def setup_run(run, need_data: bool = True):
    """Tokenizer, model/optimizer state and document stream for a run (no checkpoint loaded)."""
    from megatron_rlp import platform
    from megatron_rlp.data.documents import DocumentStream, open_indexed_dataset
    from megatron_rlp.data.tokenizer import build_tokenizer
    from megatron_rlp.training import loop

    platform.setup_platform()
    if need_data and not run.data.data_path:
        raise ValueError("--data-path is required (prefix of a .bin/.idx dataset from tools/preprocess_data.py)")
    check_evaluation_config(run)
    from megatron_rlp.training.logging import check_wandb_config

    check_wandb_config(run.logging)
    if "rlp" in run.extra:
        from megatron_rlp.rlp.config import validate_rlp_config

        validate_rlp_config(run.extra["rlp"])
    tokenizer = build_tokenizer(run.data.tokenizer_type, run.data.tokenizer_model, run.model.vocab_size)
    # With --use-checkpoint-args this reads the --load checkpoint's architecture: a rank-local
    # file read, before any process group exists.
    preset = loop.resolve_preset(
        run.model, tokenizer.vocab_size, tp=run.parallel.tensor_model_parallel_size,
        seq_length=run.training.seq_length, load=run.checkpoint.load,
    )
    dataset = open_indexed_dataset(run.data.data_path) if need_data else None
    train_documents = None
    if dataset is not None:  # an empty split fails here, before the model is built
        train_documents = _split_range(run, dataset, 0)
        if run.evaluation.eval_interval and run.data.valid_data_path is None:
            _split_range(run, dataset, 1)
    state = loop.setup(run, preset)
    stream = None
    if dataset is not None:
        stream = DocumentStream(
            # Ids must be ones the tokenizer can produce (the model pads its vocabulary past them).
            dataset, tokenizer.vocab_size, seed=run.training.seed, shuffle=run.data.shuffle_documents,
            eod_id=tokenizer.eod, name=run.data.data_path, documents=train_documents,
        )
    return state, tokenizer, stream


def check_evaluation_config(run) -> None:
    """--eval-interval / --eval-iters / --split / --valid-data-path, before anything is built."""
    from megatron_rlp.data.documents import split_documents

    ev, data = run.evaluation, run.data
    if data.split is not None:
        split_documents(data.split, 1000)  # the syntax; the ranges need the dataset
    if ev.eval_interval is None:
        return
    if ev.eval_interval < 1 or ev.eval_iters < 1:
        raise ValueError(f"--eval-interval and --eval-iters must be >= 1, got {ev.eval_interval} and {ev.eval_iters}")
    if data.valid_data_path is None and data.split is None:
        raise ValueError(
            "--eval-interval needs validation data: pass --split (e.g. '969,30,1': a validation share "
            "of the documents of --data-path, as in Megatron-LM) or --valid-data-path"
        )
    if data.valid_data_path is not None:
        if data.split is not None and len(split_documents(data.split, 1 << 20)[1]):
            raise ValueError(
                f"--split {data.split!r} gives --data-path a validation share and --valid-data-path "
                "is given as well; pass one of them (e.g. --split 100,0,0 with --valid-data-path)"
            )
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        if not IndexedDataset.exists(data.valid_data_path):
            raise FileNotFoundError(
                f"--valid-data-path {data.valid_data_path!r}: no {data.valid_data_path}.bin / "
                f"{data.valid_data_path}.idx found; create them with tools/preprocess_data.py "
                f"--output-prefix {data.valid_data_path}"
            )


def _split_range(run, dataset, index: int):
    """The documents of split ``index`` (0 train, 1 validation) of --data-path under --split."""
    from megatron_rlp.data.documents import DataError, SPLIT_NAMES, split_documents

    if run.data.split is None:
        return None
    documents = split_documents(run.data.split, len(dataset.sequence_lengths))[index]
    if not documents:
        raise DataError(
            f"--split {run.data.split!r} leaves the {SPLIT_NAMES[index]} split of the "
            f"{len(dataset.sequence_lengths)} documents of --data-path {run.data.data_path!r} empty; "
            "give it a larger share"
        )
    return documents


def build_validation_stream(run, stream):
    """The held-out documents --eval-interval evaluates on (None without --eval-interval): the
    validation share of --data-path under --split, or --valid-data-path.  Read in a seeded order
    (as the training stream is) from the same start at every evaluation."""
    if run.evaluation.eval_interval is None:
        return None
    from megatron_rlp.data.documents import DocumentStream, open_indexed_dataset

    if run.data.valid_data_path is not None:
        dataset, name, documents = open_indexed_dataset(run.data.valid_data_path), run.data.valid_data_path, None
    else:
        dataset, name = stream.dataset, f"{run.data.data_path} (validation split)"
        documents = _split_range(run, dataset, 1)
    return DocumentStream(dataset, stream.vocab_size, seed=run.training.seed, shuffle=run.data.shuffle_documents,
                          eod_id=stream.eod_id, name=name, documents=documents)


def run_training(run, on_iteration=None) -> list[dict]:
    """Everything after argument parsing; tests and the demo call this directly."""
    from megatron_rlp.training import loop

    state, tokenizer, stream = setup_run(run)
    objective = build_objective(run, state, tokenizer, stream)
    return loop.train(state, objective, on_iteration=on_iteration,
                      validation=build_validation_stream(run, stream))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.dry_run or ns.world_size is not None:
        return run_dry_run(ns)
    run = _run_config(ns)
    from megatron_rlp.data.documents import DataError
    from megatron_rlp.training.checkpoint import CheckpointError
    from megatron_rlp.training.loop import TrainingError

    try:
        run_training(run)
    except (ValueError, FileNotFoundError, DataError, CheckpointError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def run_dry_run(ns: argparse.Namespace) -> int:
    """--dry-run: exit status 0 when the layout fits, 2 when it is invalid, 3 when it does not fit."""
    if not ns.dry_run or ns.world_size is None:
        print("error: --dry-run and --world-size N go together (N: the job's GPUs, nodes x GPUs per node)",
              file=sys.stderr, flush=True)
        return 2
    from megatron_rlp.training import dry_run

    dry_run.hide_gpus()  # before anything asks torch about CUDA
    run = _run_config(ns)
    try:
        dry_run.dry_run(run, ns.world_size, ns.dry_run_gpu_memory_gb, print_fn=lambda text: print(text, flush=True))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except dry_run.LayoutDoesNotFit as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
