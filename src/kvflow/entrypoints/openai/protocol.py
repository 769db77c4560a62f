"""Request models (pydantic, strict: a wrong type is a 400, never a silent coercion) and the
builders of OpenAI-shaped response objects.

Field names follow OpenAI's API, plus vLLM's extras (top_k, min_p, repetition_penalty, min_tokens,
ignore_eos, stop_token_ids, priority, include_stop_str_in_output, skip_special_tokens, and the
structured-output extras guided_json, guided_regex, guided_choice, guided_grammar, structured_outputs).
"""
from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from kvflow.errors import InvalidRequestError
from kvflow.outputs import TokenLogprob
from kvflow.sampling_params import MAX_LOGPROBS, SamplingParams, StructuredOutputsParams
from kvflow.structured.tools import ToolPlan, call_text, tool_plan

MAX_N = 128  # choices per prompt (OpenAI's limit)
_ROLES_DOC = ("system", "user", "assistant", "developer", "tool")  # checked by check_messages
MAX_LOGIT_BIAS = 100.0
_INT64 = (-(1 << 63), (1 << 63) - 1)
_TOKEN_ID_KEY = re.compile(r"^-?[0-9]+$")  # ASCII digits only: int() would also take " 5" and "٣"

# Schemas of the fields typed Any (checked by hand for clearer messages), for the OpenAPI document.
_STOP_SCHEMA = {"anyOf": [{"type": "string", "minLength": 1},
                          {"type": "array", "items": {"type": "string", "minLength": 1}}, {"type": "null"}]}
# "x-token-id" marks token ids: the served document bounds them by the model's vocabulary.
TOKEN_ID = {"type": "integer", "minimum": 0, "x-token-id": True}
_TOKEN_IDS = {"type": "array", "items": TOKEN_ID, "minItems": 1}
_PROMPT_SCHEMA = {"anyOf": [{"type": "string", "minLength": 1},
                            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                            _TOKEN_IDS, {"type": "array", "items": _TOKEN_IDS, "minItems": 1}]}


