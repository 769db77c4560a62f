"""Request handling of the OpenAI-compatible endpoints, independent of the HTTP framework's routing.

A request is checked in the order that costs least first: model name, then admission (n x prompts
sequences against the queue bound, before any tokenizing), then each prompt's size (its length in
characters alone may prove it cannot fit the context), then tokenized (off the event loop when
big, see tokenization.py), then its token count against the context and the KV cache. Only then
is it handed to the engine as token ids.

Streaming responses pass the engine's deltas on as chunks (streaming.py); the others accumulate
the deltas with RequestOutput.add and answer once every sequence has finished.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kvflow import __version__
from kvflow.engine.async_engine import AsyncEngine, RequestStream
from kvflow.entrypoints.openai import protocol as P
from kvflow.entrypoints.openai import serving_tts
from kvflow.entrypoints.openai.errors import bad_request, model_not_found
from kvflow.entrypoints.openai.metrics import ServerMetrics
from kvflow.entrypoints.openai.streaming import (ChatChunks, CompletionChunks, SSEResponse, StreamOptions,
                                                 UsageCounter, sse_events)
from kvflow.entrypoints.openai.tokenization import TokenizerPool
from kvflow.errors import InvalidRequestError, QueueFullError, ShuttingDownError
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParams
from kvflow.structured.grammar import parse as parse_grammar
from kvflow.structured.tools import ToolPlan, template_takes_tools, with_tools

logger = logging.getLogger("kvflow.server")


@dataclass
class Prompt:
    text: str | None
    ids: list[int]


# ---------------- tokenizer calls (run inline or on a TokenizerPool worker) ----------------
def _encode(tok, text: str, add_special_tokens: bool) -> list[int]:
    try:
        return tok.encode(text, add_special_tokens=add_special_tokens)
    except (TypeError, ValueError, UnicodeError) as e:
        raise bad_request(f"the tokenizer cannot read this text ({type(e).__name__}); send valid Unicode text",
                          "prompt") from None


def _check_grammar(tok, params: SamplingParams, field: str) -> None:
    try:
        parse_grammar(params.structured_outputs, field)
    except InvalidRequestError as e:
        raise bad_request(str(e), field) from None


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False)


def _apply_template(tok, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None) -> list[int]:
    if not getattr(tok, "chat_template", None):
        raise bad_request("this model has no chat template; use /v1/completions with a plain prompt", "messages")
    try:
        ids = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                      tokenize=True)
    except Exception as e:  # noqa: BLE001 - the template judges the messages; its own message is the reason
        from jinja2 import TemplateError
        reason = f": {e}" if isinstance(e, TemplateError) else ""
        logger.debug("chat template failed: %s: %s", type(e).__name__, e)
        raise bad_request(f"cannot apply the model's chat template to these messages{reason}", "messages") from None
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


class OpenAIServing:
    def __init__(self, async_engine: AsyncEngine, served_model_names: list[str], metrics: ServerMetrics,
                 tokenizer_workers: int = 2):
        eng = async_engine.engine
        self.async_engine = async_engine
        self.metrics = metrics
        self.model_names = served_model_names
        self.tokenizers = TokenizerPool(eng.tokenizer, max_workers=tokenizer_workers)
        self.max_model_len = eng.config.scheduler.max_model_len
        self.vocab_size = eng.model_config.vocab_size
        self.block_size = eng.block_pool.block_size
        self.num_blocks = eng.block_pool.num_blocks
        self.created = int(time.time())
        ident = f"{__version__}:{eng.model_path}:{eng.config.dtype}:{eng.config.device}"
        self.fingerprint = "fp_kvflow_" + hashlib.sha256(ident.encode()).hexdigest()[:10]
        self.model_root = str(eng.model_path)

    # ---------------- checks ----------------
    def check_model(self, model: str | None) -> str:
        if model is None or model in self.model_names:
            return self.model_names[0] if model is None else model
        raise model_not_found(model, self.model_names)

    def decode_token(self, tid: int) -> str:
        return self.tokenizers.inline.decode([tid], skip_special_tokens=False)

    def check_ids(self, ids: list[int], what: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise bad_request(f"{what} token id {bad} is outside the vocabulary [0, {self.vocab_size})", "prompt")

    def check_text_size(self, num_chars: int, what: str, where: str = "") -> None:
        """Refuse, before tokenizing, text whose length alone proves it cannot fit the context."""
        at_least = self.tokenizers.min_tokens(num_chars)
        if at_least >= self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens, but the {what} "
                f"{'are' if what == 'messages' else 'is'} {num_chars} characters long, which is at least "
                f"{at_least} tokens{where}. Please shorten the {what}.", "messages" if what == "messages" else "prompt")

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

    def admit(self, num_prompts: int, n: int | None) -> None:
        """Admission of n x prompts sequences: 400 if never possible, 503 + Retry-After if not now."""
        n = 1 if n is None else n
        if not 1 <= n <= P.MAX_N:
            raise InvalidRequestError(f"n must be between 1 and {P.MAX_N}, got {n}")
        try:
            self.async_engine.check_admission(num_prompts * n)
        except QueueFullError as e:
            self.metrics.rejected("shutting_down" if isinstance(e, ShuttingDownError) else "queue_full")
            raise

    # ---------------- tokenizing ----------------
    async def encode(self, text: str, add_special_tokens: bool, what: str = "prompt", where: str = "") -> list[int]:
        self.check_text_size(len(text), what, where)
        return await self.tokenizers.run(_encode, text, add_special_tokens, size=len(text))

    async def chat_ids(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None) -> list[int]:
        size = sum(len(m["content"]) for m in messages)
        self.check_text_size(size, "messages")
        return await self.tokenizers.run(_apply_template, messages, add_generation_prompt, tools, size=size)

    async def check_structured(self, params: SamplingParams, field: str | None) -> None:
        """A bad schema, regex or grammar is a 400 naming the field, before the engine sees it
        (parsed on a worker thread: a big schema never blocks the event loop)."""
        if params.structured_outputs is not None:
            await self.tokenizers.run(_check_grammar, params, field, size=len(params.structured_outputs.key()[1]))

    async def decode(self, ids: list[int]) -> str:
        return await self.tokenizers.run(_decode, ids, size=len(ids))

    async def _completion_prompt(self, p: str | list[int], max_tokens: int | None, where: str) -> Prompt:
        if isinstance(p, str):
            if not p:
                raise bad_request(f"the prompt is empty{where}", "prompt")
            prompt = Prompt(p, await self.encode(p, True, where=where))
        else:
            self.check_ids(p, "prompt")
            prompt = Prompt(None, p)
        self.check_length(len(prompt.ids), max_tokens, "prompt", where)
        return prompt

    # ---------------- running requests ----------------
    async def add_all(self, base_id: str, prompts: list[Prompt], params, priority: int) -> list[RequestStream]:
        self.admit(len(prompts), params.n)  # again: tokenizing took time, others may have come in
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

    async def collect(self, raw: Request, streams: list[RequestStream], consume=None) -> list | None:
        """Run the streams to the end, merging each one's deltas into one output (or through
        `consume()`, a coroutine of its own); None if the client went away first (the requests
        are aborted)."""
        async def run() -> list[RequestOutput]:
            finals = []
            for s in streams:
                acc = None
                async for delta in s:
                    if acc is None:
                        acc = delta
                    else:
                        acc.add(delta)
                finals.append(acc)
            return finals

        task = asyncio.ensure_future(consume() if consume is not None else run())
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

    def _usage(self, prompts: list[Prompt], outs: list[RequestOutput]) -> dict:
        completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
        return P.usage(sum(len(p.ids) for p in prompts), completion, sum(o.num_cached_tokens for o in outs))

    def _base(self, rid: str, obj: str, model: str, created: int) -> dict:
        return {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": self.fingerprint}

    # ---------------- /v1/completions ----------------
    async def completions(self, req: P.CompletionRequest, raw: Request) -> Response:
        model = self.check_model(req.model)
        raw_prompts = req.prompts()
        self.admit(len(raw_prompts), req.num_samples)
        many = len(raw_prompts) > 1
        prompts = [await self._completion_prompt(p, req.max_tokens, f" (prompt {i})" if many else "")
                   for i, p in enumerate(raw_prompts)]
        n_lp = req.logprobs
        params = req.sampling_params(req.max_tokens, logprobs=n_lp,
                                     prompt_logprobs=n_lp if req.echo and n_lp is not None else None,
                                     vocab_size=self.vocab_size)
        shape = req.structured_spec()
        await self.check_structured(params, shape and shape[1])
        echo_texts = [p.text if p.text is not None else await self.decode(p.ids) for p in prompts] if req.echo else None
        tts = None if req.tts is None else serving_tts.TTSPlan.parse(req.tts)
        rid = P.new_id("cmpl")
        streams = await self.add_all(rid, prompts, params, req.priority or 0)
        base = self._base(rid, "text_completion", model, P.now())
        if tts is not None:
            return await self._tts_response(raw, tts, streams, prompts, base, chat=False)
        if req.stream:
            chunks = CompletionChunks(base, len(prompts), params.n, n_lp, echo_texts, [p.ids for p in prompts],
                                      self.decode_token)
            usage = UsageCounter(sum(len(p.ids) for p in prompts), len(prompts))
            opts = StreamOptions(req.include_usage, req.continuous_usage)
            return SSEResponse(sse_events(chunks, streams, usage, opts), streams)
        outs = await self.collect(raw, streams)
        if outs is None:
            return Response(status_code=499)
        choices = [choice for i, (p, out) in enumerate(zip(prompts, outs))
                   for choice in self._completion_choices(i, p, out, params.n, n_lp, echo_texts)]
        return JSONResponse({**base, "choices": choices, "usage": self._usage(prompts, outs)})

    def _completion_choices(self, i: int, p: Prompt, out: RequestOutput, n: int, n_lp: int | None,
                            echo_texts: list[str] | None) -> list[dict]:
        """The choices of prompt i's finished output (with the prompt in front when echoing)."""
        choices = []
        for comp in sorted(out.outputs, key=lambda c: c.index):
            lp = None
            if n_lp is not None:
                ids = (p.ids if echo_texts else []) + comp.token_ids
                entries = ((out.prompt_logprobs or [None] * len(p.ids)) if echo_texts else []) + (comp.logprobs or [])
                lp = P.completion_logprobs(ids, entries, n_lp, 0, self.decode_token)
            choices.append({"index": i * n + comp.index, "text": (echo_texts[i] if echo_texts else "") + comp.text,
                            "logprobs": lp, "finish_reason": comp.finish_reason, "stop_reason": comp.stop_reason})
        return choices

    # ---------------- /v1/chat/completions ----------------
    async def chat(self, req: P.ChatCompletionRequest, raw: Request) -> Response:
        model = self.check_model(req.model)
        max_tokens = req.effective_max_tokens()
        plan = req.tool_plan()
        if plan is not None and plan.choice == "none":
            plan = None  # the tools are not shown; the output is plain text
        takes_tools = template_takes_tools(self.tokenizers.inline)
        messages = req.template_messages(takes_tools)
        template_tools = None
        if plan is not None and takes_tools:
            template_tools = [{"type": "function", "function": f} for f in plan.tools]
        elif plan is not None:
            messages = with_tools(messages, plan.tools)
        self.admit(1, req.num_samples)
        ids = await self.chat_ids(messages, req.add_generation_prompt is not False, template_tools)
        self.check_length(len(ids), max_tokens, "messages")
        n_lp = req.top_n_logprobs()
        params = req.sampling_params(max_tokens, logprobs=n_lp, vocab_size=self.vocab_size)
        shape = req.structured_spec()
        field = shape and shape[1]
        if plan is not None and plan.enforced:
            if shape is not None:
                raise bad_request(f"tool_choice {plan.choice!r} shapes the output itself; omit {shape[1]}", "tool_choice")
            params.structured_outputs, field = plan.structured_outputs(), "tools"
        await self.check_structured(params, field)
        tts = None if req.tts is None else serving_tts.TTSPlan.parse(req.tts)
        rid = P.new_id("chatcmpl")
        prompts = [Prompt(None, ids)]
        streams = await self.add_all(rid, prompts, params, req.priority or 0)
        base = self._base(rid, "chat.completion", model, P.now())
        if tts is not None:
            return await self._tts_response(raw, tts, streams, prompts, base, chat=True)
        if req.stream:
            chunks = ChatChunks({**base, "object": "chat.completion.chunk"}, params.n, n_lp, self.decode_token, plan)
            opts = StreamOptions(req.include_usage, req.continuous_usage)
            return SSEResponse(sse_events(chunks, streams, UsageCounter(len(ids), 1), opts), streams)
        outs = await self.collect(raw, streams)
        if outs is None:
            return Response(status_code=499)
        choices = []
        for comp in sorted(outs[0].outputs, key=lambda c: c.index):
            lp = None
            if n_lp is not None:
                lp = P.chat_logprobs(comp.token_ids, comp.logprobs or [], n_lp, self.decode_token)
            message, finish = _assistant_message(comp.text, comp.finish_reason, plan)
            choices.append({"index": comp.index, "message": message,
                            "logprobs": lp, "finish_reason": finish, "stop_reason": comp.stop_reason})
        return JSONResponse({**base, "choices": choices, "usage": self._usage(prompts, outs)})

    async def _tts_response(self, raw: Request, plan: serving_tts.TTSPlan, streams: list[RequestStream],
                            prompts: list[Prompt], base: dict, chat: bool) -> Response:
        """The chosen sample of each prompt as its choice, every sample in the `tts` field."""
        searches = plan.searches(streams)
        results = await self.collect(raw, streams, lambda: serving_tts.run_searches(self.async_engine, streams, searches))
        if results is None:
            return Response(status_code=499)
        choices = []
        for i, result in enumerate(results):
            text, reason = serving_tts.chosen(result)
            body = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            choices.append({"index": i, **body, "logprobs": None, "finish_reason": reason})
        usage = P.usage(sum(len(p.ids) for p in prompts), sum(r.num_generated_tokens for r in results))
        tts = results[0].to_dict() if chat else [r.to_dict() for r in results]
        return JSONResponse({**base, "choices": choices, "usage": usage, "tts": tts})

    # ---------------- other endpoints ----------------
    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card(name) for name in self.model_names]}

    def model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "kvflow",
                "root": self.model_root, "parent": None, "max_model_len": self.max_model_len}

    async def tokenize(self, req: P.TokenizeRequest) -> dict:
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("send exactly one of prompt or messages", "prompt")
        if req.prompt is not None:
            ids = await self.encode(req.prompt, req.add_special_tokens is not False)
        else:
            ids = await self.chat_ids(P.template_messages(req.messages), req.add_generation_prompt is not False)
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}

    async def detokenize(self, req: P.DetokenizeRequest) -> dict:
        self.check_model(req.model)
        self.check_ids(req.tokens, "detokenize")
        return {"prompt": await self.decode(req.tokens)}

    def close(self) -> None:
        self.tokenizers.close()


def _assistant_message(text: str, finish: str | None, plan: ToolPlan | None) -> tuple[dict, str | None]:
    """The message of one finished choice (tool calls parsed out when tools are in play) and its finish reason."""
    if plan is None:
        return {"role": "assistant", "content": text}, finish
    content, calls = plan.parse(text)
    if not calls:
        return {"role": "assistant", "content": content}, finish
    return ({"role": "assistant", "content": content, "tool_calls": [c.as_dict() for c in calls]},
            "tool_calls" if finish == "stop" else finish)


async def _wait_disconnect(raw: Request) -> None:
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return
