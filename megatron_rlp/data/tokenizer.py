"""Tokenizers: a thin wrapper over megatron-core's tokenizer package, and offline SentencePiece training.

:func:`build_tokenizer` takes Megatron-LM's ``--tokenizer-type`` names and builds the tokenizer with
``megatron.core.tokenizers.MegatronTokenizer`` (megatron-core 0.16.1):

==============================  ===========================  ====================================
``--tokenizer-type``            megatron-core library        ``--tokenizer-model``
==============================  ===========================  ====================================
SentencePieceTokenizer          ``sentencepiece``            a ``.model`` file
GPTSentencePieceTokenizer       ``sentencepiece`` (alias)    a ``.model`` file
HuggingFaceTokenizer            ``huggingface``              a local directory (never downloaded)
NullTokenizer                   ``null``                     none; ``--vocab-size N`` instead
==============================  ===========================  ====================================

:class:`Tokenizer` is the project's view of it: ``tokenize``, ``detokenize``, ``vocab_size``,
``eod``, ``token_to_id`` and ``tokenize_with_offsets``.  Gaps in megatron-core that it fills:

* ``token_to_id`` returns ``None`` for a piece that is not one vocabulary entry (megatron-core's
  SentencePiece and HuggingFace wrappers silently return the unknown-token id instead), so a caller
  can tell whether ``<think>`` / ``</think>`` exist as single tokens;
* ``tokenize_with_offsets`` gives each token's character offset in the text, which the demo corpus
  needs to map answer digits to token positions (megatron-core has offsets only for NullTokenizer);
* NullTokenizer: empty or whitespace-only text gives ``[]`` and any run of whitespace separates ids
  (megatron-core splits on single spaces and fails on ``""``); ids outside the vocabulary and
  non-integers are rejected with a message.

NullTokenizer follows megatron-core's (and Megatron-LM's) convention: ``--vocab-size N`` gives the
ordinary ids ``0 .. N-1`` plus the end-of-document id ``N``, so ``vocab_size == N + 1`` and
``eod == vocab_size - 1``.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Iterable, Optional, Sequence

SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer")
SUPPORTED_TOKENIZER_TYPES = SENTENCEPIECE_TYPES + ("HuggingFaceTokenizer", "NullTokenizer")

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_NULL_WORD = re.compile(r"\S+")


class Tokenizer:
    """The project's tokenizer interface over a megatron-core tokenizer (``self.backend``).

    Build it with :func:`build_tokenizer`.  ``library`` is megatron-core's library name
    (``sentencepiece``, ``huggingface`` or ``null``).
    """

    def __init__(self, backend, library: str, tokenizer_type: str, model_path: Optional[str] = None):
        self.backend = backend
        self.library = library
        self.tokenizer_type = tokenizer_type
        self.model_path = model_path
        self._vocab_size = int(backend.vocab_size)
        eod = backend.eod
        if eod is None or int(eod) < 0:
            raise ValueError(
                f"{tokenizer_type} {model_path!r} defines no end-of-document token (eos); "
                "Megatron needs one to separate documents — use a tokenizer with an eos token"
            )
        self._eod = int(eod)

    # -- the interface ---------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (ids are ``0 .. vocab_size-1``)."""
        return self._vocab_size

    @property
    def eod(self) -> int:
        """End-of-document token id (appended after each document by the preprocessing tool)."""
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOD added)."""
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects a str, got {type(text).__name__}")
        if self.library == "null":
            return self._null_ids(text)
        return [int(i) for i in self.backend.tokenize(text)]

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        ids = [int(i) for i in ids]
        if self.library == "null":
            return " ".join(str(i) for i in ids)
        return self.backend.detokenize(ids)

    def token_to_id(self, piece: str) -> Optional[int]:
        """Id of ``piece`` when the vocabulary holds it as one token, else ``None``.

        For SentencePiece a piece is the vocabulary string (a word-initial piece starts with
        ``▁``); for HuggingFace it is the vocabulary string including added tokens; for the
        NullTokenizer it is the decimal text of an id.
        """
        if self.library == "sentencepiece":
            sp = self._sp()
            idx = sp.piece_to_id(piece)
            if idx == sp.unk_id() and piece != sp.id_to_piece(sp.unk_id()):
                return None
            return int(idx)
        if self.library == "huggingface":
            idx = self._hf().get_vocab().get(piece)
            return None if idx is None else int(idx)
        if self.library == "null":
            if re.fullmatch(r"[0-9]+", piece) and int(piece) < self.vocab_size:
                return int(piece)
            return None
        raise AssertionError(f"unhandled library {self.library}")

    def id_to_piece(self, idx: int) -> str:
        """Vocabulary string of one id (for debugging and tests)."""
        if self.library == "sentencepiece":
            return self._sp().id_to_piece(int(idx))
        if self.library == "huggingface":
            return self._hf().convert_ids_to_tokens(int(idx))
        return str(int(idx))

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """``(ids, starts)``: the ids of :meth:`tokenize` and each token's start character in ``text``.

        A token that covers no character of ``text`` (e.g. a lone SentencePiece ``▁`` produced for
        a space) starts where its surface starts.  Raises ``ValueError`` when the tokenizer's
        output cannot be aligned with the text.
        """
        ids = self.tokenize(text)
        if self.library == "null":
            starts = [m.start() for m in _NULL_WORD.finditer(text)]
        elif self.library == "sentencepiece":
            starts = self._sp_starts(text, ids)
        else:
            starts = self._hf_starts(text, ids)
        if len(starts) != len(ids):
            raise ValueError(f"{self.tokenizer_type}: could not align tokens with the text {text[:60]!r}")
        return ids, starts

    @property
    def unique_identifiers(self):
        """What megatron-core's dataset cache keys on."""
        return self.backend.unique_identifiers

    def __repr__(self) -> str:
        where = f", model={self.model_path!r}" if self.model_path else ""
        return f"Tokenizer({self.tokenizer_type}{where}, vocab_size={self.vocab_size}, eod={self.eod})"

    # -- internals -------------------------------------------------------------------------
    def _sp(self):
        return self.backend._tokenizer.tokenizer  # sentencepiece.SentencePieceProcessor

    def _hf(self):
        return self.backend._tokenizer.tokenizer  # transformers tokenizer

    def _null_ids(self, text: str) -> list[int]:
        words = text.split()
        if not words:
            return []
        try:
            ids = [int(w) for w in self.backend.tokenize(" ".join(words))]
        except ValueError:
            bad = next(w for w in words if not re.fullmatch(r"[+-]?[0-9]+", w))
            raise ValueError(
                f"NullTokenizer reads text as space-separated integer ids; got {bad!r}. "
                "Use a real tokenizer (--tokenizer-type SentencePieceTokenizer) for natural text"
            ) from None
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"NullTokenizer: id {i} is outside [0, {self.vocab_size}) (--vocab-size "
                    f"{self.vocab_size - 1} plus the eod id); raise --vocab-size"
                )
        return ids

    def _sp_starts(self, text: str, ids: list[int]) -> list[int]:
        proto = self._sp().encode(text, out_type="proto")
        if [p.id for p in proto.pieces] != ids:
            return self._decode_prefix_starts(text, ids)
        # SentencePiece reports byte offsets into the UTF-8 text; turn them into characters.
        byte_to_char = {}
        pos = 0
        for ci, ch in enumerate(text):
            byte_to_char[pos] = ci
            pos += len(ch.encode("utf-8"))
        byte_to_char[pos] = len(text)
        return [byte_to_char.get(p.begin, byte_to_char[pos]) for p in proto.pieces]

    def _hf_starts(self, text: str, ids: list[int]) -> list[int]:
        hf = self._hf()
        if getattr(hf, "is_fast", False):
            enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
            if list(enc["input_ids"]) == ids:
                return [int(s) for s, _ in enc["offset_mapping"]]
        return self._decode_prefix_starts(text, ids)

    def _decode_prefix_starts(self, text: str, ids: list[int]) -> list[int]:
        """Offsets from decoding growing prefixes; needs ``detokenize(tokenize(text)) == text``."""
        if self.detokenize(ids) != text:
            raise ValueError(
                f"{self.tokenizer_type}: text does not survive tokenize/detokenize unchanged, so "
                f"token offsets are undefined for {text[:60]!r}"
            )
        starts, prev = [], 0
        for i in range(len(ids)):
            starts.append(prev)
            prev = len(self.detokenize(ids[: i + 1]))
        return starts


