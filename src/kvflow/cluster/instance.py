"""One engine instance of the cluster: a Ray actor around an LLMEngine driven by its AsyncEngine.

The cluster client (client.py) talks to it with a handful of calls:
- add_request / abort / import_request (a request handed over whole: prefill/decode split);
- poll: waits until outputs are ready (or a timeout), then returns every pending delta output,
  each numbered per request (so a request that moved between instances is reassembled in order),
  this instance's InstanceLoad and engine stats, and the P/D hand-overs ready to go;
- the live-migration steps (migration.py): read_stage, reserve_stage, suspend, import, resume,
  release, cancel;
- drain, health, shutdown.

The engine thread publishes the load after every step; nothing here reads the scheduler from the
actor's event loop."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from kvflow.cluster.policy import InstanceLoad, RequestLoad
from kvflow.config import EngineConfig
from kvflow.engine.async_engine import AsyncEngine, EngineStats, RequestStream
from kvflow.engine.llm_engine import ExportedRequest, LLMEngine
from kvflow.errors import InvalidRequestError, KvflowError
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class InstanceDrainingError(KvflowError):
    """This instance is being removed and takes no new requests (the client sends them elsewhere)."""


@dataclass
class Delta:
    """One delta output (or the error that ended the request), numbered per request."""
    request_id: str
    seq: int
    output: RequestOutput | None = None
    error: BaseException | None = None


@dataclass
class Handoff:
    """A prefilled request exported for a decode instance (prefill/decode split)."""
    request_id: str
    exported: object  # an ObjectRef of the ExportedRequest: the KV goes through Ray's object store
    seq: int  # the number its next delta output takes
    export_seconds: float
    kv_bytes: int


@dataclass
class PollReply:
    deltas: list[Delta]
    load: InstanceLoad
    stats: EngineStats
    running: list[RequestLoad]
    handoffs: list[Handoff] = field(default_factory=list)


@dataclass
class KVReservation:
    """Blocks a migration target fills ahead with a request's KV before the request arrives."""
    request_id: str
    block_ids: list[int] = field(default_factory=list)


def kv_bytes(exported: ExportedRequest) -> int:
    return sum(t.numel() * t.element_size() for kv in exported.kv if kv for t in kv)


class InstanceEngine(AsyncEngine):
    """An AsyncEngine whose outputs go to one outbox, numbered per request, instead of to
    per-request streams: the cluster client collects them all with one poll."""

    def __init__(self, engine: LLMEngine, instance_id: str):
        self.instance_id = instance_id  # (set first: AsyncEngine's constructor publishes the load)
        self.draining = False
        self.running: list[RequestLoad] = []
        super().__init__(engine)
        self.outbox: list[Delta] = []
        self.handoffs: list[Handoff] = []
        self.handoff_ids: set[str] = set()  # prefill-only requests, exported after their first token
        self._seq: dict[str, int] = {}
        self._wake: asyncio.Event | None = None

    def start(self) -> None:
        super().start()
        self._wake = asyncio.Event()

    # ---- requests in, deltas out (event loop side) ----
    def track(self, request_id: str, num_seqs: int, seq: int) -> None:
        self._streams[request_id] = RequestStream(request_id, self, num_seqs)  # counts as in flight
        self._seq[request_id] = seq

    def untrack(self, request_id: str) -> int:
        """Stop numbering a request's outputs (it left); returns the number its next one takes."""
        self._streams.pop(request_id, None)
        return self._seq.pop(request_id, 0)

    def _emit(self, request_id: str, output: RequestOutput | None = None, error: BaseException | None = None):
        seq = self._seq.get(request_id, 0)
        self._seq[request_id] = seq + 1
        self.outbox.append(Delta(request_id, seq, output, error))
        if output is None or output.finished:
            self.untrack(request_id)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.request_id in self._streams:
                self._emit(out.request_id, output=out)
        self._wake.set()

    def _fail(self, request_ids: list[str], err: BaseException) -> None:
        for request_id in request_ids:
            if request_id in self._streams:
                self._emit(request_id, error=err)
        self._wake.set()

    def _fail_all(self, err: BaseException) -> None:
        self._fail(list(self._streams), err)

    async def next_outputs(self, timeout: float) -> tuple[list[Delta], list[Handoff]]:
        if not self.outbox and not self.handoffs:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        deltas, self.outbox = self.outbox, []
        handoffs, self.handoffs = self.handoffs, []
        return deltas, handoffs

    # ---- engine thread side ----
    def _step(self) -> None:
        super()._step()
        if self.handoff_ids:
            self._export_prefilled()

    def _export_prefilled(self) -> None:
        """Prefill/decode split: a request whose prompt is done (it has its first token) leaves for a
        decode instance right after the step that finished it."""
        import ray
        for request_id in list(self.handoff_ids):
            parent = self.engine.parents.get(request_id)
            if parent is None:  # finished (max_tokens reached) or aborted here
                self.handoff_ids.discard(request_id)
                continue
            if not any(c.num_output_tokens for c in parent.children):
                continue
            self.handoff_ids.discard(request_id)
            t0 = time.perf_counter()
            exported = self.engine.export_request(request_id)
            ref = ray.put(exported)
            self._call_soon(self._handoff_ready, request_id, ref, time.perf_counter() - t0, kv_bytes(exported))

    def _handoff_ready(self, request_id: str, ref, seconds: float, size: int) -> None:
        if request_id not in self._streams:
            return  # aborted meanwhile: nobody wants it
        self.handoffs.append(Handoff(request_id, ref, self.untrack(request_id), seconds, size))
        self._wake.set()

    def _publish_stats(self) -> None:
        super()._publish_stats()
        eng = self.engine
        pool, sched = eng.block_pool, eng.scheduler
        queued = sched.waiting
        # Lower priority values run first in the engine (vLLM's rule); the policies count "high
        # priority" as priority > 0, so they see the engine's priority negated.
        everyone = sched.running + queued
        self.load = InstanceLoad(
            self.instance_id, num_running=len(sched.running), num_waiting=len(queued),
            num_free_blocks=pool.num_free_blocks, num_total_blocks=pool.num_blocks,
            waiting_demand_blocks=sum(max(0, pool.blocks_needed(r.num_tokens) - len(r.block_ids)) for r in queued),
            num_high_priority=sum(1 for r in everyone if r.priority < 0), draining=self.draining,
            num_waiting_high_priority=sum(1 for r in queued if r.priority < 0))
        self.running = [RequestLoad(r.request_id, self.instance_id, len(r.block_ids), -r.priority, r.num_output_tokens)
                        for r in sched.running if r.parent_id == r.request_id]  # one-sample requests move live


