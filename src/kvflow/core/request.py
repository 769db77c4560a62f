"""Request: one sequence being generated. `num_computed_tokens` catches up with `num_tokens`;
prefill, decode, prefix-cache hits and recompute after preemption are all the same rule.

A request's whole state is plain data (`export_state` / `from_state`), so another instance can
take it over: the cluster's live migration and prefill/decode split move requests this way, with
the KV contents of their blocks (ModelRunner.read_kv / write_kv)."""
from __future__ import annotations

import copy
import dataclasses
import enum
from dataclasses import dataclass, field

from kvflow.core.detokenizer import IncrementalDetokenizer
from kvflow.outputs import Logprob, RequestMetrics, TokenLogprob
from kvflow.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    priority: int = 0  # lower runs first, as in vLLM
    index: int = 0  # which of the parent's n completions
    parent_id: str = ""  # the user request this sample belongs to ("" = its own request_id)
    # The sibling whose prompt blocks this one waits to share (n > 1 with prefix caching).
    leader: Request | None = None
    eos_token_ids: tuple[int, ...] = ()
    detokenizer: IncrementalDetokenizer | None = None
    # Structured output: where this sample stands in its grammar (kvflow.structured.matcher
    # RequestGrammar; duck-typed here so the core stays free of xgrammar and torch).
    grammar: object | None = None
    # Reasoning budget (params.thinking_budget): the end-of-thinking text as token ids, and where the
    # answer starts in the output (None while the request is still thinking). See core/thinking.py.
    thinking_end_ids: tuple[int, ...] = ()
    answer_start: int | None = None

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first schedule)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float = 0.0
    logprobs: list[Logprob] | None = None
    prompt_logprobs: list[Logprob | None] | None = None
    metrics: RequestMetrics = field(init=False)
    # Speculative decoding: draft tokens to verify next step, and counters.
    spec_token_ids: list[int] = field(default_factory=list)
    spec_tree_parents: list[int] | None = None  # set when the drafts are a tree (core/spec_tree.py)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    acceptance_ema: float = 0.5
    draft_num_computed: int = 0  # tokens whose KV a separate draft model holds

    def __post_init__(self) -> None:
        self.parent_id = self.parent_id or self.request_id
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        self.all_token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first prompt token has nothing before it

    @property
    def seed(self) -> int | None:
        """The n samples of a seeded request differ from each other, each reproducibly."""
        return None if self.params.seed is None else self.params.seed + self.index

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    # ---- hand-over to another instance ----
    def export_state(self) -> dict:
        """Everything needed to continue this request elsewhere, as plain Python data (the leader
        link and the tokenizer stay behind; the importer attaches its own tokenizer)."""
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name not in ("leader", "detokenizer", "grammar", "params", "metrics", "status")}
        state["params"] = dataclasses.asdict(self.params)
        state["metrics"] = dataclasses.asdict(self.metrics)
        state["status"] = self.status.value
        state["logprobs"] = _export_logprobs(self.logprobs)
        state["prompt_logprobs"] = _export_logprobs(self.prompt_logprobs)
        state["detokenizer"] = None if self.detokenizer is None else self.detokenizer.export_state()
        return copy.deepcopy(state)

    @classmethod
    def from_state(cls, state: dict, tokenizer) -> Request:
        state = dict(state)
        params = state.pop("params")
        params.pop("stop_strings", None)
        metrics, detok = state.pop("metrics"), state.pop("detokenizer")
        status, logprobs, prompt_lps = state.pop("status"), state.pop("logprobs"), state.pop("prompt_logprobs")
        init = {f.name for f in dataclasses.fields(cls) if f.init}
        req = cls(**{k: v for k, v in state.items() if k in init}, params=SamplingParams(**params))
        for k, v in state.items():
            if k not in init:
                setattr(req, k, v)
        req.metrics = RequestMetrics(**metrics)
        req.status = RequestStatus(status)
        req.all_token_ids = list(req.prompt_token_ids) + list(req.output_token_ids)
        req.logprobs, req.prompt_logprobs = _import_logprobs(logprobs), _import_logprobs(prompt_lps)
        if detok is not None:
            req.detokenizer = IncrementalDetokenizer.from_state(detok, tokenizer)
        return req


def _export_logprobs(entries: list[Logprob | None] | None) -> list | None:
    if entries is None:
        return None
    return [None if e is None else [(t, lp.logprob, lp.rank, lp.decoded_token) for t, lp in e.items()]
            for e in entries]


def _import_logprobs(entries: list | None) -> list[Logprob | None] | None:
    if entries is None:
        return None
    return [None if e is None else {t: TokenLogprob(lp, rank, text) for t, lp, rank, text in e} for e in entries]
