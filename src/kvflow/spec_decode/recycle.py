"""Token Recycling (train-free): an adjacency table of the top-k next tokens the target predicted
after each token, refreshed from every step's logits; drafts follow its best path."""
from __future__ import annotations

import torch

from kvflow.core.request import Request


class TokenRecyclingProposer:
    def __init__(self, vocab_size: int, topk: int):
        # -1: nothing seen after this token yet. int32: 49152 x 8 x 4 bytes = 1.5 MB.
        self.table = torch.full((vocab_size, topk), -1, dtype=torch.int32)

    def observe(self, input_tokens: list[int], logits: torch.Tensor) -> None:
        """logits[i] is what the target predicted after input_tokens[i] (drafts included: rejected
        or not, they are real model predictions after that token)."""
        if not input_tokens:
            return
        top = logits.topk(self.table.shape[1], dim=-1).indices.to(device="cpu", dtype=torch.int32)
        self.table[torch.tensor(input_tokens, dtype=torch.long)] = top

    def propose(self, requests: list[Request], k: int) -> list[list[int]]:
        if k <= 0 or not requests:
            return [[] for _ in requests]
        best = self.table[:, 0]
        current = torch.tensor([r.all_token_ids[-1] for r in requests], dtype=torch.long)
        steps = []
        for _ in range(k):  # k lookups over the whole batch at once
            current = best[current].long()
            steps.append(current)
        drafts = torch.stack(steps, dim=1).tolist()
        return [d[:d.index(-1)] if -1 in d else d for d in drafts]
