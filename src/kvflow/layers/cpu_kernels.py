"""Builds and loads the C kernels in csrc/ (paged decode attention, small-batch matmul, fused ops,
whole decode steps) with the system C compiler (a few seconds, once per machine; cached under
~/.cache/kvflow). The library links libgomp by soname, so it shares the
OpenMP runtime torch already loaded. Without a compiler, or with KVFLOW_CPU_KERNELS=0, kvflow runs
the plain-torch path: same results up to float rounding."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

from kvflow.cache import cache_dir

logger = logging.getLogger(__name__)
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = sorted(_CSRC.glob("*.c"))
GEMV_MAX_ROWS = 8  # csrc/gemv.c's MAX_M
_lib: ctypes.CDLL | None = None
_tried = False
_LIMITS = (0, 0, 0)
# Query and cache dtypes the decode kernel reads (csrc/paged_decode.c: paged_decode_<q>_<cache>).
_DECODE_Q = {torch.float32: "f32", torch.bfloat16: "bf16"}
_FUSED = {torch.float32: "f32", torch.bfloat16: "bf16"}  # csrc/fused_ops.c
_DECODE_CACHE = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8", torch.int8: "i8"}


# -ffp-contract=off: a * b + c stays two roundings unless a kernel asks for a fused multiply-add, so the
# AMX and plain int8 epilogues (and the C step and torch) round alike
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-Werror=implicit-function-declaration", "-fopenmp", "-shared", "-fPIC"]


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@functools.cache
def source_digest() -> str:
    """Names this build of the kernels (sources, headers, compiler, flags): the library's file, and the
    timed choices between it and torch (layers/op_select.py), which a changed kernel invalidates."""
    source = b"".join(p.read_bytes() for p in sorted(_CSRC.glob("*.[ch]")))
    return hashlib.sha256(source + " ".join([str(_compiler()), *_FLAGS]).encode()).hexdigest()[:16]


def _build() -> ctypes.CDLL | None:
    compiler = _compiler()
    if compiler is None:
        logger.info("no C compiler: paged decode attention runs in plain torch")
        return None
    digest = source_digest()
    cache = cache_dir("kernels")
    target = cache / f"kvflow-kernels-{digest}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        cmd = [compiler, *_FLAGS, *map(str, _SOURCES), "-o", str(tmp), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            logger.warning("building the CPU kernels failed, using plain torch: %s", result.stderr[-500:])
            return None
        os.replace(tmp, target)
    lib = ctypes.CDLL(str(target))
    args = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 6 + [ctypes.c_float] + [ctypes.c_void_p] * 4
    for qt in _DECODE_Q.values():
        for ct in _DECODE_CACHE.values():
            fn = getattr(lib, f"paged_decode_{qt}_{ct}")
            fn.argtypes, fn.restype = args, None
    lib.paged_decode_amx_f32_bf16.argtypes, lib.paged_decode_amx_f32_bf16.restype = args, ctypes.c_int
    lib.gemv_f32.argtypes, lib.gemv_f32.restype = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3, None
    p, i = ctypes.c_void_p, ctypes.c_int
    for t in _FUSED.values():  # csrc/fused_ops.c
        getattr(lib, f"add_rmsnorm_{t}").argtypes = [p, p, p, p, i, i, ctypes.c_float]
        getattr(lib, f"silu_mul_{t}").argtypes = [p, p, i, i]
        getattr(lib, f"rotary_{t}").argtypes = [p, i, i, i, i, p, p]
        for name in ("add_rmsnorm", "silu_mul", "rotary"):
            getattr(lib, f"{name}_{t}").restype = None
    lib.fused_decode_step.argtypes, lib.fused_decode_step.restype = [p, p], i  # csrc/fused_decode.c
    lib.fused_linear.argtypes, lib.fused_linear.restype = [p, p, i, p], i
    lib.fused_use_amx.argtypes, lib.fused_use_amx.restype = [i], i
    lib.lse_argmax_f32.argtypes, lib.lse_argmax_f32.restype = [p, i, i, p, p], i
    lib.topk_f32.argtypes, lib.topk_f32.restype = [p, i, i, i, p], i
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
    if (q.device.type != "cpu" or q.dtype not in _DECODE_Q or k_cache.dtype not in _DECODE_CACHE
            or kernels() is None):
        return False
    max_g, max_d, max_bs = _LIMITS
    return q.shape[1] // k_cache.shape[2] <= max_g and q.shape[2] <= max_d and k_cache.shape[1] <= max_bs


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 ctx_lens: torch.Tensor, scale: float, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None, tree_start: torch.Tensor | None = None,
                 tree_bits: torch.Tensor | None = None, amx: bool = False) -> torch.Tensor:
    """Attention of one query token per request over its first ctx_lens[b] cached positions.
    The caches are read in their stored dtype (k_scale / v_scale [num_blocks, block_size, Hk]
    float32 for int8), never copied. Draft-tree rows (int64 [B] each): row b sees the keys before
    tree_start[b], and past it only those whose bit (position - tree_start[b]) is set in tree_bits[b].
    amx: float32 queries on a bfloat16 cache are scored with AMX tiles where that applies (the C step's
    choice; the queries rounded to bfloat16), else by the AVX-512 kernel."""
    q, block_tables, ctx_lens = q.contiguous(), block_tables.contiguous(), ctx_lens.contiguous()
    tree = None if tree_start is None else (tree_start.contiguous(), tree_bits.contiguous())  # alive for the call
    assert block_tables.dtype == ctx_lens.dtype == torch.int64
    assert tree is None or tree[0].dtype == tree[1].dtype == torch.int64
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert (k_scale is None) == (k_cache.dtype != torch.int8) and (v_scale is None) == (k_scale is None)
    out = torch.empty_like(q)
    B, Hq, D = q.shape
    _, BS, Hk, _ = k_cache.shape
    args = (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), ctx_lens.data_ptr(),
            out.data_ptr(), B, Hq, Hk, D, BS, block_tables.shape[1], scale,
            None if k_scale is None else k_scale.data_ptr(), None if v_scale is None else v_scale.data_ptr(),
            *((None, None) if tree is None else (tree[0].data_ptr(), tree[1].data_ptr())))
    if amx and q.dtype == torch.float32 and k_cache.dtype == torch.bfloat16 and _lib.paged_decode_amx_f32_bf16(*args):
        return out
    getattr(_lib, f"paged_decode_{_DECODE_Q[q.dtype]}_{_DECODE_CACHE[k_cache.dtype]}")(*args)
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


# ---------------- fused non-matmul ops (csrc/fused_ops.c) ----------------
def can_run_fused(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _FUSED and kernels() is not None


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x + residual) * weight; `residual` (contiguous) becomes x + residual in place."""
    x = x.contiguous()
    assert residual is None or (residual.is_contiguous() and residual.dtype == x.dtype)
    T, H = x.numel() // x.shape[-1], x.shape[-1]
    out = torch.empty_like(x)
    w = weight if weight.dtype == x.dtype else weight.to(x.dtype)
    getattr(_lib, f"add_rmsnorm_{_FUSED[x.dtype]}")(
        x.data_ptr(), None if residual is None else residual.data_ptr(), w.contiguous().data_ptr(), out.data_ptr(),
        T, H, eps)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for rows [gate | up] of the fused gate_up projection: [T, 2I] -> [T, I]."""
    gate_up = gate_up.contiguous()
    T, I2 = gate_up.shape
    out = torch.empty(T, I2 // 2, dtype=gate_up.dtype)
    getattr(_lib, f"silu_mul_{_FUSED[gate_up.dtype]}")(gate_up.data_ptr(), out.data_ptr(), T, I2 // 2)
    return out


def lse_argmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's log-sum-exp and first argmax (float32 [S, V] logits on the CPU), or None when the
    kernels are off or a row holds NaN."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2 or kernels() is None:
        return None
    logits = logits.contiguous()
    lse, argmax = torch.empty(logits.shape[0]), torch.empty(logits.shape[0], dtype=torch.long)
    if _lib.lse_argmax_f32(logits.data_ptr(), logits.shape[0], logits.shape[1], lse.data_ptr(), argmax.data_ptr()):
        return None
    return lse, argmax


def topk_indices(logits: torch.Tensor, k: int) -> torch.Tensor | None:
    """The indices of each row's k (<= 32) largest values, largest first (float32 [S, V] on the
    CPU), or None when the kernels are off or a row has fewer than k values above -inf. Ties may
    order differently from torch.topk."""
    if (logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2 or not 0 < k <= 32
            or kernels() is None):
        return None
    logits = logits.contiguous()
    idx = torch.empty(logits.shape[0], k, dtype=torch.long)
    if _lib.topk_f32(logits.data_ptr(), logits.shape[0], logits.shape[1], k, idx.data_ptr()):
        return None
    return idx


def rotary_(rows: torch.Tensor, num_heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate, in place, the first num_heads heads of each row of rows [T, stride] (contiguous);
    cos / sin: float32 [T, head_dim]."""
    assert rows.is_contiguous() and cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous()
    T, stride = rows.shape
    getattr(_lib, f"rotary_{_FUSED[rows.dtype]}")(rows.data_ptr(), T, stride, num_heads, head_dim,
                                                  cos.data_ptr(), sin.data_ptr())
