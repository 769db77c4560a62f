"""Request: one sequence being generated. `num_computed_tokens` catches up with `num_tokens`;
prefill, decode, prefix-cache hits and recompute after preemption are all the same rule."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvflow.outputs import Logprob, RequestMetrics
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
    # The sibling whose prompt blocks this one waits to share (n > 1 with prefix caching).
    leader: Request | None = None
    eos_token_ids: tuple[int, ...] = ()

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
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    acceptance_ema: float = 0.5
    draft_num_computed: int = 0  # tokens whose KV a separate draft model holds
    detokenizer: object = None  # IncrementalDetokenizer, set by the engine

    def __post_init__(self) -> None:
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
