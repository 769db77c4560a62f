"""The FastAPI app: routes, middleware, request bodies, the OpenAPI document and graceful shutdown.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /v1/models/{model},
POST /tokenize, POST /detokenize, GET /version, GET /openapi.json, and, open without a key,
GET /health, GET /metrics (Prometheus) and the web page (GET /, web_ui.py).

Middleware, outermost first: RequestGuard (counts requests in progress for the shutdown drain;
answers any unexpected exception with one 500 and one log entry) and, when a key is set,
ApiKeyMiddleware (401 before the body is read). Bodies are read here, not by FastAPI: JSON whatever
the Content-Type (curl -d sends form encoding), within a size and a time limit, with every parse or
type error a 400 naming the field, in OpenAI's error shape.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from kvflow import __version__
from kvflow.engine.async_engine import AsyncEngine
from kvflow.entrypoints.openai import protocol as P
from kvflow.entrypoints.openai import web_ui
from kvflow.entrypoints.openai.errors import (APIError, bad_request, error_body, error_response, from_exception,
                                              install_error_handlers, validation_message)
from kvflow.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from kvflow.entrypoints.openai.serving import OpenAIServing
from kvflow.errors import EngineDeadError, RequestAbortedError, ShuttingDownError

logger = logging.getLogger("kvflow.server")

OPEN_PATHS = frozenset({"/health", "/metrics"}) | web_ui.PATHS  # everything else needs the key when one is set


@dataclass
class Limits:
    """What one request may send (see the README's Security section)."""
    max_body_bytes: int = 32 << 20
    body_timeout: float = 30.0  # seconds to receive the whole body once the headers are in
    max_json_depth: int = 64


# ---------------- request bodies ----------------
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # the only way a surrogate gets into parsed JSON
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}
_OFFLOAD_BYTES = 1 << 20  # parse bigger bodies on a thread: the event loop keeps serving meanwhile


