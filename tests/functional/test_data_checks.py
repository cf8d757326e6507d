"""Data that does not fit the run: a .bin that does not match its .idx, and token ids the
tokenizer cannot produce (even where the model's padded vocabulary would accept them)."""

import os
import shutil

import pytest

from megatron_rlp.data.documents import DataError, open_indexed_dataset
from megatron_rlp.pretrain import parse_run_config, run_training
from megatron_rlp.training import parallel
from training_fixtures import NULL_VOCAB, tiny_run_args, write_corpus


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    a = write_corpus(str(root / "a" / "corpus"), num_docs=40, seed=1)
    b = write_corpus(str(root / "b" / "corpus"), num_docs=40, seed=2)
    return root, a, b


def _pair(root, name, bin_from, idx_from):
    prefix = str(root / name)
    shutil.copy(bin_from + ".bin", prefix + ".bin")
    shutil.copy(idx_from + ".idx", prefix + ".idx")
    return prefix


def test_truncated_bin_names_both_files(corpora):
    root, a, _ = corpora
    prefix = _pair(root, "truncated", a, a)
    size = os.path.getsize(prefix + ".bin")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(DataError, match="is truncated") as e:
        open_indexed_dataset(prefix)
    assert prefix + ".bin" in str(e.value) and prefix + ".idx" in str(e.value)
    assert "tools/preprocess_data.py" in str(e.value)


def test_bin_of_another_dataset_is_refused(corpora):
    root, a, b = corpora
    prefix = _pair(root, "mixed", a, b)  # both files valid, from different datasets
    with pytest.raises(DataError, match="different datasets") as e:
        open_indexed_dataset(prefix)
    assert prefix + ".bin" in str(e.value) and prefix + ".idx" in str(e.value)
    assert open_indexed_dataset(a) is not None  # a matching pair opens


def test_truncated_idx_names_the_index(corpora):
    root, a, _ = corpora
    prefix = _pair(root, "short_idx", a, a)
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(40)
    with pytest.raises(DataError, match="cannot be read as a Megatron index") as e:
        open_indexed_dataset(prefix)
    assert prefix + ".idx" in str(e.value)


@pytest.mark.parametrize("rlp", [False, True])
def test_ids_past_the_tokenizer_but_inside_the_padded_vocabulary(corpora, rlp):
    """The corpus holds ids up to NULL_VOCAB (500); a 300-id tokenizer cannot have produced them,
    although the tiny model's 512-row vocabulary would accept them."""
    _, a, _ = corpora
    argv = tiny_run_args(a, iters=1)
    argv[argv.index("--vocab-size") + 1] = "300"
    if rlp:
        argv += ["--rlp", "--rlp-num-thoughts", "2", "--rlp-thought-len", "3", "--rlp-min-context", "2",
                 "--rlp-think-open", "298", "--rlp-think-close", "299"]
    with pytest.raises(DataError, match=r"document \d+ holds token id \d+, outside the tokenizer's vocabulary \[0, 301\)") as e:
        try:
            run_training(parse_run_config(argv))
        finally:
            parallel.destroy()
    assert a in str(e.value)
