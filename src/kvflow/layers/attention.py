"""Paged attention in plain PyTorch (the fallback every device can run).

Each layer writes the step's new keys and values straight into the paged cache through
`slot_mapping`, then attends over the cache through block tables. The step's requests come in at
most two groups: decodes (one query token each) and prompt chunks (padded to the longest chunk), so a
layer makes at most two attention calls whatever the batch size: no loop over requests.

Backends (`attention_backend`, or the environment variable KVFLOW_ATTENTION_BACKEND as vLLM does it):
"torch" is the SDPA path below; "cpu" adds the C decode kernel where it applies (today's CPU default);
"triton" runs layers/triton (compiled on a GPU, interpreted on CPU tensors); "auto" picks "cpu" on
CPU and "triton" on CUDA. The process default is set by `set_attention_backend`; an engine's runner
may override it per batch through `AttentionMetadata.backend`.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvflow.config import ATTENTION_BACKENDS
from kvflow.errors import ConfigError
from kvflow.layers import cpu_kernels, kv_quant


@dataclass
class AttentionGroup:
    token_index: torch.Tensor  # [B, Q] flat token index of each query (padding repeats a valid one)
    valid: torch.Tensor | None  # [B, Q] bool, None when every query is real (decodes)
    block_tables: torch.Tensor  # [B, max_blocks]
    # [B, 1, Q, L] bool, True where the query may attend the key. Built on first use (once per step,
    # shared by every layer) from q_positions: the C decode kernel and prefix-free chunks need none.
    mask: torch.Tensor | None = None
    ctx_lens: torch.Tensor | None = None  # [B] keys per request; set on the decode group, rows [0, B)
    # Chunk group, varlen layout (the triton backend): request r's queries are flat rows
    # query_start_loc[r]:query_start_loc[r+1]; it attends its first seq_lens[r] cached positions.
    query_start_loc: torch.Tensor | None = None  # [B + 1] int
    query_starts: list[int] | None = None  # the same on the host (no device sync to read them)
    seq_lens: torch.Tensor | None = None  # [B] int
    max_query_len: int = 0
    # Prompt chunks with no cached prefix (every request starts at position 0): they attend only to
    # this step's own keys, causally, so the torch path uses its fresh k and v with SDPA's is_causal
    # and neither gathers the cache nor builds a mask.
    causal_fresh: bool = False
    q_positions: torch.Tensor | None = None  # [B, Q] position of each query (for the mask)
    block_size: int = 0
    # (first, stop) when token_index is exactly the flat rows first..stop-1 (B chunks of Q tokens back to
    # back, no padding): the group's queries and outputs are then views of the batch, not gathered copies
    flat_rows: tuple[int, int] | None = None

    def attn_mask(self) -> torch.Tensor:
        if self.mask is None:
            num_keys = self.block_tables.shape[1] * self.block_size
            keys = torch.arange(num_keys, device=self.q_positions.device)
            self.mask = (keys[None, None, :] <= self.q_positions[:, :, None])[:, None]  # causal; hides padding keys
        return self.mask
    # True when `mask` is not causal (draft-tree ancestor masks): a backend that would infer a
    # causal mask from positions must use `mask` as it is for this group.
    tree: bool = False
    # The same trees, per node, for kernels that take no mask: (flat token index, position of the
    # tree's first node, bit k set when node k is this node or one of its ancestors).
    tree_nodes: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    groups: list[AttentionGroup]
    backend: str | None = None  # None: the process default (set_attention_backend)


def check_backend(name: str) -> str:
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}; got {name!r}")
    return name


_default_backend = os.environ.get("KVFLOW_ATTENTION_BACKEND", "auto")


def set_attention_backend(name: str) -> None:
    """The process-wide default backend (an engine's own choice, in AttentionMetadata.backend, wins)."""
    global _default_backend
    _default_backend = check_backend(name)


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(name: str | None, device: torch.device) -> str:
    """The concrete backend for tensors on `device`. An engine's "auto" (or None) defers to the process
    default (KVFLOW_ATTENTION_BACKEND / set_attention_backend), whose "auto" picks by device."""
    name = check_backend(_default_backend if name in (None, "auto") else name)
    if name != "auto":
        return name
    if device.type == "cuda" and _has_triton():
        return "triton"
    return "cpu" if device.type == "cpu" else "torch"


def writes_kv_with_rotary(qkv: torch.Tensor, kv_cache, meta: AttentionMetadata) -> bool:
    """Whether the layer rotates q and k and writes the step's keys and values into the pool in one
    Triton kernel (layers/triton/rotary.py) and then calls paged_attention with kv_written=True: the
    triton backend, on a cache in the compute dtype, for a contiguous fused qkv output."""
    return (getattr(kv_cache, "scale", None) is None and qkv.is_contiguous()
            and resolve_backend(meta.backend, qkv.device) == "triton")


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hk, D]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D], in the KV cache dtype
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k_scale: torch.Tensor | None = None,  # [num_blocks, block_size, Hk] float32, int8 caches only
    v_scale: torch.Tensor | None = None,
    kv_written: bool = False,  # the step's k and v are in the cache already (writes_kv_with_rotary)
) -> torch.Tensor:
    backend = resolve_backend(meta.backend, q.device)
    if backend == "triton" and any(g.tree for g in meta.groups):
        backend = "torch"  # the triton chunk kernel is causal: draft-tree masks go through SDPA
    if backend == "triton":
        from kvflow.layers.triton.attention import triton_paged_attention  # imports triton on first use
        return triton_paged_attention(q, k, v, k_cache, v_cache, meta, scale, kv_written)
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    if not kv_written:
        kv_quant.write(k_cache, k_scale, meta.slot_mapping, k)
        kv_quant.write(v_cache, v_scale, meta.slot_mapping, v)
    gqa = num_kv_heads != q.shape[1]
    out = torch.empty_like(q)
    for g in meta.groups:
        if g.ctx_lens is not None and backend == "cpu" and cpu_kernels.can_run_decode(q, k_cache):
            n = g.ctx_lens.shape[0]  # the decode group is the batch's first n tokens
            out[:n] = cpu_kernels.paged_decode(q[:n], k_cache, v_cache, g.block_tables, g.ctx_lens, scale,
                                               k_scale, v_scale)
            continue
        B = g.block_tables.shape[0]
        rows = _group_rows(g)
        qg = rows(q).transpose(1, 2)  # [B, Hq, Q, D]
        if g.causal_fresh:  # right padding only follows the real queries: is_causal stays exact for them
            kg, vg = rows(k).transpose(1, 2), rows(v).transpose(1, 2)
            o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale, enable_gqa=gqa)
        else:  # dequantize only the blocks this group gathers
            kg = _gather(k_cache, k_scale, g.block_tables, q.dtype).view(B, -1, num_kv_heads, head_dim).transpose(1, 2)
            vg = _gather(v_cache, v_scale, g.block_tables, q.dtype).view(B, -1, num_kv_heads, head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.attn_mask(), scale=scale, enable_gqa=gqa)
        o = o.transpose(1, 2)  # [B, Q, Hq, D]
        if g.flat_rows is not None:
            out[g.flat_rows[0]:g.flat_rows[1]] = o.reshape(-1, *q.shape[1:])
        elif g.valid is None:
            out[g.token_index.view(-1)] = o.reshape(-1, *q.shape[1:])
        else:
            out[g.token_index[g.valid]] = o[g.valid]
    return out


def _group_rows(g: AttentionGroup):
    """x [T, H, D] -> the group's rows [B, Q, H, D]: a view where they lie back to back, else a gather."""
    if g.flat_rows is None:
        return lambda x: x[g.token_index]
    first, stop = g.flat_rows
    shape = g.token_index.shape
    return lambda x: x[first:stop].view(*shape, *x.shape[1:])


def _gather(cache: torch.Tensor, cache_scale: torch.Tensor | None, tables: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """The blocks of `tables` [B, nb] -> [B, nb, block_size, H, D] in the compute dtype."""
    blocks = cache[tables]
    if blocks.dtype == dtype:
        return blocks
    return kv_quant.dequantize(blocks, None if cache_scale is None else cache_scale[tables], dtype)
