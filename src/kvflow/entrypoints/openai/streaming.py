"""Server-sent events: OpenAI stream chunks built from the engine's delta outputs.

Each RequestOutput a stream yields holds only what is new for the completions that changed (text,
token ids and logprobs since the previous output), so a chunk is built from it directly. A stream
always ends with `data: [DONE]`: after the last finish reason (and the usage chunk when asked for),
after `finish_reason: "abort"` for every open choice when the server aborted the request at
shutdown, or after an error event when something failed once the headers were sent.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol

from fastapi.responses import StreamingResponse

from kvflow.engine.async_engine import RequestStream
from kvflow.entrypoints.openai import protocol as P
from kvflow.entrypoints.openai.errors import APIError, error_body, from_exception
from kvflow.errors import KvflowError, RequestAbortedError
from kvflow.outputs import RequestOutput
from kvflow.structured.tools import ToolPlan, ToolStream

logger = logging.getLogger("kvflow.server")

DONE = "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_error(e: BaseException) -> str:
    """A failure after the stream started: headers are sent, so the error travels as an event."""
    err = from_exception(e)
    return sse(error_body(err.message, err.type, err.param, err.code))


class SSEResponse(StreamingResponse):
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


class UsageCounter:
    """Token counts of one HTTP request, summed from the deltas as they pass."""

    def __init__(self, prompt_tokens: int, num_prompts: int):
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.cached = [0] * num_prompts

    def add(self, i: int, out: RequestOutput) -> None:
        self.completion_tokens += sum(len(c.token_ids) for c in out.outputs)
        self.cached[i] = out.num_cached_tokens

    def as_dict(self) -> dict:
        return P.usage(self.prompt_tokens, self.completion_tokens, sum(self.cached))


@dataclass
class _Choice:
    first: bool = True
    done: bool = False
    text_offset: int = 0  # completions' logprobs.text_offset continues across chunks


class ChunkBuilder(Protocol):
    base: dict  # id, object, created, model, system_fingerprint

    def opening(self) -> list[dict]: ...
    def choices(self, i: int, out: RequestOutput) -> list[dict]: ...
    def aborted(self) -> list[dict]: ...


@dataclass
class StreamOptions:
    include_usage: bool
    continuous_usage: bool


class CompletionChunks:
    """Choices of /v1/completions chunks: choice index i * n + j for completion j of prompt i."""

    def __init__(self, base: dict, num_prompts: int, n: int, n_lp: int | None, echo_texts: list[str] | None,
                 prompt_ids: list[list[int]], decode: Callable[[int], str]):
        self.base = base
        self.num_prompts, self.n, self.n_lp = num_prompts, n, n_lp
        self.echo_texts = echo_texts  # None unless echo
        self.prompt_ids = prompt_ids
        self.decode = decode
        self.state: dict[tuple[int, int], _Choice] = defaultdict(_Choice)
        self.prompt_logprobs: dict[int, list] = {}

    def opening(self) -> list[dict]:
        return []

    def choices(self, i: int, out: RequestOutput) -> list[dict]:
        if out.prompt_logprobs is not None:  # the request's first output only
            self.prompt_logprobs[i] = out.prompt_logprobs
        chosen = []
        for comp in sorted(out.outputs, key=lambda c: c.index):
            st = self.state[(i, comp.index)]
            if st.done:
                continue
            prefix, lp_ids, lp_entries = "", [], []
            if st.first and self.echo_texts is not None:
                prefix = self.echo_texts[i]
                if self.n_lp is not None:
                    lp_ids = list(self.prompt_ids[i])
                    lp_entries = list(self.prompt_logprobs.get(i) or [None] * len(lp_ids))
            if self.n_lp is not None:
                lp_ids += comp.token_ids
                lp_entries += comp.logprobs or []
            finish = comp.finish_reason
            if not (prefix or comp.text or finish or lp_ids):
                continue
            lp = None
            if self.n_lp is not None:
                lp = P.completion_logprobs(lp_ids, lp_entries, self.n_lp, st.text_offset, self.decode)
                st.text_offset += sum(len(t) for t in lp["tokens"])
            chosen.append({"index": i * self.n + comp.index, "text": prefix + comp.text, "logprobs": lp,
                           "finish_reason": finish, "stop_reason": comp.stop_reason if finish else None})
            st.first, st.done = False, finish is not None
        return chosen

    def aborted(self) -> list[dict]:
        return [{"index": i * self.n + j, "text": "", "logprobs": None, "finish_reason": "abort", "stop_reason": None}
                for i in range(self.num_prompts) for j in range(self.n) if not self.state[(i, j)].done]


class ChatChunks:
    """Choices of /v1/chat/completions chunks (one prompt, n choices). With tools in play each
    choice's text goes through a ToolStream, which turns it into content and tool_calls deltas."""

    def __init__(self, base: dict, n: int, n_lp: int | None, decode: Callable[[int], str],
                 tools: ToolPlan | None = None):
        self.base = base
        self.n, self.n_lp = n, n_lp
        self.decode = decode
        self.done = [False] * n
        self.tool_streams = None if tools is None else [ToolStream(tools) for _ in range(n)]

    def opening(self) -> list[dict]:
        return [{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for j in range(self.n)]

    def choices(self, i: int, out: RequestOutput) -> list[dict]:
        chosen = []
        for comp in sorted(out.outputs, key=lambda c: c.index):
            if self.done[comp.index]:
                continue
            finish = comp.finish_reason
            if not (comp.text or finish or (self.n_lp is not None and comp.token_ids)):
                continue
            lp = None
            if self.n_lp is not None:
                lp = P.chat_logprobs(comp.token_ids, comp.logprobs or [], self.n_lp, self.decode)
            delta = {"content": comp.text} if comp.text else {}
            if self.tool_streams is not None:
                delta, finish = self._tool_delta(comp.index, comp.text, finish)
                if not delta and finish is None and lp is None:
                    continue  # text held back until the tool calls can be parsed
            chosen.append({"index": comp.index, "delta": delta,
                           "logprobs": lp, "finish_reason": finish,
                           "stop_reason": comp.stop_reason if finish else None})
            self.done[comp.index] = finish is not None
        return chosen

    def _tool_delta(self, j: int, text: str, finish: str | None) -> tuple[dict, str | None]:
        stream = self.tool_streams[j]
        delta = stream.delta(text)
        if finish is None:
            return delta, None
        last, has_calls = stream.finish()
        if "content" in last:
            delta["content"] = delta.get("content", "") + last["content"]
        if "tool_calls" in last:
            delta["tool_calls"] = last["tool_calls"]
        return delta, "tool_calls" if has_calls and finish == "stop" else finish

    def aborted(self) -> list[dict]:
        return [{"index": j, "delta": {}, "logprobs": None, "finish_reason": "abort", "stop_reason": None}
                for j in range(self.n) if not self.done[j]]


async def sse_events(chunks: ChunkBuilder, streams: list[RequestStream], usage: UsageCounter,
                     opts: StreamOptions) -> AsyncIterator[str]:
    """The whole event stream of one request; always ends with [DONE]."""
    usage_field = {"usage": None} if opts.include_usage else {}

    def chunk(choices: list[dict]) -> str:
        extra = {"usage": usage.as_dict()} if opts.include_usage and opts.continuous_usage else usage_field
        return sse({**chunks.base, "choices": choices, **extra})

    try:
        opening = chunks.opening()
        if opening:
            yield sse({**chunks.base, "choices": opening, **usage_field})
        async for i, out in merge_streams(streams):
            usage.add(i, out)
            choices = chunks.choices(i, out)
            if choices:
                yield chunk(choices)
    except RequestAbortedError:  # the server is shutting down: close every open choice
        choices = chunks.aborted()
        if choices:
            yield chunk(choices)
    except (KvflowError, APIError) as e:
        yield sse_error(e)
        yield DONE
        return
    except Exception as e:  # noqa: BLE001 - a bug: logged once by from_exception; the stream still ends well
        yield sse_error(e)
        yield DONE
        return
    finally:
        for s in streams:
            s.close()
    if opts.include_usage:
        yield sse({**chunks.base, "choices": [], "usage": usage.as_dict()})
    yield DONE


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
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
