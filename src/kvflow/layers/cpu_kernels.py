"""Builds and loads the C kernels in csrc/ (paged decode attention, small-batch matmul) with the system C compiler (about a second, once per
machine; cached under ~/.cache/kvflow). The library links libgomp by soname, so it shares the
OpenMP runtime torch already loaded. Without a compiler, or with KVFLOW_CPU_KERNELS=0, kvflow runs
the plain-torch path: same results up to float rounding."""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
_SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.c"))
GEMV_MAX_ROWS = 8  # csrc/gemv.c's MAX_M
_lib: ctypes.CDLL | None = None
_tried = False
_LIMITS = (0, 0, 0)


def _build() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler: paged decode attention runs in plain torch")
        return None
    source = b"".join(p.read_bytes() for p in _SOURCES)
    digest = hashlib.sha256(source + compiler.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("KVFLOW_CACHE", Path.home() / ".cache" / "kvflow")) / "kernels"
    target = cache / f"kvflow-kernels-{digest}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", *map(str, _SOURCES), "-o", str(tmp), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            logger.warning("building the CPU kernels failed, using plain torch: %s", result.stderr[-500:])
            return None
        os.replace(tmp, target)
    lib = ctypes.CDLL(str(target))
    args = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 6 + [ctypes.c_float]
    for fn in (lib.paged_decode_f32, lib.paged_decode_bf16):
        fn.argtypes, fn.restype = args, None
    lib.gemv_f32.argtypes, lib.gemv_f32.restype = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3, None
    return lib


def kernels() -> ctypes.CDLL | None:
    global _lib, _tried, _LIMITS
    if not _tried:
        _tried = True
        if os.environ.get("KVFLOW_CPU_KERNELS", "1") != "0":
            try:
                _lib = _build()
            except OSError as e:
                logger.warning("cannot load the CPU kernels, using plain torch: %s", e)
            if _lib is not None:
                g, d, bs = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
                _lib.kvflow_kernel_limits(ctypes.byref(g), ctypes.byref(d), ctypes.byref(bs))
                _LIMITS = (g.value, d.value, bs.value)
    return _lib


def can_run_decode(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """q: [B, Hq, D]; k_cache: [num_blocks, block_size, Hk, D]."""
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16) or kernels() is None:
        return False
    max_g, max_d, max_bs = _LIMITS
    return q.shape[1] // k_cache.shape[2] <= max_g and q.shape[2] <= max_d and k_cache.shape[1] <= max_bs


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 ctx_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one query token per request over its first ctx_lens[b] cached positions."""
    q, block_tables, ctx_lens = q.contiguous(), block_tables.contiguous(), ctx_lens.contiguous()
    assert block_tables.dtype == ctx_lens.dtype == torch.int64
    out = torch.empty_like(q)
    B, Hq, D = q.shape
    _, BS, Hk, _ = k_cache.shape
    fn = _lib.paged_decode_f32 if q.dtype == torch.float32 else _lib.paged_decode_bf16
    fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), ctx_lens.data_ptr(),
       out.data_ptr(), B, Hq, Hk, D, BS, block_tables.shape[1], scale)
    return out


def can_run_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS and x.device.type == "cpu"
            and x.dtype == weight.dtype == torch.float32 and weight.is_contiguous() and kernels() is not None)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias for a few rows of x: reads each weight row once, on every thread."""
    x = x.contiguous()
    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    _lib.gemv_f32(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.contiguous().data_ptr(),
                  y.data_ptr(), x.shape[0], weight.shape[0], weight.shape[1])
    return y
