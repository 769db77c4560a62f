"""Paged decode attention: one query token per request against its cached keys and values, read in
place from the paged pool ([num_blocks, block_size, kv_heads, head_dim] for k and for v) through
the request's block table.

One program handles one (request, kv head, split): the kv head's GQA query heads are the rows of
one tile (padded to 16, tl.dot's minimum), so each key is read once for the whole group. Keys are
gathered token by token (block = table[pos // block_size], row pos % block_size), which serves any
block size. Long contexts are cut into `num_splits` ranges (split-K, "flash decoding") so batch 1
with a long context still fills the GPU; a second kernel merges the splits by their log-sum-exp.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvflow.layers.triton import INTERPRET, dot_options, next_pow2

LOG2E = 1.4426950408889634
MIN_SPLIT_TOKENS = 256  # below this a split's fixed cost outweighs the parallelism it adds


@triton.jit
def _decode_split_kernel(
    Q, K, V, Tables, CtxLens, Out, PartO, PartLse,
    scale_log2e,
    s_qb, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_tb, s_ob, s_oh,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(CtxLens + b).to(tl.int32)
    # Each split covers a whole number of BLOCK_N tiles; trailing splits may be empty.
    per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)

    offs_g = tl.arange(0, BLOCK_G)
    heads = kh * GROUP + offs_g
    mask_g = offs_g < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        block = tl.load(Tables + b * s_tb + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        row = offs_n % BLOCK_SIZE
        k = tl.load(K + (block * s_kb + row * s_ks + kh * s_kh)[None, :] + offs_d[:, None],
                    mask=mask_d[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
        v = tl.load(V + (block * s_vb + row * s_vs + kh * s_vh)[:, None] + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, k, input_precision=PRECISION) * scale_log2e
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    mask_out = mask_g[:, None] & mask_d[None, :]
    if NUM_SPLITS == 1:
        o = acc / l_i[:, None]
        tl.store(Out + b * s_ob + heads[:, None] * s_oh + offs_d[None, :], o.to(Out.dtype.element_ty), mask=mask_out)
    else:
        # Partials are [B, Hq, NUM_SPLITS, HEAD_DIM] and [B, Hq, NUM_SPLITS], contiguous.
        row_idx = (b * GROUP * tl.num_programs(1) + heads) * NUM_SPLITS + split
        has_keys = l_i > 0
        o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(PartO + row_idx[:, None] * HEAD_DIM + offs_d[None, :], o, mask=mask_out)
        tl.store(PartLse + row_idx, lse, mask=mask_g)


@triton.jit
def _decode_reduce_kernel(
    PartO, PartLse, Out, s_ob, s_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    row0 = (b * tl.num_programs(1) + h) * NUM_SPLITS
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(PartLse + row0 + offs_s, mask=mask_s, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # split 0 always holds keys, so the max is finite
    o = tl.load(PartO + (row0 + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    o = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(Out + b * s_ob + h * s_oh + offs_d, o.to(Out.dtype.element_ty), mask=mask_d)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: only decides how often the tests take the split path


def choose_num_splits(batch: int, kv_heads: int, max_ctx: int, device: torch.device) -> int:
    """Enough (request, head, split) programs to cover the GPU twice, none shorter than
    MIN_SPLIT_TOKENS. Decided from host-side sizes only: no device sync."""
    by_length = math.ceil(max_ctx / MIN_SPLIT_TOKENS)
    by_occupancy = math.ceil(2 * _sm_count(device) / max(1, batch * kv_heads))
    return max(1, min(by_length, by_occupancy, 64))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None, num_splits: int | None = None) -> torch.Tensor:
    """q: [B, Hq, D]; caches [num_blocks, block_size, Hk, D]; block_tables [B, W]; ctx_lens [B] (>= 1).
    Writes into `out` ([B, Hq, D], may be a view of a larger buffer) and returns it."""
    B, Hq, D = q.shape
    _, block_size, Hk, _ = k_cache.shape
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and block_tables.stride(1) == 1
    assert Hq % Hk == 0
    if out is None:
        out = torch.empty_like(q)
    if B == 0:
        return out
    group = Hq // Hk
    if num_splits is None:
        num_splits = choose_num_splits(B, Hk, block_tables.shape[1] * block_size, q.device)
    upcast, precision = dot_options(q.dtype)
    block_d = max(16, next_pow2(D))
    block_n = 64 if INTERPRET else (32 if block_d > 128 else 64)
    if num_splits > 1:
        part_o = torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    _decode_split_kernel[(B, Hk, num_splits)](
        q, k_cache, v_cache, block_tables, ctx_lens, out, part_o, part_lse,
        scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, GROUP=group, BLOCK_G=max(16, next_pow2(group)), HEAD_DIM=D, BLOCK_D=block_d,
        BLOCK_N=block_n, NUM_SPLITS=num_splits, UPCAST=upcast, PRECISION=precision,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(B, Hq)](part_o, part_lse, out, out.stride(0), out.stride(1),
                                       HEAD_DIM=D, BLOCK_D=block_d, NUM_SPLITS=num_splits,
                                       BLOCK_S=max(2, next_pow2(num_splits)))
    return out


def paged_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain torch, float32, one request at a time (tests only)."""
    B, Hq, D = q.shape
    _, block_size, Hk, _ = k_cache.shape
    out = torch.empty(B, Hq, D, dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(ctx_lens[b])
        pos = torch.arange(n, device=q.device)
        blocks = block_tables[b, pos // block_size]
        k = k_cache[blocks, pos % block_size].float().repeat_interleave(Hq // Hk, dim=1)  # [n, Hq, D]
        v = v_cache[blocks, pos % block_size].float().repeat_interleave(Hq // Hk, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", s.softmax(-1), v)
    return out
