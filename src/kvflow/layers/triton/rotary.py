"""Rotary position embedding applied in place to q and k (rotate-half layout, as layers/rotary.py and
Hugging Face Llama use): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin over the two halves of each head.
One program rotates a tile of heads of one token, so cos and sin are read once per token.

`rotary_and_write_kv_` also stores the rotated keys and the values into the paged KV pool at each
token's slot: one kernel per layer instead of three (rotary, then a scatter each for k and v). At
batch 1 a decode step is ~350 small kernels, and each costs a few microseconds whatever its size."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.layers.triton import next_pow2


@triton.jit
def _rotary_kernel(X, Cos, Sin, KCache, VCache, Slots, s_xt, s_xh, s_c, s_s, s_slot,
                   H_ROT, H_Q, H_ALL, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   WRITE_KV: tl.constexpr):
    """Heads [0, H_ROT) of token t are rotated in place. With WRITE_KV the row holds q, k, v heads
    side by side (H_Q query heads, then H_ROT - H_Q key heads, then as many value heads, H_ALL in
    all): heads from H_Q on also go to the caches ([slots, kv_heads, 2 * HALF], slot stride s_slot)."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    rotate = offs_h < H_ROT
    c = tl.load(Cos + t * s_c + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    s = tl.load(Sin + t * s_s + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    p1 = X + t * s_xt + offs_h[:, None] * s_xh + offs_d[None, :]
    mask = (offs_h < H_ALL)[:, None] & mask_d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
    r1 = (x1.to(tl.float32) * c - x2.to(tl.float32) * s).to(X.dtype.element_ty)
    r2 = (x2.to(tl.float32) * c + x1.to(tl.float32) * s).to(X.dtype.element_ty)
    rot_mask = mask & rotate[:, None]
    tl.store(p1, r1, mask=rot_mask)
    tl.store(p1 + HALF, r2, mask=rot_mask)
    if WRITE_KV:
        slot = tl.load(Slots + t).to(tl.int64)
        is_k = (offs_h >= H_Q) & rotate
        is_v = offs_h >= H_ROT
        head = tl.where(is_k, offs_h - H_Q, offs_h - H_ROT)
        dst = slot * s_slot + head[:, None] * (2 * HALF) + offs_d[None, :]
        k_mask = mask & is_k[:, None]
        v_mask = mask & is_v[:, None]
        tl.store(KCache + dst, r1, mask=k_mask)
        tl.store(KCache + dst + HALF, r2, mask=k_mask)
        tl.store(VCache + dst, x1, mask=v_mask)
        tl.store(VCache + dst + HALF, x2, mask=v_mask)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D] (may be a strided view, e.g. q and k side by side in the fused qkv output),
    rotated in place. cos, sin: [T, D] or [T, 1, D] as RotaryEmbedding.cos_sin gives them (the two
    halves repeat, only the first is read). Returns x."""
    T, H, D = x.shape
    _launch(x, H, H, H, cos, sin, x, x, x, 0, write_kv=False)
    return x


def rotary_and_write_kv_(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """qkv: [T, Hq + 2 Hk, D] (the fused qkv output viewed per head). Rotates its q and k heads in
    place and writes the rotated k and the v of token t into the caches ([num_blocks, block_size, Hk,
    D], contiguous) at slot_mapping[t]. Returns qkv."""
    T, H, D = qkv.shape
    assert H == num_heads + 2 * num_kv_heads and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k_cache.shape[-2:] == (num_kv_heads, D) and slot_mapping.shape == (T,)
    _launch(qkv, num_heads + num_kv_heads, num_heads, H, cos, sin, k_cache, v_cache, slot_mapping,
            num_kv_heads * D, write_kv=True)
    return qkv


def _launch(x, h_rot, h_q, h_all, cos, sin, k_cache, v_cache, slots, slot_stride, write_kv: bool) -> None:
    T, _, D = x.shape
    assert x.stride(2) == 1 and D % 2 == 0
    cos, sin = cos.reshape(T, -1), sin.reshape(T, -1)
    assert cos.stride(1) == 1 and sin.stride(1) == 1
    block_h = min(16, next_pow2(h_all))
    if T:
        _rotary_kernel[(T, triton.cdiv(h_all, block_h))](
            x, cos, sin, k_cache, v_cache, slots, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), slot_stride,
            h_rot, h_q, h_all, HALF=D // 2, BLOCK_H=block_h, BLOCK_HALF=next_pow2(D // 2), WRITE_KV=write_kv)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    from kvflow.layers.rotary import apply_rotary
    T = x.shape[0]
    return apply_rotary(x, cos.reshape(T, 1, -1), sin.reshape(T, 1, -1))
