"""What the host CPU can do, read once from /proc/cpuinfo (Linux; elsewhere: nothing known).
Used to pick the default compute dtype and to key the kernel-choice cache."""
from __future__ import annotations

import functools
import platform


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields (model name, flags, ...)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if info:
                        break
                    continue
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_model_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_id() -> str:
    """Family and model numbers: VMs often show a generic model name ("Intel(R) Xeon(R) Processor")
    for CPUs of different generations, whose kernels and timings differ."""
    info = _cpuinfo()
    return f"{info.get('cpu family', '?')}/{info.get('model', '?')}"


def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo().get("flags", "").split())


def native_bf16_flags() -> list[str]:
    """The flags that give this CPU native bfloat16 arithmetic (AVX512-BF16 dot products or AMX tiles)."""
    return sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def has_native_bf16() -> bool:
    return bool(native_bf16_flags())
