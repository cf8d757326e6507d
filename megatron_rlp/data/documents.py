"""A resumable stream of documents over a Megatron ``.bin/.idx`` dataset.

Three views of one corpus:

* :meth:`DocumentStream.next_samples` packs documents end to end into fixed-length samples of
  ``seq_length + 1`` tokens (next-token pretraining, Megatron's GPT sample layout);
* :meth:`DocumentStream.next_windows` reads each document in windows of at most a fixed number of
  tokens (RLP samples positions inside a window: a long document is used in full over
  successive windows, a short one is one window);
* :meth:`DocumentStream.next_documents` returns whole documents.

The order is a seeded permutation of the documents, re-drawn each epoch.  The stream's
position is a small :class:`Cursor` that goes into every checkpoint, so a resumed run reads
exactly the tokens an uninterrupted run would have read.  Packing walks only the document
lengths stored in the ``.idx`` file; a rank reads the tokens of its own samples only.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from struct import error as struct_error
from typing import Optional

import numpy as np

from megatron.core.datasets.indexed_dataset import IndexedDataset


@dataclass
class Cursor:
    """Where the stream stands: epoch, index into the epoch's document order, token offset."""

    epoch: int = 0
    order_index: int = 0
    token_offset: int = 0
    samples_consumed: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "Cursor":
        return cls(**{k: int(v) for k, v in state.items()})


@dataclass
class Window:
    """Tokens ``document[offset : offset + len(tokens)]`` of one document."""

    document: int
    offset: int
    tokens: np.ndarray


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """Starts of the windows of at most ``window`` tokens that cover a ``length``-token document,
    each starting ``overlap`` tokens before the previous one ends (the last one reaches the end)."""
    _check_window(window, overlap)
    starts = [0]
    while starts[-1] + window < length:
        starts.append(starts[-1] + window - overlap)
    return starts


def window_start_of(position: int, window: int, overlap: int) -> int:
    """Start of the window (of :func:`window_starts`) in which ``position`` has at least
    ``overlap`` tokens before it and is not one of the first ``overlap`` tokens of the window
    (positions < overlap: the first window).  Each position belongs to exactly one window."""
    stride = window - overlap
    return max(0, position - overlap) // stride * stride


def _check_window(window: int, overlap: int) -> None:
    if not 0 <= overlap < window:
        raise ValueError(f"a window of {window} tokens cannot overlap the previous one by {overlap} tokens")


class DataError(ValueError):
    """Bad training data: the message names the file, the document and the fix."""


SPLIT_NAMES = ("train", "validation", "test")


