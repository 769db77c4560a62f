"""Chunk (prefill) attention for mixed batches: each request's chunk of new query tokens attends to
its cached prefix and, causally, to itself, with every key read in place from the paged pool through
the block table (the layer has already written the chunk's own keys there).

The chunks sit back to back in the flat batch (`query_start_loc`, cu_seqlens style), so nothing is
padded to the longest chunk: a program owns one BLOCK_M tile of one request's queries for one head,
and programs past the end of a short chunk exit at once. Softmax is computed online (flash
attention), in base 2 with the scale folded in; key tiles stop at the tile's last query position.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.layers.triton import INTERPRET, dot_options, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _chunk_kernel(
    Q, K, V, Out, Tables, QueryStart, SeqLens,
    scale_log2e,
    s_qt, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_tb, s_ot, s_oh,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    r = tl.program_id(1)
    h = tl.program_id(2)
    q_first = tl.load(QueryStart + r).to(tl.int32)
    q_len = tl.load(QueryStart + r + 1).to(tl.int32) - q_first
    if tile * BLOCK_M < q_len:
        seq_len = tl.load(SeqLens + r).to(tl.int32)
        prefix = seq_len - q_len
        kh = h // GROUP
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < q_len
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        q = tl.load(Q + (q_first + offs_m)[:, None] * s_qt + h * s_qh + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        q_pos = prefix + offs_m  # rows past the chunk see every key: harmless, never stored

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        kv_end = tl.minimum(seq_len, prefix + (tile + 1) * BLOCK_M)
        for n0 in range(0, kv_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < kv_end
            block = tl.load(Tables + r * s_tb + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
            row = offs_n % BLOCK_SIZE
            k = tl.load(K + (block * s_kb + row * s_ks + kh * s_kh)[None, :] + offs_d[:, None],
                        mask=mask_d[:, None] & mask_n[None, :], other=0.0)
            v = tl.load(V + (block * s_vb + row * s_vs + kh * s_vh)[:, None] + offs_d[None, :],
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            qk = tl.dot(q, k, input_precision=PRECISION) * scale_log2e
            allowed = mask_n[None, :] & (offs_n[None, :] <= q_pos[:, None])
            qk = tl.where(allowed, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))  # key 0 is visible to every row: finite
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        o = acc / l_i[:, None]
        tl.store(Out + (q_first + offs_m)[:, None] * s_ot + h * s_oh + offs_d[None, :],
                 o.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def chunk_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, max_query_len: int, scale: float,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, Hq, D], the flat batch; request r's queries are rows query_start_loc[r]:query_start_loc[r+1]
    and its keys are its first seq_lens[r] cached positions (the chunk is the last q_len of them).
    block_tables [R, W]; caches [num_blocks, block_size, Hk, D]. Writes only the chunks' rows of `out`."""
    T, Hq, D = q.shape
    _, block_size, Hk, _ = k_cache.shape
    R = block_tables.shape[0]
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and block_tables.stride(1) == 1
    assert query_start_loc.shape[0] == R + 1 and seq_lens.shape[0] == R and Hq % Hk == 0
    if out is None:
        out = torch.empty_like(q)
    if R == 0 or max_query_len == 0:
        return out
    upcast, precision = dot_options(q.dtype)
    block_d = max(16, next_pow2(D))
    if INTERPRET:  # few, large tiles: the interpreter's cost is per operation, not per element
        block_m, block_n = 32, 64
    else:
        block_m, block_n = (64, 64) if block_d <= 128 else (64, 32)
    grid = (triton.cdiv(max_query_len, block_m), R, Hq)
    _chunk_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
        scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, GROUP=Hq // Hk, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        UPCAST=upcast, PRECISION=precision, num_warps=4 if block_d <= 64 else 8,
    )
    return out


def chunk_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                              scale: float) -> torch.Tensor:
    """Plain torch, float32, one request at a time (tests only). Rows outside every chunk are 0."""
    _, Hq, D = q.shape
    _, block_size, Hk, _ = k_cache.shape
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for r in range(block_tables.shape[0]):
        a, b, n = int(query_start_loc[r]), int(query_start_loc[r + 1]), int(seq_lens[r])
        pos = torch.arange(n, device=q.device)
        blocks = block_tables[r, pos // block_size]
        k = k_cache[blocks, pos % block_size].float().repeat_interleave(Hq // Hk, dim=1)
        v = v_cache[blocks, pos % block_size].float().repeat_interleave(Hq // Hk, dim=1)
        s = torch.einsum("qhd,nhd->hqn", q[a:b].float(), k) * scale
        q_pos = torch.arange(n - (b - a), n, device=q.device)
        s = s.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[a:b] = torch.einsum("hqn,nhd->qhd", s.softmax(-1), v)
    return out
