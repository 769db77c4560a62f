"""Pick, by timing on this machine, between two implementations of an op: the plain-torch one and a
C kernel (csrc/). The lead's rule is that no path may be slower than plain torch on the CPU it runs
on, and which one wins depends on the CPU and on the number of rows. So the first call of an op
for a (dtype, shape) class times both on inputs of that shape and every later call takes the faster
one. The choices are kept on disk next to the linear kernels' (layers/kernel_choice.py: per CPU
model, thread count and torch version, and per build of the C kernels; `recalibrate` drops them), so
that only the first process on a machine pays the timing (the C step's choices are made at start-up:
worker/model_runner.py).

KVFLOW_FUSED_OPS=torch | c forces one side (tests and A/B benchmarks); the default is "measure".
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

from kvflow.cache import write_atomic
from kvflow.layers import cpu_kernels, kernel_choice

logger = logging.getLogger(__name__)
_choice: dict[tuple, str] = {}
_saved: dict[str, str] | None = None  # this machine's earlier choices, by repr(key); loaded on first use


def mode() -> str:
    return os.environ.get("KVFLOW_FUSED_OPS", "measure")


def rows_class(rows: int) -> int:
    """Row counts are grouped by powers of two: a decision made for 40 rows holds for 33-64."""
    return 1 << max(0, (rows - 1).bit_length())


def choose(key: tuple, make_candidates: Callable[[], dict[str, Callable[[], object]]],
           names: tuple[str, ...] = ("c", "torch"), reps: int = 7) -> str:
    """The name of the fastest candidate for `key`. The first time a key is seen, `make_candidates()`
    builds the candidates (on scratch copies of the inputs: they are called repeatedly) and each is
    timed: best of `reps` after a warm-up, the candidates taking turns call by call, so that a slow
    spell of the machine lands on all of them (timed one after the other, a VM that slowed down
    midway had saved the AVX-512 C step for one row at 21 ms against 17 for AMX tiles). Later calls
    are a dict lookup."""
    forced = mode()
    if forced in names:
        return forced
    choice = _choice.get(key) or _saved_choices().get(repr(key))
    if choice in names:
        _choice[key] = choice
    else:
        candidates = make_candidates()
        for fn in candidates.values():
            fn()
        best = dict.fromkeys(candidates, float("inf"))
        for _ in range(reps):
            for name, fn in candidates.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
        choice = _choice[key] = min(best, key=best.get)
        logger.debug("op %s: %s (%s)", key, choice, {k: f"{v * 1e6:.1f} us" for k, v in best.items()})
        _save(repr(key), choice)
    return choice


def known(key: tuple) -> bool:
    """Whether `key` needs no timing: a side is forced, or it was chosen here or saved earlier."""
    return mode() != "measure" or key in _choice or repr(key) in _saved_choices()


def forget_saved() -> None:
    """Time every op again (recalibrate): drop this machine's saved choices and this process's."""
    global _saved
    _choice.clear()
    _saved = {}
    cache_path().unlink(missing_ok=True)


def cache_path() -> Path:
    path = kernel_choice.cache_path()  # per CPU, thread count and torch; and per build of the C kernels
    # "v2": choices timed with the candidates taking turns; older files may hold a slow spell's verdict
    name = path.name.replace("linear-", "ops-v2-").replace(".json", f"-{cpu_kernels.source_digest()}.json")
    return path.with_name(name)


def _saved_choices() -> dict[str, str]:
    global _saved
    if _saved is None:
        try:
            _saved = json.loads(cache_path().read_text())
        except (OSError, ValueError):
            _saved = {}
    return _saved


def _save(key: str, choice: str) -> None:
    """Add one choice to the file (re-read first: other processes on this machine add theirs)."""
    global _saved
    _saved = None  # re-read
    saved = _saved_choices()
    saved[key] = choice
    try:
        write_atomic(cache_path(), json.dumps(saved, indent=1, sort_keys=True))
    except OSError as e:  # a read-only cache: the choice still holds for this process
        logger.debug("op choices not saved: %s", e)


def decisions() -> dict[tuple, str]:
    return dict(_choice)
