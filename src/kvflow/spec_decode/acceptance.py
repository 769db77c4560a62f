"""What each draft node is worth: the probability that it ends up on the accepted path.

Chains (prompt lookup, draft models): each request has its own per-token acceptance rate a (accepted
tokens / tokens examined, examined = accepted + the one rejected, decayed so it follows the request),
pulled toward the pooled rate while the request is young; the d-th token is worth a^d.

Trees (Token Recycling, Lookahead): every node comes with a slot (its place in the proposer's
template: rank and depth) and a prior; each slot's reach rate is learned over all requests
(reached / offered, decayed), and scaled per request by how its accepted lengths compare with what
the slots predicted. A node is never worth more than its parent."""
from __future__ import annotations

from dataclasses import dataclass, field

from kvflow.core.spec_tree import DraftTree

# per verification, a request's old counts fade; and per step it verifies nothing, too: a request
# that stopped drafting after a few misses would otherwise keep its low estimate (only verifications
# moved it) and never draft again
_DECAY = 0.9
_PRIOR = 2.0  # pseudo-counts of the pooled rate / slot prior


@dataclass
class TreeProposal:
    """A proposer's tree: nodes (parents first), each with a slot key and a prior reach probability."""
    tree: DraftTree
    slots: list[int]
    prior: list[float]

    def __len__(self) -> int:
        return len(self.tree)

    def select(self, order: list[int]) -> "TreeProposal":
        """The nodes in `order` (parents before children), re-indexed."""
        where = {old: new for new, old in enumerate(order)}
        parents = [-1 if self.tree.parents[o] < 0 else where[self.tree.parents[o]] for o in order]
        return TreeProposal(DraftTree([self.tree.token_ids[o] for o in order], parents),
                            [self.slots[o] for o in order], [self.prior[o] for o in order])


@dataclass
class _RequestAcceptance:
    hits: float = 0.0  # accepted chain tokens
    trials: float = 0.0  # examined chain tokens
    got: float = 0.0  # tree: accepted lengths
    predicted: float = 0.0  # tree: what the slots predicted


@dataclass
class AcceptanceModel:
    pooled_hits: float = 1.0
    pooled_trials: float = 2.0
    slots: dict[int, list[float]] = field(default_factory=dict)  # slot -> [reached, offered]
    requests: dict[str, _RequestAcceptance] = field(default_factory=dict)

    def chain_rate(self, request_id: str) -> float:
        r = self.requests.get(request_id) or _RequestAcceptance()
        pooled = self.pooled_hits / self.pooled_trials
        return min(0.98, (r.hits + _PRIOR * pooled) / (r.trials + _PRIOR))

    def _slot_rate(self, slot: int, prior: float) -> float:
        reached, offered = self.slots.get(slot, (0.0, 0.0))
        return (reached + _PRIOR * prior) / (offered + _PRIOR)

    def _factor(self, request_id: str) -> float:
        r = self.requests.get(request_id)
        if r is None:
            return 1.0
        return min(3.0, max(0.25, (r.got + 1.0) / (r.predicted + 1.0)))

    def tree_values(self, request_id: str, prop: TreeProposal) -> tuple[TreeProposal, list[float]]:
        """The proposal re-ordered best value first (parents still first) and each node's value."""
        f = self._factor(request_id)
        vals: list[float] = []
        for i, (p, s, pr) in enumerate(zip(prop.tree.parents, prop.slots, prop.prior)):
            v = min(0.99, self._slot_rate(s, pr) * f)
            vals.append(min(v, vals[p]) if p >= 0 else v)
        # a child is never worth more than its parent and comes later: a stable sort keeps parents first
        order = sorted(range(len(vals)), key=lambda i: -vals[i])
        return prop.select(order), [vals[i] for i in order]

    # ---- learning ----
    def record_chain(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        r = self.requests.setdefault(request_id, _RequestAcceptance())
        examined = num_accepted + (1 if num_accepted < num_drafts else 0)
        r.hits, r.trials = _DECAY * r.hits + num_accepted, _DECAY * r.trials + examined
        self.pooled_hits = 0.995 * self.pooled_hits + num_accepted
        self.pooled_trials = 0.995 * self.pooled_trials + examined

    def record_tree(self, request_id: str, prop: TreeProposal, path: list[int]) -> None:
        on_path = set(path)
        predicted = 0.0
        for i, (s, pr) in enumerate(zip(prop.slots, prop.prior)):
            predicted += self._slot_rate(s, pr)
            st = self.slots.setdefault(s, [0.0, 0.0])
            st[0] = 0.998 * st[0] + (i in on_path)
            st[1] = 0.998 * st[1] + 1.0
        r = self.requests.setdefault(request_id, _RequestAcceptance())
        r.got, r.predicted = _DECAY * r.got + len(path), _DECAY * r.predicted + predicted
        self.record_chain(request_id, len(prop), len(path))

    def fade(self, request_id: str) -> None:
        """A step in which this request verified no drafts: its own evidence fades toward the pooled
        rate and the slots' rates, so that it is tried again once the misses are old."""
        r = self.requests.get(request_id)
        if r is not None:
            r.hits, r.trials = _DECAY * r.hits, _DECAY * r.trials
            r.got, r.predicted = _DECAY * r.got, _DECAY * r.predicted

    def forget(self, keep: set[str]) -> None:
        """Drop the counts of requests no longer running."""
        for rid in [rid for rid in self.requests if rid not in keep]:
            del self.requests[rid]
