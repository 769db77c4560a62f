"""ModelRunner: owns the model and the KV tensors; turns a SchedulerOutput into one forward pass
over a flat batch of tokens, then samples.

Batch layout: decodes (one new token each) first, then prompt chunks, so the attention layer sees
two groups. Positions, slot_mapping and block tables are built with vectorised ops from one
per-request list of (start, length) pairs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvflow.config import CacheConfig
from kvflow.engine.request import Request
from kvflow.engine.scheduler import ScheduledRequest, SchedulerOutput
from kvflow.layers.attention import AttentionGroup, AttentionMetadata
from kvflow.layers.sampler import SamplerOutput, sample
from kvflow.model.llama import LlamaForCausalLM


@dataclass
class StepResult:
    sampled: list[Request]  # requests that got a new token this step, in SamplerOutput order
    sampler_output: SamplerOutput | None
    # Prompt logprobs computed this step: (request, first prompt position they score, [n, V] logprobs)
    prompt_logprobs: list[tuple[Request, int, torch.Tensor]]


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, cache_config: CacheConfig, num_blocks: int,
                 dtype: torch.dtype, device: torch.device):
        self.model = model
        self.device = device
        self.block_size = cache_config.block_size
        cfg = model.config
        shape = (2, num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]

    @staticmethod
    def bytes_per_block(model_cfg, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * model_cfg.num_layers * block_size * model_cfg.num_kv_heads * model_cfg.head_dim * elem

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        items = sorted(sched.scheduled, key=lambda s: s.num_new_tokens > 1)  # decodes first (stable)
        input_ids, positions, meta, logit_rows, sampled, prompt_rows = self._prepare(items)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        logits = self.model.compute_logits(hidden[logit_rows])
        n_sample = len(sampled)
        sampler_output = None
        if n_sample:
            under_min = [r.num_output_tokens < r.params.min_tokens for r in sampled]
            sampler_output = sample(logits[:n_sample], sampled, under_min)
        prompt_lps = []
        offset = n_sample
        for req, first_pos, n in prompt_rows:
            prompt_lps.append((req, first_pos, torch.log_softmax(logits[offset:offset + n], dim=-1)))
            offset += n
        return StepResult(sampled, sampler_output, prompt_lps)

    def _prepare(self, items: list[ScheduledRequest]):
        dev = self.device
        bs = self.block_size
        token_lists, starts, lens = [], [], []
        for s in items:
            token_lists.extend(s.request.all_token_ids[s.start:s.start + s.num_new_tokens])
            starts.append(s.start)
            lens.append(s.num_new_tokens)
        num_reqs = len(items)
        lens_t = torch.tensor(lens)
        starts_t = torch.tensor(starts)
        req_of_token = torch.repeat_interleave(torch.arange(num_reqs), lens_t)
        first_token = torch.cumsum(lens_t, 0) - lens_t
        positions = starts_t[req_of_token] + torch.arange(len(token_lists)) - first_token[req_of_token]
        ctx_lens = starts_t + lens_t
        max_blocks = int((ctx_lens.max() + bs - 1) // bs)
        tables = torch.zeros(num_reqs, max_blocks, dtype=torch.long)
        for i, s in enumerate(items):
            ids = s.request.block_ids[:max_blocks]
            tables[i, :len(ids)] = torch.tensor(ids)
        slot_mapping = tables[req_of_token, positions // bs] * bs + positions % bs

        num_decodes = int((lens_t == 1).sum())
        groups = []
        if num_decodes:
            ctx = int(ctx_lens[:num_decodes].max())
            tables_d = tables[:num_decodes, :(ctx + bs - 1) // bs]
            groups.append(self._group(torch.arange(num_decodes)[:, None], None, tables_d, positions[:num_decodes, None]))
        if num_decodes < num_reqs:
            p_lens, p_first = lens_t[num_decodes:], first_token[num_decodes:]
            q = int(p_lens.max())
            offs = torch.arange(q)[None, :]
            valid = offs < p_lens[:, None]
            index = torch.where(valid, p_first[:, None] + offs, p_first[:, None])  # pad with the chunk's first token
            ctx = int(ctx_lens[num_decodes:].max())
            tables_p = tables[num_decodes:, :(ctx + bs - 1) // bs]
            groups.append(self._group(index, valid, tables_p, positions[index]))

        # Logit rows: each sampling request's last token, then the prompt-logprob rows.
        last_token = first_token + lens_t - 1
        sampled, logit_rows, prompt_rows = [], [], []
        for i, s in enumerate(items):
            if s.samples:
                sampled.append(s.request)
                logit_rows.append(int(last_token[i]))
        for i, s in enumerate(items):
            req = s.request
            if req.prompt_logprobs is not None:
                # Position p's logits score prompt token p + 1; only tokens not scored yet.
                lo = max(s.start, len(req.prompt_logprobs) - 1)
                hi = min(s.start + s.num_new_tokens, req.num_prompt_tokens - 1)
                if hi > lo:
                    logit_rows.extend(range(int(first_token[i]) + lo - s.start, int(first_token[i]) + hi - s.start))
                    prompt_rows.append((req, lo + 1, hi - lo))
        meta = AttentionMetadata(slot_mapping.to(dev), groups)
        input_ids = torch.tensor(token_lists, dtype=torch.long, device=dev)
        return input_ids, positions.to(dev), meta, torch.tensor(logit_rows, dtype=torch.long, device=dev), sampled, prompt_rows

    def _group(self, index, valid, tables, q_positions) -> AttentionGroup:
        num_keys = tables.shape[1] * self.block_size
        mask = torch.arange(num_keys)[None, None, :] <= q_positions[:, :, None]  # causal; also hides padding keys
        dev = self.device
        return AttentionGroup(index.to(dev), None if valid is None else valid.to(dev), tables.to(dev), mask[:, None].to(dev))
