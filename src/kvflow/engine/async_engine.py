"""AsyncEngine: the synchronous LLMEngine driven from a background thread, one async stream per request.

The engine is single-threaded, so exactly one thread (``kvflow-engine``) ever touches it. The event
loop talks to that thread through a queue of small typed commands (AddRequest, AbortRequest, Stop)
that the thread applies between steps; outputs travel back with ``loop.call_soon_threadsafe``, one
callback per step. The forward pass runs in torch, which releases the GIL, so the event loop keeps
serving HTTP meanwhile.

Outputs are deltas (what is new since the request's previous output). A stream whose consumer
falls behind merges the pending ones with ``RequestOutput.add``: a slow client holds one merged
delta, loses nothing, and costs no copies of what it has already received.

Admission counts sequences (a request with n=4 over 2 prompts is 8): at most
``max_num_seqs + max_queue_len`` are in flight; ``check_admission`` says whether one more request
fits, and refuses one that never could. ``begin_drain`` stops admission (shutdown), ``abort_all``
ends what is left.

    engine = AsyncEngine(LLMEngine(config)); engine.start()      # inside a running event loop
    stream = await engine.add_request("id", "Hello", SamplingParams(max_tokens=8))
    async with stream:
        async for delta in stream: ...                            # leaving early aborts the request
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Protocol

import torch

from kvflow.engine.llm_engine import LLMEngine
from kvflow.errors import (EngineDeadError, EngineStepError, InvalidRequestError, QueueFullError,  # noqa: F401
                           RequestAbortedError, ShuttingDownError)
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# EngineDeadError, EngineStepError and QueueFullError live in kvflow.errors; they stay importable
# from here for code written before they moved.
__all__ = ["AsyncEngine", "RequestStream", "EngineStats", "EngineObserver", "EngineDeadError",
           "EngineStepError", "QueueFullError", "ShuttingDownError", "RequestAbortedError"]


@dataclass(frozen=True)
class EngineStats:
    """A snapshot the engine thread publishes after each step; safe to read from any thread."""
    num_running: int = 0  # sequences (an n=2 request counts twice)
    num_waiting: int = 0
    num_unfinished_requests: int = 0
    num_blocks: int = 0
    num_free_blocks: int = 0
    num_cached_blocks: int = 0  # blocks holding a prefix-cache entry, in use or free
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens served from it
    num_preemptions: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_steps: int = 0  # engine steps run
    spec_draft_tokens: int = 0  # speculative decoding: drafts sent to verification
    spec_accepted_tokens: int = 0
    spec_mean_k: float = 0.0  # mean speculation length chosen per proposal round
    time: float = 0.0

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def kv_cache_usage(self) -> float:
        return self.num_used_blocks / self.num_blocks if self.num_blocks else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class EngineObserver(Protocol):
    """Latency and outcome events, called on the engine thread (keep them cheap and thread-safe)."""

    def first_token(self, ttft: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def sequence_finished(self, finish_reason: str, e2e_latency: float) -> None: ...


# ---------------- commands from the event loop to the engine thread ----------------
@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    priority: int
    arrival: float
    ack: asyncio.Future  # settled on the event loop once the engine accepted (or refused) it


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class AbortSample:
    """Abort one of a request's n samples (test-time compute prunes them); the others go on."""
    request_id: str
    index: int


@dataclass(frozen=True)
class Stop:
    """Abort everything and end the engine thread."""


@dataclass(frozen=True)
class Call:
    """Run fn(engine) on the engine thread between steps (a cluster instance's migrations)."""
    fn: Callable[[LLMEngine], Any]
    done: asyncio.Future  # settled on the event loop with fn's result or exception


Command = AddRequest | AbortRequest | AbortSample | Stop | Call


@dataclass
class _Tracked:
    """Engine-thread bookkeeping of one request, for the latency observer."""
    arrival: float
    n: int
    num_tokens: list[int] = field(default_factory=list)
    last_time: list[float] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    saw_first: bool = False

    def __post_init__(self) -> None:
        self.num_tokens = [0] * self.n
        self.last_time = [self.arrival] * self.n
        self.finished = [False] * self.n