def _integral(v: Any) -> Any:
    """JSON has one kind of number: 4.0 is the integer 4 (as JSON Schema's "integer" says), 4.5 is not."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[int, BeforeValidator(_integral)]  # strict otherwise: "4" and true stay errors


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM: usage on every chunk


def _doc(default=None, **schema):
    """A field whose accepted range the OpenAPI document states; the value is still checked by
    SamplingParams (or below), whose messages name the field and the limit."""
    return Field(default, json_schema_extra=schema)


_RESPONSE_FORMAT = {"type": "object", "required": ["type"], "properties": {
    "type": {"enum": ["text", "json_object", "json_schema"]},
    "json_schema": {"type": "object", "required": ["schema"], "properties": {"schema": {"type": "object"}}}}}
_STRUCTURED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                      "structured_outputs")


class PruneOptions(_Strict):
    margin: float = _doc(1.0, minimum=0)
    min_tokens: Int = _doc(16, minimum=1)


class TTSOptions(_Strict):
    """kvflow extra `tts`: sample n answers (sharing the prompt's KV) and return the one a strategy
    picks; the response's `tts` field lists every sample (see kvflow.tts)."""
    strategy: str = _doc(..., enum=["self_consistency", "best_of_n"])
    n: Int = _doc(8, minimum=1, maximum=MAX_N)
    extractor: str = _doc("default", enum=["default", "boxed", "last_number"])
    prune: PruneOptions | None = None


class _SamplingRequest(_Strict):
    model: str | None = None
    n: Int | None = _doc(1, minimum=1, maximum=MAX_N)
    max_tokens: Int | None = _doc(None, minimum=1)
    temperature: float | None = _doc(None, minimum=0)
    top_p: float | None = _doc(None, exclusiveMinimum=0, maximum=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Any = Field(None, json_schema_extra=_STOP_SCHEMA)  # SamplingParams checks it and names the field
    seed: Int | None = _doc(None, minimum=_INT64[0], maximum=_INT64[1])
    presence_penalty: float | None = _doc(None, minimum=-2, maximum=2)
    frequency_penalty: float | None = _doc(None, minimum=-2, maximum=2)
    logit_bias: dict[str, float] | None = _doc(None, propertyNames={"pattern": _TOKEN_ID_KEY.pattern},
                                               additionalProperties={"type": "number", "minimum": -MAX_LOGIT_BIAS,
                                                                     "maximum": MAX_LOGIT_BIAS})
    user: str | None = None
    # vLLM's extras
    top_k: Int | None = _doc(None, minimum=-1)
    min_p: float | None = _doc(None, minimum=0, maximum=1)
    repetition_penalty: float | None = _doc(None, exclusiveMinimum=0)
    min_tokens: Int | None = _doc(None, minimum=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[Int] | None = _doc(None, items=TOKEN_ID)
    priority: Int | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    # structured output: OpenAI's response_format, or one of vLLM's extras
    response_format: Any = _doc(None, anyOf=[{"type": "null"}, _RESPONSE_FORMAT])
    guided_json: Any = _doc(None, anyOf=[{"type": "null"}, {"type": "object"}, {"type": "string"}])
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None
    # kvflow extras: a reasoning budget, and test-time compute
    thinking_budget: Int | None = _doc(None, minimum=0)
    thinking_end: str | None = _doc(None, minLength=1)
    tts: TTSOptions | None = None

    @property
    def num_samples(self) -> int | None:
        """Sequences per prompt: tts.n under test-time compute, else n."""
        return self.tts.n if self.tts is not None else self.n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def _unsupported(self) -> None:
        pass

    def structured_spec(self) -> tuple[StructuredOutputsParams, str] | None:
        """The output's shape from whichever field sets it, and that field's name for errors."""
        fmt = self.response_format
        if isinstance(fmt, dict) and fmt.get("type") == "text":
            fmt = None
        given = [name for name in _STRUCTURED_FIELDS if (fmt if name == "response_format" else getattr(self, name)) is not None]
        if not given:
            return None
        if len(given) > 1:
            raise InvalidRequestError(f"send only one way to shape the output; got {', '.join(given)}")
        name = given[0]
        if name == "response_format":
            return _response_format(fmt)
        if name == "structured_outputs":
            try:
                return StructuredOutputsParams(**self.structured_outputs), name
            except TypeError as e:
                raise InvalidRequestError(f"structured_outputs: {e}") from None
        kind = name.removeprefix("guided_")
        return StructuredOutputsParams(**{kind: getattr(self, name)}), name

    def sampling_params(self, max_tokens: int | None, logprobs: int | None = None,
                        prompt_logprobs: int | None = None, vocab_size: int | None = None) -> SamplingParams:
        """SamplingParams for this request; InvalidRequestError names the field at fault."""
        self._unsupported()
        if self.tts is not None and self.n not in (None, 1):
            raise InvalidRequestError("set tts.n, not n, for the number of samples under tts")
        if self.tts is not None and self.stream:
            raise InvalidRequestError("tts requests do not stream (the answer is chosen once all samples end)")
        n = self.num_samples or 1
        if not 1 <= n <= MAX_N:
            raise InvalidRequestError(f"n must be between 1 and {MAX_N}, got {n}")
        if self.seed is not None and not _INT64[0] <= self.seed <= _INT64[1]:
            raise InvalidRequestError(f"seed must be a 64-bit signed integer, got {self.seed}")
        bias = None
        if self.logit_bias:
            bias = {}
            for key, value in self.logit_bias.items():
                if not _TOKEN_ID_KEY.fullmatch(key):
                    raise InvalidRequestError(f"logit_bias keys must be token ids (integers as strings), got {key!r}")
                tid = int(key)
                if vocab_size is not None and not 0 <= tid < vocab_size:
                    raise InvalidRequestError(f"logit_bias token id {tid} is outside the vocabulary [0, {vocab_size})")
                if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                    raise InvalidRequestError(f"logit_bias values must be in [-100, 100], got {value} for token {tid}")
                bias[tid] = value
        if self.stop_token_ids and vocab_size is not None:
            bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            if bad:
                raise InvalidRequestError(f"stop_token_ids entry {bad[0]} is outside the vocabulary [0, {vocab_size})")
        shape = self.structured_spec()
        kw: dict[str, Any] = dict(
            n=n, max_tokens=max_tokens, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            logit_bias=bias, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            structured_outputs=shape and shape[0])
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "min_tokens", "ignore_eos", "include_stop_str_in_output",
                     "skip_special_tokens", "thinking_budget", "thinking_end"):
            value = getattr(self, name)
            if value is not None:
                kw[name] = value
        return SamplingParams(**kw)


def _response_format(fmt: object) -> tuple[StructuredOutputsParams, str]:
    if not isinstance(fmt, dict) or fmt.get("type") not in ("json_object", "json_schema"):
        raise InvalidRequestError('response_format must be {"type": "text"}, {"type": "json_object"} or '
                                  f'{{"type": "json_schema", "json_schema": {{"name": ..., "schema": {{...}}}}}}; got {fmt!r}')
    if fmt["type"] == "json_object":
        return StructuredOutputsParams(json_object=True), "response_format"
    js = fmt.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
        raise InvalidRequestError("response_format.json_schema.schema must be a JSON schema object")
    return StructuredOutputsParams(json=js["schema"]), "response_format.json_schema.schema"


class CompletionRequest(_SamplingRequest):
    prompt: Any = Field(..., json_schema_extra=_PROMPT_SCHEMA)  # checked in prompts(), for clearer messages
    max_tokens: Int | None = _doc(16, minimum=1)  # OpenAI's default for completions
    echo: bool | None = False
    logprobs: Int | None = _doc(None, minimum=0, maximum=MAX_LOGPROBS)
    # Not supported: a 400 says so when they are set.
    suffix: Any = _doc(None, type="null")
    best_of: Any = _doc(None, enum=[None, 1])

    def _unsupported(self) -> None:
        if self.suffix is not None:
            raise InvalidRequestError("suffix is not supported (kvflow has no fill-in-the-middle); omit it")
        if self.best_of is not None and self.best_of != 1:
            raise InvalidRequestError("best_of is not supported yet; use n to get several completions")

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list of strings or token-id lists."""
        p = self.prompt
        shape = "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"
        if p is None:
            raise InvalidRequestError("prompt is required")
        if isinstance(p, str):
            return [p]
        if not isinstance(p, list) or not p:
            raise InvalidRequestError(f"{shape}; got {'an empty list' if p == [] else type(p).__name__}")
        p = [[_integral(t) for t in x] if isinstance(x, list) else _integral(x) for x in p]
        if all(_is_int(t) for t in p):
            return [list(p)]
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in p):
            return [list(x) for x in p]
        raise InvalidRequestError(shape)


class ContentPart(_Strict):
    model_config = ConfigDict(json_schema_extra={"required": ["type", "text"]})
    type: str = _doc(..., enum=["text"])  # other types get a 400 saying so
    text: str | None = _doc(None, type="string")


class ChatMessage(_Strict):
    role: str = _doc(..., enum=sorted(_ROLES_DOC))
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text":
                raise InvalidRequestError(f"message content of type {part.type!r} is not supported; only text")
            if part.text is None:
                raise InvalidRequestError("a message content part of type 'text' needs a 'text' string")
            parts.append(part.text)
        return "".join(parts)


_ROLES = set(_ROLES_DOC)


def check_messages(messages: list[ChatMessage] | None) -> list[ChatMessage] | None:
    """The rule chat and /tokenize share: at least one message, each with a known role."""
    if messages is None:
        return None
    if not messages:
        raise ValueError("messages must hold at least one message")
    for m in messages:
        if m.role not in _ROLES:
            raise ValueError(f"role must be one of {sorted(_ROLES)}, got {m.role!r}")
    return messages


def template_messages(messages: list[ChatMessage], template_takes_tools: bool = False) -> list[dict]:
    """Messages as the chat template takes them (developer is a system message to it). Earlier tool
    calls and results go to a template that knows tools as fields, to others as Hermes-style text."""
    out = []
    for m in messages:
        msg = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls and template_takes_tools:
            msg["tool_calls"] = m.tool_calls
        elif m.tool_calls:
            msg["content"] = "\n".join(t for t in (msg["content"], call_text(m.tool_calls)) if t)
        if m.tool_call_id is not None and template_takes_tools:
            msg["tool_call_id"] = m.tool_call_id
        elif m.role == "tool":
            msg["content"] = f"<tool_response>\n{msg['content']}\n</tool_response>"
        out.append(msg)
    return out


_TOOL = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"enum": ["function"]},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}, "description": {"type": "string"},
        "parameters": {"type": "object"}}}}}
_NAMED_CHOICE = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"enum": ["function"]}, "function": {"type": "object", "required": ["name"],
                                                 "properties": {"name": {"type": "string"}}}}}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = _doc(..., minItems=1)
    max_tokens: Int | None = _doc(None, minimum=1)
    max_completion_tokens: Int | None = _doc(None, minimum=1)
    logprobs: bool | None = False
    top_logprobs: Int | None = _doc(None, minimum=0, maximum=MAX_LOGPROBS)
    add_generation_prompt: bool | None = True  # vLLM extra
    tools: Any = _doc(None, anyOf=[{"type": "null"}, {"type": "array", "items": _TOOL}])
    tool_choice: Any = _doc(None, anyOf=[{"type": "null"}, {"enum": ["none", "auto", "required"]}, _NAMED_CHOICE])
    parallel_tool_calls: bool | None = None
    # Not supported: a 400 says so when they are set (the document states what is accepted).
    functions: Any = _doc(None, anyOf=[{"type": "null"}, {"type": "array", "maxItems": 0}])
    function_call: Any = _doc(None, enum=[None, "none"])
    audio: Any = _doc(None, type="null")
    modalities: Any = _doc(None, anyOf=[{"type": "null"}, {"type": "array", "items": {"enum": ["text"]}, "minItems": 1, "maxItems": 1}])

    def _unsupported(self) -> None:
        if self.functions or self.function_call not in (None, "none"):
            raise InvalidRequestError("functions / function_call (deprecated by OpenAI) are not supported; "
                                      "use tools and tool_choice")
        if self.audio is not None or self.modalities not in (None, ["text"]):
            raise InvalidRequestError("only text output is supported (audio / modalities)")

    @field_validator("messages")
    @classmethod
    def _check_messages(cls, messages):
        return check_messages(messages)

    def template_messages(self, template_takes_tools: bool = False) -> list[dict]:
        return template_messages(self.messages, template_takes_tools)

    def tool_plan(self) -> ToolPlan | None:
        return tool_plan(self.tools, self.tool_choice, self.parallel_tool_calls)

    def top_n_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true")
        if not self.logprobs:
            return None
        n = self.top_logprobs or 0
        if not 0 <= n <= MAX_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {n}")
        return n

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = True
    add_generation_prompt: bool | None = True

    @field_validator("messages")
    @classmethod
    def _check_messages(cls, messages):
        return check_messages(messages)


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[Int] = _doc(..., items=TOKEN_ID)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------- responses ----------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        u["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return u


def _token_str(entry: dict[int, TokenLogprob], tid: int, fallback) -> str:
    lp = entry.get(tid)
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return fallback(tid)


def completion_logprobs(token_ids: list[int], entries: list[dict[int, TokenLogprob] | None], n_top: int,
                        text_offset: int, decode) -> dict:
    """The legacy completions `logprobs` object for these tokens (entries aligned with token_ids;
    None for the first prompt token, which has nothing before it)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, entry in zip(token_ids, entries):
        s = _token_str(entry or {}, tid, decode)
        tokens.append(s)
        offsets.append(text_offset)
        text_offset += len(s)
        if entry is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(entry[tid].logprob if tid in entry else None)
        top = sorted(((lp.rank, _token_str(entry, t, decode), lp.logprob) for t, lp in entry.items()
                      if lp.rank <= n_top), key=lambda x: x[0])[:n_top]
        d = {s_: lp for _, s_, lp in top}
        if tid in entry:
            d.setdefault(s, entry[tid].logprob)  # OpenAI includes the sampled token
        tops.append(d)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(token_ids: list[int], entries: list[dict[int, TokenLogprob]], n_top: int, decode) -> dict:
    content = []
    for tid, entry in zip(token_ids, entries):
        s = _token_str(entry, tid, decode)
        top = sorted(((lp.rank, t, lp) for t, lp in entry.items() if lp.rank <= n_top),
                     key=lambda x: x[0])[:n_top]
        chosen = entry.get(tid)
        content.append({
            "token": s, "logprob": chosen.logprob if chosen else None, "bytes": list(s.encode("utf-8")),
            "top_logprobs": [{"token": _token_str(entry, t, decode), "logprob": lp.logprob,
                              "bytes": list(_token_str(entry, t, decode).encode("utf-8"))} for _, t, lp in top],
        })
    return {"content": content}



# ---------------- response models: what the OpenAPI document declares (responses are built as dicts) ----------------
class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Out):
    error: ErrorDetail


class PromptTokensDetails(_Out):
    cached_tokens: int


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None = None


class CompletionResponse(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    logprob: float | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[ChatTokenLogprob]


class FunctionCall(_Out):
    name: str
    arguments: str


class ToolCallOut(_Out):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class TokenizeResponse(_Out):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(_Out):
    prompt: str


class ModelCard(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelCard]


class HealthResponse(_Out):
    status: str


class VersionResponse(_Out):
    version: str
