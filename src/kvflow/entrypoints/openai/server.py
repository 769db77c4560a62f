"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over one AsyncEngine.

    kvflow serve [--model smollm2-135m] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-queue-len N]
    python -m kvflow.entrypoints.openai.server ...      (the same, without the CLI wrapper)

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus), POST /tokenize, POST /detokenize, GET /version.

Requests are tokenized on the event loop with the server's own copy of the tokenizer (the engine
thread uses the engine's), validated (context length, vocabulary, sampling fields), then handed to
the engine as token ids. A client that disconnects aborts its request, which frees its KV blocks
before the next engine step. SIGTERM stops accepting connections, lets requests in flight finish
(up to --shutdown-timeout seconds), stops the engine and exits 0.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import hmac
import json
import logging
import os
import signal
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from kvflow import __version__
from kvflow.config import CacheConfig, EngineConfig, SchedulerConfig
from kvflow.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestStream
from kvflow.entrypoints.openai import protocol as P
from kvflow.entrypoints.openai.errors import (APIError, bad_request, error_body, from_exception,
                                              install_error_handlers, model_not_found, validation_message)
from kvflow.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from kvflow.errors import ConfigError, KvflowError
from kvflow.outputs import RequestOutput

logger = logging.getLogger("kvflow.server")

_PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


@dataclass
class _ChoiceState:
    sent_text: int = 0
    sent_tokens: int = 0
    text_offset: int = 0
    first: bool = True
    done: bool = False


@dataclass
class _Prompt:
    text: str | None
    ids: list[int]


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


_DONE = "data: [DONE]\n\n"


def _sse_error(e: Exception) -> str:
    """A failure after the stream started: headers are sent, so the error travels as an event."""
    err = from_exception(e)
    return _sse(error_body(err.message, err.type, err.param, err.code))