class RequestStream:
    """The outputs of one request: an async iterator of delta RequestOutputs that ends after the
    finished one. Closing it (or leaving ``async with``) before then aborts the request."""

    def __init__(self, request_id: str, engine: AsyncEngine, num_seqs: int = 1, coalesce: bool = True):
        self.request_id = request_id
        self.num_seqs = num_seqs  # what this request counts against admission
        self._engine = engine
        self._items: deque = deque()
        self._ready = asyncio.Event()
        self._coalesce = coalesce
        self.finished = False  # the final output was delivered (or the stream failed)
        self.closed = False

    def _put(self, item: RequestOutput | BaseException) -> None:
        last = self._items[-1] if self._items else None
        if (self._coalesce and isinstance(item, RequestOutput) and isinstance(last, RequestOutput)
                and not last.finished):
            last.add(item)  # deltas: the pending one absorbs the newer one, nothing is lost
        else:
            self._items.append(item)
        self._ready.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self.closed:
            raise StopAsyncIteration
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def close(self) -> None:
        """Abort the request if it has not finished; idempotent, never blocks."""
        if self.closed:
            return
        self.closed = True
        if not self.finished:
            self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()


class ServingLifecycle:
    """What the OpenAI front end asks of whatever runs its requests, one engine (AsyncEngine) or a
    cluster of them (ClusterClient): why it died, whether it drains, and what is in flight."""
    kind = "engine"  # how errors name it
    _dead: BaseException | None = None
    _draining: bool = False

    def _in_flight(self) -> Collection[RequestStream]:
        raise NotImplementedError

    def _started(self) -> bool:
        raise NotImplementedError

    @property
    def max_seqs_in_flight(self) -> int | None:
        raise NotImplementedError

    def _limits(self) -> str:
        """Where max_seqs_in_flight comes from, for error messages."""
        return ""

    @property
    def dead_reason(self) -> BaseException | None:
        return self._dead

    @property
    def is_draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> None:
        """Admit nothing new (ShuttingDownError); what runs goes on."""
        self._draining = True

    @property
    def num_in_flight(self) -> int:
        """Requests added and not yet finished or aborted."""
        return len(self._in_flight())

    @property
    def num_seqs_in_flight(self) -> int:
        """Sequences of those requests (each request counts its n)."""
        return sum(s.num_seqs for s in self._in_flight())

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every request in flight to end; True if they did."""
        deadline = time.monotonic() + timeout
        while self._in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self._in_flight()

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                       priority: int = 0):
        """Convenience: an async generator of delta outputs; aborts the request if left early."""
        stream = await self.add_request(request_id, prompt, params, priority)
        async with stream:
            async for out in stream:
                yield out

    def check_admission(self, num_seqs: int = 1) -> None:
        """Raise unless `num_seqs` more sequences may start now: EngineDeadError if nothing can run,
        ShuttingDownError while draining, InvalidRequestError if that many could never be admitted
        at once, QueueFullError if they would exceed max_seqs_in_flight."""
        if self._dead is not None or not self._started():
            raise EngineDeadError(f"the {self.kind} is not running: {self._dead}")
        if self._draining:
            raise ShuttingDownError("the server is shutting down and admits no new requests; retry on "
                                    "another instance", retry_after=5.0)
        capacity = self.max_seqs_in_flight
        if capacity is None:
            return
        if num_seqs > capacity:
            raise InvalidRequestError(
                f"this request asks for {num_seqs} sequences (n x prompts) but the {self.kind} runs at most "
                f"{capacity} at once{self._limits()}; send fewer prompts or a lower n")
        in_flight = self.num_seqs_in_flight
        if in_flight + num_seqs > capacity:
            raise QueueFullError(
                f"the {self.kind} is busy: {in_flight} sequences in flight, {num_seqs} more would exceed the "
                f"limit of {capacity}{self._limits()}; retry later", retry_after=1.0)


class AsyncEngine(ServingLifecycle):
    def __init__(self, engine: LLMEngine, max_queue_len: int | None = None,
                 observer: EngineObserver | None = None):
        self.engine = engine
        self.max_queue_len = max_queue_len  # sequences allowed to wait beyond max_num_seqs; None: no bound
        self.observer = observer
        self.stats = EngineStats()
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # event-loop side only
        self._tracked: dict[str, _Tracked] = {}  # engine-thread side only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._num_steps = 0
        # OpenMP's thread count is per thread: a new thread would not inherit torch.set_num_threads
        # from the one that built the engine, so the engine thread sets it again.
        self._torch_threads = torch.get_num_threads()
        self._publish_stats()

    # ---------------- lifecycle ----------------
    def start(self) -> None:
        """Start the engine thread; call from inside the event loop that will consume the streams."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="kvflow-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    def _in_flight(self) -> Collection[RequestStream]:
        return self._streams.values()

    def abort_all(self, err: BaseException) -> int:
        """End every request in flight: its stream raises `err` after the outputs it already holds,
        and the engine frees its blocks before its next step. Returns how many there were."""
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream._put(err)
            self._commands.put(AbortRequest(stream.request_id))
        return len(streams)

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine thread (after the step in progress) and fail the streams still open."""
        self._draining = True
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(Stop())
            await asyncio.to_thread(self._thread.join, timeout)
        if self._dead is None:
            self._dead = EngineDeadError("the engine has shut down")
        for stream in list(self._streams.values()):
            stream._put(EngineDeadError("the server is shutting down; the request was aborted"))
        self._streams.clear()

    # ---------------- requests (event loop side) ----------------
    @property
    def max_seqs_in_flight(self) -> int | None:
        """max_num_seqs + max_queue_len, or None without a queue bound."""
        if self.max_queue_len is None:
            return None
        return self.engine.config.scheduler.max_num_seqs + self.max_queue_len

    def _started(self) -> bool:
        return self._thread is not None

    def _limits(self) -> str:
        return f" (max_num_seqs {self.engine.config.scheduler.max_num_seqs} + max_queue_len {self.max_queue_len})"

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    async def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams,
                          priority: int = 0, arrival_time: float | None = None,
                          coalesce: bool = True) -> RequestStream:
        """Queue a request; returns its stream once the engine has accepted it. Raises what
        LLMEngine.add_request raises (InvalidRequestError naming the problem) or EngineDeadError.
        Admission (max_queue_len) is the caller's to check with check_admission()."""
        if self._dead is not None or self._thread is None:
            raise EngineDeadError(f"the engine is not running: {self._dead}")
        request_id = request_id or self.new_request_id()
        if request_id in self._streams:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use")
        arrival = time.time() if arrival_time is None else arrival_time
        stream = RequestStream(request_id, self, params.n, coalesce)
        self._streams[request_id] = stream
        ack = self._loop.create_future()
        self._commands.put(AddRequest(request_id, prompt, params, priority, arrival, ack))
        try:
            await ack
        except asyncio.CancelledError:
            stream.close()  # the abort follows the add in the queue, so it finds the request
            self._streams.pop(request_id, None)
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            stream.closed = True
            raise
        return stream

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """fn(engine), run on the engine thread between two steps; its result or its exception."""
        if self._dead is not None or self._thread is None:
            raise EngineDeadError(f"the engine is not running: {self._dead}")
        done = self._loop.create_future()
        self._commands.put(Call(fn, done))
        return await done

    def abort(self, request_id: str) -> None:
        """Abort now: the engine thread frees the request's blocks before its next step."""
        self._streams.pop(request_id, None)
        self._commands.put(AbortRequest(request_id))

    def abort_sample(self, request_id: str, index: int) -> None:
        """Abort one sample of a request; its final delta (finish_reason "abort") follows."""
        self._commands.put(AbortSample(request_id, index))

    # ---------------- the engine thread ----------------
    def _run(self) -> None:
        eng = self.engine
        try:
            torch.set_num_threads(self._torch_threads)
            while True:
                # Nothing to step (idle, or only requests suspended by a migration): wait for a command.
                if not self._apply_commands(block=not eng.has_unfinished_requests()):
                    break
                if eng.has_unfinished_requests():
                    self._step()
                self._publish_stats()
        except BaseException as e:  # an invariant broke outside a step: nothing can run any more
            logger.exception("the engine thread died")
            self._dead = EngineDeadError(f"the engine thread died: {type(e).__name__}: {e}")
            self._call_soon(self._fail_all, self._dead)
        else:
            self._dead = self._dead or EngineDeadError("the engine has shut down")
        self._publish_stats()

    def _apply_commands(self, block: bool) -> bool:
        """Apply every queued command (waiting for one if `block`); False once told to stop."""
        cmds = [self._commands.get()] if block else []
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                break
        for cmd in cmds:
            if isinstance(cmd, Stop):
                self._abort_all("abort")
                return False
            if isinstance(cmd, AddRequest):
                self._apply_add(cmd)
            elif isinstance(cmd, AbortSample):
                self.engine.abort_sample(cmd.request_id, cmd.index)
            elif isinstance(cmd, Call):
                self._apply_call(cmd)
            elif self.engine.abort(cmd.request_id):
                self._forget(cmd.request_id, "abort")
        return True

    def _apply_add(self, cmd: AddRequest) -> None:
        try:
            self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params, arrival_time=cmd.arrival,
                                    priority=cmd.priority)
        except BaseException as e:  # InvalidRequestError mostly; anything else must not kill the thread
            self._call_soon(_settle, cmd.ack, e)
            return
        self._tracked[cmd.request_id] = _Tracked(cmd.arrival, cmd.params.n)
        self._call_soon(_settle, cmd.ack, None)

    def _apply_call(self, cmd: Call) -> None:
        try:
            result, error = cmd.fn(self.engine), None
        except BaseException as e:  # the caller gets it; the engine thread goes on
            result, error = None, e
        self._call_soon(_settle, cmd.done, error, result)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
            self._num_steps += 1
        except Exception as e:
            logger.exception("engine step failed; aborting the %d requests in flight",
                             self.engine.get_num_unfinished_requests())
            err = EngineStepError(f"internal error in the engine step: {type(e).__name__}: {e}")
            self._call_soon(self._fail, self._abort_all("error"), err)
            return
        if not outputs:
            return
        now = time.time()
        if self.observer is not None:
            for out in outputs:
                self._observe(out, now)
        for out in outputs:
            if out.finished:
                self._tracked.pop(out.request_id, None)
        self._call_soon(self._deliver, outputs)

    def _observe(self, out: RequestOutput, now: float) -> None:
        """Latency events from one delta: a completion that got tokens this step had its first
        token or one more gap; one that got a finish reason finished."""
        t = self._tracked.get(out.request_id)
        if t is None:
            return
        obs = self.observer
        try:
            for comp in out.outputs:
                i = comp.index
                if i >= t.n:
                    continue
                if comp.token_ids:
                    if not t.saw_first:
                        t.saw_first = True
                        obs.first_token(now - t.arrival)
                    elif t.num_tokens[i] > 0:
                        obs.inter_token(now - t.last_time[i])
                    t.num_tokens[i] += len(comp.token_ids)
                    t.last_time[i] = now
                if comp.finish_reason is not None and not t.finished[i]:
                    t.finished[i] = True
                    obs.sequence_finished(comp.finish_reason, now - t.arrival)
        except Exception:  # metrics must never take the engine down
            logger.exception("metrics observer failed")

    def _forget(self, request_id: str, reason: str) -> None:
        t = self._tracked.pop(request_id, None)
        if t is None or self.observer is None:
            return
        now = time.time()
        try:
            for done in t.finished:
                if not done:
                    self.observer.sequence_finished(reason, now - t.arrival)
        except Exception:
            logger.exception("metrics observer failed")

    def _abort_all(self, reason: str) -> list[str]:
        ids = list(self.engine.parents)
        for request_id in ids:
            try:
                self.engine.abort(request_id)
            except Exception:
                logger.exception("abort of %s failed", request_id)
            self._forget(request_id, reason)
        return ids

    def _publish_stats(self) -> None:
        eng = self.engine
        pool, sched = eng.block_pool, eng.scheduler
        spec = eng.speculator.stats if eng.speculator is not None else None
        self.stats = EngineStats(
            num_running=len(sched.running), num_waiting=len(sched.waiting),
            num_unfinished_requests=eng.get_num_unfinished_requests(),
            num_blocks=pool.num_blocks, num_free_blocks=pool.num_free_blocks,
            num_cached_blocks=len(pool.cached), prefix_cache_queries=pool.stats.queries,
            prefix_cache_hits=pool.stats.hits, num_preemptions=sched.num_preemptions,
            prompt_tokens_total=eng.num_prompt_tokens_total,
            generation_tokens_total=eng.num_generation_tokens_total,
            num_steps=self._num_steps,
            spec_draft_tokens=spec.num_drafts if spec else 0, spec_accepted_tokens=spec.num_accepted if spec else 0,
            spec_mean_k=spec.mean_k if spec else 0.0, time=time.time())

    def _call_soon(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    # ---------------- event loop side of delivery ----------------
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted meanwhile
            stream._put(out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail(self, request_ids: list[str], err: BaseException) -> None:
        for request_id in request_ids:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream._put(err)

    def _fail_all(self, err: BaseException) -> None:
        for stream in self._streams.values():
            stream._put(err)
        self._streams.clear()


def _settle(fut: asyncio.Future, exc: BaseException | None, result: Any = None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)
