"""TP/PP thought sampler: KV cache, one prefill per document, G branches at k positions.

``sample_thoughts`` (sampler.py) is the entry point; ``ThoughtBatch`` (thoughts.py) its result;
``vocab_parallel`` the vocabulary-parallel Gumbel-max; ``pipeline`` the stage-to-stage schedule;
``naive`` the no-sharing baselines for the benchmark; ``cascade`` the mask-free prefix-shared
decode layout; ``agreement`` the π_train/π_sample stats.
"""

from megatron_rlp.sampling.agreement import log_ratio_stats, thought_ratio_stats
from megatron_rlp.sampling.naive import sample_thoughts_batched, sample_thoughts_naive
from megatron_rlp.sampling.sampler import sample_thoughts
from megatron_rlp.sampling.thoughts import (
    PAD_ID,
    STOP_CLOSE,
    STOP_EOD,
    STOP_LENGTH,
    ThoughtBatch,
)
from megatron_rlp.sampling.vocab_parallel import (
    SampledTokens,
    gumbel_noise,
    sample_vocab_parallel,
    uniform_noise,
)

__all__ = [
    "sample_thoughts",
    "sample_thoughts_naive",
    "sample_thoughts_batched",
    "ThoughtBatch",
    "PAD_ID",
    "STOP_CLOSE",
    "STOP_EOD",
    "STOP_LENGTH",
    "log_ratio_stats",
    "thought_ratio_stats",
    "sample_vocab_parallel",
    "SampledTokens",
    "gumbel_noise",
    "uniform_noise",
]
