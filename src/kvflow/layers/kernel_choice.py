"""Which kernel runs each linear layer, chosen by measurement on the machine itself.

A linear layer can often run more than one way (float32: torch/MKL or the C kernel of csrc/gemv.c;
int8: W8A8 through torch._int_mm or W8A16 through torch._weight_int8pack_mm; int4: torch's packed
int4 kernel or unpack + one bf16 matmul). Which is fastest depends on the CPU and on the number of
rows: the C decode kernel that won 2x on an AMD EPYC lost 40% on an Intel Xeon. So at first start
kvflow times every way on the model's real shapes for a few row counts (ROW_BUCKETS), with the
model's own weights (rotating over the layers, so weights come from memory as in a real step), and
each layer then runs the fastest per row-count bucket. The choice is cached per CPU model, thread
count and torch version under $KVFLOW_CACHE (default ~/.cache/kvflow)/calibration; recalibrate=True
times again. KVFLOW_LINEAR_KERNELS="float=torch,int8=w8a8,int4=int4pack" (or force()) fixes the
choice instead, for tests and experiments.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from kvflow.cache import cache_dir, write_atomic

logger = logging.getLogger(__name__)

ROW_BUCKETS = (1, 4, 8, 16, 64, 256)  # a call with M rows uses the bucket of the smallest bound >= M
_SLOW_CALL_S = 0.01
_REPS = 3  # timed calls per (shape, rows, kernel): the minimum is kept (robust to a busy machine)
_forced: dict[str, str] = {}


@dataclass(frozen=True)
class KernelPlan:
    """One kernel per row bucket."""
    names: tuple[str, ...]
    fns: tuple[Callable, ...]

    @classmethod
    def single(cls, fn: Callable, name: str = "default") -> KernelPlan:
        return cls((name,) * len(ROW_BUCKETS), (fn,) * len(ROW_BUCKETS))

    def pick(self, rows: int) -> Callable:
        i = bisect.bisect_left(ROW_BUCKETS, rows)
        return self.fns[min(i, len(ROW_BUCKETS) - 1)]


def force(choices: dict[str, str] | None) -> None:
    """Fix the kernel per layer kind ("float" / "int8" / "int4" -> kernel name) for every row count;
    None clears it. Applies to models calibrated afterwards."""
    _forced.clear()
    _forced.update(choices or {})


def _forced_choices() -> dict[str, str]:
    env = os.environ.get("KVFLOW_LINEAR_KERNELS", "")
    out = dict(item.split("=", 1) for item in env.split(",") if "=" in item)
    out.update(_forced)
    return out


def cache_key() -> dict:
    from kvflow.cpu_info import cpu_id, cpu_model_name
    return {"cpu": cpu_model_name(), "cpu_id": cpu_id(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def cache_path() -> Path:
    root = cache_dir("calibration")
    digest = hashlib.sha256(json.dumps(cache_key(), sort_keys=True).encode()).hexdigest()[:16]
    return root / f"linear-{digest}.json"


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if data.get("key") == cache_key() else {}
    except (OSError, ValueError):
        return {}


def _save_cache(path: Path, data: dict) -> None:
    try:
        write_atomic(path, json.dumps(data, indent=1, sort_keys=True))
    except OSError as e:
        logger.info("could not cache the kernel choice in %s: %s", path, e)


def _time(fn: Callable, inputs: list[torch.Tensor], rival: float, reps: int = _REPS) -> float:
    """Seconds per call: the fastest of `reps` calls, each on the next layer's weights. A slow call
    is timed once, and not again when the warm-up alone is 3x the best rival's time: calibration
    must stay short, and such a kernel loses either way."""
    t0 = time.perf_counter()
    fn(0, inputs[0])  # warm-up: first-call allocations, oneDNN primitive creation
    best = time.perf_counter() - t0
    if best > _SLOW_CALL_S:
        reps = 0 if best > 3 * rival else 1
    for r in range(reps):
        t0 = time.perf_counter()
        fn(r + 1, inputs[r % len(inputs)])
        best = min(best, time.perf_counter() - t0)
    return best


def _measure(layers: list, dtype: torch.dtype) -> dict:
    """{bucket: {kernel: seconds}} for one group of same-shaped layers."""
    k = layers[0].in_features
    timings: dict[str, dict[str, float]] = {}
    gen = torch.Generator().manual_seed(0)
    for rows in ROW_BUCKETS:
        inputs = [torch.randn(rows, k, generator=gen).to(dtype) for _ in range(2)]
        names = layers[0].kernel_methods(rows)
        per = {}
        t0 = time.perf_counter()
        for name in names:
            def call(i, x, name=name):
                return layers[i % len(layers)].kernel_methods(rows)[name](x)
            per[name] = _time(call, inputs, min(per.values(), default=float("inf")))
        timings[str(rows)] = per
        logger.debug("%s rows %d: %.2f s", layers[0].kernel_signature(), rows, time.perf_counter() - t0)
    return timings


def _plan(layer, names: list[str]) -> KernelPlan:
    fns = [layer.kernel_methods(rows)[name] for rows, name in zip(ROW_BUCKETS, names)]
    return KernelPlan(tuple(names), tuple(fns))


@torch.inference_mode()
def calibrate(model: torch.nn.Module, recalibrate: bool = False) -> dict[str, list[str]]:
    """Give every choosable layer of `model` its per-bucket kernel; returns {signature: names}."""
    groups: dict[str, list] = {}
    for module in model.modules():
        if hasattr(module, "kernel_methods"):
            groups.setdefault(module.kernel_signature(), []).append(module)
    if not groups:
        return {}
    forced = _forced_choices()
    path = cache_path()
    data = {} if recalibrate else _load_cache(path)
    data.setdefault("key", cache_key())
    entries = data.setdefault("layers", {})
    dirty, t0 = False, time.perf_counter()
    chosen = {}
    dtype = _compute_dtype(model)
    for sig, layers in groups.items():
        first = layers[0]
        sig_key = f"{sig}:{str(dtype).removeprefix('torch.')}"
        kind = first.kernel_kind()
        if kind in forced:
            names = [_forced_name(first, rows, forced[kind]) for rows in ROW_BUCKETS]
        elif all(len(first.kernel_methods(rows)) == 1 for rows in ROW_BUCKETS):  # nothing to choose
            names = [next(iter(first.kernel_methods(rows))) for rows in ROW_BUCKETS]
        else:
            entry = entries.get(sig_key)
            available = [sorted(first.kernel_methods(rows)) for rows in ROW_BUCKETS]
            if entry is None or entry.get("available") != available:
                timings = _measure(layers, dtype)
                entry = {"available": available, "seconds": timings,
                         "choice": [min(timings[str(r)], key=timings[str(r)].get) for r in ROW_BUCKETS]}
                entries[sig_key] = entry
                dirty = True
            names = entry["choice"]
        plan = _plan(first, names)
        for layer in layers:
            layer.set_kernel_plan(_plan(layer, names) if layer is not first else plan)
        chosen[sig_key] = names
    if dirty:
        logger.info("timed the linear kernels in %.1f s: %s", time.perf_counter() - t0, _summary(chosen))
        _save_cache(path, data)
    else:
        logger.debug("linear kernels (cached in %s): %s", path, _summary(chosen))
    return chosen


def _forced_name(layer, rows: int, name: str) -> str:
    methods = layer.kernel_methods(rows)
    if name in methods:
        return name
    if "torch" in methods:  # e.g. gemv forced, but this row count is past what the C kernel takes
        return "torch"
    raise ValueError(f"kernel {name!r} is not one of {sorted(methods)} for {layer.kernel_signature()}")


def _compute_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _summary(chosen: dict[str, list[str]]) -> str:
    return "; ".join(f"{sig} " + ",".join(f"{r}:{n}" for r, n in zip(ROW_BUCKETS, names))
                     for sig, names in chosen.items())