def split_documents(split: str, num_documents: int) -> list[range]:
    """Megatron-LM's ``--split``: the train, validation and test ranges of document indices.

    As megatron.core.datasets reads it: up to three non-negative proportions (missing ones are 0),
    normalised; split i is the contiguous range [round(b_i * N), round(e_i * N)) of the documents
    in dataset order, where [b_i, e_i) are the cumulative bounds.  It depends on nothing else, so
    it is the same at every restart and layout.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import convert_split_vector_to_split_matrix

    numbers = [n for n in re.split(r"[\s,/]+", split) if n]
    try:
        values = [float(n) for n in numbers]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or min(values) < 0 or sum(values) <= 0:
        raise ValueError(
            f"--split {split!r}: expected one to three non-negative proportions for train, validation "
            "and test with a positive sum, e.g. '969,30,1'"
        )
    values += [0.0] * (3 - len(values))
    matrix = convert_split_vector_to_split_matrix([v / sum(values) for v in values])
    ranges = []
    for bounds in matrix:
        if bounds is None:
            ranges.append(range(0))
        else:
            ranges.append(range(int(round(bounds[0] * num_documents)), int(round(bounds[1] * num_documents))))
    return ranges


def open_indexed_dataset(path_prefix: str) -> IndexedDataset:
    """Open a .bin/.idx pair, checking that the .bin holds exactly the bytes the .idx describes."""
    if not IndexedDataset.exists(path_prefix):
        raise FileNotFoundError(
            f"--data-path {path_prefix!r}: no {path_prefix}.bin / {path_prefix}.idx found; "
            f"create them with tools/preprocess_data.py --output-prefix {path_prefix}"
        )
    bin_path, idx_path = path_prefix + ".bin", path_prefix + ".idx"
    redo = f"re-create both with tools/preprocess_data.py --output-prefix {path_prefix}"
    try:
        dataset = IndexedDataset(path_prefix, mmap=True)
    except (ValueError, AssertionError, struct_error) as e:
        raise DataError(f"{idx_path} cannot be read as a Megatron index ({e}); it is truncated or not "
                        f"an .idx file — {redo}") from None
    check_bin_matches_index(dataset.index, os.path.getsize(bin_path), bin_path, idx_path, redo)
    return dataset


def check_bin_matches_index(index, bin_bytes: int, bin_path: str, idx_path: str, redo: str) -> None:
    """Every sequence of the .idx lies inside the .bin, back to back, and the .bin ends where the
    last one does: a truncated .bin, or a .bin of another dataset, is refused naming both files."""
    lengths = np.asarray(index.sequence_lengths, dtype=np.int64)
    pointers = np.asarray(index.sequence_pointers, dtype=np.int64)
    item = int(index.dtype_size)
    if len(lengths) == 0:
        return
    ends = pointers + lengths * item
    expected = int(ends[-1])
    if pointers[0] != 0 or np.any(pointers[1:] != ends[:-1]) or np.any(lengths < 0):
        bad = int(np.flatnonzero(np.concatenate([[pointers[0] != 0], pointers[1:] != ends[:-1]]))[0])
        raise DataError(f"{idx_path}: document bounds are inconsistent at sequence {bad} (not back to back "
                        f"in {bin_path}); the index is damaged — {redo}")
    if bin_bytes != expected:
        what = "is truncated" if bin_bytes < expected else "is longer"
        raise DataError(
            f"{bin_path} ({bin_bytes} bytes) does not match {idx_path}, which describes "
            f"{len(lengths)} sequences in {expected} bytes: the .bin {what} — the pair comes from "
            f"different datasets or a write was cut short; {redo}"
        )


class DocumentStream:
    def __init__(
        self,
        dataset: IndexedDataset,
        vocab_size: int,
        seed: int,
        shuffle: bool = True,
        eod_id: Optional[int] = None,
        name: str = "dataset",
        documents: Optional[range] = None,
    ):
        """``documents``: the dataset's documents this stream reads (a --split range; default
        all); the epoch order permutes them, so without a split the order is as before."""
        self.dataset = dataset
        self.vocab_size = vocab_size
        self.seed = seed
        self.shuffle = shuffle
        self.eod_id = eod_id
        self.name = name
        self.lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)
        if len(self.lengths) == 0:
            raise DataError(f"{name}: the dataset holds no documents; check --data-path")
        empty = np.flatnonzero(self.lengths == 0)
        if len(empty):
            raise DataError(
                f"{name}: document {int(empty[0])} is empty ({len(empty)} empty in all); "
                "re-run tools/preprocess_data.py, which rejects or drops empty documents"
            )
        self.documents = np.arange(len(self.lengths)) if documents is None else np.asarray(documents, dtype=np.int64)
        if len(self.documents) == 0:
            raise DataError(f"{name}: this split holds no documents; check --split")
        self.cursor = Cursor()
        self._order_epoch = -1
        self._order = self.documents

    @property
    def num_documents(self) -> int:
        """Documents this stream reads (its split of the dataset)."""
        return len(self.documents)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Dataset document indices in the order of ``epoch``."""
        if epoch != self._order_epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                self._order = self.documents[rng.permutation(len(self.documents))]
            else:
                self._order = self.documents
            self._order_epoch = epoch
        return self._order

    def _read(self, doc: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        tokens = np.asarray(self.dataset.get(int(doc), offset=offset, length=length), dtype=np.int64)
        if len(tokens) and (tokens.max() >= self.vocab_size or tokens.min() < 0):
            bad = int(tokens.max() if tokens.max() >= self.vocab_size else tokens.min())
            raise DataError(
                f"{self.name}: document {int(doc)} holds token id {bad}, outside the tokenizer's "
                f"vocabulary [0, {self.vocab_size}); the data was tokenized with another "
                "tokenizer — re-run tools/preprocess_data.py with this run's --tokenizer-* flags "
                "or set --vocab-size"
            )
        return tokens

    # -- packed samples ---------------------------------------------------------------------
    def _walk(self, cursor: Cursor, num_tokens: int) -> tuple[list[tuple[int, int, int]], Cursor]:
        """Spans (doc, offset, length) covering the next num_tokens tokens, and the cursor after."""
        spans = []
        c = dataclasses.replace(cursor)
        need = num_tokens
        while need > 0:
            order = self._epoch_order(c.epoch)
            doc = int(order[c.order_index])
            available = int(self.lengths[doc]) - c.token_offset
            take = min(available, need)
            spans.append((doc, c.token_offset, take))
            need -= take
            c.token_offset += take
            if c.token_offset == self.lengths[doc]:
                c.token_offset = 0
                c.order_index += 1
                if c.order_index == len(order):
                    c.order_index = 0
                    c.epoch += 1
        return spans, c

    def next_samples(self, count: int, seq_length: int, keep: Optional[range] = None) -> np.ndarray:
        """The next ``count`` packed samples of ``seq_length + 1`` tokens.

        Only samples whose index is in ``keep`` are read (others are skipped by length arithmetic);
        the returned array has ``len(keep)`` rows.  As in Megatron's GPT dataset, consecutive
        samples share one boundary token: the last label of sample i is the first input of i+1.
        """
        keep = range(count) if keep is None else keep
        rows = []
        for i in range(count):
            spans, after = self._walk(self.cursor, seq_length + 1)
            if i in keep:
                rows.append(np.concatenate([self._read(d, o, n) for d, o, n in spans]))
            # A sample consumes seq_length tokens; its last token is the next sample's first input.
            _, self.cursor = self._walk(self.cursor, seq_length)
            self.cursor.samples_consumed += 1
        return np.stack(rows) if rows else np.zeros((0, seq_length + 1), dtype=np.int64)

    # -- windows ------------------------------------------------------------------------------
    def next_windows(self, count: int, window: int, overlap: int) -> list[Window]:
        """The next ``count`` windows of at most ``window`` tokens.

        A document longer than ``window`` is read in successive windows (:func:`window_starts`),
        each starting ``overlap`` tokens before the previous one ends, so that every token past
        the first ``overlap`` of a document is a token after the first ``overlap`` of exactly one
        window; the window that reaches the end of a document moves the stream to the next one.
        The cursor's token offset is where the next window starts.
        """
        _check_window(window, overlap)
        windows = []
        for _ in range(count):
            doc = int(self._epoch_order(self.cursor.epoch)[self.cursor.order_index])
            offset, length = self.cursor.token_offset, int(self.lengths[doc])
            windows.append(Window(doc, offset, self._read(doc, offset, min(window, length - offset))))
            advance = length - offset if offset + window >= length else window - overlap
            _, self.cursor = self._walk(self.cursor, advance)
            self.cursor.samples_consumed += 1
        return windows

    # -- whole documents --------------------------------------------------------------------
    def next_documents(self, count: int, max_length: Optional[int] = None) -> list[np.ndarray]:
        """The next ``count`` whole documents (truncated to max_length tokens)."""
        docs = []
        for _ in range(count):
            if self.cursor.token_offset:
                # Mid-document after packed reads: skip to the next document boundary.
                _, self.cursor = self._walk(
                    self.cursor,
                    int(self.lengths[self._epoch_order(self.cursor.epoch)[self.cursor.order_index]])
                    - self.cursor.token_offset,
                )
            doc = int(self._epoch_order(self.cursor.epoch)[self.cursor.order_index])
            docs.append(self._read(doc, 0, min(int(self.lengths[doc]), max_length or 1 << 62)))
            _, self.cursor = self._walk(self.cursor, int(self.lengths[doc]))
            self.cursor.samples_consumed += 1
        return docs

    def state_dict(self) -> dict:
        return self.cursor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.cursor = Cursor.from_state_dict(state)
