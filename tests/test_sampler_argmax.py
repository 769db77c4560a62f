"""argmax_rows (the sampler's greedy pick) returns exactly what torch.argmax returns: ties to the
first index, NaN as the maximum, all -inf rows to 0; the C log-sum-exp pass of greedy steps agrees
with torch."""
from __future__ import annotations

import pytest
import torch

from kvflow.layers import cpu_kernels
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


@pytest.mark.skipif(cpu_kernels.kernels() is None, reason="no C compiler: the CPU kernels are off")
def test_lse_argmax_kernel_matches_torch():
    """The C pass the greedy sampler uses instead of log_softmax: torch's logsumexp and first argmax,
    vocabularies off the 16-lane width too; rows with NaN are handed back (None) to torch's rules."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4099, generator=g) * 6
    x[0, [17, 3, 4000]] = 30.0  # a tie: the first index
    x[1] = -float("inf")  # everything masked
    x[2, 4098] = 40.0  # the maximum in the tail past the last 16
    lse, top = cpu_kernels.lse_argmax(x)
    assert top.tolist()[:3] == [3, 0, 4098] and torch.equal(top, x.max(dim=-1).indices)
    want = torch.logsumexp(x, dim=-1)
    assert lse[1] == -float("inf")
    assert torch.allclose(lse[[0, 2, 3, 4, 5]], want[[0, 2, 3, 4, 5]], rtol=1e-6, atol=1e-5)
    x[4, 9] = float("nan")
    assert cpu_kernels.lse_argmax(x) is None
