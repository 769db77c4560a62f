"""Draft trees: candidate continuations verified in one forward pass (Token Recycling, Lookahead).

A tree is a list of nodes in an order where every parent comes before its children, so any prefix
of the list is itself a tree (a token budget cuts it there). `parents[i]` is node i's parent index,
or -1 for a child of the root (the request's last known token). A chain of k drafts is the tree with
parents [-1, 0, 1, ..., k-2].

In the step the root and the nodes are one chunk: node i sits in KV slot `start + 1 + i` (distinct
slots, so siblings never overwrite each other) but at rotary position `start + depth(i)`, and it
attends to the history, the root and its own ancestors only. After verification the accepted path's
KV is copied down to the contiguous slots `start + 1 ... start + m` (`path_kv_moves`), so the cache
holds exactly what a plain decode of those tokens would have written.

Plain Python: the scheduler (torch-free) uses it to accept, the model runner to build masks."""
from __future__ import annotations

from dataclasses import dataclass

# A node's ancestors are the bits of one 64-bit word in the C decode kernel (tree_bits).
MAX_TREE_NODES = 64


@dataclass
class DraftTree:
    token_ids: list[int]
    parents: list[int]

    def __post_init__(self) -> None:
        assert len(self.token_ids) == len(self.parents)
        assert all(-1 <= p < i for i, p in enumerate(self.parents)), "parents must come before children"

    def __len__(self) -> int:
        return len(self.token_ids)

    @classmethod
    def chain(cls, token_ids: list[int]) -> "DraftTree":
        return cls(list(token_ids), list(range(-1, len(token_ids) - 1)))

    def truncate(self, n: int) -> "DraftTree":
        return DraftTree(self.token_ids[:n], self.parents[:n])

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))


def depths(parents: list[int]) -> list[int]:
    """Depth of each node (children of the root have depth 1)."""
    out: list[int] = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


def ancestors(parents: list[int]) -> list[list[int]]:
    """For each node, the node indices on its path from the root, itself included, root-first."""
    out: list[list[int]] = []
    for i, p in enumerate(parents):
        out.append((out[p] if p >= 0 else []) + [i])
    return out


def path_tokens(tree_tokens: list[int], parents: list[int]) -> list[list[int]]:
    """The draft tokens from the root to each node (what a sampling row sees after the history)."""
    return [[tree_tokens[j] for j in path] for path in ancestors(parents)]


def accept_path(tree_tokens: list[int], parents: list[int], targets: list[int]) -> list[int]:
    """The longest root-to-node path whose every token equals the target's draw at its parent:
    targets[0] is the draw after the root, targets[1 + i] the draw after node i. Returns the
    accepted node indices in path order (lossless for deterministic drafts: see verifier.py)."""
    children: dict[int, dict[int, int]] = {}
    for i, (t, p) in enumerate(zip(tree_tokens, parents)):
        children.setdefault(p, {}).setdefault(t, i)  # a repeated sibling adds nothing: keep the first
    path, cur = [], -1
    while True:
        nxt = children.get(cur, {}).get(targets[cur + 1])
        if nxt is None:
            return path
        path.append(nxt)
        cur = nxt


def path_kv_moves(start: int, path: list[int]) -> list[tuple[int, int]]:
    """(from position, to position) for the accepted nodes not already at their final slot:
    node i was computed at position start + 1 + i and belongs at start + 1 + its depth - 1."""
    return [(start + 1 + node, start + 1 + d) for d, node in enumerate(path) if node != d]
