"""Memory figures for the benchmarks: the process's peak and current resident set, and what the
engine holds (weights as stored, possibly quantized; the KV pool; the model file's size)."""
from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (getrusage: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


def engine_memory(engine) -> dict:
    model = engine.runner.model
    seen, weights = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen and t.device.type != "meta":  # a tied tensor counts once
            seen.add(t.data_ptr())
            weights += t.numel() * t.element_size()
    kv = sum(t.numel() * t.element_size() for c in engine.runner.kv_caches for t in (c.data, c.scale) if t is not None)
    path = engine.model_path
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return {"weights_bytes": weights, "kv_cache_bytes": kv, "model_file_bytes": size}
