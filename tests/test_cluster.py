"""The Ray cluster (kvflow.cluster): dispatch, live migration, prefill/decode split, faults, and the
OpenAI server in front of several instances. Ray starts once for the module; two instances of a
tiny random-weight model serve every test but the server's (which joins the same Ray)."""
from __future__ import annotations

import asyncio
import signal
import time

import pytest

from engine_helpers import build_model, hf_greedy

ray = pytest.importorskip("ray")

from kvflow import SamplingParams  # noqa: E402

POOL = dict(dtype="float32", num_gpu_blocks=40, block_size=16, max_model_len=320, max_num_seqs=8,
            weight_cache=False)
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Paged attention splits the KV cache into blocks.",
           "def fibonacci(n): return n if n < 2 else", "Servers must survive hostile clients: huge bodies"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from server_helpers import build_tiny_model
    path = build_tiny_model(tmp_path_factory.mktemp("cluster-model"), max_positions=512)
    import transformers
    vocab = transformers.AutoTokenizer.from_pretrained(str(path)).vocab_size + 3
    build_model("llama", False, 16, vocab).save_pretrained(str(path), safe_serialization=True)  # clear argmax margins
    return path


@pytest.fixture(scope="module")
def cluster(model_dir):
    from kvflow.cluster.cluster import Cluster
    # room for this module's two instances and the server test's two (Ray counts CPUs per actor)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    c = Cluster(str(model_dir), instances=2, threads_per_instance=1, dispatch_policy="round-robin", **POOL)
    yield c
    c.stop()
    ray.shutdown()


def _ids(cluster, prompt: str) -> list[int]:
    return cluster.client.tokenizer.encode(prompt, add_special_tokens=True)


def _free(cluster, iid: str, settle_s: float = 5.0) -> tuple[int, int]:
    """(free blocks, total blocks) of an instance once it is idle. An instance publishes its stats
    after the step that sent the last output, so the first poll may still see that step's blocks:
    poll until every block is free or `settle_s` has passed."""
    deadline = time.monotonic() + settle_s
    while True:
        stats = ray.get(cluster.client.instances[iid].actor.poll.remote(0)).stats
        if stats.num_free_blocks == stats.num_blocks or time.monotonic() > deadline:
            return stats.num_free_blocks, stats.num_blocks
        time.sleep(0.05)


def test_dispatch_gives_transformers_greedy_tokens(cluster, model_dir):
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="float32").eval()
    params = SamplingParams(temperature=0.0, max_tokens=24)
    outs = cluster.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        ids = _ids(cluster, prompt)
        assert out.finished and out.outputs[0].token_ids == hf_greedy(hf, ids, 24)[:len(out.outputs[0].token_ids)]
        assert len(out.outputs[0].token_ids) == 24 or out.outputs[0].token_ids[-1] == 2
    stats = cluster.client.instance_stats()  # round-robin spread the four over both instances
    assert len(stats) == 2 and all(s.prompt_tokens_total > 0 for s in stats.values()), stats


async def _stream_and_migrate(client, request_id, prompt, params, after_tokens, migrate=True):
    """Stream a request; after `after_tokens` tokens move it to the other instance. Returns
    (token ids, migration report or None)."""
    stream = await client.add_request(request_id, prompt, params)
    tokens, report = [], None
    async with stream:
        async for delta in stream:
            tokens += delta.outputs[0].token_ids
            if migrate and report is None and len(tokens) >= after_tokens:
                source = client.routes[request_id].instance_id
                target = next(i for i in client.instances if i != source)
                report = await client.migrate(request_id, target)
    return tokens, report


def test_migration_mid_decode_same_tokens_and_frees_source(cluster):
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    prompt = _ids(cluster, PROMPTS[0] * 3)
    want = cluster.generate(prompt, params)[0].outputs[0].token_ids
    got, report = cluster.run(lambda c: _stream_and_migrate(c, "moving", prompt, params, after_tokens=40))
    assert report is not None and report.moved, report
    assert report.stages >= 1 and report.tokens_ahead >= 16 and report.downtime_s > 0
    assert got == want
    for iid in cluster.instance_ids:  # the source let go of every block; the target freed its own at the end
        free, total = _free(cluster, iid)
        assert free == total, (iid, free, total)


