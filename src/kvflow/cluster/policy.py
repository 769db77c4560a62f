"""Cluster policies: where a request goes (dispatch), which running request moves (migration), and
how many instances there should be (autoscaling).

Torch-free and Ray-free on purpose: the real Ray cluster (`kvflow.cluster`) and the simulator
(`kvflow.sim`) run these same objects, so a policy measured in simulation is the policy deployed.
Every decision is made from `InstanceLoad` reports alone (what an instance says after each step),
never by reaching into an instance.

Load is Llumnix's *virtual usage*: KV blocks in use, plus the blocks the queued prompts will need,
plus headroom reserved for high-priority requests, over the pool size. Counting the queue makes a
busy instance look full before its blocks are; the headroom makes an instance holding
high-priority work look fuller, so new work goes elsewhere and the important requests keep room.
"""
from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass, field

DEFAULT_PRIORITY_HEADROOM_BLOCKS = 16  # reserved per high-priority request (about 256 tokens)


class NoInstanceError(RuntimeError):
    """Every instance is draining or there is none: the caller holds the request (and may scale out)."""


@dataclass
class InstanceLoad:
    """One instance's load, reported after each step (real cluster) or simulated event."""

    instance_id: str
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    waiting_demand_blocks: int  # KV blocks the queued requests' prompts will need
    num_high_priority: int = 0  # running + waiting requests with priority > 0
    draining: bool = False  # being removed: gets no new requests
    num_waiting_high_priority: int = 0  # queued requests with priority > 0 (migration frees room)

    @property
    def num_used_blocks(self) -> int:
        return self.num_total_blocks - self.num_free_blocks

    @property
    def num_requests(self) -> int:
        return self.num_running + self.num_waiting


def virtual_usage(load: InstanceLoad,
                  priority_headroom_blocks: int = DEFAULT_PRIORITY_HEADROOM_BLOCKS) -> float:
    """(blocks in use + queued demand + high-priority headroom) / total blocks; a draining (or
    empty-pool) instance counts as infinitely loaded so nothing new lands there."""
    if load.draining or load.num_total_blocks <= 0:
        return math.inf
    demand = (load.num_used_blocks + load.waiting_demand_blocks
              + load.num_high_priority * priority_headroom_blocks)
    return demand / load.num_total_blocks


def _open_instances(loads: list[InstanceLoad]) -> list[InstanceLoad]:
    open_ = [load for load in loads if not load.draining]
    if not open_:
        raise NoInstanceError("no instance accepts requests (none running, or all draining)")
    return open_


def _least_loaded(loads: list[InstanceLoad], headroom: int) -> InstanceLoad:
    # Ties (e.g. all empty) go to the instance with fewer requests, then to list order.
    return min(loads, key=lambda load: (virtual_usage(load, headroom), load.num_requests))


# ---------------------------------------------------------------- dispatch
class DispatchPolicy:
    """Picks the instance for a new request. The caller reports what it did with on_dispatch."""

    name = "base"

    def choose(self, prompt_token_ids: list[int], priority: int, loads: list[InstanceLoad]) -> str:
        raise NotImplementedError

    def on_dispatch(self, instance_id: str, prompt_token_ids: list[int]) -> None:
        pass

    def on_instance_removed(self, instance_id: str) -> None:
        pass


class RoundRobin(DispatchPolicy):
    """Each open instance in turn, skipping draining ones; blind to load."""

    name = "round-robin"

    def __init__(self):
        self._counter = 0

    def choose(self, prompt_token_ids: list[int], priority: int, loads: list[InstanceLoad]) -> str:
        open_ = _open_instances(loads)
        chosen = open_[self._counter % len(open_)]
        self._counter += 1
        return chosen.instance_id


class LeastLoad(DispatchPolicy):
    """The instance with the lowest virtual usage (Llumnix's dispatch rule)."""

    name = "least-load"

    def __init__(self, priority_headroom_blocks: int = DEFAULT_PRIORITY_HEADROOM_BLOCKS):
        self.priority_headroom_blocks = priority_headroom_blocks

    def choose(self, prompt_token_ids: list[int], priority: int, loads: list[InstanceLoad]) -> str:
        return _least_loaded(_open_instances(loads), self.priority_headroom_blocks).instance_id


