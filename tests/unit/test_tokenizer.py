"""Tokenizer wrapper over megatron-core's tokenizers, and offline SentencePiece training."""
import os

import pytest
import sentencepiece as spm

from megatron_rlp.data.tokenizer import (
    SUPPORTED_TOKENIZER_TYPES,
    THINK_CLOSE,
    THINK_OPEN,
    build_tokenizer,
    train_sentencepiece,
)

CORPUS = [
    "The cat sat on the mat and counted 12345 fish.",
    "A café sells 7 cakes; the baker thinks <think>3+4=7</think> before writing 7.",
    "Numbers like 2048, 31 and 569 are split into digits.",
    "We think <think>1+1=2 c1</think> then answer 2.",
] * 20


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(CORPUS, str(tmp_path_factory.mktemp("sp") / "tok"), vocab_size=96)


@pytest.fixture(scope="module")
def sp_tok(sp_model):
    return build_tokenizer("SentencePieceTokenizer", sp_model)


# -- errors ----------------------------------------------------------------------------------
def test_unknown_type_lists_supported():
    with pytest.raises(ValueError) as e:
        build_tokenizer("SentencepieceTokenizer", "x.model")
    msg = str(e.value)
    for name in SUPPORTED_TOKENIZER_TYPES:
        assert name in msg
    assert "did you mean SentencePieceTokenizer" in msg


def test_missing_sentencepiece_file_names_path_flag_and_fix(tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError) as e:
        build_tokenizer("SentencePieceTokenizer", missing)
    msg = str(e.value)
    assert missing in msg and "--tokenizer-model" in msg and "train_sentencepiece" in msg


def test_sentencepiece_without_model_flag():
    with pytest.raises(ValueError, match="--tokenizer-model"):
        build_tokenizer("GPTSentencePieceTokenizer")


def test_huggingface_needs_local_directory(tmp_path):
    missing = str(tmp_path / "no-such-dir")
    with pytest.raises(FileNotFoundError) as e:
        build_tokenizer("HuggingFaceTokenizer", missing)
    msg = str(e.value)
    assert missing in msg and "--tokenizer-model" in msg and "local directory" in msg


