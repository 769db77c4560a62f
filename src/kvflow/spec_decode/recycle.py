"""Token Recycling (train-free, Luo et al. 2024): an adjacency matrix of the top-k next tokens the
target predicted after each token, refreshed from every step's logits (every verified node's row,
rejected or not: each is a real model prediction after that token).

Drafts are a tree from a static template: each template node names its parent and a rank r, and
takes the r-th best successor of its parent's token, filled breadth-first for all requests at once.
The template is built once, best-first from a prior of how often the rank-r successor is the
target's next token; the speculator then learns each template node's real reach rate and keeps only
the nodes worth their cost in this step (goodput.py)."""
from __future__ import annotations

import heapq

import numpy as np
import torch

from kvflow.core.request import Request
from kvflow.core.spec_tree import DraftTree
from kvflow.layers import cpu_kernels, op_select
from kvflow.spec_decode.acceptance import TreeProposal

# Prior P(rank-r successor is the target's next token | its parent was accepted). Shallow nodes
# are a little likelier: the matrix was refreshed from a nearby context.
_RANK_PRIOR = (0.45, 0.14, 0.07, 0.045, 0.03, 0.022, 0.016, 0.012)


def build_template(num_nodes: int, topk: int, max_depth: int = 8) -> tuple[list[int], list[int], list[float]]:
    """(parents, ranks, prior reach) of the num_nodes most probable nodes, parents first."""
    ranks_prior = [_RANK_PRIOR[min(r, len(_RANK_PRIOR) - 1)] for r in range(topk)]
    parents, ranks, prior, depth = [], [], [], []
    heap = [(-ranks_prior[r], -1, r, 1) for r in range(topk)]  # (-reach, parent, rank, depth)
    heapq.heapify(heap)
    while heap and len(parents) < num_nodes:
        neg, parent, rank, d = heapq.heappop(heap)
        idx = len(parents)
        parents.append(parent)
        ranks.append(rank)
        prior.append(-neg)
        depth.append(d)
        if d < max_depth:
            decay = 0.97 ** d
            for r in range(topk):
                heapq.heappush(heap, (neg * ranks_prior[r] * decay, idx, r, d + 1))
    return parents, ranks, prior


class TokenRecyclingProposer:
    def __init__(self, vocab_size: int, topk: int, tree: bool = True, tree_size: int = 64):
        # -1: nothing seen after this token yet. int32: 49152 x 8 x 4 bytes = 1.5 MB.
        self.table = torch.full((vocab_size, topk), -1, dtype=torch.int32)
        self.tree = tree
        self.parents, self.ranks, self.prior = build_template(tree_size, topk)
        self.depths = [0] * len(self.parents)
        for j, p in enumerate(self.parents):
            self.depths[j] = 1 if p < 0 else self.depths[p] + 1
        self._levels: dict[int, list[tuple[list[int], list[int], list[int]]]] = {}

    def levels(self, n: int) -> list[tuple[list[int], list[int], list[int]]]:
        """The template's first n nodes (parents come first) level by level: (nodes, their parents,
        their ranks); every node of a depth is filled by one lookup."""
        if n not in self._levels:
            d = self.depths[:n]
            self._levels[n] = [([j for j in range(n) if d[j] == depth],
                                [self.parents[j] for j in range(n) if d[j] == depth],
                                [self.ranks[j] for j in range(n) if d[j] == depth]) for depth in range(1, max(d) + 1)]
        return self._levels[n]

    def observe(self, input_tokens: list[int], logits: torch.Tensor) -> None:
        """logits[i] is what the target predicted after input_tokens[i] (drafts included: rejected
        or not, they are real model predictions after that token)."""
        if not input_tokens:
            return
        top = _top_indices(logits, self.table.shape[1]).to(device="cpu", dtype=torch.int32)
        self.table[torch.tensor(input_tokens, dtype=torch.long)] = top

    def propose(self, requests: list[Request], k: int) -> list[list[int]] | list[TreeProposal]:
        if not self.tree:
            return self._chains(requests, k)
        return self._trees(requests, k)

    def _chains(self, requests: list[Request], k: int) -> list[list[int]]:
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

    def _trees(self, requests: list[Request], k: int) -> list[TreeProposal]:
        """The template's first k nodes for every request, filled in one lookup per node."""
        n = min(k, len(self.parents))
        if n <= 0 or not requests:
            return [TreeProposal(DraftTree([], []), [], []) for _ in requests]
        # numpy on the table's memory: its small fancy lookups cost a tenth of torch's per call
        table = self.table.numpy()
        tokens = np.empty((len(requests), n + 1), dtype=np.int64)
        tokens[:, -1] = [r.all_token_ids[-1] for r in requests]  # parent index -1 reads the root
        for idx, parents, ranks in self.levels(n):
            src = tokens[:, parents]
            tokens[:, idx] = np.where(src >= 0, table[np.maximum(src, 0), ranks], -1)
        out = []
        for row in tokens[:, :n].tolist():
            keep = [j for j in range(n) if row[j] >= 0]  # a missing parent leaves its children missing
            where = {old: new for new, old in enumerate(keep)}
            parents = [-1 if self.parents[j] < 0 else where[self.parents[j]] for j in keep]
            out.append(TreeProposal(DraftTree([row[j] for j in keep], parents), keep, [self.prior[j] for j in keep]))
        return out


def _top_indices(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's k best token ids: the C kernel's one pass where it is faster (measured), else torch."""
    if logits.device.type == "cpu" and cpu_kernels.kernels() is not None:
        key = ("topk", logits.shape[1], k, op_select.rows_class(logits.shape[0]))
        if op_select.choose(key, lambda: {"c": lambda: cpu_kernels.topk_indices(logits, k),
                                          "torch": lambda: logits.topk(k, dim=-1)}) == "c":
            top = cpu_kernels.topk_indices(logits, k)
            if top is not None:
                return top
    return logits.topk(k, dim=-1).indices