class OpenAIServer:
    """Request handling, independent of the HTTP framework's routing."""

    def __init__(self, async_engine: AsyncEngine, served_model_names: list[str], metrics: ServerMetrics):
        eng = async_engine.engine
        self.async_engine = async_engine
        self.metrics = metrics
        self.model_names = served_model_names
        try:  # the event loop tokenizes with its own copy: never shared with the engine thread
            self.tokenizer = copy.deepcopy(eng.tokenizer)
        except Exception as e:  # noqa: BLE001 - fast tokenizers' encode is thread-safe enough
            logger.warning("cannot copy the tokenizer (%s); sharing the engine's", e)
            self.tokenizer = eng.tokenizer
        self.max_model_len = eng.config.scheduler.max_model_len
        self.vocab_size = eng.model_config.vocab_size
        self.block_size = eng.block_pool.block_size
        self.num_blocks = eng.block_pool.num_blocks
        self.created = int(time.time())
        ident = f"{__version__}:{eng.model_path}:{eng.config.dtype}:{eng.config.device}"
        self.fingerprint = "fp_kvflow_" + hashlib.sha256(ident.encode()).hexdigest()[:10]
        self.model_root = str(eng.model_path)

    # ---------------- helpers ----------------
    def check_model(self, model: str | None) -> str:
        if model is None or model in self.model_names:
            return self.model_names[0] if model is None else model
        raise model_not_found(model, self.model_names)

    def decode_token(self, tid: int) -> str:
        return self.tokenizer.decode([tid], skip_special_tokens=False)

    def check_ids(self, ids: list[int], what: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise bad_request(f"{what} token id {bad} is outside the vocabulary [0, {self.vocab_size})", "prompt")

    def check_length(self, n_prompt: int, max_tokens: int | None, what: str, where: str = "") -> None:
        limit = self.max_model_len
        if n_prompt == 0:
            raise bad_request(f"the {what} is empty (0 tokens){where}", "prompt")
        if n_prompt >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens, but the {what} "
                f"{'are' if what == 'messages' else 'is'} {n_prompt} tokens{where}"
                f" (at least one token must be left to generate). Please shorten the {what}.", "prompt")
        if max_tokens is not None and n_prompt + max_tokens > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n_prompt + max_tokens} tokens ({n_prompt} in the {what}, {max_tokens} in the completion){where}. "
                f"Please reduce the length of the {what} or max_tokens.", "max_tokens")
        total = min(limit, n_prompt + (max_tokens if max_tokens is not None else limit))
        need = -(-total // self.block_size)
        if need > self.num_blocks:
            raise bad_request(
                f"this request may need {total} tokens of KV cache ({need} blocks of {self.block_size}) but the "
                f"server's cache holds {self.num_blocks} blocks; lower max_tokens{where}", "max_tokens")

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise bad_request("this model has no chat template; use /v1/completions with a plain prompt", "messages")
        try:
            ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        except Exception as e:
            raise bad_request(f"cannot apply the model's chat template to these messages: {type(e).__name__}: {e}",
                              "messages") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    async def add_all(self, base_id: str, prompts: list[_Prompt], params, priority: int) -> list[RequestStream]:
        try:
            self.async_engine.check_admission(len(prompts))
        except QueueFullError:
            self.metrics.rejected("queue_full")
            raise
        streams: list[RequestStream] = []
        try:
            for i, p in enumerate(prompts):
                rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
                streams.append(await self.async_engine.add_request(rid, p.ids, params, priority=priority))
        except BaseException:
            for s in streams:
                s.close()
            raise
        return streams

    async def collect(self, raw: Request, streams: list[RequestStream]) -> list[RequestOutput] | None:
        """Run the streams to the end; None if the client went away first (the requests are aborted)."""
        async def run() -> list[RequestOutput]:
            finals: list[RequestOutput | None] = [None] * len(streams)
            for i, s in enumerate(streams):
                async for out in s:
                    finals[i] = out
            return finals

        task = asyncio.ensure_future(run())
        watcher = asyncio.ensure_future(_wait_disconnect(raw))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            logger.info("client disconnected; aborting %s", ", ".join(s.request_id for s in streams))
            return None
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
            for s in streams:
                s.close()

    def _usage(self, prompts: list[_Prompt], outs: list[RequestOutput | None]) -> dict:
        prompt_tokens = sum(len(p.ids) for p in prompts)
        completion = sum(len(c.token_ids) for o in outs if o is not None for c in o.outputs)
        cached = sum(o.num_cached_tokens for o in outs if o is not None)
        return P.usage(prompt_tokens, completion, cached)

    # ---------------- /v1/completions ----------------
    async def completions(self, req: P.CompletionRequest, raw: Request) -> Response:
        model = self.check_model(req.model)
        prompts: list[_Prompt] = []
        raw_prompts = req.prompts()
        many = len(raw_prompts) > 1
        for i, p in enumerate(raw_prompts):
            where = f" (prompt {i})" if many else ""
            if isinstance(p, str):
                if not p:
                    raise bad_request(f"the prompt is empty{where}", "prompt")
                ids = self.tokenizer.encode(p, add_special_tokens=True)
                prompts.append(_Prompt(p, ids))
            else:
                self.check_ids(p, "prompt")
                prompts.append(_Prompt(None, p))
            self.check_length(len(prompts[-1].ids), req.max_tokens, "prompt", where)
        n_lp = req.logprobs
        params = req.sampling_params(req.max_tokens, logprobs=n_lp,
                                     prompt_logprobs=n_lp if req.echo and n_lp is not None else None,
                                     vocab_size=self.vocab_size)
        rid = P.new_id("cmpl")
        streams = await self.add_all(rid, prompts, params, req.priority or 0)
        created = P.now()
        if req.stream:
            gen = self._stream_completion(req, rid, model, created, prompts, streams, params.n, n_lp)
            return _SSEResponse(gen, streams)
        outs = await self.collect(raw, streams)
        if outs is None:
            return Response(status_code=499)
        choices = []
        for i, (p, out) in enumerate(zip(prompts, outs)):
            for comp in out.outputs:
                prefix = self._prompt_text(p) if req.echo else ""
                lp = None
                if n_lp is not None:
                    ids = (p.ids if req.echo else []) + comp.token_ids
                    entries = ((out.prompt_logprobs or [None] * len(p.ids)) if req.echo else []) + (comp.logprobs or [])
                    lp = P.completion_logprobs(ids, entries, n_lp, 0, self.decode_token)
                choices.append({"index": i * params.n + comp.index, "text": prefix + comp.text, "logprobs": lp,
                                "finish_reason": comp.finish_reason, "stop_reason": comp.stop_reason})
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                             "system_fingerprint": self.fingerprint, "choices": choices,
                             "usage": self._usage(prompts, outs)})

    def _prompt_text(self, p: _Prompt) -> str:
        if p.text is None:
            p.text = self.tokenizer.decode(p.ids, skip_special_tokens=False)
        return p.text

    async def _stream_completion(self, req: P.CompletionRequest, rid: str, model: str, created: int,
                                 prompts: list[_Prompt], streams: list[RequestStream], n: int,
                                 n_lp: int | None) -> AsyncIterator[str]:
        states: dict[tuple[int, int], _ChoiceState] = {}
        latest: list[RequestOutput | None] = [None] * len(streams)
        base = {"id": rid, "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": self.fingerprint}
        try:
            async for i, out in _merge(streams):
                latest[i] = out
                choices = []
                for comp in out.outputs:
                    st = states.setdefault((i, comp.index), _ChoiceState())
                    if st.done:
                        continue
                    delta = comp.text[st.sent_text:]
                    new_ids = comp.token_ids[st.sent_tokens:]
                    prefix, lp_ids, lp_entries = "", [], []
                    if st.first and req.echo:
                        prefix = self._prompt_text(prompts[i])
                        if n_lp is not None:
                            lp_ids = list(prompts[i].ids)
                            lp_entries = list(out.prompt_logprobs or [None] * len(lp_ids))
                    if n_lp is not None:
                        lp_ids += new_ids
                        lp_entries += (comp.logprobs or [])[st.sent_tokens:len(comp.token_ids)]
                    finish = comp.finish_reason
                    if not (prefix or delta or finish or lp_ids):
                        continue
                    lp = None
                    if n_lp is not None:
                        lp = P.completion_logprobs(lp_ids, lp_entries, n_lp, st.text_offset, self.decode_token)
                        st.text_offset += sum(len(t) for t in lp["tokens"])
                    choices.append({"index": i * n + comp.index, "text": prefix + delta, "logprobs": lp,
                                    "finish_reason": finish, "stop_reason": comp.stop_reason if finish else None})
                    st.sent_text, st.sent_tokens = len(comp.text), len(comp.token_ids)
                    st.first, st.done = False, finish is not None
                if choices:
                    chunk = {**base, "choices": choices}
                    if req.include_usage:
                        chunk["usage"] = self._usage(prompts, latest) if req.continuous_usage else None
                    yield _sse(chunk)
            if req.include_usage:
                yield _sse({**base, "choices": [], "usage": self._usage(prompts, latest)})
            yield _DONE
        except (KvflowError, APIError) as e:
            yield _sse_error(e)
            yield _DONE
        finally:
            for s in streams:
                s.close()

    # ---------------- /v1/chat/completions ----------------
    async def chat(self, req: P.ChatCompletionRequest, raw: Request) -> Response:
        model = self.check_model(req.model)
        max_tokens = req.effective_max_tokens()
        messages = req.template_messages()
        ids = self.chat_ids(messages, req.add_generation_prompt is not False)
        self.check_length(len(ids), max_tokens, "messages")
        n_lp = req.top_n_logprobs()
        params = req.sampling_params(max_tokens, logprobs=n_lp, vocab_size=self.vocab_size)
        rid = P.new_id("chatcmpl")
        prompts = [_Prompt(None, ids)]
        streams = await self.add_all(rid, prompts, params, req.priority or 0)
        created = P.now()
        if req.stream:
            gen = self._stream_chat(req, rid, model, created, prompts, streams[0], params.n, n_lp)
            return _SSEResponse(gen, streams)
        outs = await self.collect(raw, streams)
        if outs is None:
            return Response(status_code=499)
        out = outs[0]
        choices = []
        for comp in out.outputs:
            lp = None
            if n_lp is not None:
                lp = P.chat_logprobs(comp.token_ids, comp.logprobs or [], n_lp, self.decode_token)
            choices.append({"index": comp.index, "message": {"role": "assistant", "content": comp.text},
                            "logprobs": lp, "finish_reason": comp.finish_reason, "stop_reason": comp.stop_reason})
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                             "system_fingerprint": self.fingerprint, "choices": choices,
                             "usage": self._usage(prompts, outs)})

    async def _stream_chat(self, req: P.ChatCompletionRequest, rid: str, model: str, created: int,
                           prompts: list[_Prompt], stream: RequestStream, n: int,
                           n_lp: int | None) -> AsyncIterator[str]:
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": self.fingerprint}
        usage_none = {"usage": None} if req.include_usage else {}
        states = [_ChoiceState() for _ in range(n)]
        latest: RequestOutput | None = None
        try:
            yield _sse({**base, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None} for j in range(n)],
                        **usage_none})
            async for out in stream:
                latest = out
                choices = []
                for comp in out.outputs:
                    st = states[comp.index]
                    if st.done:
                        continue
                    delta = comp.text[st.sent_text:]
                    new_ids = comp.token_ids[st.sent_tokens:]
                    finish = comp.finish_reason
                    if not (delta or finish or (n_lp is not None and new_ids)):
                        continue
                    lp = None
                    if n_lp is not None:
                        entries = (comp.logprobs or [])[st.sent_tokens:len(comp.token_ids)]
                        lp = P.chat_logprobs(new_ids, entries, n_lp, self.decode_token)
                    choices.append({"index": comp.index, "delta": {"content": delta} if delta else {},
                                    "logprobs": lp, "finish_reason": finish,
                                    "stop_reason": comp.stop_reason if finish else None})
                    st.sent_text, st.sent_tokens, st.done = len(comp.text), len(comp.token_ids), finish is not None
                if choices:
                    chunk = {**base, "choices": choices, **usage_none}
                    if req.continuous_usage and req.include_usage:
                        chunk["usage"] = self._usage(prompts, [latest])
                    yield _sse(chunk)
            if req.include_usage:
                yield _sse({**base, "choices": [], "usage": self._usage(prompts, [latest])})
            yield _DONE
        except (KvflowError, APIError) as e:
            yield _sse_error(e)
            yield _DONE
        finally:
            stream.close()

    # ---------------- other endpoints ----------------
    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card(name) for name in self.model_names]}

    def model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "kvflow",
                "root": self.model_root, "parent": None, "max_model_len": self.max_model_len}

    def tokenize(self, req: P.TokenizeRequest) -> dict:
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("send exactly one of prompt or messages", "prompt")
        if req.prompt is not None:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
        else:
            if not req.messages:
                raise bad_request("messages must hold at least one message", "messages")
            msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
            ids = self.chat_ids(msgs, req.add_generation_prompt is not False)
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}

    def detokenize(self, req: P.DetokenizeRequest) -> dict:
        self.check_model(req.model)
        self.check_ids(req.tokens, "detokenize")
        return {"prompt": self.tokenizer.decode(req.tokens, skip_special_tokens=False)}


