"""Token-budget scheduler (Sarathi-Serve stall-free batching, vLLM v1 style).

Each step has one budget of `max_num_batched_tokens`. Running requests are served first (a decode
costs one token, an unfinished prompt continues with a chunk), then waiting requests fill what is
left with prompt chunks. So a long prompt never stalls running decodes. When the KV pool runs out,
the lowest-priority, newest running request is preempted: its blocks are freed and it goes back to
the front of the queue to be recomputed later (its output so far is kept).

The scheduler owns every request's progress: `schedule` decides what runs, `update_from_output`
applies what the model sampled (accept drafts, roll back rejected ones, append tokens, check stops,
free and publish blocks), and `set_draft_tokens` is the one way speculative drafts come in.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from kvflow.config import SchedulerConfig
from kvflow.core import thinking
from kvflow.core.kv_cache import BlockPool
from kvflow.core.request import Request, RequestStatus
from kvflow.core.spec_tree import DraftTree, accept_path, path_kv_moves
from kvflow.outputs import Logprob, TokenLogprob

logger = logging.getLogger(__name__)


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # includes the speculative tokens
    start: int  # num_computed_tokens before this step
    spec_token_ids: list[int] = field(default_factory=list)
    spec_parents: list[int] | None = None  # a draft tree's parent indices (None: a chain)

    @property
    def samples(self) -> bool:
        """Does this step reach the end of the request's known tokens (so it samples the next one)?"""
        return self.start + self.num_new_tokens - len(self.spec_token_ids) == self.request.num_tokens

    @property
    def token_ids(self) -> list[int]:
        known = self.request.all_token_ids[self.start:self.start + self.num_new_tokens - len(self.spec_token_ids)]
        return known + self.spec_token_ids if self.spec_token_ids else known


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


@dataclass
class SampledTokens:
    """What the model drew for one request this step: the target's token at each of its
    1 + len(drafts) sampled positions, with their logprobs (and top-N entries when asked)."""
    token_ids: list[int]
    logprobs: list[float]
    entries: list[Logprob] | None = None


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, SampledTokens] = field(default_factory=dict)  # by request_id
    prompt_logprobs: dict[str, list[Logprob]] = field(default_factory=dict)  # new entries by request_id
    sample_logits: object = None  # [rows, V] tensor of the sampled rows, for proposers that learn from it


@dataclass
class StepUpdate:
    """What `update_from_output` changed, for the engine's outputs and statistics."""
    touched: list[Request] = field(default_factory=list)  # requests that got tokens or finished
    verified: list[tuple[Request, int, int]] = field(default_factory=list)  # (request, drafts, accepted)
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    # Draft trees: (from slot, to slot) KV copies that put each accepted path at contiguous
    # positions. The engine has the runner apply them before anything else is scheduled.
    kv_moves: list[tuple[int, int]] = field(default_factory=list)


