"""ClusterClient: the cluster seen as one engine. It has the AsyncEngine's interface (add_request
returning a RequestStream, abort, stats, admission, drain, shutdown), so the OpenAI front end runs
on it unchanged, and it does what a cluster adds:

- dispatch: each request goes to the instance the DispatchPolicy picks from the instances' latest
  InstanceLoad (with the requests sent since counted in, so a burst spreads out);
- one poll loop per instance brings its numbered delta outputs; a request's stream takes them in
  order whichever instance they came from (after a migration, the target's may arrive first);
- faults: a request sent to a dead instance goes elsewhere; when an instance dies, its requests
  that had not streamed anything yet are dispatched again, the others end with a clear error;
- live migration (migration.py), planned by the MigrationPolicy every migration_interval seconds
  (balance with --enable-migration; always off draining instances);
- prefill/decode split: requests go to prefill instances, which hand each over after its first
  token; the client imports it on a decode instance (the KV travels through Ray's object store);
- autoscaling: AutoscalePolicy decides; new instances start in the background (a request that
  finds none waits for one: the cold start), removed ones are drained by migration, then stopped.

The front end keeps the tokenizer and the model's shape, so it answers tokenize, length checks and
/v1/models with no instance running."""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field, fields
from types import SimpleNamespace
from typing import Collection

from kvflow.cluster import policy as P
from kvflow.cluster.instance import Delta, EngineInstance, Handoff, InstanceDrainingError
from kvflow.cluster.migration import MigrationReport, live_migrate
from kvflow.cluster.ray_env import ClusterError, init_ray
from kvflow.config import ClusterConfig, EngineConfig
from kvflow.engine.async_engine import EngineObserver, EngineStats, RequestStream, ServingLifecycle
from kvflow.errors import EngineDeadError, InvalidRequestError, KvflowError, QueueFullError
from kvflow.sampling_params import SamplingParams

logger = logging.getLogger("kvflow.cluster")

POLL_TIMEOUT = 1.0


@dataclass
class InstanceHandle:
    instance_id: str
    actor: object
    role: str  # "mixed" (prefill and decode), "prefill" or "decode"
    info: dict
    load: P.InstanceLoad
    stats: EngineStats = field(default_factory=EngineStats)
    running: list[P.RequestLoad] = field(default_factory=list)
    alive: bool = True
    draining: bool = False
    poller: asyncio.Task | None = None


@dataclass
class Route:
    """A request the client holds: where it runs and how far its stream has got."""
    request_id: str
    prompt: list[int]
    params: SamplingParams
    priority: int
    arrival: float
    stream: RequestStream
    instance_id: str | None = None
    next_seq: int = 0
    held: dict[int, Delta] = field(default_factory=dict)  # deltas that came before their turn
    started: bool = False  # something was streamed to the client: it can no longer be re-run
    migrating: str | None = None  # the target instance while a migration runs
    # for the latency observer
    first_seen: bool = False
    last_time: dict[int, float] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)


@dataclass
class TransferReport:
    """One prefill -> decode hand-over."""
    request_id: str
    source: str
    target: str
    kv_bytes: int
    export_s: float  # reading the KV out on the prefill instance
    transfer_s: float  # from the hand-over's arrival at the client to the decode instance holding it


@dataclass
class ColdStart:
    """One instance start: Ray actor (process) start, engine build (weights), then ready."""
    instance_id: str
    process_s: float
    engine_s: float
    total_s: float
    first_token_s: float | None = None  # request arrival (or start, if later) to first token