def prompt_block_hashes(prompt_token_ids: list[int], block_size: int) -> list[int]:
    """Chained hashes of the prompt's full blocks: block i's hash covers blocks 0..i, so equal
    hashes mean an equal prefix (as the engine's prefix cache keys its blocks)."""
    hashes: list[int] = []
    parent = None
    for start in range(0, len(prompt_token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(prompt_token_ids[start:start + block_size])))
        hashes.append(parent)
    return hashes


class PrefixAffinity(DispatchPolicy):
    """Send a prompt where its leading blocks were sent before (they are likely still cached there).

    Per instance an LRU of the block hashes of prompts dispatched to it: the dispatcher's picture of
    that instance's prefix cache (as SGLang's router keeps one), bounded to roughly the instance's
    pool size. The instance holding most leading blocks wins if its virtual usage is under
    `max_usage`; otherwise, or with no hit at all, the request goes to the least-loaded instance.
    """

    name = "prefix-affinity"

    def __init__(self, block_size: int = 16, max_usage: float = 0.9,
                 cache_blocks: int | None = None,
                 priority_headroom_blocks: int = DEFAULT_PRIORITY_HEADROOM_BLOCKS):
        self.block_size = block_size
        self.max_usage = max_usage
        self.cache_blocks = cache_blocks  # None: each instance's pool size, as last reported
        self.priority_headroom_blocks = priority_headroom_blocks
        self._cached: dict[str, OrderedDict[int, None]] = {}
        self._pool_blocks: dict[str, int] = {}
        self.last_hit_blocks = 0  # leading blocks matched by the last choose() (for reports)

    def choose(self, prompt_token_ids: list[int], priority: int, loads: list[InstanceLoad]) -> str:
        return self.choose_blocks(prompt_block_hashes(prompt_token_ids, self.block_size), priority, loads)

    def on_dispatch(self, instance_id: str, prompt_token_ids: list[int]) -> None:
        self.on_dispatch_blocks(instance_id, prompt_block_hashes(prompt_token_ids, self.block_size))

    # The same two decisions from chained block hashes the caller already has (the simulator
    # describes prompts by their blocks, not by token ids).
    def choose_blocks(self, hashes: list[int], priority: int, loads: list[InstanceLoad]) -> str:
        open_ = _open_instances(loads)
        for load in open_:
            self._pool_blocks[load.instance_id] = load.num_total_blocks
        best, best_hits = None, 0
        for load in open_:
            hits = self._leading_hits(load.instance_id, hashes)
            if hits > best_hits:
                best, best_hits = load, hits
        self.last_hit_blocks = best_hits
        if best is not None and virtual_usage(best, self.priority_headroom_blocks) < self.max_usage:
            return best.instance_id
        self.last_hit_blocks = 0
        return _least_loaded(open_, self.priority_headroom_blocks).instance_id

    def on_dispatch_blocks(self, instance_id: str, hashes: list[int]) -> None:
        cache = self._cached.setdefault(instance_id, OrderedDict())
        for h in hashes:
            cache[h] = None
            cache.move_to_end(h)
        capacity = self.cache_blocks or self._pool_blocks.get(instance_id, 0)
        while capacity and len(cache) > capacity:
            cache.popitem(last=False)

    def on_instance_removed(self, instance_id: str) -> None:
        self._cached.pop(instance_id, None)
        self._pool_blocks.pop(instance_id, None)

    def _leading_hits(self, instance_id: str, hashes: list[int]) -> int:
        cache = self._cached.get(instance_id)
        if not cache:
            return 0
        return sum(1 for _ in itertools.takewhile(cache.__contains__, hashes))


DISPATCH_POLICIES = ("round-robin", "least-load", "prefix-affinity")


