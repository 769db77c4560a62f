"""argmax_rows (the sampler's greedy pick) returns exactly what torch.argmax returns: ties to the
first index, NaN as the maximum, all -inf rows to 0."""
from __future__ import annotations

import torch

from kvflow.layers.sampler import argmax_rows


def test_matches_argmax_on_random_rows():
    g = torch.Generator().manual_seed(0)
    for rows, vocab in ((1, 49152), (7, 1000), (64, 4099)):
        x = torch.randn(rows, vocab, generator=g)
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
        assert torch.equal(argmax_rows(x.bfloat16()), x.bfloat16().argmax(dim=-1))


def test_ties_nan_and_masked_rows_match_argmax():
    x = torch.zeros(5, 300)
    x[0, [17, 3, 250]] = 2.0  # a tie: the first index wins
    x[1] = 1.0  # all equal
    x[2, 40], x[2, 9] = float("nan"), float("nan")  # NaN is the maximum, the first one
    x[3] = -float("inf")  # everything masked
    x[4, [299, 100]] = float("inf")
    expected = x.argmax(dim=-1)
    assert expected.tolist() == [3, 0, 9, 0, 100]
    assert torch.equal(argmax_rows(x), expected)
    assert argmax_rows(x[:0]).shape == (0,)
