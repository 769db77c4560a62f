"""Prompt lookup: find the request's latest suffix of n tokens earlier in its prompt and output,
and propose what followed it there."""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from kvflow.core.request import Request


class NgramProposer:
    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n

    def propose(self, requests: list[Request], k: int) -> list[list[int]]:
        return [self._one(r.all_token_ids, k) for r in requests]

    def _one(self, tokens: list[int], k: int) -> list[int]:
        if k <= 0 or len(tokens) < self.min_n + 1:
            return []
        arr = np.asarray(tokens, dtype=np.int64)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            windows = sliding_window_view(arr[:-1], n)  # every earlier n-gram with a token after it
            hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n  # the most recent occurrence
                return tokens[start:start + k]
        return []
