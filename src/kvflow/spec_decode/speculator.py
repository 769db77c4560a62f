"""Speculator: after each step, picks K and asks the proposer for each decoding request's drafts.
The engine hands them to Scheduler.set_draft_tokens; the scheduler schedules them as extra tokens
of the request (vLLM v1's rule) and verifies them against the target's draws from the same pass.

The speculator is handed what it needs: a proposer and a way to reserve KV slots (draft models
write their KV ahead of verification). It reads the scheduler's queues and never writes them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from kvflow.core.request import Request
from kvflow.core.scheduler import ModelRunnerOutput, Scheduler, SchedulerOutput, accepted_prefix
from kvflow.core.spec_tree import DraftTree, accept_path, depths
from kvflow.errors import ConfigError
from kvflow.spec_decode.config import SpeculativeConfig
from kvflow.spec_decode.draft import DraftProposer
from kvflow.spec_decode.acceptance import AcceptanceModel, TreeProposal
from kvflow.spec_decode.goodput import Candidate, Choice, StepLayout, StepTimeModel, chain_values, choose_counts
from kvflow.spec_decode.lookahead import LookaheadProposer
from kvflow.spec_decode.ngram import NgramProposer
from kvflow.spec_decode.recycle import TokenRecyclingProposer
from kvflow.worker.model_runner import ModelRunner

_EMA = 0.3  # weight of the newest step in a request's acceptance-rate average


@dataclass
class SpecStats:
    num_drafts: int = 0  # draft tokens (tree nodes) sent to verification
    num_accepted: int = 0
    num_verifications: int = 0  # requests that verified drafts, summed over steps
    num_steps: int = 0  # proposals: one per decoding request per step
    sum_k: int = 0  # of the draft tokens (tree nodes) chosen per proposal
    k_histogram: dict[int, int] = field(default_factory=dict)
    num_trees: int = 0  # proposals that were trees (more than one branch)
    step_time_error: float | None = None  # the step-time model's mean |predicted - measured| / measured
    step_time_observed: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_drafts if self.num_drafts else 0.0

    @property
    def mean_k(self) -> float:
        return self.sum_k / self.num_steps if self.num_steps else 0.0

    @property
    def mean_tree_size(self) -> float:
        """Draft tokens (nodes) per verification."""
        return self.num_drafts / self.num_verifications if self.num_verifications else 0.0

    @property
    def accepted_per_step(self) -> float:
        """Accepted drafts per verification (each also yields one token of the target's own)."""
        return self.num_accepted / self.num_verifications if self.num_verifications else 0.0

    def as_dict(self) -> dict:
        return {"draft_tokens": self.num_drafts, "accepted_tokens": self.num_accepted,
                "acceptance_rate": round(self.acceptance_rate, 4), "mean_k": round(self.mean_k, 3),
                "k_histogram": dict(sorted(self.k_histogram.items())),
                "verifications": self.num_verifications, "tree_proposals": self.num_trees,
                "mean_tree_size": round(self.mean_tree_size, 3),
                "accepted_per_step": round(self.accepted_per_step, 3),
                "step_time_error": None if self.step_time_error is None else round(self.step_time_error, 4),
                "step_time_observed": self.step_time_observed}


class Speculator:
    def __init__(self, config: SpeculativeConfig, proposer, reserve: Callable[[Request, int], bool]):
        self.config = config
        self.proposer = proposer
        self.reserve = reserve  # own blocks for this many positions, all or nothing
        self.stats = SpecStats()
        self.step_time = StepTimeModel()
        self.acceptance = AcceptanceModel()
        self._proposed: dict[str, TreeProposal | list[int]] = {}  # what each request verifies next
        self.last_choice: Choice | None = None

    @property
    def needs_blocks(self) -> bool:
        """Draft models compute KV for their drafts, so K is chosen before proposing."""
        return isinstance(self.proposer, DraftProposer)

    # ---- after a step ----
    def observe_step(self, sched: SchedulerOutput, seconds: float, out: ModelRunnerOutput) -> None:
        if self.config.auto:  # only goodput choices read the step-time model
            self.step_time.observe(step_layout(sched).shape(), seconds)
            self.stats.step_time_error = self.step_time.relative_error
            self.stats.step_time_observed = self.step_time.num_observed
        by_id = {s.request.request_id: s for s in sched.scheduled}
        if isinstance(self.proposer, TokenRecyclingProposer) and out.sample_logits is not None:
            # the sampled rows, in the runner's order: each request's last known token, then its drafts
            inputs = [t for rid in out.sampled for t in by_id[rid].token_ids[-(len(by_id[rid].spec_token_ids) + 1):]]
            self.proposer.observe(inputs, out.sample_logits)
        for rid, sampled in out.sampled.items():
            s = by_id[rid]
            proposed = self._proposed.pop(rid, None)
            if not s.spec_token_ids or proposed is None:
                continue
            n = len(s.spec_token_ids)
            if isinstance(proposed, TreeProposal):
                prop = proposed.select(list(range(n)))
                path = accept_path(prop.tree.token_ids, prop.tree.parents, sampled.token_ids)
                self.acceptance.record_tree(rid, prop, path)
                if isinstance(self.proposer, LookaheadProposer):
                    tail = s.request.all_token_ids[max(0, s.start - self.config.lookahead_ngram):s.start + 1]
                    self.proposer.observe_tree(tail, prop.tree, sampled.token_ids)
            else:
                self.acceptance.record_chain(rid, n, accepted_prefix(s.spec_token_ids, sampled.token_ids))

    def record_verification(self, req: Request, num_drafts: int, num_accepted: int) -> None:
        if not num_drafts:
            return
        req.num_draft_tokens += num_drafts
        req.num_accepted_tokens += num_accepted
        req.acceptance_ema = (1 - _EMA) * req.acceptance_ema + _EMA * num_accepted / num_drafts
        self.stats.num_drafts += num_drafts
        self.stats.num_accepted += num_accepted
        self.stats.num_verifications += 1

    # ---- before the next step ----
    def propose(self, scheduler: Scheduler) -> dict[Request, list[int] | DraftTree]:
        """Drafts for the next step, per decoding request: a chain, or a tree."""
        decoding, layout = _next_layout(scheduler)
        self._proposed = {}
        if not decoding:
            return {}
        if len(self.acceptance.requests) > 4 * len(scheduler.running) + 64:
            self.acceptance.forget({r.request_id for r in scheduler.running})
        # drafts ride with running requests, which are scheduled before any waiting prompt
        running_tokens = sum(min(r.num_tokens - r.num_computed_tokens, scheduler.config.max_num_batched_tokens)
                             for r in scheduler.running)
        room = max(0, scheduler.config.max_num_batched_tokens - running_tokens)
        depth_limits = [self._room(r, scheduler) for r in decoding]  # tokens that could still be kept
        limits = [min(d, room) for d in depth_limits]
        max_k = self.config.max_tokens
        if self.needs_blocks:  # a draft model: choose K first, its drafts cost forward passes
            values = [chain_values(self.acceptance.chain_rate(r.request_id), min(max_k, n)) for r, n in zip(decoding, limits)]
            counts = self._counts(decoding, values, layout, max_k)
            k = max(counts)
            ready = [r for r, n in zip(decoding, limits) if k and n >= k and self.reserve(r, r.num_tokens + k - 1)]
            drafts = self.proposer.propose(ready, k) if k else []
            chosen = {r: d[:counts[decoding.index(r)]] for r, d in zip(ready, drafts)}
            self._proposed = {r.request_id: d for r, d in chosen.items()}
            return self._finish(decoding, chosen)
        if self.config.auto and not self.config.uses_tree and not any(self._counts(
                decoding, [chain_values(self.acceptance.chain_rate(r.request_id), min(max_k, n))
                           for r, n in zip(decoding, limits)], layout, max_k)):
            # even full-length chains at each request's own rate would not pay: skip proposing
            return self._finish(decoding, {})
        proposals = self.proposer.propose(decoding, max_k)
        values, ordered = [], []
        for r, prop, n, max_depth in zip(decoding, proposals, limits, depth_limits):
            if isinstance(prop, TreeProposal):
                keep = [i for i, d in enumerate(depths(prop.tree.parents)) if d <= max_depth][:room]
                prop, v = self.acceptance.tree_values(r.request_id, prop.select(keep))
            else:
                prop = prop[:n]
                v = chain_values(self.acceptance.chain_rate(r.request_id), len(prop))
            ordered.append(prop)
            values.append(v)
        counts = self._counts(decoding, values, layout, max_k)
        chosen = {}
        for r, prop, c in zip(decoding, ordered, counts):
            if c:
                prop = prop.select(list(range(c))) if isinstance(prop, TreeProposal) else prop[:c]
                self._proposed[r.request_id] = prop
                chosen[r] = prop.tree if isinstance(prop, TreeProposal) else prop
        return self._finish(decoding, chosen)

    def _finish(self, decoding: list[Request], chosen: dict) -> dict:
        for r in decoding:
            d = chosen.get(r)
            k = len(d) if d is not None else 0
            if not k:
                self.acceptance.fade(r.request_id)
            self.stats.num_steps += 1
            self.stats.sum_k += k
            self.stats.k_histogram[k] = self.stats.k_histogram.get(k, 0) + 1
            if isinstance(d, DraftTree) and not d.is_chain:
                self.stats.num_trees += 1
        return {r: d for r, d in chosen.items() if len(d)}

    def _counts(self, reqs: list[Request], values: list[list[float]], layout: StepLayout, max_k: int) -> list[int]:
        if not self.config.auto:
            return [min(max_k, len(v)) for v in values]
        cands = [Candidate(v[:max_k], r.num_tokens - 1) for r, v in zip(reqs, values)]
        self.last_choice = choose_counts(cands, layout, self.step_time)
        return self.last_choice.counts

    @staticmethod
    def _room(r: Request, scheduler: Scheduler) -> int:
        """Drafts beyond max_tokens or the context would be thrown away: don't propose them."""
        room = scheduler.config.max_model_len - r.num_tokens
        if r.params.max_tokens is not None:
            room = min(room, r.params.max_tokens - r.num_output_tokens - 1)
        return max(0, room)


def step_layout(sched: SchedulerOutput) -> StepLayout:
    """The layout the model runner gave this step (single tokens, then padded chunks)."""
    lay = StepLayout()
    for s in sched.scheduled:
        rows = (1 + len(s.spec_token_ids)) if s.samples else 0
        ctx = s.start + s.num_new_tokens
        if s.num_new_tokens == 1:
            lay.add_decode(ctx, rows)
        else:
            lay.add_chunk(s.num_new_tokens, ctx, rows)
    return lay


def _next_layout(scheduler: Scheduler) -> tuple[list[Request], StepLayout]:
    """The requests that will decode next step and the layout of that step without drafts: their
    single tokens plus the prompt chunks that will share the budget."""
    decoding, lay = [], StepLayout()
    budget = scheduler.config.max_num_batched_tokens
    for r in scheduler.running:
        if r.num_computed_tokens == r.num_tokens - 1:
            decoding.append(r)
            lay.add_decode(r.num_tokens)
            budget -= 1
    waiting = len(scheduler.running)
    for i, r in enumerate([*scheduler.running, *scheduler.waiting]):
        if budget <= 0:
            break
        left = r.num_tokens - r.num_computed_tokens
        if left <= 1 and r in decoding:
            continue
        n = min(left, budget)
        lay.add_chunk(n, r.num_computed_tokens + n, 1 if n == left else 0)
        if i >= waiting:  # drafts are scheduled before waiting prompts: each takes one of these tokens' place
            lay.displaceable += n
        budget -= n
    return decoding, lay


def build_proposer(config: SpeculativeConfig, target: ModelRunner, draft: ModelRunner | None, max_model_len: int):
    """The proposer a config names. `draft` is the draft model's runner (method "draft" with a draft_model)."""
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "recycle":
        return TokenRecyclingProposer(target.model_config.vocab_size, config.recycle_topk, tree=config.uses_tree,
                                      tree_size=max(64, config.max_tokens))
    if config.method == "lookahead":
        return LookaheadProposer(config.lookahead_ngram, config.lookahead_branches, config.lookahead_branches)
    if config.layer_skip is not None:
        total = target.model_config.num_layers
        if config.layer_skip >= total:
            raise ConfigError(f"layer_skip must be below the target's {total} layers, got {config.layer_skip}")
        return DraftProposer(target.model, target.kv_caches, config.layer_skip, target.block_size, target.device,
                             shares_target_cache=True)
    _check_draft(config, target, draft, max_model_len)
    return DraftProposer(draft.model, draft.kv_caches, draft.model_config.num_layers, draft.block_size, draft.device,
                         shares_target_cache=False)


def _check_draft(config: SpeculativeConfig, target: ModelRunner, draft: ModelRunner, max_len: int) -> None:
    draft_len = draft.model_config.max_position_embeddings
    if draft_len < max_len:
        raise ConfigError(f"draft model {config.draft_model!r} has a context of {draft_len} tokens, below "
                          f"max_model_len {max_len}: pass max_model_len <= {draft_len}")
    vocab = target.model_config.vocab_size
    if draft.model_config.vocab_size != vocab or draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
        raise ConfigError(f"draft model {config.draft_model!r} has a different vocabulary "
                          f"({draft.model_config.vocab_size} tokens) from the target's ({vocab}): "
                          f"a draft must share the target's tokenizer")
