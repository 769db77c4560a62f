"""One simulated engine instance: kvflow's scheduler at step granularity, without a model.

Each step follows kvflow's Scheduler (core/scheduler.py): decoding requests take one token each,
unfinished prompts continue with a chunk, then waiting prompts are admitted under the token budget
(`max_num_batched_tokens`) and `max_num_seqs`; KV slots come from a pool of `num_blocks` blocks,
and when the pool runs short the lowest-priority, newest running request is preempted (freed, and
recomputed later with the output it had). Freed full blocks stay in the prefix cache (an LRU over
the free blocks) until reused, so a later prompt with the same leading blocks skips computing them.

Cost per step is O(1) in the number of decoding requests: a decoding request's token count and
block count follow from the step counter (`dec_k0`, `dec_base`), the blocks the batch needs this
step come from a count per step residue mod block_size, and finishes come off a heap keyed by the
step at which they happen. Only prefill chunks, admissions, finishes and preemptions touch
individual requests.

Simplification: a prefix hit is served only from free cached blocks, not from blocks another
running request holds at that moment (the engine shares those too); multi-turn follow-ups, which
arrive after the previous answer, are unaffected.
"""
from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from dataclasses import dataclass

from kvflow.cluster.policy import InstanceLoad, RequestLoad
from kvflow.sim.step_model import StepTimeModel
from kvflow.sim.workload import SimRequest


@dataclass
class InstanceConfig:
    num_blocks: int = 2048
    block_size: int = 16
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    enable_prefix_caching: bool = True


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def _importance(r: SimRequest) -> tuple:
    return (-r.priority, r.arrival, r.request_id)  # most important first: higher priority, then oldest


