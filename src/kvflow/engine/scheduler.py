"""Token-budget scheduler (Sarathi-Serve stall-free batching, vLLM v1 style).

Each step has one budget of `max_num_batched_tokens`. Running requests are served first (a decode
costs one token, an unfinished prompt continues with a chunk), then waiting requests fill what is
left with prompt chunks. So a long prompt never stalls running decodes. When the KV pool runs out,
the lowest-priority, newest running request is preempted: its blocks are freed and it goes back to
the front of the queue to be recomputed later (its output so far is kept).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvflow.config import SchedulerConfig
from kvflow.engine.kv_cache import BlockPool
from kvflow.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # includes the speculative tokens
    start: int  # num_computed_tokens before this step
    spec_token_ids: list[int] = field(default_factory=list)

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


def _importance(r: Request) -> tuple[int, float]:
    return (r.priority, r.arrival_time)  # lower priority value first, then oldest


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_pool: BlockPool):
        self.config = config
        self.pool = block_pool
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
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
            n += len(spec)
            while not self.reserve(req, req.num_computed_tokens + n):
                if spec:  # drafts are a guess: drop them before preempting anyone
                    n, spec = n - len(spec), []
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                out.num_preempted += 1
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:  # it was the least important one left
                break
            out.scheduled.append(ScheduledRequest(req, n, req.num_computed_tokens, spec))
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
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs or self._waits_for_leader(req):
                still_waiting.append(req)
                continue
            hits = self.pool.find_cached_prefix(req)
            num_hit_tokens = len(hits) * self.pool.block_size
            n = min(req.num_tokens - num_hit_tokens, budget)
            new_blocks = self.pool.blocks_needed(num_hit_tokens + n) - len(hits)
            # Touch before allocating, so the allocation cannot evict the hits themselves.
            self.pool.touch(hits)
            fresh = self.pool.allocate(new_blocks)
            if fresh is None:
                self.pool.release([b.block_id for b in reversed(hits)])
                still_waiting.append(req)
                # Keep FCFS order within a priority: nobody overtakes a request that does not fit.
                still_waiting.extend(r for r in self.waiting[self.waiting.index(req) + 1:])
                break
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = time.time()
                req.num_cached_tokens = num_hit_tokens
                self.pool.record_lookup(req.num_prompt_tokens, num_hit_tokens)
            req.block_ids = [b.block_id for b in hits] + fresh
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

    def reserve(self, req: Request, num_tokens: int) -> bool:
        """Make the request own blocks for `num_tokens` positions (all or nothing)."""
        need = self.pool.blocks_needed(num_tokens) - len(req.block_ids)
        if need <= 0:
            return True
        fresh = self.pool.allocate(need)
        if fresh is None:
            return False
        req.block_ids.extend(fresh)
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.free(req)
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.draft_num_computed = 0  # a draft model's KV went with the blocks
        req.status = RequestStatus.WAITING
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, req)
        self._sort_waiting()  # back to the front among its priority: it is older than any newcomer

    def update_after_step(self, scheduled: list[ScheduledRequest]) -> None:
        """After the engine has advanced num_computed_tokens past the verified tokens: drop blocks
        that only rejected draft tokens needed, and publish newly full blocks to the prefix cache."""
        for s in scheduled:
            req = s.request
            if req.is_finished:
                continue
            keep = self.pool.blocks_needed(req.num_tokens)
            if len(req.block_ids) > keep:
                self.pool.release(req.block_ids[keep:][::-1])
                del req.block_ids[keep:]
            self.pool.cache_full_blocks(req, req.num_computed_tokens)

    def finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
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