class EngineInstance:
    """The Ray actor (client.py creates it with ray.remote(...)). Async methods all run on the
    actor's event loop; the engine runs on its own thread."""

    def __init__(self, instance_id: str, options: dict, threads: int, weight_cache: bool = True,
                 standby: bool = False):
        """standby: start the process (Ray worker, imports) but build the engine only at start():
        the autoscaler keeps one such process ready, so a cold start skips the process start."""
        self.instance_id = instance_id
        self._build = (options, threads, weight_cache)
        self.reservations: dict[str, KVReservation] = {}
        self.load_seconds = 0.0
        self.warm_up_seconds = 0.0
        if standby:
            self._warm_up()
        else:
            self._build_engine()

    def _warm_up(self) -> None:
        """A standby process pays ahead what a process's first engine build pays once beyond its
        imports: transformers' tokenizer modules and the tokenizer files (a GGUF's is converted
        once and cached on disk; reading it back still takes a second or more here)."""
        from kvflow.model.loader import load_tokenizer
        t0 = time.perf_counter()
        try:
            load_tokenizer(self._build[0]["model"])
        except Exception:  # noqa: BLE001 - the engine build will report it
            logger.exception("standby warm-up failed")
        self.warm_up_seconds = time.perf_counter() - t0

    def _build_engine(self) -> None:
        options, threads, weight_cache = self._build
        t0 = time.perf_counter()
        torch.set_num_threads(threads)
        if not weight_cache:  # this actor's process only (the loader's cache: model/loader.py)
            os.environ["KVFLOW_WEIGHTS_CACHE"] = "0"
        self.engine = LLMEngine(EngineConfig.from_options(**options))
        self.async_engine = InstanceEngine(self.engine, self.instance_id)
        self.load_seconds = time.perf_counter() - t0

    async def ping(self) -> bool:
        return True

    async def start(self) -> dict:
        """Build the engine if this was a standby process, start the engine thread; returns what
        the front end needs to know about this instance."""
        if not hasattr(self, "engine"):
            await asyncio.to_thread(self._build_engine)
        self.async_engine.start()
        eng = self.engine
        return {"instance_id": self.instance_id, "load_seconds": self.load_seconds,
                "max_model_len": eng.config.scheduler.max_model_len, "num_blocks": eng.block_pool.num_blocks,
                "block_size": eng.block_pool.block_size, "dtype": eng.config.dtype, "device": eng.config.device,
                "model_path": str(eng.model_path), "model_config": eng.model_config}

    async def call(self, fn):
        """fn(engine) on the engine thread between two steps (it holds the thread meanwhile); its
        result. For tools that time the engine where it runs (`python -m kvflow.bench.cluster calibrate`)."""
        return await self.async_engine.call(fn)

    async def health(self) -> bool:
        return self.async_engine.is_running

    # ---- requests ----
    async def add_request(self, request_id: str, prompt: list[int], params: SamplingParams, priority: int,
                          arrival: float, prefill_only: bool = False) -> None:
        ae = self.async_engine
        if ae.draining:
            raise InstanceDrainingError(f"instance {self.instance_id} is draining")
        ae.track(request_id, params.n, 0)

        def add(eng: LLMEngine) -> None:
            eng.add_request(request_id, prompt, params, arrival_time=arrival, priority=priority)
            if prefill_only:  # on the engine thread, so the step after this sees both or neither
                ae.handoff_ids.add(request_id)
        try:
            await ae.call(add)
        except BaseException:
            ae.untrack(request_id)
            raise

    async def import_request(self, exported: ExportedRequest, seq: int) -> None:
        """Continue a request handed over whole (prefill/decode split)."""
        await self._import(exported, seq, [])

    async def _import(self, exported: ExportedRequest, seq: int, reserved: list[int]) -> None:
        ae = self.async_engine
        ae.track(exported.request_id, len(exported.children), seq)
        try:
            await ae.call(lambda eng: eng.import_request(exported, reserved))
        except BaseException:
            ae.untrack(exported.request_id)
            raise

    async def abort(self, request_id: str) -> None:
        ae = self.async_engine
        ae.handoff_ids.discard(request_id)
        ae.untrack(request_id)
        ae.abort(request_id)  # the engine thread ignores a request it does not hold

    async def poll(self, timeout: float = 1.0) -> PollReply:
        ae = self.async_engine
        deltas, handoffs = await ae.next_outputs(timeout)
        return PollReply(deltas, ae.load, ae.stats, ae.running, handoffs)

    async def drain(self) -> None:
        """Take no new requests (the client migrates the running ones away)."""
        self.async_engine.draining = True
        await self.async_engine.call(lambda eng: None)  # republish the load with draining set

    async def shutdown(self) -> None:
        await self.async_engine.shutdown(timeout=5.0)

    # ---- live migration, source side (see migration.py) ----
    async def read_stage(self, request_id: str, copied: int):
        """The KV of the request's full blocks computed since `copied` tokens, while it keeps
        running. Returns (meta, kv): meta None if the request is gone or cannot move live, else
        {"upto": tokens copied after this stage, "computed": its computed tokens}."""
        def read(eng: LLMEngine):
            parent = eng.parents.get(request_id)
            if parent is None or len(parent.children) != 1 or parent.children[0].is_finished:
                return None, None
            child, bs = parent.children[0], eng.block_pool.block_size
            full = child.num_computed_tokens // bs * bs
            if full <= copied:  # nothing new (or preempted and recomputing)
                return {"upto": copied, "computed": child.num_computed_tokens}, None
            kv = eng.runner.read_kv(child.block_ids[copied // bs:full // bs], full - copied)
            return {"upto": full, "computed": child.num_computed_tokens}, kv
        return await self.async_engine.call(read)

    async def suspend(self, request_id: str, copied: int):
        """Stop the request (keeping it and its blocks) and export what was not copied ahead.
        Returns (seq, exported), or (None, None) if it has finished meanwhile."""
        ae = self.async_engine

        def export(eng: LLMEngine):
            if request_id not in eng.parents:
                return None
            return eng.export_request(request_id, kv_from=copied, suspend=True)
        exported = await ae.call(export)
        if exported is None:
            return None, None
        return ae._seq.get(request_id, 0), exported  # every delta before the stop is numbered by now

    async def resume(self, request_id: str) -> None:
        await self.async_engine.call(lambda eng: eng.resume_request(request_id))

    async def release(self, request_id: str) -> None:
        ae = self.async_engine
        ae.untrack(request_id)

        def release(eng: LLMEngine) -> None:
            if request_id in eng.parents:  # (an abort during the stop has freed it already)
                eng.release_request(request_id)
        await ae.call(release)

    # ---- live migration, target side ----
    async def reserve_stage(self, migration_id: str, start: int, kv: list[torch.Tensor]) -> None:
        """Write one stage of copied-ahead KV into blocks held for the coming request."""
        res = self.reservations.setdefault(migration_id, KVReservation(migration_id))

        def write(eng: LLMEngine):
            bs = eng.block_pool.block_size
            assert len(res.block_ids) * bs == start, "stages arrive in order"
            if not eng.block_pool.allocate_slots(res, start + kv[0].shape[2]):
                raise InvalidRequestError(f"instance {self.instance_id} has no free blocks for the migration")
            eng.runner.write_kv(res.block_ids[start // bs:], kv)
        await self.async_engine.call(write)

    async def finish_import(self, migration_id: str, exported: ExportedRequest, seq: int) -> None:
        """The last stage: continue the request on the blocks filled ahead plus its last KV."""
        res = self.reservations.pop(migration_id, KVReservation(migration_id))
        reserved = res.block_ids if exported.kv_from else []
        if not exported.kv_from:
            await self._free(res)
        try:
            await self._import(exported, seq, reserved)
        except BaseException:
            await self._free(res)
            raise

    async def cancel(self, migration_id: str) -> None:
        res = self.reservations.pop(migration_id, None)
        if res is not None:
            await self._free(res)

    async def _free(self, res: KVReservation) -> None:
        if res.block_ids:
            await self.async_engine.call(lambda eng: eng.block_pool.free(res))
