"""The server under hostile input (issue 12): each test sends what a hostile or broken client would
to a real running server and checks the status, the OpenAI error shape and that the server still
serves the next request. The module shares one server process running a tiny random-weight model
(the model's output is not the point here); the last test stops it with SIGTERM.
"""
from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import threading
import time

import httpx
import pytest

import server_helpers
from server_helpers import ServerProcess, build_tiny_model

KEY = "hostile-key"
MAX_NUM_SEQS, MAX_QUEUE_LEN = 4, 8
CAPACITY = MAX_NUM_SEQS + MAX_QUEUE_LEN
MAX_MODEL_LEN = 4096
SHUTDOWN_TIMEOUT = 0.5
OPTIONS = dict(max_model_len=MAX_MODEL_LEN, num_gpu_blocks=4096, max_num_seqs=MAX_NUM_SEQS, block_size=16,
               max_num_batched_tokens=512, max_queue_len=MAX_QUEUE_LEN, shutdown_timeout=SHUTDOWN_TIMEOUT,
               header_timeout=1, timeout_keep_alive=1, body_timeout=1, max_connections=48)
POST_PATHS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), max_positions=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def server(model_dir):
    srv = ServerProcess(api_key=KEY, options=OPTIONS, model=str(model_dir))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))


AUTH = {"Authorization": f"Bearer {KEY}"}


def post(server, path: str, body, headers: dict | None = None, **kw) -> httpx.Response:
    return server_helpers.post(server, path, body, AUTH if headers is None else headers, **kw)


error_of = server_helpers.openai_error


