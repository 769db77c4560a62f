"""Lookahead decoding's n-gram pool as a trie (Fu et al. 2024), without its Jacobi branch.

The pool maps a token to the (n-1)-grams seen after it, most recent first, at most `pool_size`
per token. It is fed by (1) each request's own prompt and output, (2) every request's output (a
pool shared by all, as the paper's is), and (3) the target's own guesses: after each verification,
every tree node's path followed by the token the target drew after it is an n-gram the model
produced from a guessed prefix, which is what the paper's Jacobi window contributes. The drafts of
a request are all pool n-grams that follow its last token, merged into a trie (several branches,
shared prefixes once), verified in one pass."""
from __future__ import annotations

from collections import OrderedDict

from kvflow.core.request import Request
from kvflow.core.spec_tree import DraftTree, ancestors
from kvflow.spec_decode.acceptance import TreeProposal

_MAX_RANK = 8


class NgramPool:
    def __init__(self, n: int, pool_size: int):
        self.n, self.pool_size = n, pool_size
        self.grams: dict[int, OrderedDict[tuple[int, ...], None]] = {}

    def add(self, tokens: list[int]) -> None:
        """Every full n-gram of `tokens`."""
        m = self.n - 1
        for i in range(len(tokens) - 1):
            cont = tuple(tokens[i + 1:i + 1 + m])
            if len(cont) < m:  # completed later, when more tokens come
                break
            entry = self.grams.setdefault(tokens[i], OrderedDict())
            if cont in entry:
                entry.move_to_end(cont)
            else:
                entry[cont] = None
                if len(entry) > self.pool_size:
                    entry.popitem(last=False)

    def get(self, token: int) -> list[tuple[int, ...]]:
        entry = self.grams.get(token)
        return list(reversed(entry)) if entry else []  # most recent first


class LookaheadProposer:
    def __init__(self, ngram: int = 5, pool_size: int = 8, max_branches: int = 8):
        self.n = ngram
        self.max_branches = max_branches
        self.shared = NgramPool(ngram, pool_size)
        self.own: dict[str, NgramPool] = {}
        self.indexed: dict[str, int] = {}  # tokens of each request already in its own pool

    def _own_pool(self, r: Request) -> NgramPool:
        pool = self.own.get(r.request_id)
        if pool is None:
            pool = self.own[r.request_id] = NgramPool(self.n, self.max_branches)
            self.indexed[r.request_id] = 0
        done = self.indexed[r.request_id]
        tokens = r.all_token_ids
        if len(tokens) > done:
            lo = max(0, done - self.n + 1)  # n-grams that straddle the old end
            pool.add(tokens[lo:])
            if done >= r.num_prompt_tokens:
                self.shared.add(tokens[max(lo, r.num_prompt_tokens - 1):])
            self.indexed[r.request_id] = len(tokens)
        return pool

    def propose(self, requests: list[Request], k: int) -> list[TreeProposal]:
        live = {r.request_id for r in requests}
        for rid in [rid for rid in self.own if rid not in live and len(self.own) > 4 * len(live) + 64]:
            del self.own[rid], self.indexed[rid]
        return [self._one(r, k) for r in requests]

    def _one(self, r: Request, k: int) -> TreeProposal:
        last = r.all_token_ids[-1]
        own = self._own_pool(r).get(last)
        seen, conts = set(), []
        for c in own + self.shared.get(last):
            if c not in seen:
                seen.add(c)
                conts.append(c)
            if len(conts) == self.max_branches:
                break
        tokens: list[int] = []
        parents: list[int] = []
        slots: list[int] = []
        prior: list[float] = []
        children: dict[tuple[int, int], int] = {}
        for rank, cont in enumerate(conts):
            node = -1
            for d, t in enumerate(cont, 1):
                nxt = children.get((node, t))
                if nxt is None:
                    if len(tokens) >= k:
                        break
                    nxt = len(tokens)
                    children[(node, t)] = nxt
                    tokens.append(t)
                    parents.append(node)
                    slots.append(d * _MAX_RANK + min(rank, _MAX_RANK - 1))
                    prior.append(0.5 * 0.7 ** (d - 1) / (1 + rank))
                node = nxt
        return TreeProposal(DraftTree(tokens, parents), slots, prior)

    def observe_tree(self, context_tail: list[int], tree: DraftTree, draws: list[int]) -> None:
        """The target's draw after each node, appended to the node's path: n-grams the model made
        from a guessed prefix (draws[0] follows the root, draws[1 + i] node i)."""
        for i, path in enumerate(ancestors(tree.parents)):
            seq = context_tail + [tree.token_ids[j] for j in path] + [draws[i + 1]]
            self.shared.add(seq[-self.n:])

    def forget(self, request_id: str) -> None:
        self.own.pop(request_id, None)
        self.indexed.pop(request_id, None)