class _SSEResponse(StreamingResponse):
    """Server-sent events whose request streams are closed (aborting unfinished requests) however
    the response ends, even when the client leaves before the body generator has started."""

    def __init__(self, body: AsyncIterator[str], streams: list[RequestStream]):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for s in self._streams:
                s.close()


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index, output) from several streams as they arrive."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                q.put_nowait((i, out))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put_nowait(e)
        finally:
            q.put_nowait(end)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await q.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


MAX_BODY_BYTES = 32 << 20


async def parse_body(raw: Request, model: type[BaseModel]):
    declared = raw.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is {int(declared)} bytes; the limit is {MAX_BODY_BYTES}")
    body = await raw.body()
    if len(body) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, got a JSON {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        message, param = validation_message(e.errors())
        raise bad_request(message, param) from None


async def _wait_disconnect(raw: Request) -> None:
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


class _ApiKeyMiddleware:
    """401 unless `Authorization: Bearer <key>` matches, on /v1/*, /tokenize and /detokenize
    (/health, /metrics and /version stay open, as in vLLM). Runs before the body is parsed."""

    def __init__(self, app, api_key: str, on_reject=None):
        self.app = app
        self.key = api_key.encode()
        self.on_reject = on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or not scope["path"].startswith(_PROTECTED_PREFIXES):
            return await self.app(scope, receive, send)
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if not auth:
            message = "Missing API key: send it in the header 'Authorization: Bearer <key>'"
        elif scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            message = "Incorrect API key provided"
        else:
            return await self.app(scope, receive, send)
        if self.on_reject is not None:
            self.on_reject()
        response = JSONResponse(error_body(message, "authentication_error", None, "invalid_api_key"),
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def build_app(async_engine: AsyncEngine, served_model_names: list[str], api_key: str | None = None,
              metrics: ServerMetrics | None = None) -> FastAPI:
    """The FastAPI app. Its lifespan starts the engine thread and stops it on shutdown."""
    if metrics is None:
        metrics = ServerMetrics(lambda: async_engine.stats, lambda: async_engine.num_in_flight)
        async_engine.observer = metrics
    server = OpenAIServer(async_engine, served_model_names, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        logger.info("engine started: %s, max_model_len %d, %d KV blocks of %d tokens", served_model_names[0],
                    server.max_model_len, server.num_blocks, server.block_size)
        try:
            yield
        finally:
            await async_engine.shutdown()
            logger.info("engine stopped")

    app = FastAPI(title="kvflow OpenAI-compatible server", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.server = server

    def on_error(err: APIError) -> None:
        if err.status == 400:
            metrics.rejected("invalid")
        elif err.code == "model_not_found":
            metrics.rejected("model_not_found")

    install_error_handlers(app, on_error)
    if api_key:
        app.add_middleware(_ApiKeyMiddleware, api_key=api_key, on_reject=lambda: metrics.rejected("unauthorized"))

    @app.get("/health")
    async def health():
        if not async_engine.is_running:
            err = from_exception(async_engine.dead_reason or EngineDeadError("the engine is not running"))
            return JSONResponse(error_body(err.message, err.type, None, err.code), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        server.check_model(model)
        return server.model_card(model)

    # Bodies are parsed here rather than by FastAPI: JSON whatever the Content-Type (curl -d sends
    # form encoding), and every parse or type error becomes one 400 naming the field.
    @app.post("/v1/completions")
    async def completions(raw: Request):
        return await server.completions(await parse_body(raw, P.CompletionRequest), raw)

    @app.post("/v1/chat/completions")
    async def chat(raw: Request):
        return await server.chat(await parse_body(raw, P.ChatCompletionRequest), raw)

    @app.post("/tokenize")
    async def tokenize(raw: Request):
        return server.tokenize(await parse_body(raw, P.TokenizeRequest))

    @app.post("/detokenize")
    async def detokenize(raw: Request):
        return server.detokenize(await parse_body(raw, P.DetokenizeRequest))

    return app


# ---------------- command line ----------------
def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine options, named as in vLLM. Unset ones keep EngineConfig's defaults."""
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default="smollm2-135m", help="bundled model name, .gguf file or Hugging Face folder")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 where the CPU has native bf16 or on CUDA, else float32")
    g.add_argument("--quantization", default=None, choices=["none", "int8", "int4", "auto"],
                   help="keep the weights quantized: int8, int4, auto (the GGUF file's own type)")
    g.add_argument("--recalibrate", action="store_true", help="time the linear kernels again")
    g.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-num-seqs", type=int, default=None, help="sequences per batch (default 64)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per step (default 512)")
    g.add_argument("--block-size", type=int, default=None, help="tokens per KV-cache block (default 16)")
    g.add_argument("--num-gpu-blocks", type=int, default=None, help="KV-cache blocks (overrides --kv-cache-memory-gb)")
    g.add_argument("--kv-cache-memory-gb", type=float, default=None, help="memory for the KV cache (default 1.0)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default 2048, capped by the model)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse the KV cache of shared prompt prefixes (default on)")
    g.add_argument("--speculative-config", metavar="JSON", default=None,
                   help="speculative decoding, as JSON (see `kvflow generate --help`); default off")


def add_server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("KVFLOW_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $KVFLOW_API_KEY, else none)")
    g.add_argument("--max-queue-len", type=int, default=None,
                   help="accept at most max-num-seqs + N requests at once; more get 503 with Retry-After (default: no limit)")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use (default: the --model argument)")
    g.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="on SIGTERM, seconds to let requests in flight finish before aborting them")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    cache, sched = CacheConfig(), SchedulerConfig()
    for name, target, attr in [("block_size", cache, "block_size"), ("num_gpu_blocks", cache, "num_blocks"),
                               ("kv_cache_memory_gb", cache, "kv_cache_memory_gb"),
                               ("enable_prefix_caching", cache, "enable_prefix_caching"),
                               ("max_num_seqs", sched, "max_num_seqs"),
                               ("max_num_batched_tokens", sched, "max_num_batched_tokens"),
                               ("max_model_len", sched, "max_model_len")]:
        value = getattr(args, name, None)
        if value is not None:
            setattr(target, attr, value)
    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, seed=args.seed, cache=cache,
                          scheduler=sched, quantization=getattr(args, "quantization", None),
                          recalibrate=getattr(args, "recalibrate", False))
    spec = getattr(args, "speculative_config", None)
    if spec is not None:
        if not hasattr(config, "speculative_config"):
            raise ConfigError("this build of kvflow has no speculative decoding (--speculative-config)")
        config.speculative_config = spec
    return config


class _Server(uvicorn.Server):
    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal once it has shut down; a server stopped by SIGTERM or
        # Ctrl-C that shut down cleanly exits 0 instead.
        if sig in (signal.SIGTERM, signal.SIGINT) and sig in self._captured_signals:
            self._captured_signals.remove(sig)


def run_server(args: argparse.Namespace) -> int:
    from kvflow.engine.llm_engine import LLMEngine

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.max_queue_len is not None and args.max_queue_len < 0:
        print(f"error: --max-queue-len must be >= 0, got {args.max_queue_len}", file=sys.stderr)
        return 2
    if not 0 <= args.port < 65536:
        print(f"error: --port must be in [0, 65535], got {args.port}", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        engine = LLMEngine(engine_config_from_args(args))
    except KvflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logger.info("loaded %s in %.1f s", engine.model_path, time.time() - t0)
    pool = engine.block_pool
    if pool.num_blocks * pool.block_size < engine.config.scheduler.max_model_len:
        logger.warning("the KV cache (%d tokens) is smaller than max_model_len (%d): long requests will be refused",
                       pool.num_blocks * pool.block_size, engine.config.scheduler.max_model_len)
    async_engine = AsyncEngine(engine, max_queue_len=args.max_queue_len)
    names = args.served_model_name or [args.model]
    app = build_app(async_engine, names, api_key=args.api_key)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.access_log, timeout_graceful_shutdown=args.shutdown_timeout,
                            lifespan="on")
    server = _Server(config)
    logger.info("serving %s on http://%s:%d", names[0], args.host, args.port)
    server.run()
    if not server.started:
        return 1
    logger.info("server stopped cleanly")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to the kvflow command line (cli.py wires this in)."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server",
                              description="Serve a model over an OpenAI-compatible HTTP API.")
    add_engine_args(p)
    add_server_args(p)
    p.set_defaults(func=run_server)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvflow.entrypoints.openai.server",
                                     description="Serve a model over an OpenAI-compatible HTTP API.")
    add_engine_args(parser)
    add_server_args(parser)
    return run_server(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
