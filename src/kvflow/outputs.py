"""What the engine returns per request.

Outputs are deltas (vLLM's RequestOutputKind.DELTA): each step's RequestOutput lists only the
completions that changed, and each CompletionOutput holds only the text, token ids and logprobs
that are new since that request's previous output (cumulative_logprob and finish_reason are
current). `RequestOutput.add` merges a later delta into an earlier one; `LLM.generate` returns the
merged whole."""
from __future__ import annotations

from dataclasses import dataclass, field

# One position's logprobs: token id -> (logprob, rank, decoded token).
Logprob = dict[int, "TokenLogprob"]


@dataclass
class TokenLogprob:
    logprob: float
    rank: int  # 1 = most likely
    decoded_token: str | None = None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[Logprob] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, delta: CompletionOutput) -> None:
        """Append a later delta of the same completion (in place: the engine never reuses its lists)."""
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = self.logprobs if self.logprobs is not None else []
            self.logprobs.extend(delta.logprobs)
        self.cumulative_logprob = delta.cumulative_logprob
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[Logprob | None] | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    error: str | None = None  # set when this request was rejected; the others in a batch still run
    metrics_by_sample: list[RequestMetrics] = field(default_factory=list, repr=False)

    def add(self, delta: RequestOutput) -> None:
        """Merge a later delta of the same request into this one."""
        mine = {c.index: c for c in self.outputs}
        for c in delta.outputs:
            if c.index in mine:
                mine[c.index].add(c)
            else:
                self.outputs.append(c)
        self.outputs.sort(key=lambda c: c.index)
        self.finished = delta.finished
        self.prompt_logprobs = self.prompt_logprobs if delta.prompt_logprobs is None else delta.prompt_logprobs
        self.num_cached_tokens, self.metrics = delta.num_cached_tokens, delta.metrics
        self.metrics_by_sample = delta.metrics_by_sample
