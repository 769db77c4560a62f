"""Rotary position embedding applied in place to q and k (rotate-half layout, as layers/rotary.py and
Hugging Face Llama use): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin over the two halves of each head.
One program rotates every head of one token, so cos and sin are read once per token."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.layers.triton import next_pow2


@triton.jit
def _rotary_kernel(X, Cos, Sin, s_xt, s_xh, s_c, s_s, H, HALF: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    mask = (offs_h < H)[:, None] & mask_d[None, :]
    c = tl.load(Cos + t * s_c + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    s = tl.load(Sin + t * s_s + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    p1 = X + t * s_xt + offs_h[:, None] * s_xh + offs_d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * c - x2 * s).to(X.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * c + x1 * s).to(X.dtype.element_ty), mask=mask)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D] (may be a strided view, e.g. q and k side by side in the fused qkv output),
    rotated in place. cos, sin: [T, D] or [T, 1, D] as RotaryEmbedding.cos_sin gives them (the two
    halves repeat, only the first is read). Returns x."""
    T, H, D = x.shape
    assert x.stride(2) == 1 and D % 2 == 0
    cos, sin = cos.reshape(T, -1), sin.reshape(T, -1)
    assert cos.stride(1) == 1 and sin.stride(1) == 1
    block_h = min(16, next_pow2(H))
    if T:
        _rotary_kernel[(T, triton.cdiv(H, block_h))](x, cos, sin, x.stride(0), x.stride(1), cos.stride(0),
                                                     sin.stride(0), H, HALF=D // 2, BLOCK_H=block_h,
                                                     BLOCK_HALF=next_pow2(D // 2))
    return x


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    from kvflow.layers.rotary import apply_rotary
    T = x.shape[0]
    return apply_rotary(x, cos.reshape(T, 1, -1), sin.reshape(T, 1, -1))