def make_dispatch_policy(name: str, block_size: int = 16) -> DispatchPolicy:
    if name == "round-robin":
        return RoundRobin()
    if name == "least-load":
        return LeastLoad()
    if name == "prefix-affinity":
        return PrefixAffinity(block_size=block_size)
    raise ValueError(f"unknown dispatch policy {name!r}; choose one of {', '.join(DISPATCH_POLICIES)}")


# ---------------------------------------------------------------- migration
@dataclass
class RequestLoad:
    """A running request, as the migration policy sees it."""

    request_id: str
    instance_id: str
    num_blocks: int
    priority: int = 0
    num_output_tokens: int = 0


@dataclass
class Migration:
    request_id: str
    source: str
    target: str
    reason: str  # "balance" | "priority" | "drain"


class MigrationPolicy:
    """Llumnix's rescheduling rules, one plan per call (the caller calls it periodically):

    - drain: move requests off draining instances (one per instance per call);
    - priority: where a high-priority request waits without room, move a low-priority request out;
    - balance: from instances above `high_watermark` virtual usage to ones below `low_watermark`,
      moving the request with the fewest KV blocks (least to copy, shortest stop).

    At most one migration out of and one into each instance per call, so a plan never piles onto
    one target and a source never loses more than one request before its load is re-reported.
    A target must have free blocks for the whole request.
    """

    def __init__(self, high_watermark: float = 0.8, low_watermark: float = 0.5,
                 priority_headroom_blocks: int = DEFAULT_PRIORITY_HEADROOM_BLOCKS):
        if low_watermark >= high_watermark:
            raise ValueError(f"low_watermark ({low_watermark}) must be below high_watermark ({high_watermark})")
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self.priority_headroom_blocks = priority_headroom_blocks

    def candidate_sources(self, loads: list[InstanceLoad]) -> set[str]:
        """The instances plan() may move a request off: callers need only report their running
        requests (fewer to gather, on a big cluster)."""
        return {load.instance_id for load in loads
                if load.draining or _lacks_room_for_priority(load)
                or virtual_usage(load, self.priority_headroom_blocks) > self.high_watermark}

    def plan(self, loads: list[InstanceLoad], running: list[RequestLoad]) -> list[Migration]:
        by_instance: dict[str, list[RequestLoad]] = {}
        for request in running:
            by_instance.setdefault(request.instance_id, []).append(request)
        usage = {load.instance_id: virtual_usage(load, self.priority_headroom_blocks) for load in loads}
        free = {load.instance_id: load.num_free_blocks for load in loads}
        targets = sorted((load for load in loads if not load.draining), key=lambda l: usage[l.instance_id])
        sent_out: set[str] = set()
        taken_in: set[str] = set()
        plan: list[Migration] = []

        def move(request: RequestLoad | None, reason: str, max_target_usage: float) -> None:
            if request is None or request.instance_id in sent_out:
                return
            for target in targets:
                tid = target.instance_id
                if usage[tid] >= max_target_usage:
                    break  # sorted by usage: every later target is fuller
                if tid == request.instance_id or tid in taken_in or tid in sent_out:
                    continue
                if free[tid] < request.num_blocks:
                    continue
                plan.append(Migration(request.request_id, request.instance_id, tid, reason))
                sent_out.add(request.instance_id)
                taken_in.add(tid)
                return

        for load in loads:
            if load.draining:
                move(_smallest(by_instance.get(load.instance_id, [])), "drain", math.inf)
        for load in loads:
            if not load.draining and _lacks_room_for_priority(load):
                victims = [r for r in by_instance.get(load.instance_id, []) if r.priority <= 0]
                # the largest low-priority request frees the most room in one move
                move(max(victims, key=lambda r: r.num_blocks, default=None), "priority", self.high_watermark)
        for load in sorted(loads, key=lambda l: usage[l.instance_id], reverse=True):
            if load.draining or usage[load.instance_id] <= self.high_watermark:
                continue
            move(_smallest(by_instance.get(load.instance_id, [])), "balance", self.low_watermark)
        return plan


def _smallest(requests: list[RequestLoad]) -> RequestLoad | None:
    return min(requests, key=lambda r: (r.num_blocks, r.num_output_tokens), default=None)


