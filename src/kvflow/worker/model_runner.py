"""ModelRunner: owns the model and the KV tensors; turns a SchedulerOutput into one forward pass
over a flat batch of tokens, then samples.

Batch layout: decodes (one new token each) first, then multi-token chunks (prompt chunks, or a last
token plus speculative tokens), so the attention layer sees two groups. Positions, slot_mapping and
block tables are built with vectorised ops from one (start, length) pair per request.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvflow.config import CacheConfig
from kvflow.engine.request import Request
from kvflow.engine.scheduler import ScheduledRequest, SchedulerOutput
from kvflow.layers import kv_quant
from kvflow.layers.attention import AttentionGroup, AttentionMetadata
from kvflow.layers.kv_quant import LayerKVCache
from kvflow.layers.sampler import SamplerOutput, SamplingRow, sample
from kvflow.model.llama import LlamaForCausalLM


@dataclass
class StepResult:
    sampled: list[ScheduledRequest]  # items that sample: each owns 1 + len(spec_token_ids) rows, in order
    sampler_output: SamplerOutput | None
    sample_logits: torch.Tensor | None  # [rows, V] raw logits of those rows (for proposers that learn from them)
    # Prompt logprobs computed this step: (request, first prompt position they score, [n, V] logprobs)
    prompt_logprobs: list[tuple[Request, int, torch.Tensor]]


@dataclass
class Batch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    last_token: torch.Tensor  # [R] flat index of each item's last token


def build_batch(items: list[tuple[list[int], int, list[int]]], block_size: int, device: torch.device) -> Batch:
    """items: (token ids, start position, block ids) per request, single-token ones first."""
    bs = block_size
    lens_t = torch.tensor([len(t) for t, _, _ in items])
    starts_t = torch.tensor([s for _, s, _ in items])
    num_reqs = len(items)
    req_of_token = torch.repeat_interleave(torch.arange(num_reqs), lens_t)
    first_token = torch.cumsum(lens_t, 0) - lens_t
    positions = starts_t[req_of_token] + torch.arange(int(lens_t.sum())) - first_token[req_of_token]
    ctx_lens = starts_t + lens_t
    max_blocks = int((ctx_lens.max() + bs - 1) // bs)
    tables = torch.zeros(num_reqs, max_blocks, dtype=torch.long)
    for i, (_, _, block_ids) in enumerate(items):
        ids = block_ids[:max_blocks]
        tables[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    slot_mapping = tables[req_of_token, positions // bs] * bs + positions % bs

    num_single = int((lens_t == 1).sum())
    groups = []
    if num_single:
        ctx = int(ctx_lens[:num_single].max())
        # contiguous: the C decode kernel walks rows with the table's own width as the stride
        decode = _group(torch.arange(num_single)[:, None], None, tables[:num_single, :(ctx + bs - 1) // bs].contiguous(),
                        positions[:num_single, None], bs, device)
        decode.ctx_lens = ctx_lens[:num_single].to(device)
        groups.append(decode)
    if num_single < num_reqs:
        # Chunks that start at position 0 (no cached prefix) attend causally over their own keys;
        # the others (later chunks, prefix-cache hits, speculative tokens) read the cache with a mask.
        fresh = starts_t[num_single:] == 0
        for sel in (fresh, ~fresh):
            rows = torch.nonzero(sel).flatten() + num_single
            if len(rows):
                groups.append(_chunk_group(rows, lens_t, first_token, ctx_lens, tables, positions, bs, device,
                                           causal_fresh=sel is fresh))
    all_ids = [t for ids, _, _ in items for t in ids]
    return Batch(torch.tensor(all_ids, dtype=torch.long, device=device), positions.to(device),
                 AttentionMetadata(slot_mapping.to(device), groups), first_token + lens_t - 1)


def _chunk_group(rows, lens_t, first_token, ctx_lens, tables, positions, bs: int, device,
                 causal_fresh: bool) -> AttentionGroup:
    """Multi-token items `rows`, padded to the longest (padding repeats the chunk's first token)."""
    m_lens, m_first = lens_t[rows], first_token[rows]
    offs = torch.arange(int(m_lens.max()))[None, :]
    valid = offs < m_lens[:, None]
    index = torch.where(valid, m_first[:, None] + offs, m_first[:, None])
    ctx = int(ctx_lens[rows].max())
    group = _group(index, valid, tables[rows, :(ctx + bs - 1) // bs], positions[index], bs, device)
    group.causal_fresh = causal_fresh
    return group


def _group(index, valid, tables, q_positions, block_size: int, device) -> AttentionGroup:
    return AttentionGroup(index.to(device), None if valid is None else valid.to(device), tables.to(device),
                          q_positions=q_positions.to(device), block_size=block_size)


def allocate_kv_caches(model_cfg, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device) -> list[LayerKVCache]:
    """One LayerKVCache per layer: [2 (k, v), num_blocks, block_size, kv_heads, head_dim] values in
    `dtype` (the KV cache dtype), plus per (token, head) scales when that dtype is int8."""
    return [LayerKVCache.allocate(num_blocks, block_size, model_cfg.num_kv_heads, model_cfg.head_dim, dtype, device)
            for _ in range(model_cfg.num_layers)]


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, cache_config: CacheConfig, num_blocks: int,
                 dtype: torch.dtype, device: torch.device):
        self.model = model
        self.device = device
        self.block_size = cache_config.block_size
        # dtype is the compute dtype; the cache stores cache_config.kv_cache_dtype ("auto" = dtype)
        self.kv_cache_dtype = kv_quant.storage_dtype(getattr(cache_config, "kv_cache_dtype", "auto"), dtype)
        self.kv_caches = allocate_kv_caches(model.config, num_blocks, self.block_size, self.kv_cache_dtype, device)
        if hasattr(model, "warm_up_op_choices"):
            model.warm_up_op_choices(max_rows=512)

    @staticmethod
    def bytes_per_block(model_cfg, block_size: int, dtype: torch.dtype) -> int:
        """dtype: the KV cache's storage dtype (int8 adds a float32 scale per token and head)."""
        per = kv_quant.bytes_per_token_head(model_cfg.head_dim, dtype)
        return 2 * model_cfg.num_layers * block_size * model_cfg.num_kv_heads * per

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        items = sorted(sched.scheduled, key=lambda s: s.num_new_tokens > 1)  # single tokens first (stable)
        batch = build_batch([(s.token_ids, s.start, s.request.block_ids) for s in items], self.block_size, self.device)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)

        sampled = [s for s in items if s.samples]
        rows: list[int] = []
        sampling_rows: list[SamplingRow] = []
        for i, s in enumerate(items):
            if s.samples:
                k = len(s.spec_token_ids)
                last = int(batch.last_token[i])
                rows.extend(range(last - k, last + 1))
                sampling_rows.extend(SamplingRow.for_request(s.request, s.spec_token_ids[:j]) for j in range(k + 1))
        prompt_rows = self._prompt_logprob_rows(items, batch, rows)
        logits = self.model.compute_logits(hidden[torch.tensor(rows, dtype=torch.long, device=self.device)])

        n = len(sampling_rows)
        sampler_output = sample(logits[:n], sampling_rows) if n else None
        prompt_lps = []
        offset = n
        for req, first_pos, count in prompt_rows:
            prompt_lps.append((req, first_pos, torch.log_softmax(logits[offset:offset + count], dim=-1)))
            offset += count
        return StepResult(sampled, sampler_output, logits[:n] if n else None, prompt_lps)

    @staticmethod
    def _prompt_logprob_rows(items: list[ScheduledRequest], batch: Batch, rows: list[int]):
        """Append the rows whose logits score prompt tokens (position p scores token p + 1)."""
        out = []
        for i, s in enumerate(items):
            req = s.request
            if req.prompt_logprobs is None:
                continue
            first = int(batch.last_token[i]) - (s.num_new_tokens - 1)
            lo = max(s.start, len(req.prompt_logprobs) - 1)  # skip tokens already scored (recompute)
            hi = min(s.start + s.num_new_tokens, req.num_prompt_tokens - 1)
            if hi > lo:
                rows.extend(range(first + lo - s.start, first + hi - s.start))
                out.append((req, lo + 1, hi - lo))
        return out
