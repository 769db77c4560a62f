"""The simulated cluster: a discrete-event loop over instances, with the real cluster's policies.

Events sit on one heap keyed by time: request arrivals, the end of each instance's step, the two
phases of a live migration, KV transfers of the prefill/decode split, instances finishing their
cold start, and the periodic migration and autoscaling ticks. The dispatcher, the migration policy
and the autoscaler are the objects from kvflow.cluster.policy, fed the InstanceLoad reports each
simulated instance keeps up to date, exactly as the Ray cluster feeds them.

Modelled costs:
- a step: the fitted step-time model (kvflow.sim.step_model) of the batch the scheduler built;
- live migration (Llumnix): the KV blocks are copied while the request keeps decoding on the
  source (blocks x bytes per block / bandwidth), then the request stops, the blocks written
  meanwhile are copied (the downtime: a fixed stop + those bytes / bandwidth), and it resumes on
  the target; it is aborted if the request ends first or the target has no room;
- prefill/decode split (Splitwise): a finished prompt's KV goes to a decode instance in
  prompt tokens x bytes per token / bandwidth + a latency, holding its blocks on the prefill side
  until it lands;
- autoscaling: a new instance takes `cold_start_s` before it accepts requests; requests that find
  no instance wait in the dispatcher (their TTFT includes the cold start).
"""
from __future__ import annotations

import copy
import heapq
import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from kvflow.cluster.policy import (AutoscalePolicy, LeastLoad, MigrationPolicy, NoInstanceError,
                                   make_dispatch_policy)
from kvflow.errors import ConfigError
from kvflow.sim.instance import InstanceConfig, SimInstance, _blocks
from kvflow.sim.step_model import StepTimeModel
from kvflow.sim.workload import SimRequest, next_turn

# event kinds
ARRIVAL, STEP_END, COPY_DONE, LAND, KV_DONE, READY, MIGRATE_TICK, SCALE_TICK, DELIVER = range(9)


@dataclass
class ClusterConfig:
    num_instances: int = 4
    dispatch: str = "least-load"
    instance: InstanceConfig = field(default_factory=InstanceConfig)
    max_model_len: int = 4096
    # live migration
    migration: bool = False
    migration_interval_s: float = 0.05
    high_watermark: float = 0.8
    low_watermark: float = 0.5
    kv_bytes_per_token: int = 23040  # SmolLM2-135M: 30 layers x 3 KV heads x 64 dims x (K, V) x bf16
    migration_bandwidth: float = 5e9  # bytes/s between instances
    migration_stop_s: float = 0.002  # fixed part of the stop (hand-over of the request's state)
    # prefill/decode split: both > 0 turns it on (num_instances is then their sum)
    prefill_instances: int = 0
    decode_instances: int = 0
    kv_transfer_bandwidth: float = 5e9
    kv_transfer_latency_s: float = 0.001
    # autoscaling (colocated only)
    autoscale: bool = False
    min_instances: int = 1
    max_instances: int = 8
    idle_timeout_s: float = 60.0
    cold_start_s: float = 2.0
    autoscale_interval_s: float = 0.5
    # The real cluster's front end knows an instance's load from its last poll reply, which follows
    # the instance's steps, plus the requests it sent there whose add has returned (client.py's
    # _count_in): requests sent in one burst all see the same loads (least-load's fallback sends
    # them to one instance). True: dispatch sees each instance's load as of its last step end, plus
    # the requests that reached it since.
    stale_loads: bool = False

    @property
    def pd_split(self) -> bool:
        return self.prefill_instances > 0 or self.decode_instances > 0

    def validate(self) -> None:
        if self.pd_split and (self.prefill_instances < 1 or self.decode_instances < 1):
            raise ConfigError("P/D split needs --prefill-instances >= 1 and --decode-instances >= 1")
        if self.pd_split and self.autoscale:
            raise ConfigError("autoscaling is simulated for colocated instances only, not with a P/D split")
        if not self.pd_split and not self.autoscale and self.num_instances < 1:
            raise ConfigError(f"num_instances must be >= 1, got {self.num_instances}")
        if self.max_model_len > self.instance.num_blocks * self.instance.block_size:
            raise ConfigError(f"max_model_len {self.max_model_len} exceeds one instance's KV pool "
                              f"({self.instance.num_blocks} blocks x {self.instance.block_size})")