def test_migration_under_preemption_and_prefix_caching(cluster):
    """Three long requests share a prompt prefix (prefix-cache hits) on one instance whose pool cannot
    hold them all (preemption); one migrates mid-decode. Every output equals the unmigrated one."""
    base = _ids(cluster, PROMPTS[1] * 3)
    prompts = [base + [10 + i] for i in range(3)]
    # each needs the whole context (20 blocks): three, less their shared prefix, overflow 40 blocks
    # past ~170 output tokens, so the newest is preempted before the oldest moves (at 200)
    params = SamplingParams(temperature=0.0, max_tokens=POOL["max_model_len"] - len(prompts[0]), ignore_eos=True)
    want = [o.outputs[0].token_ids for o in cluster.generate(prompts, params)]
    iid = cluster.instance_ids[0]
    preempted_before = _preemptions(cluster)

    async def scenario(c):
        for h in c.instances.values():  # pin all three to one instance: the other only receives
            h.load.num_waiting = 0 if h.instance_id == iid else 1000
        policy, c.dispatch_policy = c.dispatch_policy, _Pinned(iid)
        try:
            runs = [_stream_and_migrate(c, f"pre-{i}", p, params, after_tokens=200, migrate=(i == 0))
                    for i, p in enumerate(prompts)]
            return await asyncio.gather(*runs)
        finally:
            c.dispatch_policy = policy

    results = cluster.run(scenario)
    assert [tokens for tokens, _ in results] == want
    assert results[0][1] is not None and results[0][1].moved, results[0][1]
    assert _preemptions(cluster) > preempted_before
    for i in cluster.instance_ids:
        free, total = _free(cluster, i)
        assert free == total


def test_abort_during_migration_stop_leaves_nothing_on_the_target(cluster, monkeypatch):
    """The client aborts a request while its migration stops it, and the abort reaches the target
    before the import does (a client that disconnects mid-move): the target must not go on running
    the request unseen, holding its KV until max_tokens."""
    import kvflow.cluster.client as client_module
    params = SamplingParams(temperature=0.0, max_tokens=POOL["max_model_len"] - 40, ignore_eos=True)
    prompt = _ids(cluster, PROMPTS[3])
    real = client_module.live_migrate

    async def abort_overtakes_import(src, dst, report, *args):
        return await real(src, _AbortFirst(dst, cluster.client, report.request_id), report, *args)
    monkeypatch.setattr(client_module, "live_migrate", abort_overtakes_import)

    async def scenario(c):
        stream = await c.add_request("orphan", prompt, params)
        tokens = []
        async for delta in stream:
            tokens += delta.outputs[0].token_ids
            if len(tokens) >= 20:
                break
        source = c.routes["orphan"].instance_id
        target = next(i for i in c.instances if i != source)
        return await c.migrate("orphan", target), target

    report, target = cluster.run(scenario)
    assert report.stages >= 1 and "orphan" not in cluster.client.routes
    generated = _stats(cluster, target).generation_tokens_total
    for iid in cluster.instance_ids:
        free, total = _free(cluster, iid)
        assert free == total, (iid, free, total)
    # an orphan would have run on to max_tokens (~250 more tokens) before freeing its blocks
    assert _stats(cluster, target).generation_tokens_total - generated < 20


class _AbortFirst:
    """A migration target whose finish_import is preceded by the client's abort of the request."""

    def __init__(self, actor, client, request_id):
        self._actor, self._client, self._request_id = actor, client, request_id

    def __getattr__(self, name):
        return getattr(self._actor, name)

    @property
    def finish_import(self):
        actor, client, rid = self._actor, self._client, self._request_id

        async def abort_then_import(*args):
            client.abort(rid)  # sent to the source and to the target (route.migrating)
            await actor.health.remote()  # the target has handled the abort
            return await actor.finish_import.remote(*args)
        return type("Method", (), {"remote": staticmethod(abort_then_import)})()


def _stats(cluster, iid: str):
    return ray.get(cluster.client.instances[iid].actor.poll.remote(0)).stats


def _preemptions(cluster) -> int:
    return sum(ray.get(h.actor.poll.remote(0)).stats.num_preemptions for h in cluster.client.instances.values())


class _Pinned:
    """A dispatch policy that sends everything to one instance while it is open."""

    def __init__(self, iid):
        self.iid = iid

    def choose(self, prompt, priority, loads):
        ids = [load.instance_id for load in loads]
        return self.iid if self.iid in ids else ids[0]

    def on_dispatch(self, *a):
        pass

    def on_instance_removed(self, *a):
        pass


def test_prefill_decode_split_same_tokens(cluster):
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in cluster.generate(PROMPTS, params)]
    client = cluster.client
    first, second = cluster.instance_ids
    client.set_role(first, "prefill")
    client.set_role(second, "decode")
    try:
        got = [o.outputs[0].token_ids for o in cluster.generate(PROMPTS, params)]
    finally:
        client.set_role(first, "mixed")
        client.set_role(second, "mixed")
    assert got == want

    async def settled(c):  # a hand-over is recorded when the import returns, maybe after the stream ended
        while len(c.transfers) < len(PROMPTS):
            await asyncio.sleep(0.01)
    cluster.run(settled, timeout=10)
    handed = client.transfers[-len(PROMPTS):]
    assert len(handed) == len(PROMPTS) and all(t.source == first and t.target == second for t in handed)
    assert all(t.kv_bytes > 0 and t.transfer_s > 0 for t in handed)


