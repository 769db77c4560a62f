"""Pick, by timing on this machine, between two implementations of an op: the plain-torch one and a
C kernel (csrc/). The lead's rule is that no path may be slower than plain torch on the CPU it runs
on, and which one wins depends on the CPU and on the number of rows. So the first call of an op
for a (dtype, shape) class times both on inputs of that shape (a few milliseconds, once per
process) and every later call takes the faster one.

KVFLOW_FUSED_OPS=torch | c forces one side (tests and A/B benchmarks); the default is "measure".
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

logger = logging.getLogger(__name__)
_choice: dict[tuple, str] = {}


def mode() -> str:
    return os.environ.get("KVFLOW_FUSED_OPS", "measure")


def rows_class(rows: int) -> int:
    """Row counts are grouped by powers of two: a decision made for 40 rows holds for 33-64."""
    return 1 << max(0, (rows - 1).bit_length())


def choose(key: tuple, make_candidates: Callable[[], dict[str, Callable[[], object]]],
           names: tuple[str, ...] = ("c", "torch"), reps: int = 7) -> str:
    """The name of the fastest candidate for `key`. The first time a key is seen, `make_candidates()`
    builds the candidates (on scratch copies of the inputs: they are called repeatedly) and each is
    timed: best of `reps` after a warm-up. Later calls are a dict lookup."""
    forced = mode()
    if forced in names:
        return forced
    choice = _choice.get(key)
    if choice is None:
        best = {}
        for name, fn in make_candidates().items():
            fn()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            best[name] = min(times)
        choice = _choice[key] = min(best, key=best.get)
        logger.debug("op %s: %s (%s)", key, choice, {k: f"{v * 1e6:.1f} us" for k, v in best.items()})
    return choice


def decisions() -> dict[tuple, str]:
    return dict(_choice)