async def parse_body(raw: Request, model: type[BaseModel], limits: Limits):
    declared = raw.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise APIError(413, f"the request body is {int(declared)} bytes; the limit is {limits.max_body_bytes}")
    try:
        body = await asyncio.wait_for(_read_body(raw, limits.max_body_bytes), limits.body_timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {limits.body_timeout:g} s") from None
    if len(body) > _OFFLOAD_BYTES:
        obj = await asyncio.to_thread(decode_json, body, limits.max_json_depth)
    else:
        obj = decode_json(body, limits.max_json_depth)
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        message, param = validation_message(e.errors())
        raise bad_request(message, param) from None


async def _read_body(raw: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in raw.stream():
        size += len(chunk)
        if size > limit:  # chunked bodies declare no length: count as they come
            raise APIError(413, f"the request body is over {limit} bytes, the limit")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_json(body: bytes, max_depth: int) -> dict:
    """The body as a JSON object of text a tokenizer can read, or a 400 saying what is wrong."""
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        obj = json.loads(body)
    except RecursionError:
        raise bad_request(f"the request body nests deeper than {max_depth} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, got {_JSON_TYPES.get(type(obj), 'a value')}")
    # Both walks below are skipped for ordinary bodies: few brackets, no surrogate escapes.
    if body.count(b"[") + body.count(b"{") > max_depth:
        _check_depth(obj, max_depth)
    if _SURROGATE_ESCAPE.search(body):
        _check_surrogates(obj)
    return obj


def _check_depth(obj, max_depth: int) -> None:
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise bad_request(f"the request body nests deeper than {max_depth} levels")
        children = value.values() if isinstance(value, dict) else value
        stack.extend((v, depth + 1) for v in children if isinstance(v, (dict, list)))


def _check_surrogates(obj) -> None:
    """A lone UTF-16 surrogate (valid JSON: "\\ud800") is not text: no tokenizer can encode it."""
    stack = [(obj, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise bad_request(f"{path or 'a string'} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                                  "escape), which is not text; send valid Unicode", path.split(".")[0].split("[")[0] or None)
        elif isinstance(value, dict):
            for k, v in value.items():
                if _SURROGATE.search(k):
                    raise bad_request("a key of the request body holds a lone UTF-16 surrogate; send valid Unicode")
                stack.append((v, f"{path}.{k}" if path else k))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value) if isinstance(v, (str, dict, list)))


# ---------------- middleware ----------------
@dataclass
class HttpState:
    active: int = 0  # HTTP requests in progress (read by the shutdown drain)


class RequestGuard:
    """Counts requests in progress; an exception nothing else handled becomes one 500 (if the
    response has not started) and one log entry, instead of uvicorn's two tracebacks."""

    def __init__(self, app, state: HttpState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        self.state.active += 1
        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:  # noqa: BLE001 - the last line of defence
            err = from_exception(e)  # logs it, with its traceback, once
            if not started:
                await error_response(err)(scope, receive, send)
        finally:
            self.state.active -= 1


class ApiKeyMiddleware:
    """401 unless the request carries exactly one `Authorization: Bearer <key>` header whose key
    matches (compared in constant time); every path but /health and /metrics. Runs before the body
    is read."""

    def __init__(self, app, api_key: str, on_reject=None):
        self.app = app
        self.key = api_key.encode()
        self.on_reject = on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        message = self.reject_reason([v for k, v in scope.get("headers") or [] if k == b"authorization"])
        if message is None:
            return await self.app(scope, receive, send)
        if self.on_reject is not None:
            self.on_reject()
        response = JSONResponse(error_body(message, "authentication_error", None, "invalid_api_key"),
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def reject_reason(self, values: list[bytes]) -> str | None:
        if not values:
            return "Missing API key: send it in the header 'Authorization: Bearer <key>'"
        if len(values) > 1:
            return f"Send exactly one Authorization header, not {len(values)}"
        scheme, _, token = values[0].partition(b" ")
        matches = hmac.compare_digest(token.strip(), self.key)  # constant time, whatever the scheme
        return None if scheme.lower() == b"bearer" and matches else "Incorrect API key provided"


# ---------------- graceful shutdown ----------------
class GracefulShutdown:
    """What SIGTERM does (server.py calls drain before letting uvicorn stop): admit nothing new
    (503 + Retry-After; /health turns 503), give what runs `timeout` seconds to finish, then abort
    the rest (streams end with finish_reason "abort" and [DONE], others get a 503), and wait for
    those responses to be written."""

    def __init__(self, async_engine: AsyncEngine, http: HttpState):
        self.async_engine = async_engine
        self.http = http

    async def drain(self, timeout: float) -> None:
        self.async_engine.begin_drain()
        logger.info("shutting down: %d requests in flight get %.0f s to finish", self.async_engine.num_in_flight,
                    timeout)
        if not await self.async_engine.wait_idle(timeout):
            n = self.async_engine.abort_all(RequestAbortedError(
                f"the server shut down before this request finished (shutdown timeout {timeout:g} s)"))
            logger.warning("shutdown timeout: aborted %d requests still running", n)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while self.http.active and loop.time() < deadline:
            await asyncio.sleep(0.02)


# ---------------- OpenAPI ----------------
_BODIES = [P.CompletionRequest, P.ChatCompletionRequest, P.TokenizeRequest, P.DetokenizeRequest]
_ERRORS = {400: "invalid request (names the field at fault)", 401: "missing, repeated or wrong API key",
           404: "unknown model or route", 408: "the body did not arrive in time", 413: "the body is too big",
           500: "internal error", 503: "busy or shutting down (with Retry-After)"}


# One server-sent event (OpenAPI before 3.2 describes each event of a stream with `schema`).
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a JSON chunk object; the last event's data is [DONE]"},
    "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}


def _body(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _responses(model: type[BaseModel] | None, stream: bool = False, codes=tuple(_ERRORS)) -> dict:
    out: dict = {code: {"model": P.ErrorResponse, "description": _ERRORS[code]} for code in codes}
    if model is not None:
        out[200] = {"model": model, "description": "OK"}
        if stream:
            out[200]["content"] = {"text/event-stream": {"schema": _SSE_EVENT}}
    return out


def _bound_token_ids(schema, vocab_size: int) -> None:
    """Every schema marked "x-token-id" gets the vocabulary's bound."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("x-token-id"):
                node["maximum"] = vocab_size - 1
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _install_openapi(app: FastAPI, api_key: bool, vocab_size: int) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description="OpenAI-compatible API of kvflow")
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in _BODIES:
                s = model.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(s.pop("$defs", {}))
                comps[model.__name__] = s
            _bound_token_ids(comps, vocab_size)
            if api_key:
                schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                schema["security"] = [{"bearer": []}]
                for path in OPEN_PATHS:
                    for op in schema["paths"].get(path, {}).values():
                        op["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


# ---------------- the app ----------------
def build_app(async_engine: AsyncEngine, served_model_names: list[str], api_key: str | None = None,
              metrics: ServerMetrics | None = None, limits: Limits | None = None,
              tokenizer_workers: int = 2) -> FastAPI:
    """The FastAPI app. Its lifespan starts the engine thread and stops it on shutdown;
    app.state.shutdown.drain(timeout) is the graceful part of a shutdown."""
    limits = limits or Limits()
    if metrics is None:
        metrics = ServerMetrics(lambda: async_engine.stats, lambda: async_engine.num_in_flight,
                                getattr(async_engine, "instance_stats", None),  # a cluster: per instance too
                                getattr(async_engine, "cluster_counters", None))
        async_engine.observer = metrics
    server = OpenAIServing(async_engine, served_model_names, metrics, tokenizer_workers)
    http = HttpState()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        logger.info("engine started: %s, max_model_len %d, %d KV blocks of %d tokens", served_model_names[0],
                    server.max_model_len, server.num_blocks, server.block_size)
        try:
            yield
        finally:
            await async_engine.shutdown()
            server.close()
            logger.info("engine stopped")

    app = FastAPI(title="kvflow OpenAI-compatible server", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.server = server
    app.state.shutdown = GracefulShutdown(async_engine, http)

    def on_error(err: APIError) -> None:
        if err.status == 400:
            metrics.rejected("invalid")
        elif err.code == "model_not_found":
            metrics.rejected("model_not_found")

    install_error_handlers(app, on_error)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key, on_reject=lambda: metrics.rejected("unauthorized"))
    app.add_middleware(RequestGuard, state=http)  # added last: outermost
    _install_openapi(app, bool(api_key), server.vocab_size)
    _add_routes(app, server, async_engine, metrics, limits)
    web_ui.add_web_ui_routes(app)
    return app


def _add_routes(app: FastAPI, server: OpenAIServing, async_engine: AsyncEngine, metrics: ServerMetrics,
                limits: Limits) -> None:
    @app.get("/health", responses=_responses(P.HealthResponse, codes=(503,)))
    async def health():
        if async_engine.is_draining and async_engine.is_running:
            err = from_exception(ShuttingDownError("the server is shutting down", retry_after=5.0))
            return error_response(err)
        if not async_engine.is_running:
            err = from_exception(async_engine.dead_reason or EngineDeadError("the engine is not running"))
            return JSONResponse(error_body(err.message, err.type, None, err.code), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version", responses=_responses(P.VersionResponse, codes=(401,)))
    async def version():
        return {"version": __version__}

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}, "description": "Prometheus"}})
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", responses=_responses(P.ModelList, codes=(401,)))
    async def models():
        return server.models()

    @app.get("/v1/models/{model:path}", responses=_responses(P.ModelCard, codes=(401, 404)))
    async def model(model: str):
        server.check_model(model)
        return server.model_card(model)

    # Bodies are parsed by parse_body rather than by FastAPI (see the module's docstring); the
    # OpenAPI document still declares each one.
    @app.post("/v1/completions", openapi_extra=_body(P.CompletionRequest),
              responses=_responses(P.CompletionResponse, stream=True))
    async def completions(raw: Request):
        return await server.completions(await parse_body(raw, P.CompletionRequest, limits), raw)

    @app.post("/v1/chat/completions", openapi_extra=_body(P.ChatCompletionRequest),
              responses=_responses(P.ChatCompletionResponse, stream=True))
    async def chat(raw: Request):
        return await server.chat(await parse_body(raw, P.ChatCompletionRequest, limits), raw)

    @app.post("/tokenize", openapi_extra=_body(P.TokenizeRequest), responses=_responses(P.TokenizeResponse))
    async def tokenize(raw: Request):
        return await server.tokenize(await parse_body(raw, P.TokenizeRequest, limits))

    @app.post("/detokenize", openapi_extra=_body(P.DetokenizeRequest), responses=_responses(P.DetokenizeResponse))
    async def detokenize(raw: Request):
        return await server.detokenize(await parse_body(raw, P.DetokenizeRequest, limits))