@dataclass(slots=True, eq=False)
class _Migration:
    req: SimRequest
    source: SimInstance
    target: SimInstance
    reason: str
    reserved: int
    started: float
    kv_tokens: int = 0


@dataclass
class SimResult:
    requests: list[SimRequest]
    failed: list[SimRequest]
    instances: list[SimInstance]
    end_time: float
    migrations: list[dict]
    migrations_aborted: int
    wall_seconds: float
    num_events: int


class ClusterSim:
    def __init__(self, config: ClusterConfig, step_model: StepTimeModel, requests: list[SimRequest]):
        config.validate()
        self.cfg = config
        self.model = step_model
        self.requests = requests
        bs = config.instance.block_size
        self.dispatch = make_dispatch_policy(config.dispatch, block_size=bs)
        self.decode_dispatch = LeastLoad()
        self.migration = (MigrationPolicy(config.high_watermark, config.low_watermark)
                          if config.migration else None)
        self.autoscaler = (AutoscalePolicy(config.min_instances, config.max_instances, config.idle_timeout_s)
                           if config.autoscale else None)
        self.block_bytes = config.kv_bytes_per_token * bs
        self.instances: dict[str, SimInstance] = {}
        self.all_instances: list[SimInstance] = []
        self.front: list = []  # loads of the ready instances that take new requests
        self.reported: dict[str, object] = {}  # stale_loads: each instance's load at its last step end
        self.decoders: list = []  # P/D: loads of the ready decode instances
        self.pending: list[SimRequest] = []  # arrived while no instance accepts requests
        self.num_starting = 0
        self.done: list[SimRequest] = []
        self.failed: list[SimRequest] = []
        self.migration_log: list[dict] = []
        self.migrations_aborted = 0
        self._events: list[tuple] = []
        self._seq = itertools.count()
        self._ids = itertools.count(1 + max((r.request_id for r in requests), default=-1))
        self._instance_ids = itertools.count()
        self.live = len(requests)
        self.now = 0.0

    # ------------------------------------------------------------ the loop
    def run(self) -> SimResult:
        started = time.perf_counter()
        self._start_instances()
        for req in self.requests:
            self._push(req.arrival + self._arrival_lag(), ARRIVAL, req)
        if self.migration is not None:
            self._push(self.cfg.migration_interval_s, MIGRATE_TICK, None)
        if self.autoscaler is not None:
            self._push(0.0, SCALE_TICK, None)
        handlers = {ARRIVAL: self._on_arrival, STEP_END: self._on_step_end, COPY_DONE: self._on_copy_done,
                    LAND: self._on_land, KV_DONE: self._on_kv_done, READY: self._on_ready,
                    MIGRATE_TICK: self._on_migrate_tick, SCALE_TICK: self._on_scale_tick, DELIVER: self._deliver}
        events = 0
        heap = self._events
        while heap and self.live > 0:
            self.now, _, kind, payload = heapq.heappop(heap)
            handlers[kind](payload)
            events += 1
        for inst in self.all_instances:
            if inst.stopped is None:
                inst.stopped = self.now
        return SimResult(self.done, self.failed, self.all_instances, self.now, self.migration_log,
                         self.migrations_aborted, time.perf_counter() - started, events)

    def _push(self, at: float, kind: int, payload) -> None:
        heapq.heappush(self._events, (at, next(self._seq), kind, payload))

    # ------------------------------------------------------------ instances
    def _start_instances(self) -> None:
        if self.cfg.pd_split:
            for _ in range(self.cfg.prefill_instances):
                self._ready(self._new_instance("prefill"))
            for _ in range(self.cfg.decode_instances):
                self._ready(self._new_instance("decode"))
        elif not self.cfg.autoscale:
            for _ in range(self.cfg.num_instances):
                self._ready(self._new_instance("both"))
        else:
            for _ in range(min(self.cfg.num_instances, self.cfg.max_instances)):
                self._ready(self._new_instance("both"))

    def _new_instance(self, role: str) -> SimInstance:
        inst = SimInstance(f"i{next(self._instance_ids)}", self.cfg.instance, self.model, role, created=self.now)
        self.instances[inst.id] = inst
        self.all_instances.append(inst)
        return inst

    def _ready(self, inst: SimInstance) -> None:
        inst.ready = True
        (self.decoders if inst.role == "decode" else self.front).append(inst.load)
        self.reported[inst.id] = copy.copy(inst.load)
        pending, self.pending = self.pending, []
        for req in pending:
            self._dispatch(req)

    def _on_ready(self, inst: SimInstance) -> None:
        self.num_starting -= 1
        self._ready(inst)

    def _kick(self, inst: SimInstance) -> None:
        if inst.busy or not inst.ready or inst.stopped is not None:
            return
        duration = inst.start_step()
        if duration is not None:
            self._push(self.now + duration, STEP_END, inst)
        elif inst.load.draining and inst.idle():
            self._stop(inst)

    def _stop(self, inst: SimInstance) -> None:
        inst.stopped = self.now
        del self.instances[inst.id]
        self.front = [l for l in self.front if l is not inst.load]
        self.dispatch.on_instance_removed(inst.id)

    # ------------------------------------------------------------ requests
    def _on_arrival(self, req: SimRequest) -> None:
        if req.prompt_len + req.output_len > self.cfg.max_model_len:
            self.failed.append(req)  # the engine rejects it: longer than max_model_len
            self.live -= 1
            return
        self._dispatch(req)

    def _dispatch(self, req: SimRequest) -> None:
        bs = self.cfg.instance.block_size
        by_blocks = getattr(self.dispatch, "choose_blocks", None)
        loads = ([self.reported.get(l.instance_id, l) for l in self.front] if self.cfg.stale_loads
                 else self.front)
        try:
            if by_blocks is not None:
                iid = by_blocks(req.prompt_hashes(bs), req.priority, loads)
            else:
                iid = self.dispatch.choose([], req.priority, loads)
        except NoInstanceError:
            self.pending.append(req)
            if self.autoscaler is not None and not self.front and self.num_starting == 0:
                self._on_scale_tick(None, reschedule=False)  # cold start now, not at the next tick
            return
        if by_blocks is not None:
            self.dispatch.on_dispatch_blocks(iid, req.prompt_hashes(bs))
        if self.cfg.stale_loads and self.model.dispatch_delay > 0:  # chosen when sent, lands later
            self._push(self.now + self.model.dispatch_delay, DELIVER, (iid, req))
        else:
            self._deliver((iid, req))

    def _arrival_lag(self) -> float:
        """A request reaches its instance dispatch_delay after it is sent. With stale_loads the
        dispatcher chooses when it is sent (DELIVER adds it later); otherwise it is an ideal
        dispatcher that chooses, seeing the loads of that moment, when the request lands."""
        return 0.0 if self.cfg.stale_loads else self.model.dispatch_delay

    def _deliver(self, payload) -> None:
        iid, req = payload
        inst = self.instances.get(iid)
        if inst is None:  # removed meanwhile (autoscaling): dispatch again
            self._dispatch(req)
            return
        inst.add(req)
        if self.cfg.stale_loads:  # the front end counts it in until the instance reports again
            view = self.reported.get(iid)
            if view is not None:
                view.num_waiting += 1
                view.waiting_demand_blocks += _blocks(req.prefill_target, self.cfg.instance.block_size)
        self._kick(inst)

    def _on_step_end(self, inst: SimInstance) -> None:
        finished, handoff = inst.finish_step(self.now)
        if self.cfg.stale_loads:
            self.reported[inst.id] = copy.copy(inst.load)
        for req in finished:
            self._complete(req)
        for req in handoff:
            self._send_kv(inst, req)
        detach, inst.pending_detach = inst.pending_detach, []
        for mig in detach:
            self._detach(mig)
        self._kick(inst)

    def _complete(self, req: SimRequest) -> None:
        self.done.append(req)
        self.live -= 1
        req._prompt_hashes = None  # memory: 100k requests
        if req.migrating_to is not None:
            req.migrating_to = None  # its migration is aborted at the next phase
        follow = next_turn(req, req.finish_time, next(self._ids), self.cfg.max_model_len)
        if follow is not None:
            self.live += 1
            self._push(follow.arrival + self._arrival_lag(), ARRIVAL, follow)

    # ------------------------------------------------------------ P/D split
    def _send_kv(self, prefill: SimInstance, req: SimRequest) -> None:
        target = self.instances[self.decode_dispatch.choose([], req.priority, self.decoders)]
        seconds = (req.num_computed * self.cfg.kv_bytes_per_token / self.cfg.kv_transfer_bandwidth
                   + self.cfg.kv_transfer_latency_s)
        req.kv_transfer_time = seconds
        target.expect(_blocks(req.num_computed, self.cfg.instance.block_size))
        self._push(self.now + seconds, KV_DONE, (prefill, req, target))

    def _on_kv_done(self, payload) -> None:
        prefill, req, target = payload
        prefill.release_transfer(req)
        target.expect(-_blocks(req.num_computed, self.cfg.instance.block_size))
        target.add(req)  # computed prompt: admitted straight into decoding when blocks allow
        self._kick(prefill)
        self._kick(target)

    # ------------------------------------------------------------ live migration
    def _on_migrate_tick(self, _payload) -> None:
        loads = [inst.load for inst in self.instances.values() if inst.ready and inst.role != "prefill"]
        sources = self.migration.candidate_sources(loads)
        if sources:
            running = [r for iid in sources for r in self.instances[iid].running_loads()]
            for m in self.migration.plan(loads, running):
                self._start_migration(m)
        self._push(self.now + self.cfg.migration_interval_s, MIGRATE_TICK, None)

    def _start_migration(self, m) -> None:
        source, target = self.instances[m.source], self.instances[m.target]
        req = source.decoding.get(m.request_id)
        if req is None or req.migrating_to is not None:
            return
        blocks = _blocks(source.decoding_kv_tokens(req), self.cfg.instance.block_size)
        if not target.reserve(blocks):
            self.migrations_aborted += 1
            return
        req.migrating_to = target
        mig = _Migration(req, source, target, m.reason, blocks, self.now)
        self._push(self.now + blocks * self.block_bytes / self.cfg.migration_bandwidth, COPY_DONE, mig)

    def _on_copy_done(self, mig: _Migration) -> None:
        if not self._still_migrating(mig):
            return
        if mig.source.busy:
            mig.source.pending_detach.append(mig)  # stop between steps
        else:
            self._detach(mig)

    def _still_migrating(self, mig: _Migration) -> bool:
        req = mig.req
        if req.migrating_to is mig.target and mig.source.decoding.get(req.request_id) is req:
            return True
        self._abort(mig)
        return False

    def _abort(self, mig: _Migration) -> None:
        if mig.req.migrating_to is mig.target:
            mig.req.migrating_to = None
        mig.target.unreserve(mig.reserved)
        self.migrations_aborted += 1
        self._kick(mig.target)

    def _detach(self, mig: _Migration) -> None:
        if not self._still_migrating(mig):
            return
        kv_tokens = mig.source.decoding_kv_tokens(mig.req)
        extra = _blocks(kv_tokens, self.cfg.instance.block_size) - mig.reserved
        if extra > 0 and not mig.target.reserve(extra):
            self._abort(mig)
            return
        mig.reserved += max(extra, 0)
        mig.kv_tokens = mig.source.detach(mig.req)
        # the stop: copy what was written during the copy (the new blocks and the last, partial one)
        downtime = self.cfg.migration_stop_s + (max(extra, 0) + 1) * self.block_bytes / self.cfg.migration_bandwidth
        self._push(self.now + downtime, LAND, mig)
        self.migration_log.append({"request_id": mig.req.request_id, "reason": mig.reason,
                                   "source": mig.source.id, "target": mig.target.id,
                                   "blocks": mig.reserved, "copy_s": self.now - mig.started,
                                   "downtime_s": downtime})
        self._kick(mig.source)

    def _on_land(self, mig: _Migration) -> None:
        mig.req.migrating_to = None
        mig.req.num_migrations += 1
        mig.target.attach(mig.req, mig.kv_tokens, mig.reserved)
        self._kick(mig.target)

    # ------------------------------------------------------------ autoscaling
    def _on_scale_tick(self, _payload, reschedule: bool = True) -> None:
        loads = [inst.load for inst in self.instances.values() if inst.ready]
        decision = self.autoscaler.decide(loads, self.num_starting, self.now, num_pending=len(self.pending))
        for _ in range(decision.add):
            inst = self._new_instance("both")
            self.num_starting += 1
            self._push(self.now + self.cfg.cold_start_s, READY, inst)
        for iid in decision.remove:
            inst = self.instances[iid]
            inst.load.draining = True
            for req in inst.take_waiting():
                self._dispatch(req)
            self._kick(inst)
        if reschedule:
            self._push(self.now + self.cfg.autoscale_interval_s, SCALE_TICK, None)


