"""CUDA graphs for decode-only steps (vLLM's idea): a batch of B one-token requests launches the same
few hundred kernels every step, so on a GPU the launches, not the math, bound small batches. The
forward pass is captured once per batch-size bucket (1, 2, 4, 8, ... up to max_num_seqs) into static
buffers at start-up; a step copies its inputs into the buffers (two host-to-device copies from pinned
memory: the per-row fields, and the bucket's block tables), pads to the next bucket, and replays.
Steps with prompt chunks or drafts run eagerly.

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
        # One pinned host buffer holds a step's whole input (rows: token id, position, slot, context
        # length; then the block tables); one copy moves it to its device twin.
        self.host = _StepBuffer(n, self.max_blocks, torch.device("cpu"), pin=device.type == "cuda")
        self.static = _StepBuffer(n, self.max_blocks, device)
        self.token_index = torch.arange(n, device=device)[:, None]
        self.no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)  # the triton decode kernel needs none
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _forward(self, b: int) -> torch.Tensor:
        s = self.static
        group = AttentionGroup(self.token_index[:b], None, s.tables[:b], self.no_mask, ctx_lens=s.ctx_lens[:b])
        meta = AttentionMetadata(s.slots[:b], [group], backend="triton")
        return self.model(s.token_ids[:b], s.positions[:b], self.kv_caches, meta)

    @torch.inference_mode()
    def capture(self) -> None:
        self._fill_padding(0, self.sizes[-1])
        self.static.flat.copy_(self.host.flat)
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
        h, bs = self.host, self.block_size
        pos = torch.tensor(starts)
        h.token_ids[:n] = torch.tensor(token_ids)
        h.positions[:n] = pos
        h.ctx_lens[:n] = pos + 1
        h.tables[:n] = self.scratch_block
        for i, table in enumerate(block_tables):
            h.tables[i, :len(table)] = torch.tensor(table[:self.max_blocks])
        h.slots[:n] = h.tables[torch.arange(n), pos // bs] * bs + pos % bs
        self._fill_padding(n, b)
        self.static.copy_rows_(h, b)
        if b not in self.graphs:  # not captured (a CPU test of the buffers): the same forward, eagerly
            return self._forward(b)[:n]
        graph, out = self.graphs[b]
        graph.replay()
        return out[:n]

    def _fill_padding(self, start: int, end: int) -> None:
        h = self.host
        h.token_ids[start:end] = 0
        h.positions[start:end] = 0
        h.slots[start:end] = self.scratch_block * self.block_size  # the scratch block's first slot
        h.ctx_lens[start:end] = 1
        h.tables[start:end] = self.scratch_block


class _StepBuffer:
    """A decode step's inputs in one flat tensor, each field a contiguous view (the kernels read
    context lengths and slots with unit stride)."""

    def __init__(self, n: int, max_blocks: int, device: torch.device, pin: bool = False):
        self.flat = torch.zeros(n * (4 + max_blocks), dtype=torch.long, device=device, pin_memory=pin)
        self.head = self.flat[:4 * n]
        self.token_ids, self.positions, self.slots, self.ctx_lens = self.head.view(4, n)
        self.tables = self.flat[4 * n:].view(n, max_blocks)

    def copy_rows_(self, src: "_StepBuffer", b: int) -> None:
        """The per-row fields and the first b block tables (a bucket-b graph reads no more) from src:
        two copies, not the whole buffer (a table row is max_model_len / block_size entries)."""
        self.head.copy_(src.head, non_blocking=True)
        self.tables[:b].copy_(src.tables[:b], non_blocking=True)