def _importance(r: Request) -> tuple[int, float]:
    return (r.priority, r.arrival_time)  # lower priority value first, then oldest


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_pool: BlockPool):
        self.config = config
        self.pool = block_pool
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        # Requests held out of the schedule while a live migration copies their last KV (cluster/);
        # each remembers the queue it came from.
        self.suspended: dict[Request, list[Request]] = {}
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        if thinking.end_is_due(request):  # a thinking budget of 0: the answer starts at once
            self._force_end_of_thinking(request)
        self.waiting.append(request)
        self._sort_waiting()

    def _sort_waiting(self) -> None:
        self.waiting.sort(key=_importance)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # Most important first, so victims come off the tail, which is never scheduled yet this step.
        self.running.sort(key=_importance)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            spec = self._spec_tokens(req, n, budget)
            parents = req.spec_tree_parents[:len(spec)] if spec and req.spec_tree_parents is not None else None
            n += len(spec)
            while not self.reserve(req, req.num_computed_tokens + n):
                if spec:  # drafts are a guess: drop them before preempting anyone
                    n, spec, parents = n - len(spec), [], None
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                out.num_preempted += 1
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:  # it was the least important one left
                break
            out.scheduled.append(ScheduledRequest(req, n, req.num_computed_tokens, spec, parents))
            budget -= n
            i += 1

        if out.num_preempted == 0:
            budget = self._admit_waiting(out, budget)
        return out

    def _spec_tokens(self, req: Request, n: int, budget: int) -> list[int]:
        """Draft tokens ride along when the request is decoding, within the budget and the context."""
        if not req.spec_token_ids or req.num_computed_tokens + n != req.num_tokens:
            return []
        room = min(budget - n, self.config.max_model_len - req.num_tokens)
        return req.spec_token_ids[:max(0, room)]

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        still_waiting: list[Request] = []
        for req in self.waiting:
            if (budget <= 0 or len(self.running) >= self.config.max_num_seqs or self._waits_for_leader(req)
                    or self._waits_for_grammar(req)):
                still_waiting.append(req)
                continue
            hits = self.pool.find_cached_prefix(req)
            num_hit_tokens = len(hits) * self.pool.block_size
            n = min(req.num_tokens - num_hit_tokens, budget)
            if not self.pool.allocate_slots(req, num_hit_tokens + n, hits):
                still_waiting.append(req)
                # Keep FCFS order within a priority: nobody overtakes a request that does not fit.
                still_waiting.extend(r for r in self.waiting[self.waiting.index(req) + 1:])
                break
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = time.time()
                req.num_cached_tokens = num_hit_tokens
                self.pool.record_lookup(req.num_prompt_tokens, num_hit_tokens)
            req.num_computed_tokens = num_hit_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n, num_hit_tokens))
            budget -= n
        self.waiting = still_waiting
        return budget

    def _waits_for_leader(self, req: Request) -> bool:
        """n > 1: a sibling waits until the first one has computed the shared prompt, then reuses
        its cached blocks instead of computing the prompt again."""
        lead = req.leader
        return (lead is not None and self.pool.enable_prefix_caching and not lead.is_finished
                and lead.num_computed_tokens < lead.num_prompt_tokens)

    @staticmethod
    def _waits_for_grammar(req: Request) -> bool:
        """Structured output: the request waits (and nobody waits for it) until its grammar is
        compiled; one whose compilation failed also waits here until the engine fails it."""
        return req.grammar is not None and (not req.grammar.ready or req.grammar.error is not None)

    def reserve(self, req: Request, num_tokens: int) -> bool:
        """Make the request own blocks for `num_tokens` positions (all or nothing)."""
        return self.pool.allocate_slots(req, num_tokens)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.free(req)
        req.num_computed_tokens = 0
        req.spec_token_ids, req.spec_tree_parents = [], None
        req.draft_num_computed = 0  # a draft model's KV went with the blocks
        req.status = RequestStatus.WAITING
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, req)
        self._sort_waiting()  # back to the front among its priority: it is older than any newcomer

    # ---- after the forward pass ----
    def update_from_output(self, sched: SchedulerOutput, out: ModelRunnerOutput) -> StepUpdate:
        """Advance every scheduled request past what it computed; append what it sampled."""
        update, now = StepUpdate(), time.time()
        for s in sched.scheduled:
            req = s.request
            req.num_computed_tokens = s.start + s.num_new_tokens
            update.num_prompt_tokens += min(s.num_new_tokens, max(0, req.num_prompt_tokens - s.start))
            if req.request_id in out.prompt_logprobs:
                req.prompt_logprobs.extend(out.prompt_logprobs[req.request_id])
            sampled = out.sampled.get(req.request_id)
            if sampled is not None:
                if s.spec_parents is None:
                    update.num_generated_tokens += self._apply_sampled(req, s.spec_token_ids, sampled, now, update)
                else:
                    update.num_generated_tokens += self._apply_tree(req, s, sampled, now, update)
                update.touched.append(req)
            if not req.is_finished:
                self.pool.trim(req)
                self.pool.cache_full_blocks(req, req.num_computed_tokens)
        return update

    def _apply_sampled(self, req: Request, drafts: list[int], sampled: SampledTokens, now: float,
                       update: StepUpdate) -> int:
        """Accept drafts while they equal the target's draws, then take the target's own next token
        (lossless: see spec_decode/verifier.py). Returns the number of tokens appended."""
        accepted = accepted_prefix(drafts, sampled.token_ids)
        req.num_computed_tokens -= len(drafts) - accepted  # rejected drafts' KV is not kept
        req.draft_num_computed = min(req.draft_num_computed, req.num_computed_tokens)
        req.spec_token_ids = []
        if drafts:
            update.verified.append((req, len(drafts), accepted))
        for j, token in enumerate(sampled.token_ids[:accepted + 1]):
            if self._append(req, token, sampled, j, now):
                return j + 1
        return accepted + 1

    def _apply_tree(self, req: Request, s: ScheduledRequest, sampled: SampledTokens, now: float,
                    update: StepUpdate) -> int:
        """A draft tree: accept the longest path whose tokens equal the target's draws (row 0 is the
        draw after the root, row 1 + i the draw after node i), keep only that path's KV (moved down
        to contiguous slots), append its tokens and the draw after its last node."""
        drafts, parents = s.spec_token_ids, s.spec_parents
        path = accept_path(drafts, parents, sampled.token_ids)
        req.num_computed_tokens -= len(drafts) - len(path)
        req.draft_num_computed = min(req.draft_num_computed, req.num_computed_tokens)
        req.spec_token_ids, req.spec_tree_parents = [], None
        update.verified.append((req, len(drafts), len(path)))
        root = s.start + s.num_new_tokens - len(drafts) - 1  # the root token's position
        rows = [0] + [node + 1 for node in path]
        for j, row in enumerate(rows):
            if self._append(req, sampled.token_ids[row], sampled, row, now):
                return j + 1
        bs = self.pool.block_size
        slot = lambda pos: req.block_ids[pos // bs] * bs + pos % bs  # noqa: E731
        update.kv_moves.extend((slot(a), slot(b)) for a, b in path_kv_moves(root, path))
        return len(rows)

    def _append(self, req: Request, token: int, sampled: SampledTokens, row: int, now: float) -> bool:
        """Append one sampled token. True when the request takes no more of this step's tokens: it
        finished, or its thinking budget ran out and the end of thinking was appended after it."""
        req.append_token(token)
        req.cumulative_logprob += sampled.logprobs[row]
        if req.logprobs is not None:
            req.logprobs.append(sampled.entries[row])
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        req.metrics.last_token_time = now
        if req.grammar is not None and not req.grammar.accept(token):
            # The bitmask allowed only grammar tokens, so this is a bug; it fails this request alone.
            logger.error("request %s: token %d is outside its grammar; aborting it", req.request_id, token)
            self.finish(req, "abort")
            return True
        thinking.note_natural_end(req)
        self._check_stop(req, token)
        if req.grammar is not None and not req.is_finished and req.grammar.terminated:
            self.finish(req, "stop")  # the grammar took its stop token (ignore_eos, min_tokens)
        if not req.is_finished and thinking.end_is_due(req):
            self._force_end_of_thinking(req)
            return True
        return req.is_finished

    def _force_end_of_thinking(self, req: Request) -> None:
        """Append the end-of-thinking tokens as if sampled (logprob 0: the engine chose them). The
        next step computes their KV as one chunk before sampling the answer's first token."""
        # KV past the last appended token came from accepted drafts that assumed no forced text.
        req.num_computed_tokens = min(req.num_computed_tokens, req.num_tokens)
        req.spec_token_ids, req.spec_tree_parents = [], None
        for token in req.thinking_end_ids:
            req.append_token(token)
            if req.logprobs is not None:
                req.logprobs.append({token: TokenLogprob(0.0, 1)})
            self._check_stop(req, token)
            if req.is_finished:
                return
        req.answer_start = req.num_output_tokens

    def _check_stop(self, req: Request, token: int) -> None:
        p = req.params
        stop_str = req.detokenizer.add_token(token) if req.detokenizer is not None else None
        if req.num_output_tokens >= p.min_tokens:
            if token in (p.stop_token_ids or ()):
                return self.finish(req, "stop", token)
            if not p.ignore_eos and token in req.eos_token_ids:
                return self.finish(req, "stop", None)
            if stop_str is not None:
                return self.finish(req, "stop", stop_str)
        if p.max_tokens is not None and thinking.answer_tokens(req) >= p.max_tokens:
            return self.finish(req, "length")
        if req.num_tokens >= self.config.max_model_len:
            return self.finish(req, "length")

    # ---- drafts, endings, hand-over ----
    def set_draft_tokens(self, drafts: dict[Request, list[int] | DraftTree]) -> None:
        """The drafts each running request verifies next step (none for those not named): a chain
        of tokens, or a DraftTree whose nodes list parents before children."""
        for req in self.running:
            d = drafts.get(req, [])
            if req.grammar is not None:  # structured: a chain, cut where the grammar stops allowing it
                d = [] if isinstance(d, DraftTree) and not d.is_chain else req.grammar.valid_prefix(
                    list(d.token_ids) if isinstance(d, DraftTree) else list(d))
            if isinstance(d, DraftTree) and not d.is_chain:
                req.spec_token_ids, req.spec_tree_parents = list(d.token_ids), list(d.parents)
            else:  # a chain (a one-branch tree is verified as one)
                req.spec_token_ids = list(d.token_ids) if isinstance(d, DraftTree) else d
                req.spec_tree_parents = None

    def finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        if req in self.suspended:
            self.resume(req)
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status == RequestStatus.WAITING:
            self.waiting.remove(req)
        self.pool.cache_full_blocks(req, req.num_computed_tokens)  # a finished chat turn is the next one's prefix
        self.pool.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        req.metrics.finished_time = time.time()

    def add_imported(self, req: Request, reserved_blocks: list[int] = ()) -> bool:
        """Take over a request exported by another instance. A running one gets blocks for its
        computed tokens: `reserved_blocks` (already holding the KV of its first tokens, copied
        ahead by a live migration) and fresh ones for the rest (the caller writes their KV); False
        if the pool is short (the reserved blocks then stay the caller's)."""
        req.block_ids, req.spec_token_ids, req.draft_num_computed = [], [], 0
        req.spec_tree_parents = None
        if req.num_computed_tokens == 0 or req.status != RequestStatus.RUNNING:
            assert not reserved_blocks, "KV copied ahead for a request that has none"
            req.status, req.num_computed_tokens = RequestStatus.WAITING, 0
            self.add(req)
            return True
        req.block_ids = list(reserved_blocks)
        if len(self.running) >= self.config.max_num_seqs or not self.pool.allocate_slots(req, req.num_computed_tokens):
            req.block_ids = []
            return False
        self.running.append(req)
        return True

    def suspend(self, req: Request) -> None:
        """Hold a request out of the schedule, keeping its blocks (the last stage of a migration)."""
        queue = self.running if req in self.running else self.waiting
        queue.remove(req)
        self.suspended[req] = queue

    def resume(self, req: Request) -> None:
        queue = self.suspended.pop(req)
        queue.append(req)
        if queue is self.waiting:
            self._sort_waiting()


def accepted_prefix(drafts: list[int], targets: list[int]) -> int:
    """Leading drafts equal to the target's tokens at the same positions."""
    a = 0
    while a < len(drafts) and drafts[a] == targets[a]:
        a += 1
    return a
