"""Draft-model proposer: a smaller model with the target's tokenizer, or the target's own first
layers and head (layer_skip self-speculation). Greedy drafts, so verification is a plain
accept-while-equal (see verifier.py).

Draft KV lives in the paged cache under the target's block tables: a separate draft model keeps its
own KV tensors indexed by the same block ids; layer_skip needs none, since its layers' KV for
verified tokens is exactly what the target computed."""
from __future__ import annotations

import torch

from kvflow.core.request import Request
from kvflow.model.llama import LlamaForCausalLM
from kvflow.worker.model_runner import build_batch


class DraftProposer:
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[torch.Tensor], num_layers: int,
                 block_size: int, device: torch.device, shares_target_cache: bool):
        self.model = model
        self.kv_caches = kv_caches
        self.num_layers = num_layers
        self.block_size = block_size
        self.device = device
        self.shares_target_cache = shares_target_cache

    @torch.inference_mode()
    def propose(self, requests: list[Request], k: int) -> list[list[int]]:
        """Requests must own blocks for positions up to num_tokens + k - 2 (the last draft is never fed back)."""
        if k <= 0 or not requests:
            return [[] for _ in requests]
        drafts: list[list[int]] = [[] for _ in requests]
        # First pass: catch up on the tokens the draft has not seen (for layer_skip, just the last one).
        items = []
        for r in requests:
            seen = r.num_computed_tokens if self.shares_target_cache else min(r.draft_num_computed, r.num_computed_tokens)
            items.append((r.all_token_ids[seen:], seen, r.block_ids))
        for step in range(k):
            order = sorted(range(len(items)), key=lambda i: len(items[i][0]) > 1)
            batch = build_batch([items[i] for i in order], self.block_size, self.device)
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta, num_layers=self.num_layers)
            next_ids = self.model.compute_logits(hidden[batch.last_token.to(self.device)]).argmax(dim=-1).tolist()
            for j, i in enumerate(order):
                drafts[i].append(next_ids[j])
            if step + 1 < k:
                items = [([drafts[i][-1]], r.num_tokens + step, r.block_ids) for i, r in enumerate(requests)]
        for r in requests:
            r.draft_num_computed = r.num_tokens + k - 1
        return drafts
