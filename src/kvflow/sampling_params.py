"""SamplingParams: what to generate and how. Invalid values raise InvalidRequestError naming the field.

StructuredOutputsParams (vLLM's name and fields) constrains the output's shape; kvflow.structured
turns it into a grammar. Only its form is checked here; the grammar itself (a schema, a regex) is
checked when the engine parses it (kvflow.structured.grammar.parse)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from kvflow.errors import InvalidRequestError

MAX_LOGPROBS = 20
_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """Exactly one of: a JSON schema (dict or JSON text), a regex, a list of choices, an EBNF
    grammar (GBNF, as llama.cpp writes it), or json_object=True (any JSON object)."""
    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False  # JSON: no whitespace between elements (compact output)

    def __post_init__(self) -> None:
        set_kinds = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise InvalidRequestError("structured_outputs must set exactly one of json, regex, choice, grammar, "
                                      f"json_object; got {set_kinds or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise InvalidRequestError(f"structured_outputs.json must be a JSON schema (an object or its text), "
                                      f"got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise InvalidRequestError(f"structured_outputs.{name} must be a non-empty string, got {v!r}")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):
            raise InvalidRequestError(f"structured_outputs.choice must be a non-empty list of strings, got {self.choice!r}")
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise InvalidRequestError(f"structured_outputs.json_object must be true or false, got {self.json_object!r}")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str, bool]:
        """What identifies the compiled grammar (its cache key)."""
        value = getattr(self, self.kind)
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        return self.kind, text, self.disable_any_whitespace


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # top-N logprobs per generated token (plus the sampled one)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    # Reasoning budget (Elastic Reasoning): the output opens in a thinking span that ends at
    # `thinking_end`; after `thinking_budget` thinking tokens the engine appends `thinking_end`
    # itself, and `max_tokens` then counts the answer only (tokens after the end of thinking).
    thinking_budget: int | None = None
    thinking_end: str = "</think>"
    stop_strings: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self._check_numbers()
        self.stop_strings = self._check_stop(self.stop)
        if isinstance(self.structured_outputs, dict):  # from export_state (dataclasses.asdict)
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise InvalidRequestError(f"structured_outputs must be a StructuredOutputsParams, "
                                      f"got {type(self.structured_outputs).__name__}")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids
            ):
                raise InvalidRequestError(f"stop_token_ids must be a list of ints, got {self.stop_token_ids!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise InvalidRequestError(f"logit_bias must be a dict token_id -> bias, got {type(self.logit_bias).__name__}")
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError) as e:
                raise InvalidRequestError(f"logit_bias must map integer token ids to numbers: {e}") from None

    def _check_numbers(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise InvalidRequestError(msg)

        need(_is_int(self.n) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        need(_is_num(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature!r}")
        need(_is_num(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        need(_is_int(self.top_k) and (self.top_k >= 0 or self.top_k == -1), f"top_k must be -1, 0 (disabled) or >= 1, got {self.top_k!r}")
        need(_is_num(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        need(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
             f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        need(_is_int(self.min_tokens) and self.min_tokens >= 0, f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        need(self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        need(_is_num(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        need(_is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        need(_is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        need(self.seed is None or _is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        need(self.thinking_budget is None or (_is_int(self.thinking_budget) and self.thinking_budget >= 0),
             f"thinking_budget must be an integer >= 0, got {self.thinking_budget!r}")
        need(isinstance(self.thinking_end, str) and self.thinking_end != "",
             f"thinking_end must be a non-empty string, got {self.thinking_end!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            need(v is None or (_is_int(v) and 0 <= v <= MAX_LOGPROBS), f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")

    @staticmethod
    def _check_stop(stop: object) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequestError(f"stop must be a string or a list of strings, got {type(stop).__name__}: {stop!r}")
        if any(s == "" for s in stop):
            raise InvalidRequestError("stop strings must not be empty")
        return list(stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # v == v rejects NaN