def _lacks_room_for_priority(load: InstanceLoad) -> bool:
    return load.num_waiting_high_priority > 0 and load.waiting_demand_blocks > load.num_free_blocks


# ---------------------------------------------------------------- autoscaling
@dataclass
class ScaleDecision:
    add: int = 0
    remove: list[str] = field(default_factory=list)  # instance ids to drain, then stop


class AutoscalePolicy:
    """How many instances: out on pressure, in after a quiet spell, to zero if allowed.

    Scale out by one when the mean virtual usage passes `scale_out_usage`, the mean queue per
    instance passes `scale_out_queue`, or requests wait with no instance at all (the cold start).
    Nothing more is added while an instance is starting, so one burst does not start a fleet.
    Scale in the least-loaded instance once it has stayed under `scale_in_usage` for
    `idle_timeout_s`; the last instance goes (scale to zero, min_instances=0) only when it is empty.
    """

    def __init__(self, min_instances: int = 1, max_instances: int = 8, idle_timeout_s: float = 60.0,
                 scale_out_usage: float = 0.8, scale_out_queue: float = 4.0, scale_in_usage: float = 0.2,
                 priority_headroom_blocks: int = DEFAULT_PRIORITY_HEADROOM_BLOCKS):
        if not 0 <= min_instances <= max_instances or max_instances < 1:
            raise ValueError(f"need 0 <= min_instances ({min_instances}) <= max_instances ({max_instances}), "
                             "max_instances >= 1")
        self.min_instances = min_instances
        self.max_instances = max_instances
        self.idle_timeout_s = idle_timeout_s
        self.scale_out_usage = scale_out_usage
        self.scale_out_queue = scale_out_queue
        self.scale_in_usage = scale_in_usage
        self.priority_headroom_blocks = priority_headroom_blocks
        self._quiet_since: dict[str, float] = {}

    def decide(self, loads: list[InstanceLoad], num_starting: int, now: float,
               num_pending: int = 0) -> ScaleDecision:
        """num_pending: requests the dispatcher holds because no instance accepts them."""
        active = [load for load in loads if not load.draining]
        self._track_quiet(active, now)
        total = len(active) + num_starting
        if total < self.min_instances:
            return ScaleDecision(add=self.min_instances - total)
        if total == 0:
            return ScaleDecision(add=1 if num_pending > 0 else 0)
        if num_starting == 0 and total < self.max_instances and self._under_pressure(active, num_pending):
            return ScaleDecision(add=1)
        if num_starting == 0 and num_pending == 0 and len(active) > self.min_instances:
            victim = self._idle_victim(active, now)
            if victim is not None:
                self._quiet_since.pop(victim, None)
                return ScaleDecision(remove=[victim])
        return ScaleDecision()

    def _under_pressure(self, active: list[InstanceLoad], num_pending: int) -> bool:
        if not active:
            return num_pending > 0
        mean_usage = sum(virtual_usage(l, self.priority_headroom_blocks) for l in active) / len(active)
        mean_queue = (sum(l.num_waiting for l in active) + num_pending) / len(active)
        return mean_usage > self.scale_out_usage or mean_queue > self.scale_out_queue

    def _track_quiet(self, active: list[InstanceLoad], now: float) -> None:
        seen = set()
        for load in active:
            seen.add(load.instance_id)
            if virtual_usage(load, self.priority_headroom_blocks) < self.scale_in_usage:
                self._quiet_since.setdefault(load.instance_id, now)
            else:
                self._quiet_since.pop(load.instance_id, None)
        for gone in set(self._quiet_since) - seen:
            del self._quiet_since[gone]

    def _idle_victim(self, active: list[InstanceLoad], now: float) -> str | None:
        quiet = [l for l in active
                 if now - self._quiet_since.get(l.instance_id, math.inf) >= self.idle_timeout_s]
        if len(active) == 1:
            quiet = [l for l in quiet if l.num_requests == 0]  # nowhere to drain the last one to
        if not quiet:
            return None
        return _least_loaded(quiet, self.priority_headroom_blocks).instance_id
