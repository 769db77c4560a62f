"""Speculation length chosen per step by expected goodput (SmartSpec).

goodput(K) = expected tokens generated this step / predicted step time. Each request's expected
tokens with k drafts is 1 + a + a^2 + ... + a^k for its acceptance rate a (a moving average of what
it got accepted). The step time comes from measured steps, indexed by the batch's token count: on a
memory-bound batch extra tokens are nearly free and K grows; on a compute-bound one they cost their
full share and K falls to 0."""
from __future__ import annotations

import bisect


class StepTimeModel:
    """Moving average of step time per token-count bucket, interpolated between measured buckets.
    Outside them it extends the nearest measured slope (flat with one bucket); above, that is
    optimistic: an unmeasured size is tried once and then known."""

    def __init__(self, smoothing: float = 0.3):
        self.smoothing = smoothing
        self.times: dict[int, float] = {}

    @staticmethod
    def bucket(n: int) -> int:
        b = 1
        while b < n:
            b = b * 3 // 2 + (b < 2)
        return b

    def observe(self, num_tokens: int, seconds: float) -> None:
        b = self.bucket(num_tokens)
        old = self.times.get(b)
        self.times[b] = seconds if old is None else (1 - self.smoothing) * old + self.smoothing * seconds

    def predict(self, num_tokens: int) -> float | None:
        if not self.times:
            return None
        keys = sorted(self.times)
        b = self.bucket(num_tokens)
        if b in self.times:
            return self.times[b]
        i = bisect.bisect_left(keys, b)
        if i == 0:  # below everything measured: extend the smallest slope down (never free)
            if len(keys) < 2:
                return self.times[keys[0]]
            x0, x1 = keys[0], keys[1]
            slope = max(0.0, (self.times[x1] - self.times[x0]) / (x1 - x0))
            return max(0.1 * self.times[x0], self.times[x0] - slope * (x0 - b))
        if i == len(keys):
            if len(keys) < 2:
                return self.times[keys[-1]]
            x0, x1 = keys[-2], keys[-1]
            slope = max(0.0, (self.times[x1] - self.times[x0]) / (x1 - x0))
            return self.times[x1] + slope * (b - x1)
        x0, x1 = keys[i - 1], keys[i]
        w = (b - x0) / (x1 - x0)
        return (1 - w) * self.times[x0] + w * self.times[x1]


def expected_tokens(acceptance: float, k: int) -> float:
    """1 (the bonus token) plus the expected accepted drafts out of k."""
    return sum(acceptance ** i for i in range(k + 1))


def choose_k(acceptances: list[float], draft_lens: list[int], base_tokens: int, max_k: int,
             step_time: StepTimeModel) -> int:
    """The K in [0, max_k] with the highest expected tokens per second for this batch.
    draft_lens: how many drafts each request could offer (<= max_k)."""
    best_k, best = 0, -1.0
    for k in range(max_k + 1):
        lens = [min(k, n) for n in draft_lens]
        if k > 0 and lens == [min(k - 1, n) for n in draft_lens]:
            break  # no request has more to offer
        t = step_time.predict(base_tokens + sum(lens))
        if t is None:
            return max_k  # nothing measured yet: try the full length once
        tokens = sum(expected_tokens(a, n) for a, n in zip(acceptances, lens))
        if tokens / t > best * 1.0001:  # ties go to the shorter, cheaper K
            best_k, best = k, tokens / t
    return best_k
