"""CUDA graphs for decode-only steps (vLLM's idea): a batch of B one-token requests launches the same
few hundred kernels every step, so on a GPU the launches, not the math, bound small batches. The
forward pass is captured once per batch-size bucket (1, 2, 4, 8, ... up to max_num_seqs) into static
buffers at start-up; a step copies its inputs into the buffers (one host-to-device copy from pinned
memory), pads to the next bucket, and replays. Steps with prompt chunks or drafts run eagerly.

Padding rows write their keys and values into a scratch block the block pool never hands out, and
attend to that one slot, so they touch no request's KV."""
from __future__ import annotations

import logging

import torch

from kvflow.layers.attention import AttentionGroup, AttentionMetadata

logger = logging.getLogger(__name__)


def batch_buckets(max_num_seqs: int) -> list[int]:
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return sizes + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int, max_num_seqs: int,
                 max_model_len: int, scratch_block: int, device: torch.device):
        self.model, self.kv_caches, self.block_size, self.device = model, kv_caches, block_size, device
        self.scratch_block = scratch_block
        self.sizes = batch_buckets(max_num_seqs)
        self.max_blocks = -(-max_model_len // block_size)
        n = self.sizes[-1]
        # One pinned host buffer holds a step's whole input; one copy moves it to its device twin.
        self.columns = 4 + self.max_blocks  # token id, position, slot, context length, block table
        self.host = torch.zeros(n, self.columns, dtype=torch.long, pin_memory=True)
        self.static = torch.zeros(n, self.columns, dtype=torch.long, device=device)
        self.token_index = torch.arange(n, device=device)[:, None]
        self.no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)  # the triton decode kernel needs none
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _forward(self, b: int) -> torch.Tensor:
        s = self.static[:b]
        group = AttentionGroup(self.token_index[:b], None, s[:, 4:], self.no_mask, ctx_lens=s[:, 3])
        meta = AttentionMetadata(s[:, 2], [group], backend="triton")
        return self.model(s[:, 0], s[:, 1], self.kv_caches, meta)

    @torch.inference_mode()
    def capture(self) -> None:
        self._fill_padding(0, self.sizes[-1])
        self.static.copy_(self.host)
        pool = None
        for b in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
            self._forward(b)  # warm-up: Triton compiles and autotunes outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(b)
            pool = graph.pool()
            self.graphs[b] = (graph, out)
        logger.info("captured CUDA graphs for decode batches of %s", self.sizes)

    def can_run(self, num_requests: int) -> bool:
        return bool(self.graphs) and num_requests <= self.sizes[-1]

    @torch.inference_mode()
    def run(self, token_ids: list[int], starts: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """Hidden states [n, hidden] of n one-token requests (token i at position starts[i])."""
        n = len(token_ids)
        b = next(size for size in self.sizes if size >= n)
        host, bs = self.host, self.block_size
        host[:n, 0] = torch.tensor(token_ids)
        pos = torch.tensor(starts)
        host[:n, 1] = pos
        host[:n, 3] = pos + 1
        host[:n, 4:] = self.scratch_block
        for i, table in enumerate(block_tables):
            host[i, 4:4 + len(table)] = torch.tensor(table[:self.max_blocks])
        host[:n, 2] = host[torch.arange(n), 4 + pos // bs] * bs + pos % bs
        self._fill_padding(n, b)
        self.static[:b].copy_(host[:b], non_blocking=True)
        graph, out = self.graphs[b]
        graph.replay()
        return out[:n]

    def _fill_padding(self, start: int, end: int) -> None:
        if end > start:
            pad = self.host[start:end]
            pad[:, 0:2] = 0
            pad[:, 2] = self.scratch_block * self.block_size  # the scratch block's first slot
            pad[:, 3] = 1
            pad[:, 4:] = self.scratch_block
