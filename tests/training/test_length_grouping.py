"""Length-grouped batches: deterministic per (seed, epoch), every row once, less padding than random."""

import random

import pytest

from vembed.training.data import EpochBatchSampler


def lengths_of(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(5, 128) for _ in range(n)]


def padded_tokens(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) for b in batches)


@pytest.mark.parametrize("n", [100, 256, 1000])
def test_every_row_once_and_only_the_last_batch_short(n):
    lengths = lengths_of(n)
    batches = list(EpochBatchSampler(n, 32, seed=1, lengths=lengths))
    rows = [i for b in batches for i in b]
    assert sorted(rows) == list(range(n))
    assert len(batches) == len(EpochBatchSampler(n, 32, seed=1, lengths=lengths))
    assert all(len(b) == 32 for b in batches[:-1])
    assert len(batches[-1]) == (n % 32 or 32)


def test_same_seed_and_epoch_same_batches_other_epoch_other_batches():
    lengths = lengths_of(500)
    a, b = EpochBatchSampler(500, 16, 7, lengths), EpochBatchSampler(500, 16, 7, lengths)
    assert list(a) == list(b)
    b.epoch = 1
    assert list(a) != list(b)
    assert list(EpochBatchSampler(500, 16, 8, lengths)) != list(a)


def test_grouping_cuts_padding_but_keeps_batches_mixed():
    n, bs = 1024, 32
    lengths = lengths_of(n)
    grouped = list(EpochBatchSampler(n, bs, 3, lengths))
    plain = list(EpochBatchSampler(n, bs, 3))
    assert padded_tokens(grouped, lengths) < 0.8 * padded_tokens(plain, lengths)
    # Batches come from random windows: consecutive batches are not one global sort, and the
    # batch order is not sorted by length.
    maxima = [max(lengths[i] for i in b) for b in grouped]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)
    # A row's batch-mates come from its window of 8 batches, not only from its exact length:
    # the sampler without lengths would put different rows together.
    first_rows = {frozenset(b) for b in grouped}
    assert first_rows != {frozenset(b) for b in plain}


def test_without_lengths_batches_are_unchanged():
    # The ungrouped order is the one resumable checkpoints were written with.
    import torch

    order = torch.randperm(70, generator=torch.Generator().manual_seed(5 * 100_003 + 0)).tolist()
    assert list(EpochBatchSampler(70, 32, 5)) == [order[0:32], order[32:64], order[64:70]]


def test_lengths_must_match_the_dataset():
    with pytest.raises(ValueError, match="lengths has 3 entries for 4 examples"):
        EpochBatchSampler(4, 2, 0, [1, 2, 3])