def simulate(config: ClusterConfig, step_model: StepTimeModel, requests: list[SimRequest]) -> SimResult:
    return ClusterSim(config, step_model, requests).run()


def summarize(result: SimResult, slos: dict[str, float] | None = None,
              percentiles: list[float] | None = None) -> dict:
    """The metrics `kvflow bench serve` reports (its own code), plus the cluster's own figures."""
    from kvflow.bench.serve import RequestResult, compute_metrics

    done = result.requests
    results = [RequestResult(success=True, prompt_len=r.prompt_len, output_tokens=r.output_len,
                             ttft=r.first_token_time - r.arrival, latency=r.finish_time - r.arrival,
                             start_time=r.arrival, usage_reported=True) for r in done]
    results += [RequestResult(prompt_len=r.prompt_len, start_time=r.arrival, error="longer than max_model_len")
                for r in result.failed]
    start = min((r.arrival for r in done), default=0.0)
    end = max((r.finish_time for r in done), default=0.0)
    metrics = compute_metrics(results, end - start, slos, percentiles or [50.0, 99.0])
    seen = sum(i.prompt_tokens_seen for i in result.instances)
    downtimes = [m["downtime_s"] for m in result.migrations]
    transfers = [r.kv_transfer_time for r in done if r.kv_transfer_time > 0]
    metrics.update({
        "num_instances_used": len(result.instances),
        "instance_seconds": sum(i.stopped - i.created for i in result.instances),
        "busy_fraction": (sum(i.busy_time for i in result.instances)
                          / max(1e-9, sum(i.stopped - i.created for i in result.instances))),
        "prefix_hit_rate": sum(i.hit_tokens for i in result.instances) / seen if seen else 0.0,
        "preemptions": sum(i.num_preemptions for i in result.instances),
        "migrations": len(result.migrations),
        "migrations_aborted": result.migrations_aborted,
        "migrations_by_reason": {k: sum(1 for m in result.migrations if m["reason"] == k)
                                 for k in ("balance", "priority", "drain")},
        "mean_migration_downtime_ms": float(np.mean(downtimes)) * 1000 if downtimes else None,
        "mean_kv_transfer_ms": float(np.mean(transfers)) * 1000 if transfers else None,
        "sim_wall_seconds": result.wall_seconds,
        "sim_events": result.num_events,
    })
    return metrics