def assert_serves(server) -> None:
    """The next request is served normally."""
    r = post(server, "/v1/completions", {"prompt": "The quick brown fox", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


# ---------------- 1. no 500 from client input ----------------
def test_lone_surrogates_are_400(server):
    bodies = {
        "/v1/completions": [b'{"prompt": "a\\ud800b", "max_tokens": 2}', b'{"prompt": ["ok", "a\\udfffb"], "max_tokens": 2}'],
        "/tokenize": [b'{"prompt": "a\\ud800b"}', b'{"messages": [{"role": "user", "content": "\\ud800"}]}'],
        "/v1/chat/completions": [b'{"messages": [{"role": "user", "content": "hi \\udc00"}], "max_tokens": 2}'],
    }
    for path, items in bodies.items():
        for body in items:
            err = error_of(post(server, path, body), 400)
            assert "surrogate" in err["message"] and "Error" not in err["message"], err
            assert err["type"] == "invalid_request_error"
    err = error_of(post(server, "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'), 400)
    assert err["param"] == "messages" and "messages[0].content" in err["message"]
    # A proper surrogate pair is an ordinary character.
    r = post(server, "/tokenize", b'{"prompt": "smile \\ud83d\\ude00"}')
    assert r.status_code == 200 and r.json()["count"] > 0
    assert_serves(server)


@pytest.mark.parametrize("depth", [100, 1000, 100_000])
def test_deep_nesting_is_400(server, depth):
    body = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    for path in POST_PATHS:
        err = error_of(post(server, path, body), 400)
        assert "nests deeper than 64 levels" in err["message"], err
    assert_serves(server)


def test_rejections_are_quiet(server):
    """Bad requests leave no traceback and at most one log line each."""
    before = server.log().count("\n")
    bad = [b'{"prompt": "a\\ud800"}', b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"null", b"{",
           b'{"prompt": [1, 2, 1000000]}', b'{"prompt": "x", "n": 1000}']
    for body in bad * 3:
        assert post(server, "/v1/completions", body).status_code == 400
    log = server.log()
    assert "Traceback" not in log, log[-3000:]
    assert log.count("\n") - before <= len(bad) * 3
    assert_serves(server)


# ---------------- 2. big inputs do not block the event loop ----------------
def test_prompt_too_big_for_the_context_is_refused_before_tokenizing(server):
    huge = "word " * ((8 << 20) // 5)  # 8 MB

    async def main():
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as c:
            big = asyncio.ensure_future(c.post(server.url + "/v1/completions", json={"prompt": huge, "max_tokens": 1}))
            chat = asyncio.ensure_future(c.post(server.url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": huge}], "max_tokens": 1}))
            tok = asyncio.ensure_future(c.post(server.url + "/tokenize", json={"prompt": huge}))
            health = await c.get(server.url + "/health")
            return health, await big, await chat, await tok

    health, *refused = asyncio.run(main())
    assert health.status_code == 200
    for resp in refused:
        err = error_of(resp, 400)
        assert f"maximum context length is {MAX_MODEL_LEN} tokens" in err["message"]
        assert "characters long" in err["message"], err
    assert_serves(server)


def test_large_prompt_is_tokenized_on_a_worker_correctly(server, tokenizer):
    text = " ".join(f"token{i}" for i in range(2000))  # > INLINE_CHARS: a worker thread encodes it
    want = tokenizer.encode(text)
    r = post(server, "/tokenize", {"prompt": text})
    assert r.status_code == 200 and r.json()["tokens"] == want
    r = post(server, "/detokenize", {"tokens": want * 3})
    assert r.status_code == 200 and r.json()["prompt"] == tokenizer.decode(want * 3)
    if len(want) < MAX_MODEL_LEN:
        r = post(server, "/v1/completions", {"prompt": text, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want)


def test_tokenizer_pool_runs_off_the_event_loop():
    from kvflow.entrypoints.openai.tokenization import TokenizerPool
    from kvflow.errors import QueueFullError

    gate = threading.Event()

    class Tok:
        def get_vocab(self):
            return {"abcd": 0}

    def slow(tok, text):
        assert gate.wait(10)
        return threading.current_thread().name

    async def main():
        pool = TokenizerPool(Tok(), max_workers=1, max_pending=1)
        assert pool.min_tokens(4000) == 4000 // (4 * 4)  # no normalizer known: 4x slack
        job = asyncio.ensure_future(pool.run(slow, "x", size=10 ** 6))
        await asyncio.sleep(0.01)  # the loop runs while the worker is busy
        with pytest.raises(QueueFullError):
            await pool.run(slow, "y", size=10 ** 6)
        assert await pool.run(lambda tok, t: t, "small", size=5) == "small"  # small: inline
        gate.set()
        assert (await job).startswith("kvflow-tokenize")
        pool.close()

    asyncio.run(main())


# ---------------- 4. auth ----------------
def test_auth_exactly_one_bearer_key(server):
    url = server.url + "/v1/models"
    assert httpx.get(url, headers=AUTH).status_code == 200
    assert httpx.get(url, headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    for headers in ([("Authorization", "Bearer wrong"), ("Authorization", f"Bearer {KEY}")],
                    [("Authorization", f"Bearer {KEY}"), ("Authorization", f"Bearer {KEY}")],
                    [("Authorization", f"Basic {KEY}")], [("Authorization", KEY)], [("Authorization", "Bearer")],
                    [("Authorization", f"Bearer {KEY}x")], []):
        err = error_of(httpx.get(url, headers=headers), 401)
        assert err["code"] == "invalid_api_key"
    assert "exactly one" in error_of(httpx.get(url, headers=[("Authorization", "Bearer a"),
                                                             ("Authorization", f"Bearer {KEY}")]), 401)["message"]
    for path in ("/openapi.json", "/version", "/v1/models/x", "/docs", "/anything"):
        error_of(httpx.get(server.url + path), 401)
    for path in POST_PATHS:
        error_of(httpx.post(server.url + path, content=b"{not json"), 401)  # before the body is read
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert httpx.get(server.url + "/openapi.json", headers=AUTH).status_code == 200
    assert_serves(server)


# ---------------- 5. admission counts sequences ----------------
def test_requests_that_can_never_be_admitted_are_400(server):
    err = error_of(post(server, "/v1/completions", {"prompt": ["a", "b", "c"], "n": 5, "max_tokens": 1}), 400)
    assert "15 sequences" in err["message"] and str(CAPACITY) in err["message"]
    err = error_of(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                         "n": 128, "max_tokens": 1}), 400)
    assert "128 sequences" in err["message"]
    err = error_of(post(server, "/v1/completions", {"prompt": ["x"] * 1000, "max_tokens": 1}), 400)
    assert "1000 sequences" in err["message"]
    r = post(server, "/v1/completions", {"prompt": ["a", "b", "c"], "n": 4, "max_tokens": 1})  # 12: fits
    assert r.status_code == 200 and len(r.json()["choices"]) == 12
    assert_serves(server)


def _long_stream(c: httpx.AsyncClient, server, prompt: str, max_tokens: int = 3000):
    return c.stream("POST", server.url + "/v1/completions", headers=AUTH,
                    json={"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True})


def test_overload_is_503_with_retry_after(server):
    """CAPACITY - 2 long streams run or wait: 3 more sequences get 503, 2 more are admitted."""
    async def main():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=40)) as c:
            opened = []
            try:
                for i in range(CAPACITY - 2):
                    cm = _long_stream(c, server, f"story {i}")
                    assert (await cm.__aenter__()).status_code == 200
                    opened.append(cm)
                three = await c.post(server.url + "/v1/completions", headers=AUTH,
                                     json={"prompt": "x", "n": 3, "max_tokens": 1})
                cm = c.stream("POST", server.url + "/v1/completions", headers=AUTH,
                              json={"prompt": "x", "n": 2, "max_tokens": 1, "stream": True})
                opened.append(cm)
                two = await cm.__aenter__()  # admitted (it waits for a running slot, so do not read it)
                return three, two.status_code
            finally:
                for cm in opened:
                    await cm.__aexit__(None, None, None)

    three, two = asyncio.run(main())
    err = error_of(three, 503)  # 3 more sequences would exceed the capacity: busy, not invalid
    assert err["code"] == "queue_full" and int(three.headers["Retry-After"]) >= 1
    assert f"{CAPACITY - 2} sequences in flight" in err["message"]
    assert two == 200
    m = server.wait_idle(timeout=20)
    assert m["kvflow:kv_cache_used_blocks"] == 0
    assert_serves(server)


# ---------------- 6. slow clients ----------------
def _raw_connection(server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return s


def _response(s: socket.socket, within: float = 10) -> bytes:
    """One HTTP response (head and Content-Length body) read off a raw socket."""
    s.settimeout(within)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"content-length: *(\d+)", head, re.I)
            if sep and length and len(body) >= int(length.group(1)):
                break
    except (socket.timeout, ConnectionResetError):
        pass
    s.close()
    return data


def _closed_by_server(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return True
            data += chunk
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def test_slow_headers_and_idle_connections_are_closed(server):
    slow = _raw_connection(server)
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    idle = _raw_connection(server)  # sends nothing at all
    kept = _raw_connection(server)
    kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert kept.recv(65536).startswith(b"HTTP/1.1 200")
    t0 = time.time()
    for s in (slow, idle, kept):  # header timeout 1 s, keep-alive timeout 1 s
        assert _closed_by_server(s, within=5), "the server kept a slow or idle connection open"
        s.close()
    assert time.time() - t0 < 5
    assert_serves(server)


def test_slow_body_is_408(server):
    s = _raw_connection(server)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
              b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
    head = _response(s)
    assert head.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in head, head[:300]
    assert_serves(server)


def test_connection_cap(server):
    socks = [_raw_connection(server) for _ in range(OPTIONS["max_connections"])]
    try:
        time.sleep(0.1)
        r = httpx.get(server.url + "/health", timeout=10)
        assert r.status_code == 503
    finally:
        for s in socks:
            s.close()
    time.sleep(0.2)
    assert_serves(server)


# ---------------- 8. smaller ones ----------------
def test_field_checks(server):
    for key in (" 5", "٣", "5 ", "+5", "0x5", "५"):
        err = error_of(post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1, "logit_bias": {key: 1}}), 400)
        assert "logit_bias" in err["message"]
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1, "logit_bias": {"5": 1}}).status_code == 200
    for seed in (2 ** 63 - 1, -(2 ** 63)):
        assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1, "seed": seed}).status_code == 200
    for seed in (2 ** 63, -(2 ** 63) - 1):
        assert "seed" in error_of(post(server, "/v1/completions", {"prompt": "x", "seed": seed}), 400)["message"]
    err = error_of(post(server, "/tokenize", {"messages": [{"role": "bot", "content": "x"}]}), 400)
    assert "role" in err["message"]
    for body, shown in ((b"null", "null"), (b"[1]", "an array"), (b'"x"', "a string"), (b"3", "a number")):
        err = error_of(post(server, "/v1/completions", body), 400)
        assert err["message"].endswith(f"got {shown}") and "NoneType" not in err["message"]
    assert_serves(server)


def test_body_limits(server):
    s = _raw_connection(server)  # a declared length over the limit: refused before any body is read
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
              b"\r\nContent-Length: " + str(64 << 20).encode() + b"\r\n\r\n{")
    head = _response(s)
    assert head.startswith(b"HTTP/1.1 413") and b"limit" in head, head[:300]
    assert_serves(server)


# ---------------- the OpenAPI contract, fuzzed ----------------
def test_openapi_declares_bodies_and_errors(server):
    doc = httpx.get(server.url + "/openapi.json", headers=AUTH).json()
    for path, model in [("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest"),
                        ("/tokenize", "TokenizeRequest"), ("/detokenize", "DetokenizeRequest")]:
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(model)
        assert model in doc["components"]["schemas"]
        for code in ("200", "400", "401", "503"):
            assert code in op["responses"], (path, code)
        assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    assert doc["paths"]["/health"]["get"]["security"] == []


def _bounded(doc: dict) -> dict:
    """The served document with generation kept cheap: at most 4 tokens and n <= 2 (the server
    itself accepts more)."""
    schemas = doc["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens", "min_tokens"):
            if field in props:
                props[field] = {"type": "integer", "minimum": 0 if field == "min_tokens" else 1, "maximum": 4}
        props["n"] = {"type": "integer", "minimum": 1, "maximum": 2}
        schemas[name].setdefault("required", []).append("max_tokens")
    return doc


def test_schemathesis_fuzz(server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)

    doc = _bounded(httpx.get(server.url + "/openapi.json", headers=AUTH).json())
    schema = schemathesis.openapi.from_dict(doc)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    statuses: dict[str, list[int]] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        post_ = op.method.upper() == "POST"
        # Valid bodies, then (POST) bodies that break the schema: neither may get a 5xx.
        for mode, examples in [(GenerationMode.POSITIVE, 30 if post_ else 5)] + [(GenerationMode.NEGATIVE, 15)] * post_:
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case):
                resp = case.call_and_validate(base_url=server.url, headers=AUTH, checks=checks, timeout=30)
                statuses.setdefault(f"{op.method.upper()} {op.path} {mode.value}", []).append(resp.status_code)

            run()
    for path in POST_PATHS:  # the fuzzer reached every handler, and some of its requests were valid
        assert 200 in statuses[f"POST {path} positive"], statuses
        assert 400 in statuses[f"POST {path} negative"], statuses
    assert "Traceback" not in server.log()
    assert_serves(server)


