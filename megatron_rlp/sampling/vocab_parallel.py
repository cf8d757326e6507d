"""Sampling one token per row from vocabulary-sharded logits, identically on every TP rank.

Each tensor-parallel rank holds the logits of its own slice of the vocabulary ``[start, start +
V/tp)``.  Nothing here gathers logits.  Per row, every rank reduces its shard to five numbers:

* ``best``   the largest score of the shard (score = z/T + g at temperature T > 0, z when greedy),
* ``index``  the global vocabulary id of that score (lowest id on ties),
* ``z_best`` the raw logit of that id,
* ``lse``    log-sum-exp of the shard's raw logits z,
* ``lse_T``  log-sum-exp of the shard's tempered logits z/T.

One ``all_gather`` of these [rows, 5] statistics (fp64) over the TP group gives every rank the
same table; every rank then picks the winner (largest ``best``; on a tie the lower rank, which
holds the lower vocabulary ids) and merges the log-sum-exps in the same order, so every rank
holds bit-identical tokens and log-probabilities.

Gumbel-max: ``argmax_v z_v/T + g_v`` with ``g_v`` i.i.d. standard Gumbel is an exact sample of
softmax(z/T).  The noise of entry (row, v) is a counter-based hash of (seed, step, row, global
vocabulary id v) — :func:`uniform_noise` — so a rank generates noise only for its own shard and
still draws the noise every other layout would draw for that id: TP=1 and TP=2 see the same
noise, and so does a naive sampler that processes the rows in another order.

Two log-probabilities are returned for every sampled token:

* ``logprobs``          log p_θ(token) = z_token − logsumexp(z): the model's own (untempered)
  log-probability.  This is what the RLP ratio π_θ / π_θold needs (the update recomputes log p_θ
  without a temperature).
* ``tempered_logprobs`` log softmax(z/T)[token]: the log-probability under the distribution that
  was actually sampled from.  Greedy decoding (T = 0) samples from a point mass: 0.

Ids ``>= vocab_size`` (the output layer's padding past the tokenizer) are never drawn and are in
neither normaliser: the policy is the softmax over real token ids.

Top-p / top-k truncation is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_rlp import collectives

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 ``x`` in [0, 2**32) without signed overflow (16-bit halves)."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (the "lowbias32" finaliser): a bijection on [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def _mix32_int(x: int) -> int:
    """:func:`_mix32` of one Python int."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_noise(
    seed: int, step: int, rows: torch.Tensor, vocab_start: int, vocab_count: int
) -> torch.Tensor:
    """Uniform(0, 1) noise [len(rows), vocab_count] (fp32) for global vocabulary ids
    ``vocab_start .. vocab_start + vocab_count - 1``: a pure function of (seed, step, row, id)."""
    device = rows.device
    folded_seed = (int(seed) ^ (int(seed) >> 32)) & _M32
    # The (seed, step) key is hashed with Python ints: no host-to-device copy (a sync on a GPU).
    key = _mix32_int(folded_seed ^ _mix32_int(int(step) & _M32))
    row_key = _mix32((key + _mul32(rows.to(torch.int64) & _M32, 0x9E3779B9)) & _M32)  # [b]
    row_key2 = _mix32((row_key + 0x632BE5AB) & _M32)
    ids = torch.arange(vocab_start, vocab_start + vocab_count, dtype=torch.int64, device=device)
    id_key = _mix32((_mul32(ids & _M32, 0x85EBCA6B) + 0x27D4EB2F) & _M32)  # [V]
    h = _mix32(row_key[:, None] ^ id_key[None, :])
    h = _mix32((h + row_key2[:, None]) & _M32)
    return hash_to_unit(h)


def hash_to_unit(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes (int64) -> fp32 in [2^-24, 1 - 2^-24], strictly inside (0, 1).

    Uses the 23 high bits: with 24, the top value 1 - 2^-25 rounds to 1.0 in fp32, whose Gumbel
    draw is +inf (and NaN next to a masked -inf logit)."""
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def gumbel_noise(
    seed: int, step: int, rows: torch.Tensor, vocab_start: int, vocab_count: int
) -> torch.Tensor:
    """Standard Gumbel noise −log(−log U) for the same keys as :func:`uniform_noise`."""
    u = uniform_noise(seed, step, rows, vocab_start, vocab_count)
    return -torch.log(-torch.log(u))


@dataclass
class SampledTokens:
    tokens: torch.Tensor  # [b] int64, global vocabulary ids
    logprobs: torch.Tensor  # [b] fp32, log p_θ (untempered)
    tempered_logprobs: torch.Tensor  # [b] fp32, log softmax(z/T) (0 when greedy)


def _tp_world(tp_group) -> int:
    if tp_group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group=tp_group)


def sample_vocab_parallel(
    logits: torch.Tensor,
    temperature: float,
    seed: int,
    step: int,
    rows: torch.Tensor,
    tp_group=None,
    vocab_size: Optional[int] = None,
) -> SampledTokens:
    """Sample one token per row of vocabulary-sharded ``logits`` [b, V/tp] (this rank's shard).

    ``rows`` [b] are global row ids that key the noise (together with ``seed`` and ``step``);
    ``temperature`` 0 is greedy.  ``vocab_size`` (the unpadded vocabulary) excludes padded ids.
    All ranks of ``tp_group`` must call this with their shard; all get the same result.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, vocab shard], got shape {tuple(logits.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    world = _tp_world(tp_group)
    rank = dist.get_rank(group=tp_group) if world > 1 else 0
    b, shard = logits.shape
    start = rank * shard
    z = logits.float()
    valid = None
    if vocab_size is not None and start + shard > vocab_size:
        valid = torch.arange(start, start + shard, device=z.device) < vocab_size
        z = z.masked_fill(~valid[None, :], float("-inf"))
    if temperature > 0:
        zt = z / temperature
        score = zt + gumbel_noise(seed, step, rows.to(z.device), start, shard)
        if valid is not None:
            score = score.masked_fill(~valid[None, :], float("-inf"))
        lse_t = torch.logsumexp(zt, dim=-1)
    else:
        score = z
        lse_t = torch.zeros(b, dtype=z.dtype, device=z.device)
    best, arg = score.max(dim=-1)
    z_best = z.gather(-1, arg[:, None])[:, 0]
    lse = torch.logsumexp(z, dim=-1)
    stats = torch.stack(
        [best.double(), (arg + start).double(), z_best.double(), lse.double(), lse_t.double()],
        dim=-1,
    )
    if world > 1:
        table = torch.stack(collectives.all_gather(stats, group=tp_group), dim=0)  # [tp, b, 5]
    else:
        table = stats[None]
    winner = table[..., 0].argmax(dim=0)  # first maximum: lowest rank, i.e. lowest ids, on ties
    pick = table.gather(0, winner[None, :, None].expand(1, b, table.shape[-1]))[0]
    token = pick[:, 1].round().long()
    total_lse = torch.logsumexp(table[..., 3], dim=0)
    logprobs = (pick[:, 2] - total_lse).float()
    if temperature > 0:
        tempered = (pick[:, 2] / temperature - torch.logsumexp(table[..., 4], dim=0)).float()
    else:
        tempered = torch.zeros(b, dtype=torch.float32, device=logits.device)
    return SampledTokens(token.to(logits.device), logprobs.to(logits.device), tempered.to(logits.device))
