"""The unbiased pass@k estimator (Chen et al., 2021, as used by Large Language Monkeys): with n
samples of which c are correct, the chance that k drawn without replacement hold a correct one."""
from __future__ import annotations

import math


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k), computed as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def log_linear_fit(ks: list[int], values: list[float]) -> tuple[float, float]:
    """Least squares of value = a + b * ln(k): returns (a, b)."""
    xs = [math.log(k) for k in ks]
    mx, my = sum(xs) / len(xs), sum(values) / len(values)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, values)) / sxx if sxx else 0.0
    return my - b * mx, b