class ClusterClient(ServingLifecycle):
    kind = "cluster"

    def __init__(self, engine_config: EngineConfig, cluster: ClusterConfig, max_queue_len: int | None = None,
                 observer: EngineObserver | None = None):
        from kvflow.model.loader import load_tokenizer

        cluster.validate()
        self.cluster = cluster
        self.engine_config = engine_config
        self.max_queue_len = max_queue_len
        self.observer = observer
        self.options = _engine_options(engine_config)
        threads = cluster.threads_per_instance
        n_start = self._initial_instances()
        most = max(n_start, cluster.max_instances or 0, cluster.instances or 0)
        self.ray = init_ray(cluster.ray_address, most * threads)
        self._actor_class = self.ray.remote(EngineInstance)
        self.tokenizer, self.eos_token_ids = load_tokenizer(engine_config.model)
        pd = cluster.prefill_instances > 0
        self.instances: dict[str, InstanceHandle] = {}
        self.routes: dict[str, Route] = {}
        self.dispatch_policy = P.make_dispatch_policy(cluster.dispatch_policy, engine_config.cache.block_size)
        self.migration_policy = P.MigrationPolicy()
        self.autoscale_policy = self._make_autoscaler()
        self.migrations: list[MigrationReport] = []
        self.transfers: list[TransferReport] = []
        self.cold_starts: list[ColdStart] = []
        self._ids = itertools.count()
        self._instance_ids = itertools.count()
        self._num_starting = 0
        self._num_waiting_for_instance = 0
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._started_at: dict[str, float] = {}
        self._standby: tuple[str, object] | None = None
        roles = (["prefill"] * cluster.prefill_instances + ["decode"] * cluster.decode_instances if pd
                 else ["mixed"] * n_start)
        self._start_blocking(roles)
        self.engine = self._front_end_view()

    @property
    def pd(self) -> bool:
        """Prefill/decode split: some instances run prompts only."""
        return any(h.role == "prefill" for h in self.instances.values())

    def set_role(self, instance_id: str, role: str) -> None:
        """Move an instance between pools ("mixed", "prefill", "decode"), as Splitwise does when the
        mix of prompts and decodes changes; applies to requests dispatched from now on."""
        if role not in ("mixed", "prefill", "decode"):
            raise ValueError(f"role must be mixed, prefill or decode, got {role!r}")
        self.instances[instance_id].role = role

    def _initial_instances(self) -> int:
        c = self.cluster
        if c.prefill_instances:
            return c.prefill_instances + c.decode_instances
        n = c.instances if c.instances is not None else max(1, c.min_instances or 0)
        return max(1, n)  # at least one, to learn the model's shape (scale-to-zero removes it when idle)

    def _make_autoscaler(self) -> P.AutoscalePolicy | None:
        c = self.cluster
        if c.min_instances is None or c.prefill_instances:
            return None
        most = c.max_instances or max(c.instances or 1, c.min_instances, 1)
        return P.AutoscalePolicy(min_instances=c.min_instances, max_instances=most, idle_timeout_s=c.idle_timeout)

    # ---------------- instances ----------------
    def _create(self, role: str, standby: bool = False):
        iid = f"{role[0] if role != 'mixed' else 'i'}{next(self._instance_ids)}"
        # A standby process idles until it is needed: it asks Ray for no CPU, so it never waits for one.
        cpus = 0 if standby else self.cluster.threads_per_instance
        actor = self._actor_class.options(num_cpus=cpus, name=None).remote(
            iid, self.options, self.cluster.threads_per_instance, self.cluster.weight_cache, standby)
        return iid, actor, time.perf_counter()

    async def _keep_standby(self) -> None:
        """Autoscaling: one process started ahead (Ray worker and imports, no engine, no KV), so a
        cold start only builds the engine."""
        if self._standby is not None:
            return
        iid, actor, _ = self._create("mixed", standby=True)
        await actor.ping.remote()
        self._standby = (iid, actor)

    def _register(self, iid: str, actor, role: str, info: dict, t0: float) -> InstanceHandle:
        total = time.perf_counter() - t0
        engine_s = info["load_seconds"]
        self.cold_starts.append(ColdStart(iid, max(0.0, total - engine_s), engine_s, total))
        load = P.InstanceLoad(iid, 0, 0, info["num_blocks"], info["num_blocks"], 0)
        handle = InstanceHandle(iid, actor, role, info, load, EngineStats(num_blocks=info["num_blocks"],
                                                                          num_free_blocks=info["num_blocks"]))
        self.instances[iid] = handle
        self._started_at[iid] = time.time()
        logger.info("instance %s (%s) ready in %.2f s: process %.2f s, engine and weights %.2f s",
                    iid, role, total, total - engine_s, engine_s)
        return handle

    def _start_blocking(self, roles: list[str]) -> None:
        created = [(role, *self._create(role)) for role in roles]
        for role, iid, actor, t0 in created:
            try:
                info = self.ray.get(actor.start.remote())
            except Exception as e:  # noqa: BLE001 - the actor's own error says what went wrong
                raise ClusterError(f"instance {iid} failed to start: {_message(e)}") from None
            self._register(iid, actor, role, info, t0)

    def _front_end_view(self) -> SimpleNamespace:
        """What the front end reads from `async_engine.engine`, kept here: no instance needed."""
        info = next(iter(self.instances.values())).info
        config = self.engine_config
        config.scheduler.max_model_len = info["max_model_len"]
        config.dtype, config.device = info["dtype"], info["device"]
        return SimpleNamespace(tokenizer=self.tokenizer, eos_token_ids=self.eos_token_ids, config=config,
                               model_config=info["model_config"], model_path=info["model_path"],
                               block_pool=SimpleNamespace(block_size=info["block_size"], num_blocks=info["num_blocks"]))

    async def add_instance(self, role: str = "mixed") -> InstanceHandle:
        """Start one more instance (in the background of the event loop); returns it once ready."""
        self._num_starting += 1
        try:
            if self._standby is not None and role == "mixed":
                (iid, actor), self._standby = self._standby, None
                t0 = time.perf_counter()
            else:
                iid, actor, t0 = self._create(role)
            info = await actor.start.remote()
        finally:
            self._num_starting -= 1
        if self.autoscale_policy is not None:
            self._spawn(self._keep_standby())
        handle = self._register(iid, actor, role, info, t0)
        self._watch(handle)
        self._notify()
        return handle

    async def remove_instance(self, instance_id: str) -> None:
        """Drain: no new requests, the running ones migrate away; then stop it."""
        h = self.instances.get(instance_id)
        if h is None or h.draining:
            return
        h.draining, h.load.draining = True, True
        self.dispatch_policy.on_instance_removed(instance_id)
        try:
            await h.actor.drain.remote()
        except Exception:  # noqa: BLE001 - dead already
            pass
        while h.alive and (self._routes_on(instance_id) or h.load.num_running or h.load.num_waiting):
            await asyncio.sleep(0.05)
        await self._stop_instance(h)

    async def _stop_instance(self, h: InstanceHandle) -> None:
        self.instances.pop(h.instance_id, None)
        h.alive = False
        if h.poller is not None:
            h.poller.cancel()
        try:
            await asyncio.wait_for(h.actor.shutdown.remote(), 10)
        except Exception:  # noqa: BLE001 - stopping anyway
            pass
        self.ray.kill(h.actor)
        logger.info("instance %s stopped", h.instance_id)

    def kill_instance(self, instance_id: str) -> None:
        """Kill an instance's process at once (fault tests); the client finds out as Ray does."""
        self.ray.kill(self.instances[instance_id].actor, no_restart=True)

    def _routes_on(self, instance_id: str) -> list[Route]:
        return [r for r in self.routes.values() if r.instance_id == instance_id]

    def _notify(self) -> None:
        """Wake whoever waits for an instance or for load to change."""
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    # ---------------- lifecycle (the AsyncEngine's interface) ----------------
    def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        for h in self.instances.values():
            self._watch(h)
        self._spawn(self._migration_loop())
        if self.autoscale_policy is not None:
            self._spawn(self._autoscale_loop())
            self._spawn(self._keep_standby())

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("cluster task failed: %r", task.exception())

    def _watch(self, h: InstanceHandle) -> None:
        h.poller = self._spawn(self._poll_loop(h))

    @property
    def is_running(self) -> bool:
        return self._loop is not None and self._dead is None

    def _in_flight(self) -> Collection[RequestStream]:
        return [r.stream for r in self.routes.values()]

    def abort_all(self, err: BaseException) -> int:
        routes = list(self.routes.values())
        for r in routes:
            r.stream._put(err)
            self.abort(r.request_id)
        return len(routes)

    async def shutdown(self, timeout: float = 30.0) -> None:
        self._draining = True
        self._dead = self._dead or EngineDeadError("the cluster has shut down")
        for task in list(self._tasks):
            task.cancel()
        for r in list(self.routes.values()):
            r.stream._put(EngineDeadError("the server is shutting down; the request was aborted"))
        self.routes.clear()
        await asyncio.gather(*(self._stop_instance(h) for h in list(self.instances.values())),
                             return_exceptions=True)
        if self._standby is not None:
            self.ray.kill(self._standby[1])
            self._standby = None

    # ---------------- stats ----------------
    @property
    def stats(self) -> EngineStats:
        """The instances' engine stats, summed (what /metrics reports as the cluster's total)."""
        per = [h.stats for h in self.instances.values()]
        if not per:
            return EngineStats(time=time.time())
        summed = {f.name: sum(getattr(s, f.name) for s in per) for f in fields(EngineStats)}
        summed["spec_mean_k"] /= len(per)
        summed["time"] = max(s.time for s in per)
        return EngineStats(**summed)

    def instance_stats(self) -> dict[str, EngineStats]:
        return {iid: h.stats for iid, h in self.instances.items()}

    def cluster_counters(self) -> dict[str, float]:
        moved = [m for m in self.migrations if m.moved]
        return {"instances": len(self.instances), "instances_starting": self._num_starting,
                "migrations": len(moved), "migrations_failed": len(self.migrations) - len(moved),
                "migration_downtime_seconds": sum(m.downtime_s for m in moved),
                "kv_transfers": len(self.transfers), "kv_transfer_seconds": sum(t.transfer_s for t in self.transfers)}

    # ---------------- requests ----------------
    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    @property
    def max_seqs_in_flight(self) -> int | None:
        if self.max_queue_len is None:
            return None
        open_ = sum(1 for h in self.instances.values() if h.role != "decode" and not h.draining)
        return max(1, open_) * self.engine_config.scheduler.max_num_seqs + self.max_queue_len

    def _started(self) -> bool:
        return self._loop is not None

    async def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams,
                          priority: int = 0, arrival_time: float | None = None,
                          coalesce: bool = True) -> RequestStream:
        """Dispatch a request; returns its stream once an instance accepted it (with no instance
        running, after one has started: a cold start). Raises what the engine would."""
        if self._dead is not None or self._loop is None:
            raise EngineDeadError(f"the cluster is not running: {self._dead}")
        request_id = request_id or self.new_request_id()
        if request_id in self.routes:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use")
        ids = self.tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
        route = Route(request_id, ids, params, priority, time.time() if arrival_time is None else arrival_time,
                      RequestStream(request_id, self, params.n, coalesce))
        self.routes[request_id] = route
        try:
            await self._dispatch(route)
        except BaseException:
            self.routes.pop(request_id, None)
            route.stream.closed = True
            raise
        return route.stream

    def abort(self, request_id: str) -> None:
        route = self.routes.pop(request_id, None)
        if route is None:
            return
        for iid in {route.instance_id, route.migrating} - {None}:
            h = self.instances.get(iid)
            if h is not None and h.alive:
                h.actor.abort.remote(request_id)
        self._observe_end(route, "abort")

    # ---------------- dispatch ----------------
    def _open(self, roles: tuple[str, ...]) -> list[InstanceHandle]:
        return [h for h in self.instances.values() if h.alive and not h.draining and h.role in roles]

    async def _dispatch(self, route: Route) -> None:
        """Send the request to the instance the policy picks; skip dead or draining ones; wait for
        one if there is none (the autoscaler starts it)."""
        roles = ("prefill",) if self.pd else ("mixed",)
        while True:
            candidates = self._open(roles)
            if not candidates:
                await self._wait_for_instance()
                continue
            try:
                iid = self.dispatch_policy.choose(route.prompt, -route.priority, [h.load for h in candidates])
            except P.NoInstanceError:
                await self._wait_for_instance()
                continue
            h = self.instances[iid]
            try:
                await h.actor.add_request.remote(route.request_id, route.prompt, route.params, route.priority,
                                                 route.arrival, self.pd)
            except InstanceDrainingError:
                h.draining = True
                continue
            except self.ray.exceptions.RayActorError:
                self._on_instance_died(h)
                continue
            except KvflowError as e:
                raise _unwrap(e) from None
            if route.request_id not in self.routes:  # aborted while being added
                h.actor.abort.remote(route.request_id)
            route.instance_id = iid
            self.dispatch_policy.on_dispatch(iid, route.prompt)
            _count_in(h.load, route, self.engine.block_pool.block_size)
            return

    async def _wait_for_instance(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the cluster is not running: {self._dead}")
        if self.autoscale_policy is None and not self._num_starting:
            raise EngineDeadError("no instance is running and autoscaling is off (--min-instances not set)")
        self._num_waiting_for_instance += 1
        try:
            await self._changed.wait()
        finally:
            self._num_waiting_for_instance -= 1

    # ---------------- outputs ----------------
    async def _poll_loop(self, h: InstanceHandle) -> None:
        while h.alive:
            try:
                reply = await h.actor.poll.remote(POLL_TIMEOUT)
            except self.ray.exceptions.RayActorError:
                self._on_instance_died(h)
                return
            if not h.alive:
                return
            h.stats, h.running = reply.stats, reply.running
            h.load = reply.load
            h.load.draining = h.load.draining or h.draining
            for delta in reply.deltas:
                self._on_delta(delta)
            for handoff in reply.handoffs:
                self._spawn(self._hand_over(h, handoff))

    def _on_delta(self, delta: Delta) -> None:
        route = self.routes.get(delta.request_id)
        if route is None:
            return  # aborted meanwhile
        route.held[delta.seq] = delta
        while route.next_seq in route.held:
            d = route.held.pop(route.next_seq)
            route.next_seq += 1
            if d.error is not None:
                route.stream._put(_unwrap(d.error))
                self.routes.pop(route.request_id, None)
                self._observe_end(route, "error")
                return
            route.started = True
            self._observe(route, d.output)
            route.stream._put(d.output)
            if d.output.finished:
                self.routes.pop(route.request_id, None)
                return

    # ---------------- faults ----------------
    def _on_instance_died(self, h: InstanceHandle) -> None:
        if not h.alive:
            return
        h.alive = False
        self.instances.pop(h.instance_id, None)
        self.dispatch_policy.on_instance_removed(h.instance_id)
        lost = self._routes_on(h.instance_id)
        logger.warning("instance %s died; %d requests on it", h.instance_id, len(lost))
        for route in lost:
            if route.started:
                self.routes.pop(route.request_id, None)
                route.stream._put(EngineDeadError(
                    f"instance {h.instance_id} died while this request was streaming; the output so far is "
                    "all there is: send the request again"))
                self._observe_end(route, "abort")
            else:  # nothing was sent: run it elsewhere from the start
                route.instance_id, route.next_seq, route.held = None, 0, {}
                self._spawn(self._redispatch(route))
        self._notify()

    async def _redispatch(self, route: Route) -> None:
        try:
            await self._dispatch(route)
        except Exception as e:  # noqa: BLE001 - the stream reports it
            if self.routes.pop(route.request_id, None) is not None:
                route.stream._put(e if isinstance(e, KvflowError) else EngineDeadError(str(e)))

    # ---------------- prefill/decode split ----------------
    async def _hand_over(self, source: InstanceHandle, handoff: Handoff) -> None:
        route = self.routes.get(handoff.request_id)
        if route is None:
            return
        t0 = time.perf_counter()
        for h in sorted(self._open(("decode",)), key=lambda h: P.virtual_usage(h.load)):
            try:
                await h.actor.import_request.remote(handoff.exported, handoff.seq)
            except self.ray.exceptions.RayActorError:
                self._on_instance_died(h)
                continue
            except InvalidRequestError:  # no room there
                continue
            route.instance_id = h.instance_id
            if handoff.request_id not in self.routes:
                h.actor.abort.remote(handoff.request_id)
            self.transfers.append(TransferReport(route.request_id, source.instance_id, h.instance_id,
                                                 handoff.kv_bytes, handoff.export_seconds, time.perf_counter() - t0))
            return
        if self.routes.pop(route.request_id, None) is not None:
            route.stream._put(QueueFullError("no decode instance has room for this request; retry later"))

    # ---------------- live migration ----------------
    async def migrate(self, request_id: str, target: str, reason: str = "manual") -> MigrationReport:
        """Move a running request to instance `target` while it keeps decoding (migration.py)."""
        route = self.routes.get(request_id)
        source = route.instance_id if route else None
        report = MigrationReport(request_id, source or "?", target, reason)
        src, dst = self.instances.get(source or ""), self.instances.get(target)
        if route is None or src is None or dst is None or source == target or route.migrating:
            report.failure = "no such running request, or no such target instance"
            return report
        route.migrating = target

        def moved() -> None:
            route.instance_id = target

        try:
            report = await live_migrate(src.actor, dst.actor, report, f"mig-{next(self._ids)}",
                                        self.engine.block_pool.block_size, moved)
        finally:
            route.migrating = None
        self.migrations.append(report)
        if request_id not in self.routes:  # aborted during the move: the abort may have reached the
            dst.actor.abort.remote(request_id)  # target before the import, so the target holds it unseen
        logger.info("migration %s %s -> %s (%s): %s, %d stages, downtime %.1f ms", request_id, source, target,
                    reason, "moved" if report.moved else f"stayed ({report.failure})", report.stages,
                    report.downtime_s * 1e3)
        return report

    async def _migration_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cluster.migration_interval)
            role = "decode" if self.pd else "mixed"
            group = [h for h in self.instances.values() if h.alive and h.role == role]
            if len(group) < 2 or not (self.cluster.enable_migration or any(h.draining for h in group)):
                continue
            running = [r for h in group for r in h.running
                       if r.request_id in self.routes and not self.routes[r.request_id].migrating
                       and self.routes[r.request_id].instance_id == h.instance_id]
            plan = self.migration_policy.plan([h.load for h in group], running)
            if not self.cluster.enable_migration:
                plan = [m for m in plan if m.reason == "drain"]
            await asyncio.gather(*(self.migrate(m.request_id, m.target, m.reason) for m in plan))

    # ---------------- autoscaling ----------------
    async def _autoscale_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            active = [h for h in self.instances.values() if h.alive and not h.draining]
            decision = self.autoscale_policy.decide([h.load for h in active], self._num_starting, time.monotonic(),
                                                    num_pending=self._num_waiting_for_instance)
            for _ in range(decision.add):
                self._spawn(self.add_instance())
            for iid in decision.remove:
                logger.info("autoscaler: removing idle instance %s", iid)
                self._spawn(self.remove_instance(iid))

    # ---------------- latency events for /metrics ----------------
    def _observe(self, route: Route, out) -> None:
        now = time.time()
        obs = self.observer
        for comp in out.outputs:
            if comp.token_ids:
                if not route.first_seen:
                    route.first_seen = True
                    self._first_token(route, now)
                elif comp.index in route.last_time and obs is not None:
                    obs.inter_token(now - route.last_time[comp.index])
                route.last_time[comp.index] = now
            if comp.finish_reason is not None and comp.index not in route.finished:
                route.finished.add(comp.index)
                if obs is not None:
                    obs.sequence_finished(comp.finish_reason, now - route.arrival)

    def _first_token(self, route: Route, now: float) -> None:
        if self.observer is not None:
            self.observer.first_token(now - route.arrival)
        start = self._started_at.pop(route.instance_id, None)
        cold = next((c for c in self.cold_starts if c.instance_id == route.instance_id), None)
        if start is not None and cold is not None and cold.first_token_s is None:
            cold.first_token_s = now - max(route.arrival, start - cold.total_s)

    def _observe_end(self, route: Route, reason: str) -> None:
        if self.observer is None:
            return
        now = time.time()
        for i in range(route.params.n):
            if i not in route.finished:
                self.observer.sequence_finished(reason, now - route.arrival)


def _count_in(load: P.InstanceLoad, route: Route, block_size: int) -> None:
    """Until the instance reports again, count the request just sent as queued there."""
    load.num_waiting += route.params.n
    load.waiting_demand_blocks += -(-len(route.prompt) // block_size) * route.params.n
    if route.priority < 0:
        load.num_high_priority += 1


def _engine_options(config: EngineConfig) -> dict:
    """The engine options every instance is built with (flat names, as LLM(**options) takes)."""
    out = {}
    for owner in (config, config.cache, config.scheduler):
        for f in fields(owner):
            if f.name not in ("cache", "scheduler"):
                out[f.name] = getattr(owner, f.name)
    return out


def _unwrap(e: BaseException) -> BaseException:
    """What an actor raised, without Ray's wrapper (whose message carries a traceback)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def _message(e: BaseException) -> str:
    return str(_unwrap(e)).splitlines()[0] if str(_unwrap(e)) else type(_unwrap(e)).__name__