# ---------------- 3. SIGTERM (last: it stops the module's server) ----------------
def test_sigterm_drains_then_aborts_with_clean_stream_ends(server):
    async def read_events(resp) -> list:
        events = []
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
        return events

    async def main():
        async with httpx.AsyncClient(timeout=60) as c:
            async with _long_stream(c, server, "long one", max_tokens=4000) as long_resp:
                long_events = asyncio.ensure_future(read_events(long_resp))
                plain = asyncio.ensure_future(c.post(server.url + "/v1/completions", headers=AUTH, json={
                    "prompt": "long plain", "max_tokens": 4000, "ignore_eos": True}))
                async with _long_stream(c, server, "short one", max_tokens=8) as short_resp:
                    await asyncio.sleep(0.2)
                    server.proc.send_signal(signal.SIGTERM)
                    await asyncio.sleep(0.05)
                    refused = await c.post(server.url + "/v1/completions", headers=AUTH,
                                           json={"prompt": "late", "max_tokens": 1})
                    health = await c.get(server.url + "/health")
                    short_events = await read_events(short_resp)
                return await long_events, short_events, await plain, refused, health

    long_events, short_events, plain, refused, health = asyncio.run(main())
    err = error_of(refused, 503)
    assert err["code"] == "shutting_down" and int(refused.headers["Retry-After"]) >= 1
    assert health.status_code == 503
    # The short stream finished normally within the timeout.
    assert short_events[-1] == "[DONE]"
    assert [ch["finish_reason"] for e in short_events[:-1] for ch in e["choices"] if ch["finish_reason"]] == ["length"]
    # The long one was cut at the timeout: a final chunk with finish_reason "abort", then [DONE].
    assert long_events[-1] == "[DONE]"
    last = long_events[-2]
    assert last["choices"][0]["finish_reason"] == "abort"
    assert sum(len(e["choices"]) for e in long_events[:-1] if "choices" in e) >= 2
    err = error_of(plain, 503)
    assert err["code"] == "aborted"
    assert server.proc.wait(30) == 0, server.log()[-3000:]
    log = server.log()
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]


# ---------------- 7. model loading errors (offline) ----------------
def test_loader_names_the_missing_config_field(model_dir, tmp_path):
    import shutil

    from kvflow.errors import ModelLoadError
    from kvflow.model.loader import load_model

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    del config["num_attention_heads"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="num_attention_heads"):
        load_model(str(broken), dtype=__import__("torch").float32, device="cpu")


def test_loader_says_a_gguf_file_is_truncated(tmp_path):
    import gguf
    import numpy as np

    from kvflow.errors import ModelLoadError
    from kvflow.model.loader import load_model

    path = tmp_path / "cut.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(ModelLoadError, match=f"truncated: its tensors need {size} bytes, the file has {size - 100}"):
        load_model(str(path), dtype=__import__("torch").float32, device="cpu")
