"""RLP on the hybrid Mamba model at TP=1 (the TP=2 run is in tests/distributed)."""
import pytest

from training_fixtures import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("rlp_hybrid") / "corpus"), num_docs=16, seed=4)


def test_short_rlp_run_on_tiny_hybrid(corpus, tmp_path_factory):
    from megatron_rlp.training import parallel

    parallel.init_distributed()
    from rlp_parity import run_short_rlp

    run_short_rlp(corpus, "tiny-hybrid", 1, 1, tmp_path_factory)
