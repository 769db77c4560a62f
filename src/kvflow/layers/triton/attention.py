"""The Triton attention backend: `paged_attention`'s signature and semantics (layers/attention.py),
with the decode group through the split-K paged decode kernel and the chunk group through the chunk
kernel, both reading the KV pool in place.

Prompt chunks with no cached prefix (`causal_fresh`) attend only to their own new keys, which is
plain causal attention: on a GPU, torch's SDPA (FlashAttention / cuDNN kernels) over the fresh k and
v, one call per chunk, may beat the paged chunk kernel. Which one runs is measured on this GPU the
first time each (heads, head_dim, chunk length class, chunk count class) is seen (layers/op_select.py,
which keeps the choice on disk).

The step's new keys and values go into the pool with the rotary kernel (layers/triton/rotary.py,
`kv_written`), or else with torch's index_copy_, one scatter per tensor."""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from kvflow.layers import op_select
from kvflow.layers.triton import next_pow2
from kvflow.layers.triton.chunk_attention import chunk_attention
from kvflow.layers.triton.paged_decode import paged_decode_attention

logger = logging.getLogger(__name__)


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
                           v_cache: torch.Tensor, meta, scale: float, kv_written: bool = False) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hk, D]; caches [num_blocks, block_size, Hk, D] -> [T, Hq, D]."""
    if not kv_written:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty_like(q)
    for g in meta.groups:
        if g.ctx_lens is not None:  # the decode group: the batch's first n tokens, one per request
            n = g.ctx_lens.shape[0]
            paged_decode_attention(q[:n], k_cache, v_cache, g.block_tables, g.ctx_lens, scale, out=out[:n])
        elif g.causal_fresh and g.query_starts is not None and _fresh_by_sdpa(q, k, v, k_cache, v_cache, g, scale):
            fresh_chunk_attention(q, k, v, g.query_starts, scale, out)
        else:
            qsl, seq_lens, max_q = chunk_layout(g, q.device)
            chunk_attention(q, k_cache, v_cache, g.block_tables, qsl, seq_lens, max_q, scale, out=out)
    return out


def fresh_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_starts: list[int], scale: float,
                          out: torch.Tensor) -> torch.Tensor:
    """Causal attention of each chunk q[a:b] over its own k[a:b], v[a:b] (chunks back to back,
    query_starts[r]:query_starts[r+1]), written into out's rows of those chunks.

    Each chunk runs padded to a bucket length (padded_length): the rows after a causal chunk change
    nothing for the rows before them, and SDPA's cuDNN kernels build an execution plan per sequence
    length (~70 ms on an H200), which a server that sees every prompt length would pay again and again."""
    T = q.shape[0]
    for a, b in zip(query_starts[:-1], query_starts[1:]):
        n = b - a
        L = padded_length(n)
        if a + L <= T:  # the rows after the chunk are the next chunks' (or padding): views, no copy
            qc, kc, vc = q[a:a + L], k[a:a + L], v[a:a + L]
        else:
            qc, kc, vc = (F.pad(x[a:b], (0, 0, 0, 0, 0, L - n)) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qc.transpose(0, 1)[None], kc.transpose(0, 1)[None],
                                           vc.transpose(0, 1)[None], is_causal=True, scale=scale,
                                           enable_gqa=k.shape[1] != q.shape[1])
        out[a:b] = o[0, :, :n].transpose(0, 1)
    return out


def padded_length(n: int) -> int:
    """Chunk lengths in buckets: powers of two up to 256, then multiples of 256 (at most 255
    padding rows, under 3% of a chunk of 8k; 32 lengths up to 8k)."""
    return next_pow2(n) if n <= 256 else -(-n // 256) * 256


def _fresh_by_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   g, scale: float) -> bool:
    """Whether SDPA measured faster than the chunk kernel for chunks of this shape class (GPU only:
    under the interpreter the Triton kernel is what is being tested)."""
    if not q.is_cuda:
        return False
    starts = g.query_starts
    key = ("fresh_chunk_attention", _gpu_name(q.device), q.dtype, q.shape[1], k.shape[1], q.shape[2],
           op_select.rows_class(g.max_query_len), op_select.rows_class(len(starts) - 1))

    def candidates():
        scratch = torch.empty_like(q)
        qsl, seq_lens, max_q = chunk_layout(g, q.device)

        def timed(fn):  # the GPU runs asynchronously: each call ends with a sync, so the host clock counts its work
            return lambda: (fn(), torch.cuda.synchronize(q.device))

        def paged():
            chunk_attention(q, k_cache, v_cache, g.block_tables, qsl, seq_lens, max_q, scale, out=scratch)
        found = {"triton": timed(paged)}
        try:
            fresh_chunk_attention(q, k, v, starts, scale, scratch)
            found["sdpa"] = timed(lambda: fresh_chunk_attention(q, k, v, starts, scale, scratch))
        except RuntimeError as e:  # no SDPA kernel for this shape or dtype here: the chunk kernel it is
            logger.info("SDPA cannot run fresh chunks of %s: %s", key, e)
        return found

    return op_select.choose(key, candidates, names=("triton", "sdpa"), reps=3) == "sdpa"


@functools.cache
def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)