def test_killed_instance_unstarted_requests_rerouted(cluster):
    """An instance dies under load: its requests that had streamed tokens end with a clear error, the
    one still queued there (behind max_num_seqs running ones) finishes on the other instance, and a
    request sent to the dead instance before the client noticed is re-routed. (Last: it leaves one
    instance.)"""
    from kvflow.errors import EngineDeadError
    short = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    want = cluster.generate(PROMPTS[2], short)[0].outputs[0].token_ids
    victim, survivor = cluster.instance_ids
    long = SamplingParams(temperature=0.0, max_tokens=250, ignore_eos=True)

    async def scenario(c):
        policy, c.dispatch_policy = c.dispatch_policy, _Pinned(victim)
        try:
            busy = [await c.add_request(f"busy-{i}", PROMPTS[0], long) for i in range(POOL["max_num_seqs"])]
            for s in busy:  # each has streamed something
                await s.__anext__()
            queued = await c.add_request("queued", PROMPTS[2], short)  # waits for a free seat there
            c.kill_instance(victim)
            errors = []
            for s in busy:
                try:
                    async for _ in s:
                        pass
                except EngineDeadError as e:
                    errors.append(str(e))
            got = [t async for o in queued for t in o.outputs[0].token_ids]
            late = [t async for o in c.generate(PROMPTS[2], short, request_id="late")
                    for t in o.outputs[0].token_ids]
            return errors, got, late
        finally:
            c.dispatch_policy = policy

    errors, got, late = cluster.run(scenario)
    assert len(errors) == POOL["max_num_seqs"] and all("died while this request was streaming" in e for e in errors)
    assert got == want and late == want
    assert cluster.instance_ids == [survivor]


def test_openai_client_streams_from_kvflow_serve_instances(model_dir, cluster):
    """`kvflow serve --instances 2` (joining this module's Ray) streams through the official client."""
    import openai

    from server_helpers import ServerProcess
    address = ray.get_runtime_context().gcs_address
    srv = ServerProcess("--instances", "2", "--ray-address", address, "--no-weight-cache", model=str(model_dir),
                        options=dict(dtype="float32", num_gpu_blocks=40, max_model_len=320))
    try:
        srv.wait_ready(120)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
        chunks = list(client.completions.create(model=str(model_dir), prompt=PROMPTS[0], max_tokens=12,
                                                temperature=0.0, stream=True))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason in ("length", "stop") and text
        metrics = srv.metrics()
        per_instance = [k for k in metrics if k.startswith("kvflow:instance_kv_cache_total_blocks{")]
        assert len(per_instance) == 2 and metrics["kvflow:kv_cache_total_blocks"] == 80
        # SIGTERM drains: the stream in flight finishes (same text), then the server exits cleanly
        drained = client.completions.create(model=str(model_dir), prompt=PROMPTS[0], max_tokens=12,
                                            temperature=0.0, stream=True)
        first = next(iter(drained))
        srv.proc.send_signal(signal.SIGTERM)
        rest = list(drained)
        assert "".join(c.choices[0].text for c in [first, *rest] if c.choices) == text
        assert srv.proc.wait(30) == 0, srv.log()[-3000:]
        assert "Traceback" not in srv.log(), srv.log()[-3000:]
    finally:
        srv.close()


def test_scales_to_zero_then_a_cold_start_serves_greedy_tokens(cluster, model_dir):
    """Autoscaling with min_instances 0: the idle instance is drained and stopped, the next request
    waits for a new instance (a cold start, on the standby process the autoscaler keeps) and gets
    transformers' greedy tokens. (Last: it leaves the autoscaler running.)"""
    import transformers

    from kvflow.cluster.policy import AutoscalePolicy
    client = cluster.client
    params = SamplingParams(temperature=0.0, max_tokens=12)
    client.autoscale_policy = AutoscalePolicy(min_instances=0, max_instances=1, idle_timeout_s=0.3)

    async def autoscale(c):
        await c._keep_standby()  # as ClusterClient.start does with autoscaling on
        c._spawn(c._autoscale_loop())
    cluster.run(autoscale, timeout=60)
    deadline = time.monotonic() + 20
    while client.instances and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not client.instances, "the idle instance was not removed"
    started = len(client.cold_starts)
    out = cluster.generate(PROMPTS[1], params)[0]
    # counted at once: 0.3 s idle scales the new instance to zero again (loading transformers takes longer)
    assert len(client.instances) == 1 and len(client.cold_starts) == started + 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="float32").eval()
    got = out.outputs[0].token_ids
    assert got == hf_greedy(hf, _ids(cluster, PROMPTS[1]), 12)[:len(got)] and (len(got) == 12 or got[-1] == 2)
    cold = client.cold_starts[-1]
    assert cold.first_token_s is not None and cold.engine_s > 0
    assert cold.process_s < 1.0, "the cold start did not use the standby process"
