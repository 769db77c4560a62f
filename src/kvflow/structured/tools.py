"""Tool calls (OpenAI `tools` + `tool_choice`) as structured output.

- "required" and a named function are enforced: the output is constrained by a JSON schema over
  the call (a named function: its arguments object; "required": a non-empty array of
  {"name", "arguments"} objects, one anyOf branch per tool), so it always parses.
- "auto" lets the model choose: calls are parsed from its text in the Hermes / Qwen format,
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. A chat template that takes `tools`
  renders them itself; for one that does not (SmolLM2's), the tools are described in a system
  message in that same format.
- "none": the tools are not shown and the output is free text.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from kvflow.errors import InvalidRequestError
from kvflow.sampling_params import StructuredOutputsParams

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
OPEN_TAG = "<tool_call>"
_EMPTY_PARAMS = {"type": "object", "properties": {}}


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_dict(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolPlan:
    """How one chat request treats its tools."""
    tools: list[dict]  # the function definitions: {"name", "description"?, "parameters"?}
    choice: str  # "none" | "auto" | "required" | "named"
    named: str | None = None
    parallel: bool = True

    @property
    def enforced(self) -> bool:
        return self.choice in ("required", "named")

    def structured_outputs(self) -> StructuredOutputsParams | None:
        if self.choice == "named":
            fn = next(t for t in self.tools if t["name"] == self.named)
            return StructuredOutputsParams(json=fn.get("parameters") or _EMPTY_PARAMS)
        if self.choice == "required":
            calls = [{"type": "object", "properties": {"name": {"enum": [t["name"]]},
                                                        "arguments": t.get("parameters") or _EMPTY_PARAMS},
                      "required": ["name", "arguments"]} for t in self.tools]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutputsParams(json=schema)
        return None

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished output; no calls when the text holds none that parse."""
        if self.choice == "named":
            return _calls_or_text(text, lambda: [ToolCall(self.named, _compact(json.loads(text)))])
        if self.choice == "required":
            return _calls_or_text(text, lambda: [ToolCall(c["name"], _compact(c["arguments"])) for c in json.loads(text)])
        if self.choice == "auto" and OPEN_TAG in text:
            calls = []
            for body in _CALL.findall(text):
                try:
                    call = json.loads(body)
                    name, args = call["name"], call.get("arguments", call.get("parameters", {}))
                except (ValueError, KeyError, TypeError):
                    continue
                if isinstance(name, str):
                    calls.append(ToolCall(name, args if isinstance(args, str) else _compact(args)))
            if calls:
                content = text[:text.index(OPEN_TAG)].strip()
                return content or None, calls
        return text, []


def _calls_or_text(text: str, make) -> tuple[str | None, list[ToolCall]]:
    try:
        return None, make()
    except (ValueError, KeyError, TypeError):  # cut by max_tokens or a stop string: plain text
        return text, []


def _compact(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def tool_plan(tools: object, tool_choice: object, parallel_tool_calls: object = None) -> ToolPlan | None:
    """Check `tools` and `tool_choice` (InvalidRequestError naming the field) and say how to treat them."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequestError("tool_choice needs tools; send tools or omit tool_choice")
        return None
    if not isinstance(tools, list):
        raise InvalidRequestError(f"tools must be a list of tool objects, got {type(tools).__name__}")
    functions = [_function(i, t) for i, t in enumerate(tools)]
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"tools: function names must be unique, got {names}")
    parallel = parallel_tool_calls is not False
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        return ToolPlan(functions, tool_choice or "auto", parallel=parallel)
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in names:
            raise InvalidRequestError(f"tool_choice names function {name!r}, which is not in tools ({', '.join(names)})")
        return ToolPlan(functions, "named", name, parallel)
    raise InvalidRequestError('tool_choice must be "none", "auto", "required" or '
                              f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r}')


def _function(i: int, tool: object) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise InvalidRequestError(f'{where} must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}')
    fn = tool["function"]
    if not isinstance(fn.get("name"), str) or not _NAME.match(fn["name"]):
        raise InvalidRequestError(f"{where}.function.name must be 1-64 letters, digits, '_', '-' or '.', got {fn.get('name')!r}")
    if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
        raise InvalidRequestError(f"{where}.function.parameters must be a JSON schema object")
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise InvalidRequestError(f"{where}.function.description must be a string")
    return {k: fn[k] for k in ("name", "description", "parameters") if fn.get(k) is not None}


# ---------------- the prompt ----------------
def template_takes_tools(tokenizer) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def tools_system_text(functions: list[dict]) -> str:
    """The Hermes-format instructions, for chat templates that do not render tools themselves."""
    listing = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
    return ("You may call one or more functions to help with the user's request. The functions are described "
            f"in JSON schema within <tools></tools> tags:\n<tools>\n{listing}\n</tools>\n"
            "To call a function, reply with a JSON object with its name and arguments within "
            '<tool_call></tool_call> tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
            "</tool_call>")


def with_tools(messages: list[dict], functions: list[dict]) -> list[dict]:
    """The messages with the tool instructions in the system message (added first when absent)."""
    text = tools_system_text(functions)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}] + messages[1:]
    return [{"role": "system", "content": text}] + messages


def call_text(tool_calls: list[dict]) -> str:
    """An assistant message's earlier calls, as the text format the model is asked to write."""
    parts = []
    for c in tool_calls:
        fn = c.get("function") or {}
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            pass
        parts.append(f"<tool_call>\n{json.dumps({'name': fn.get('name'), 'arguments': args}, ensure_ascii=False)}\n</tool_call>")
    return "\n".join(parts)


# ---------------- streaming ----------------
class ToolStream:
    """Turns one choice's text deltas into chat-chunk deltas. A named function streams its
    arguments as they come; "required" and "auto" (once a <tool_call> tag appears) hold the text
    back and send the parsed calls at the end; before that tag, "auto" streams content, holding
    back only a tail that might be the tag's beginning."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters of text sent as content (auto) or arguments (named)
        self.call_id = ToolCall("", "").id

    def delta(self, piece: str) -> dict:
        self.text += piece
        if self.plan.choice == "named":
            first = self.sent == 0 and not piece == ""
            new, self.sent = self.text[self.sent:], len(self.text)
            if not new:
                return {}
            fn = {"name": self.plan.named, "arguments": new} if first else {"arguments": new}
            head = {"id": self.call_id, "type": "function"} if first else {}
            return {"tool_calls": [{"index": 0, **head, "function": fn}]}
        if self.plan.choice != "auto" or OPEN_TAG in self.text:
            return {}
        safe = len(self.text)
        for k in range(min(len(OPEN_TAG) - 1, len(self.text)), 0, -1):  # a tail that may start the tag
            if OPEN_TAG.startswith(self.text[-k:]):
                safe -= k
                break
        new, self.sent = self.text[self.sent:safe], max(self.sent, safe)
        return {"content": new} if new else {}

    def finish(self) -> tuple[dict, bool]:
        """The last delta once the output finished, and whether it holds tool calls."""
        content, calls = self.plan.parse(self.text)
        if self.plan.choice == "named":
            return {}, bool(calls)
        if calls:
            return {"tool_calls": [{"index": i, **c.as_dict()} for i, c in enumerate(calls)]}, True
        rest = self.text[self.sent:]
        self.sent = len(self.text)
        return ({"content": rest} if rest else {}), False
