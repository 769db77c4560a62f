"""KV cache precision: how keys and values are stored in the paged pool, and how they are written
and read back.

    auto      the compute dtype
    float32 / bfloat16
    fp8       float8 e4m3 (torch.float8_e4m3fn), no scale (vLLM's default scale of 1.0): e4m3 keeps
              3 mantissa bits at any magnitude up to 448, which key and value activations stay under
    int8      symmetric int8 with one float32 scale per token and kv head, stored beside the cache

Each layer's cache is a LayerKVCache: `data` [2 (k, v), num_blocks, block_size, kv_heads, head_dim]
in the storage dtype, and for int8 `scale` [2, num_blocks, block_size, kv_heads]. The paged decode C
kernel reads the stored form directly; the torch path dequantizes only the blocks it gathers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvflow.config import KV_CACHE_DTYPES, check_kv_cache_dtype  # noqa: F401 (re-exported)

FP8_MAX = 448.0  # largest finite float8_e4m3fn: larger values would become NaN, so writes clamp
INT8_MAX = 127.0


def storage_dtype(name: str, compute_dtype: torch.dtype) -> torch.dtype:
    name = check_kv_cache_dtype(name)
    return {"auto": compute_dtype, "float32": torch.float32, "bfloat16": torch.bfloat16,
            "fp8": torch.float8_e4m3fn, "int8": torch.int8}[name]


def has_scale(dtype: torch.dtype) -> bool:
    return dtype == torch.int8


def bytes_per_token_head(head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one (token, kv head) of K or V takes: the values, plus a float32 scale for int8."""
    elem = torch.empty((), dtype=dtype).element_size()
    return head_dim * elem + (4 if has_scale(dtype) else 0)


@dataclass
class LayerKVCache:
    data: torch.Tensor  # [2, num_blocks, block_size, kv_heads, head_dim], storage dtype
    scale: torch.Tensor | None = None  # [2, num_blocks, block_size, kv_heads] float32 (int8 only)

    @classmethod
    def allocate(cls, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> "LayerKVCache":
        data = torch.zeros((2, num_blocks, block_size, kv_heads, head_dim), dtype=dtype, device=device)
        scale = (torch.zeros((2, num_blocks, block_size, kv_heads), dtype=torch.float32, device=device)
                 if has_scale(dtype) else None)
        return cls(data, scale)

    # (k_cache, v_cache) = cache[0], cache[1] keeps working as with the plain tensor it replaces
    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [T, H, D] in the compute dtype -> (values in `dtype`, per (token, head) scale or None)."""
    if dtype == torch.int8:
        x32 = x.float()
        scale = x32.abs().amax(dim=-1).clamp_min(1e-8) / INT8_MAX  # [T, H]
        q = torch.round(x32 / scale[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        return q, scale
    if dtype == torch.float8_e4m3fn:
        return x.clamp(-FP8_MAX, FP8_MAX).to(dtype), None
    return x.to(dtype), None


def dequantize(values: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """values [..., H, D] (with scale [..., H] for int8) -> the compute dtype."""
    if scale is None:
        return values.to(dtype)
    return (values.float() * scale[..., None]).to(dtype)


def write(cache_data: torch.Tensor, cache_scale: torch.Tensor | None, slots: torch.Tensor, x: torch.Tensor) -> None:
    """Store x [T, H, D] at flat cache slots. cache_data: [num_blocks, block_size, H, D] (k or v)."""
    H, D = x.shape[1], x.shape[2]
    values, scale = quantize(x, cache_data.dtype)
    if values.dtype == torch.float8_e4m3fn:  # index_copy_ has no float8 CPU kernel: copy the bytes
        cache_data, values = cache_data.view(torch.uint8), values.view(torch.uint8)
    cache_data.view(-1, H, D).index_copy_(0, slots, values)
    if cache_scale is not None:
        cache_scale.view(-1, H).index_copy_(0, slots, scale)
