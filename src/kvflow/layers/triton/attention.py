"""The Triton attention backend: `paged_attention`'s signature and semantics (layers/attention.py),
with the decode group through the split-K paged decode kernel and the chunk group through the chunk
kernel, both reading the KV pool in place.

The step's new keys and values go into the pool with torch's index_copy_ (one scatter per tensor,
already a single kernel launch: a Triton kernel would not save anything)."""
from __future__ import annotations

import torch

from kvflow.layers.triton.chunk_attention import chunk_attention
from kvflow.layers.triton.paged_decode import paged_decode_attention


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def chunk_layout(g, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(query_start_loc [B+1], seq_lens [B], max_query_len) of a chunk group: the fields build_batch
    fills, or derived from token_index/valid/mask for metadata built without them."""
    if g.query_start_loc is not None:
        return g.query_start_loc, g.seq_lens, g.max_query_len
    lens = g.valid.sum(1) if g.valid is not None else torch.full((g.token_index.shape[0],), g.token_index.shape[1],
                                                                 device=device)
    starts = g.token_index[:, 0]
    qsl = torch.cat([starts, (starts[-1:] + lens[-1:])])
    last_row = g.attn_mask()[torch.arange(len(lens), device=device), 0, lens - 1]  # keys visible to the last query
    return qsl, last_row.sum(-1), int(g.token_index.shape[1])


def triton_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, meta, scale: float) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hk, D]; caches [num_blocks, block_size, Hk, D] -> [T, Hq, D]."""
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty_like(q)
    for g in meta.groups:
        if g.ctx_lens is not None:  # the decode group: the batch's first n tokens, one per request
            n = g.ctx_lens.shape[0]
            paged_decode_attention(q[:n], k_cache, v_cache, g.block_tables, g.ctx_lens, scale, out=out[:n])
        else:
            qsl, seq_lens, max_q = chunk_layout(g, q.device)
            chunk_attention(q, k_cache, v_cache, g.block_tables, qsl, seq_lens, max_q, scale, out=out)
    return out