class SimInstance:
    def __init__(self, instance_id: str, config: InstanceConfig, step_model: StepTimeModel,
                 role: str = "both", created: float = 0.0):
        self.id = instance_id
        self.cfg = config
        self.model = step_model
        self.role = role  # "both" | "prefill" | "decode"
        self.created = created
        self.ready = False
        self.stopped: float | None = None
        bs = config.block_size
        self.load = InstanceLoad(instance_id, 0, 0, config.num_blocks, config.num_blocks, 0)
        self.free_blocks = config.num_blocks
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # prefix cache over the free blocks, LRU first
        self.waiting: list[tuple] = []  # heap of (importance, request)
        self.prefilling: list[SimRequest] = []
        self.decoding: dict[int, SimRequest] = {}
        self.finish_heap: list[tuple[int, int, int, SimRequest]] = []  # (step, id, epoch, request)
        self.residue_counts = [0] * bs  # decoding requests needing a new block at steps k with k % bs == r
        self.ctx_offset = 0  # sum of (dec_base - dec_k0) over decoding: their context is this + n * k
        self.step_no = 0  # the next step to run
        self.busy = False
        self.plan: list[tuple[SimRequest, int]] = []  # prefill chunks of the step in flight
        self.pending_detach: list[SimRequest] = []  # migrations waiting for the step in flight to end
        self.held_for_transfer = 0  # P/D: blocks of finished prompts whose KV is being sent
        self.reserved_for_migration = 0
        self.waiting_demand = 0
        self.incoming_demand = 0  # P/D: blocks of prompts on their way here (the dispatcher counts them)
        self.num_high = 0
        self.num_waiting_high = 0
        # stats
        self.num_preemptions = 0
        self.prompt_tokens_seen = 0
        self.hit_tokens = 0
        self.busy_time = 0.0
        self._seq = itertools.count()

    # ------------------------------------------------------------ entry points
    def add(self, req: SimRequest) -> None:
        """A new (or preempted, or P/D-imported) request joins the queue."""
        req.instance = self
        if req.prefill_target == 0:
            req.prefill_target = req.prompt_len
        if req.priority > 0:
            self.num_high += 1
        self._enqueue(req)
        self._update_load()

    def take_waiting(self) -> list[SimRequest]:
        """Everything queued, removed (a draining instance hands its queue back to the dispatcher)."""
        out = [entry[-1] for entry in self.waiting]
        for req in out:
            self._leave_queue(req)
            req.instance = None
            if req.priority > 0:
                self.num_high -= 1
        self.waiting = []
        self._update_load()
        return out

    def idle(self) -> bool:
        return not (self.waiting or self.prefilling or self.decoding or self.busy or self.held_for_transfer
                    or self.reserved_for_migration or self.pending_detach)

    # ------------------------------------------------------------ one step
    def start_step(self) -> float | None:
        """Plan the next step; returns its duration, or None when there is nothing to run."""
        k = self.step_no
        bs = self.cfg.block_size
        preempted = self._reserve_decode_blocks(k)
        budget = max(0, self.cfg.max_num_batched_tokens - len(self.decoding))
        ctx = self.ctx_offset + len(self.decoding) * k
        plan: list[tuple[SimRequest, int]] = []
        for req in list(self.prefilling):
            if budget <= 0:
                break
            if req not in self.prefilling:
                continue  # preempted for an earlier one
            chunk = min(req.prefill_target - req.num_computed, budget)
            need = _blocks(req.num_computed + chunk, bs) - _blocks(req.num_computed, bs)
            while need > self.free_blocks:
                # only a prompt not yet in this step can give way (decodes hold this step's blocks)
                planned = {id(r) for r, _ in plan}
                unplanned = [r for r in self.prefilling if id(r) not in planned]
                victim = max(unplanned, key=_importance)
                self._preempt(victim, k)
                preempted += 1
                if victim is req:
                    break
            if req not in self.prefilling or need > self.free_blocks:
                continue
            self._take_blocks(need)
            plan.append((req, chunk))
            budget -= chunk
        if preempted == 0:
            budget = self._admit(plan, budget, k)
        if not plan and not self.decoding:
            self._update_load()
            return None
        prefill_tokens = sum(chunk for _, chunk in plan)
        ctx += sum(req.num_computed + chunk for req, chunk in plan)
        self.plan = plan
        self.step_no += 1
        self.busy = True
        self._update_load()
        duration = self.model.step_time(prefill_tokens, len(self.decoding), ctx)
        self.busy_time += duration
        return duration

    def finish_step(self, now: float) -> tuple[list[SimRequest], list[SimRequest]]:
        """Apply the step that just ran. Returns (requests that finished, prompts done on a prefill
        instance, to be sent to a decode instance)."""
        k = self.step_no - 1
        self.busy = False
        finished, handoff = [], []
        for req, chunk in self.plan:
            req.num_computed += chunk
            if req.num_computed < req.prefill_target:
                continue
            self.prefilling.remove(req)
            req.generated += 1
            if req.first_token_time is None:
                req.first_token_time = now + self.model.output_delay  # when the client sees it
            if req.generated >= req.output_len:
                self._free(req, req.num_computed)
                finished.append(req)
            elif self.role == "prefill":
                self.held_for_transfer += _blocks(req.num_computed, self.cfg.block_size)
                req.epoch += 1
                handoff.append(req)
            else:
                self._start_decoding(req, k + 1, req.num_computed + 1)
        self.plan = []
        while self.finish_heap and self.finish_heap[0][0] <= k:
            _, _, epoch, req = heapq.heappop(self.finish_heap)
            if epoch != req.epoch or req.instance is not self:
                continue
            req.generated = req.output_len
            self._stop_decoding(req, k + 1)
            finished.append(req)
        for req in finished:
            req.finish_time = now + self.model.output_delay
            req.instance = None
            if req.priority > 0:
                self.num_high -= 1
        self._update_load()
        return finished, handoff

    # ------------------------------------------------------------ scheduling pieces
    def _reserve_decode_blocks(self, k: int) -> int:
        """Blocks for this step's decode tokens, preempting until they fit. Returns preemptions."""
        preempted = 0
        while self.residue_counts[k % self.cfg.block_size] > self.free_blocks:
            self._preempt(self._victim(), k)
            preempted += 1
        self._take_blocks(self.residue_counts[k % self.cfg.block_size])
        return preempted

    def _admit(self, plan: list, budget: int, k: int) -> int:
        bs = self.cfg.block_size
        while self.waiting and budget > 0 and len(self.prefilling) + len(self.decoding) < self.cfg.max_num_seqs:
            req = self.waiting[0][-1]
            if req.num_computed >= req.prefill_target:  # P/D: prompt computed elsewhere, KV arrived
                if _blocks(req.num_computed, bs) > self.free_blocks:
                    break
                heapq.heappop(self.waiting)
                self._leave_queue(req)
                self._take_blocks(_blocks(req.num_computed, bs))
                self._start_decoding(req, k + 1, req.num_computed + 1)
                continue
            hits = self._prefix_hits(req)
            hit_tokens = len(hits) * bs
            chunk = min(req.prefill_target - hit_tokens, budget)
            new_blocks = _blocks(hit_tokens + chunk, bs) - len(hits)
            if len(hits) + new_blocks > self.free_blocks:
                break  # FCFS: nobody overtakes a request that does not fit
            heapq.heappop(self.waiting)
            self._leave_queue(req)
            for h in hits:
                del self.free_cached[h]
            self.free_blocks -= len(hits)
            self._take_blocks(new_blocks)
            if not req.looked_up:  # the hit rate counts each prompt once, as the engine's does
                req.looked_up = True
                req.hit_tokens = hit_tokens
                self.prompt_tokens_seen += req.prompt_len
                self.hit_tokens += hit_tokens
            req.num_computed = hit_tokens
            self.prefilling.append(req)
            plan.append((req, chunk))
            budget -= chunk
        return budget

    def _prefix_hits(self, req: SimRequest) -> list[int]:
        if not self.cfg.enable_prefix_caching or not self.free_cached:
            return []
        bs = self.cfg.block_size
        # at least one token is computed, so the step samples from it
        hashes = req.content_hashes(bs, req.prefill_target - 1)
        hits = []
        for h in hashes:
            if h not in self.free_cached:
                break
            hits.append(h)
        return hits

    def _victim(self) -> SimRequest:
        # lowest priority, newest: the request the engine's scheduler would preempt
        candidates = itertools.chain(self.prefilling, self.decoding.values())
        return max(candidates, key=_importance)

    def _preempt(self, req: SimRequest, k: int) -> None:
        self.num_preemptions += 1
        req.num_preemptions += 1
        if req.request_id in self.decoding:
            self._stop_decoding(req, k)
        else:
            self.prefilling.remove(req)
            self._free(req, req.num_computed)
        req.num_computed = 0
        req.prefill_target = req.prompt_len + req.generated  # recompute prompt and output so far
        self._enqueue(req)

    def _start_decoding(self, req: SimRequest, k0: int, slots: int) -> None:
        """From step k0 on, the request decodes one token per step; at k0 it needs `slots` KV slots."""
        req.dec_k0, req.dec_base, req.gen0 = k0, slots, req.generated
        req.instance = self
        self.decoding[req.request_id] = req
        self.residue_counts[(k0 - slots + 1) % self.cfg.block_size] += 1
        self.ctx_offset += slots - k0
        finish_step = k0 + req.output_len - req.generated - 1
        heapq.heappush(self.finish_heap, (finish_step, req.request_id, req.epoch, req))

    def _stop_decoding(self, req: SimRequest, k: int, cache: bool = True) -> int:
        """Take a decoding request out before step k runs; frees its blocks. Returns its KV tokens."""
        steps = k - req.dec_k0
        req.generated = req.gen0 + steps
        tokens = req.dec_base - 1 + steps
        del self.decoding[req.request_id]
        self.residue_counts[(req.dec_k0 - req.dec_base + 1) % self.cfg.block_size] -= 1
        self.ctx_offset -= req.dec_base - req.dec_k0
        req.epoch += 1
        self._free(req, tokens, cache)
        return tokens

    def decoding_kv_tokens(self, req: SimRequest) -> int:
        """KV tokens a decoding request holds now (after the steps done so far)."""
        return req.dec_base - 1 + (self.step_no - req.dec_k0)

    # ------------------------------------------------------------ blocks
    def _take_blocks(self, n: int) -> None:
        assert n <= self.free_blocks, (n, self.free_blocks)
        uncached = self.free_blocks - len(self.free_cached)
        for _ in range(n - uncached):
            self.free_cached.popitem(last=False)  # the least recently used cached block is reused
        self.free_blocks -= n

    def _free(self, req: SimRequest, kv_tokens: int, cache: bool = True) -> None:
        bs = self.cfg.block_size
        self.free_blocks += _blocks(kv_tokens, bs)
        if cache and self.cfg.enable_prefix_caching:
            for h in req.content_hashes(bs, kv_tokens):
                self.free_cached[h] = None
                self.free_cached.move_to_end(h)
        assert self.free_blocks <= self.cfg.num_blocks

    def release_transfer(self, req: SimRequest) -> None:
        """P/D: the prompt's KV reached the decode instance; its blocks here are free."""
        blocks = _blocks(req.num_computed, self.cfg.block_size)
        self.held_for_transfer -= blocks
        self._free(req, req.num_computed)
        req.instance = None
        if req.priority > 0:
            self.num_high -= 1
        self._update_load()

    def expect(self, blocks: int) -> None:
        self.incoming_demand += blocks
        self._update_load()

    # ------------------------------------------------------------ migration
    def running_loads(self) -> list[RequestLoad]:
        bs = self.cfg.block_size
        return [RequestLoad(r.request_id, self.id, _blocks(self.decoding_kv_tokens(r), bs), r.priority,
                            r.gen0 + self.step_no - r.dec_k0)
                for r in self.decoding.values() if r.migrating_to is None]

    def reserve(self, blocks: int) -> bool:
        if blocks > self.free_blocks:
            return False
        self._take_blocks(blocks)
        self.reserved_for_migration += blocks
        self._update_load()
        return True

    def unreserve(self, blocks: int) -> None:
        self.reserved_for_migration -= blocks
        self.free_blocks += blocks
        self._update_load()

    def detach(self, req: SimRequest) -> int:
        """Take a decoding request out between steps (its KV has been copied). Returns KV tokens."""
        tokens = self._stop_decoding(req, self.step_no)
        req.instance = None
        if req.priority > 0:
            self.num_high -= 1
        self._update_load()
        return tokens

    def attach(self, req: SimRequest, kv_tokens: int, reserved_blocks: int) -> None:
        """A migrated request lands: its KV is here (in the blocks reserved for it, + extra)."""
        self.reserved_for_migration -= reserved_blocks
        if req.priority > 0:
            self.num_high += 1
        self._start_decoding(req, self.step_no, kv_tokens + 1)  # from the next step on
        self._update_load()

    # ------------------------------------------------------------ bookkeeping
    def _enqueue(self, req: SimRequest) -> None:
        heapq.heappush(self.waiting, (_importance(req), next(self._seq), req))
        self.waiting_demand += _blocks(req.prefill_target, self.cfg.block_size)
        if req.priority > 0:
            self.num_waiting_high += 1

    def _leave_queue(self, req: SimRequest) -> None:
        self.waiting_demand -= _blocks(req.prefill_target, self.cfg.block_size)
        if req.priority > 0:
            self.num_waiting_high -= 1

    def _update_load(self) -> None:
        load = self.load
        load.num_running = len(self.prefilling) + len(self.decoding)
        load.num_waiting = len(self.waiting)
        load.num_free_blocks = self.free_blocks
        load.waiting_demand_blocks = self.waiting_demand + self.incoming_demand
        load.num_high_priority = self.num_high
        load.num_waiting_high_priority = self.num_waiting_high

    def used_blocks(self) -> int:
        return self.cfg.num_blocks - self.free_blocks
