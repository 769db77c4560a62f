"""Cluster: the synchronous Python API of a multi-instance deployment, as LLM is of one engine.

    from kvflow.cluster import Cluster
    with Cluster("smollm2-135m", instances=2, dispatch_policy="prefix-affinity") as cluster:
        outs = cluster.generate(["Hello", "Bonjour"], SamplingParams(max_tokens=16))
        report = cluster.migrate(request_id, "i1")          # while it runs (see run())
        cluster.add_instance(); cluster.remove_instance("i0")

Options are the engine's (LLM's keywords) and ClusterConfig's fields (the flags of `kvflow serve`).
The cluster's event loop runs on a background thread; `run(coro_fn)` runs `coro_fn(client)` there,
for scenarios that interleave streaming with migrations (the tests do)."""
from __future__ import annotations

import asyncio
import dataclasses
import threading

from kvflow.cluster.client import ClusterClient
from kvflow.cluster.migration import MigrationReport
from kvflow.config import ClusterConfig, EngineConfig
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParams

_CLUSTER_FIELDS = {f.name for f in dataclasses.fields(ClusterConfig)}


class Cluster:
    def __init__(self, model: str = "smollm2-135m", instances: int | None = 2, max_queue_len: int | None = None,
                 **options):
        cluster_opts = {k: options.pop(k) for k in list(options) if k in _CLUSTER_FIELDS}
        config = ClusterConfig(instances=instances, **cluster_opts)
        self.client = ClusterClient(EngineConfig.from_options(model=model, **options), config, max_queue_len)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvflow-cluster", daemon=True)
        self._thread.start()
        self._call(self._start())
        self._next_id = 0

    async def _start(self) -> None:
        self.client.start()

    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def run(self, coro_fn, timeout: float | None = None):
        """coro_fn(client) on the cluster's event loop; its result."""
        return self._call(coro_fn(self.client), timeout)

    # ---- requests ----
    def generate(self, prompts, params: SamplingParams | None = None, priority: int = 0) -> list[RequestOutput]:
        """One merged RequestOutput per prompt (a string or token ids), in order."""
        single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        params = params or SamplingParams()

        async def one(prompt, rid):
            merged = None
            async for delta in self.client.generate(prompt, params, request_id=rid, priority=priority):
                merged = delta if merged is None else (merged.add(delta) or merged)
            return merged

        async def all_of():
            return await asyncio.gather(*(one(p, self._new_id()) for p in batch))
        return self._call(all_of())

    def _new_id(self) -> str:
        self._next_id += 1
        return f"cluster-{self._next_id}"

    # ---- instances ----
    @property
    def instance_ids(self) -> list[str]:
        return list(self.client.instances)

    def migrate(self, request_id: str, target: str) -> MigrationReport:
        return self._call(self.client.migrate(request_id, target))

    def add_instance(self, role: str = "mixed") -> str:
        return self._call(self.client.add_instance(role)).instance_id

    def remove_instance(self, instance_id: str) -> None:
        self._call(self.client.remove_instance(instance_id))

    def kill_instance(self, instance_id: str) -> None:
        self.client.kill_instance(instance_id)

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self.client.shutdown(), timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
