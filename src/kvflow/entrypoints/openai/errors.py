"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

Every failure path of the server ends here: bad JSON and wrong types are 400 (never 422 or 500),
unknown models 404, missing keys 401, a body too slow 408 or too big 413, a full queue or a server
shutting down 503 with Retry-After, and anything unexpected a 500 whose body names no internals
(logged once, with its traceback). Client mistakes are never logged above debug level.
"""
from __future__ import annotations

import logging
import re
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvflow.errors import (EngineDeadError, EngineStepError, InvalidRequestError, QueueFullError,
                           RequestAbortedError, ShuttingDownError)

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
          413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_overloaded"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status,
                        headers=err.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def model_not_found(model: str, served: list[str]) -> APIError:
    return APIError(404, f"The model {model!r} does not exist; this server serves {', '.join(map(repr, served))}",
                    param="model", code="model_not_found")


def from_exception(e: BaseException) -> APIError:
    """Map an engine-side exception to the APIError a client should see."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, InvalidRequestError):
        m = re.match(r"([a-z_]+) ", str(e))  # SamplingParams' messages start with the field's name
        return bad_request(str(e), m.group(1) if m and m.group(1) in _PARAMS else None)
    if isinstance(e, QueueFullError):
        return APIError(503, str(e), code="shutting_down" if isinstance(e, ShuttingDownError) else "queue_full",
                        headers={"Retry-After": str(max(1, round(e.retry_after)))})
    if isinstance(e, RequestAbortedError):
        return APIError(503, str(e), code="aborted", headers={"Retry-After": "5"})
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), code="engine_unavailable")
    if isinstance(e, EngineStepError):  # the engine thread has logged it with its traceback
        return APIError(500, f"{e}; the request was not completed")
    logger.error("internal error: %s: %s", type(e).__name__, e, exc_info=e)
    return APIError(500, f"internal server error ({type(e).__name__}); the request was not completed")


_PARAMS = {"n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens", "stop",
           "stop_token_ids", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias",
           "logprobs", "prompt_logprobs", "priority", "prompt"}
_TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|function-.*|.*\[.*)$")


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One readable message naming the field(s) at fault, from pydantic's error list."""
    parts, first_param = [], None
    seen = set()
    for err in errors:
        loc = [x for x in err.get("loc", ()) if x != "body"]
        path = [str(x) for x in loc if isinstance(x, int) or not _TYPE_TAG.match(str(x))]
        field = ".".join(path)
        kind = err.get("type", "")
        if kind == "json_invalid":
            ctx = err.get("ctx") or {}
            parts.append(f"the request body is not valid JSON ({ctx.get('error', err.get('msg'))})")
            continue
        if kind == "missing" and not field:
            parts.append("the request body is missing; send a JSON object")
            continue
        if not field:
            parts.append(f"the request body must be a JSON object: {err.get('msg')}")
            continue
        if field in seen:  # a union reports one error per alternative: keep the first
            continue
        seen.add(field)
        first_param = first_param or field
        got = err.get("input")
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        if kind == "missing":
            parts.append(f"{field} is required")
        elif kind == "value_error":
            parts.append(f"{field}: {msg}")
        else:
            shown = repr(got)
            if len(shown) > 60:
                shown = shown[:57] + "..."
            parts.append(f"{field}: {msg} (got {shown})")
    return "; ".join(parts[:5]) or "invalid request", first_param


def install_error_handlers(app: FastAPI, on_error: Callable[[APIError], None] | None = None) -> None:
    """Route every exception to an OpenAI-shaped JSON error; `on_error` sees each (for metrics)."""

    def respond(err: APIError) -> JSONResponse:
        if on_error is not None:
            try:
                on_error(err)
            except Exception:
                logger.exception("error hook failed")
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()))
        return respond(bad_request(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return respond(APIError(exc.status_code, message, headers=getattr(exc, "headers", None)))

    # Anything else propagates to the app's outermost middleware (api_server.RequestGuard), which
    # answers 500 and logs it once; a handler for Exception here would log it a second time.
    for kind in (APIError, InvalidRequestError, QueueFullError, EngineDeadError, EngineStepError,
                 RequestAbortedError):
        async def _handler(request: Request, exc: Exception):
            return respond(from_exception(exc))
        app.add_exception_handler(kind, _handler)
