"""Paged attention in plain PyTorch (the fallback every device can run).

Each layer writes the step's new keys and values straight into the paged cache through
`slot_mapping`, then attends over the cache through block tables. The step's requests come in at
most two groups: decodes (one query token each) and prompt chunks (padded to the longest chunk), so a
layer makes at most two attention calls whatever the batch size: no loop over requests.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvflow.layers import cpu_kernels


@dataclass
class AttentionGroup:
    token_index: torch.Tensor  # [B, Q] flat token index of each query (padding repeats a valid one)
    valid: torch.Tensor | None  # [B, Q] bool, None when every query is real (decodes)
    block_tables: torch.Tensor  # [B, max_blocks]
    mask: torch.Tensor  # [B, 1, Q, L] bool, True where the query may attend the key
    ctx_lens: torch.Tensor | None = None  # [B] keys per request; set on the decode group, rows [0, B)
    # True when `mask` is not causal (draft-tree ancestor masks): a backend that would infer a
    # causal mask from positions must use `mask` as it is for this group.
    tree: bool = False


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    groups: list[AttentionGroup]


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hk, D]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    for g in meta.groups:
        if g.ctx_lens is not None and cpu_kernels.can_run_decode(q, k_cache):
            n = g.ctx_lens.shape[0]  # the decode group is the batch's first n tokens
            out[:n] = cpu_kernels.paged_decode(q[:n], k_cache, v_cache, g.block_tables, g.ctx_lens, scale)
            continue
        B = g.block_tables.shape[0]
        qg = q[g.token_index].transpose(1, 2)  # [B, Hq, Q, D]
        kg = k_cache[g.block_tables].view(B, -1, num_kv_heads, head_dim).transpose(1, 2)
        vg = v_cache[g.block_tables].view(B, -1, num_kv_heads, head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=scale,
                                           enable_gqa=num_kv_heads != q.shape[1])
        o = o.transpose(1, 2)  # [B, Q, Hq, D]
        if g.valid is None:
            out[g.token_index.view(-1)] = o.reshape(-1, *q.shape[1:])
        else:
            out[g.token_index[g.valid]] = o[g.valid]
    return out