def build_tokenizer(
    tokenizer_type: str, tokenizer_model: Optional[str] = None, vocab_size: Optional[int] = None
) -> Tokenizer:
    """Build a tokenizer from Megatron-LM's flags (``--tokenizer-type``, ``--tokenizer-model``,
    ``--vocab-size``).  See the module docstring for the supported types."""
    from megatron.core.tokenizers import MegatronTokenizer

    if tokenizer_type not in SUPPORTED_TOKENIZER_TYPES:
        close = difflib.get_close_matches(str(tokenizer_type), SUPPORTED_TOKENIZER_TYPES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(
            f"--tokenizer-type {tokenizer_type!r} is not supported{hint}; supported: "
            + ", ".join(SUPPORTED_TOKENIZER_TYPES)
        )

    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise ValueError(
                "NullTokenizer needs --vocab-size (the number of ordinary token ids; the "
                "end-of-document id vocab_size is added after them)"
            )
        if int(vocab_size) < 1:
            raise ValueError(f"--vocab-size must be positive for NullTokenizer, got {vocab_size}")
        backend = MegatronTokenizer.from_pretrained(
            metadata_path={"library": "null"}, vocab_size=int(vocab_size)
        )
        return Tokenizer(backend, "null", tokenizer_type)

    if tokenizer_model is None:
        what = "a SentencePiece .model file" if tokenizer_type in SENTENCEPIECE_TYPES else "a local directory"
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model ({what})")
    path = os.path.expanduser(str(tokenizer_model))

    if tokenizer_type in SENTENCEPIECE_TYPES:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"--tokenizer-model {path!r}: no such SentencePiece model file. Pass the path of a "
                "trained .model file, or train one offline with "
                "megatron_rlp.data.tokenizer.train_sentencepiece (make demo builds one)"
            )
        backend = MegatronTokenizer.from_pretrained(
            tokenizer_path=path, metadata_path={"library": "sentencepiece"}
        )
        return Tokenizer(backend, "sentencepiece", tokenizer_type, path)

    # HuggingFaceTokenizer: a local directory only; nothing is ever downloaded.
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"--tokenizer-model {path!r}: no such directory. HuggingFaceTokenizer loads only from a "
            "local directory holding tokenizer files (tokenizer.json / tokenizer_config.json); "
            "nothing is downloaded — save one there with tokenizer.save_pretrained(dir) first"
        )
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    backend = MegatronTokenizer.from_pretrained(
        tokenizer_path=path, metadata_path={"library": "huggingface"}, use_fast=True
    )
    return Tokenizer(backend, "huggingface", tokenizer_type, path)


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str,
    vocab_size: int,
    user_symbols: Sequence[str] = (THINK_OPEN, THINK_CLOSE),
    input_sentence_size: int = 100_000,
    num_threads: int = 1,
) -> str:
    """Train a SentencePiece model offline on ``texts``; returns the path ``{model_prefix}.model``.

    Digits are split into single tokens (``split_digits``); each of ``user_symbols`` becomes one
    token wherever it appears.  BPE, not unigram: on a small, repetitive corpus (the demo's)
    unigram's seed-piece extraction found a single candidate and produced a character-level
    vocabulary, while BPE learns the words.  ``hard_vocab_limit`` is off, so a corpus too small for
    ``vocab_size`` gives a smaller vocabulary instead of an error.  One thread and no input
    shuffling make the result depend only on the texts.
    """
    import sentencepiece as spm

    lines = [t.replace("\n", " ") for t in texts if t and t.strip()]
    if not lines:
        raise ValueError("train_sentencepiece: no non-empty texts to train on")
    if vocab_size < len(user_symbols) + 4:
        raise ValueError(f"train_sentencepiece: vocab_size {vocab_size} is too small")
    parent = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(parent, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=model_prefix,
        vocab_size=int(vocab_size),
        model_type="bpe",
        split_digits=True,
        user_defined_symbols=list(user_symbols),
        byte_fallback=False,
        character_coverage=1.0,
        hard_vocab_limit=False,
        input_sentence_size=int(input_sentence_size),
        shuffle_input_sentence=False,
        num_threads=int(num_threads),
        minloglevel=2,
    )
    return f"{model_prefix}.model"