def test_null_tokenizer_needs_vocab_size():
    with pytest.raises(ValueError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")


def test_train_sentencepiece_rejects_empty_input(tmp_path):
    with pytest.raises(ValueError, match="no non-empty texts"):
        train_sentencepiece(["", "  "], str(tmp_path / "t"), 64)


# -- NullTokenizer ---------------------------------------------------------------------------
def test_null_tokenizer_follows_megatron_core_convention():
    from megatron.core.tokenizers import MegatronTokenizer

    tok = build_tokenizer("NullTokenizer", vocab_size=50)
    core = MegatronTokenizer.from_pretrained(metadata_path={"library": "null"}, vocab_size=50)
    assert tok.vocab_size == core.vocab_size == 51
    assert tok.eod == core.eod == 50 == tok.vocab_size - 1
    assert tok.tokenize("3 1 4 50") == [3, 1, 4, 50]
    assert tok.tokenize("  3\n1  4 ") == [3, 1, 4]
    assert tok.tokenize("") == [] and tok.tokenize(" \n") == []
    assert tok.detokenize([3, 1, 4]) == "3 1 4"
    assert tok.token_to_id("7") == 7 and tok.token_to_id("51") is None
    assert tok.token_to_id(THINK_OPEN) is None
    assert tok.tokenize_with_offsets(" 12  3\n45") == ([12, 3, 45], [1, 5, 7])


def test_null_tokenizer_rejects_bad_text():
    tok = build_tokenizer("NullTokenizer", vocab_size=10)
    with pytest.raises(ValueError, match="outside"):
        tok.tokenize("1 11")
    with pytest.raises(ValueError, match="space-separated integer"):
        tok.tokenize("1 two 3")


# -- SentencePiece ---------------------------------------------------------------------------
def test_sentencepiece_markers_single_tokens_and_digits_split(sp_tok):
    open_id, close_id = sp_tok.token_to_id(THINK_OPEN), sp_tok.token_to_id(THINK_CLOSE)
    assert open_id is not None and close_id is not None and open_id != close_id
    ids = sp_tok.tokenize("We think <think>12+9=21</think> then answer 21.")
    assert ids.count(open_id) == 1 and ids.count(close_id) == 1
    pieces = [sp_tok.id_to_piece(i) for i in ids]
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert all(len(p) == 1 for p in digit_pieces)
    assert "".join(digit_pieces) == "1292121"


def test_sentencepiece_matches_sentencepiece_and_round_trips(sp_model, sp_tok):
    proc = spm.SentencePieceProcessor(model_file=sp_model)
    text = "The cat counted 2048 cakes <think>3+4=7</think> at the café."
    assert sp_tok.tokenize(text) == proc.encode(text)
    assert sp_tok.detokenize(sp_tok.tokenize(text)) == text
    assert sp_tok.vocab_size == proc.get_piece_size() <= 96
    assert sp_tok.eod == proc.eos_id() == proc.piece_to_id("</s>")
    assert sp_tok.token_to_id("<unk>") == proc.unk_id()
    assert sp_tok.token_to_id("zebra-not-a-piece") is None
    assert sp_tok.token_to_id("▁the") == proc.piece_to_id("▁the")


def test_gpt_sentencepiece_alias(sp_model, sp_tok):
    alias = build_tokenizer("GPTSentencePieceTokenizer", sp_model)
    text = "Numbers like 2048 <think>1+1=2</think> 2."
    assert alias.tokenize(text) == sp_tok.tokenize(text)
    assert (alias.vocab_size, alias.eod) == (sp_tok.vocab_size, sp_tok.eod)


def test_sentencepiece_offsets_point_at_token_surfaces(sp_tok):
    text = "A café sells 7 cakes; 31 <think>3+4=7</think>7."
    ids, starts = sp_tok.tokenize_with_offsets(text)
    assert ids == sp_tok.tokenize(text)
    assert starts == sorted(starts) and len(starts) == len(ids)
    for i, s in zip(ids, starts):
        surface = sp_tok.id_to_piece(i).replace("▁", " ")
        if s == 0:
            surface = surface.lstrip(" ")  # the dummy-prefix space is not in the text
        assert text[s : s + len(surface)] == surface, (sp_tok.id_to_piece(i), s)
    # Past the two-byte "é" character offsets are characters, not bytes.
    seven = text.index("7")
    assert sp_tok.id_to_piece(ids[starts.index(seven)]) == "7"


def test_train_sentencepiece_is_deterministic(tmp_path, sp_tok):
    again = build_tokenizer("SentencePieceTokenizer", train_sentencepiece(CORPUS, str(tmp_path / "b"), 96))
    assert [again.id_to_piece(i) for i in range(again.vocab_size)] == [
        sp_tok.id_to_piece(i) for i in range(sp_tok.vocab_size)
    ]


# -- HuggingFace (a tokenizer saved to a local directory; nothing is downloaded) --------------
def test_huggingface_from_local_directory(tmp_path, monkeypatch):
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    raw = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    raw.train_from_iterator(
        CORPUS, tokenizers.trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"])
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>")
    hf.add_tokens([THINK_OPEN])
    hf.save_pretrained(str(tmp_path / "hf"))

    tok = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "hf"))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert tok.vocab_size == len(hf)
    assert tok.eod == hf.convert_tokens_to_ids("</s>")
    assert tok.token_to_id(THINK_OPEN) == hf.convert_tokens_to_ids(THINK_OPEN)
    assert tok.token_to_id(THINK_CLOSE) is None  # not one token in this vocabulary
    text = "The cat <think>3+4=7</think> sat."
    ids, starts = tok.tokenize_with_offsets(text)
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    for i, s in zip(ids, starts):
        piece = tok.id_to_piece(i)
        assert text[s : s + len(piece)] == piece
