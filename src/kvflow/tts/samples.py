"""What test-time compute returns: every sample of a prompt, and the one a strategy chose."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Sample:
    """One of a prompt's n samples, merged from the engine's delta outputs."""
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0  # of the raw model distribution (end-of-thinking tokens the engine forced count 0)
    finish_reason: str | None = None  # "stop" | "length" | "abort" (pruned, or the search stopped early)
    pruned: bool = False
    finish_rank: int | None = None  # 0 for the first of the prompt's samples to finish, and so on
    answer: str | None = None  # what self-consistency extracted
    score: float | None = None  # what best-of-n ranked by
    verified: bool | None = None  # what the verifier said (repeated sampling)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def mean_logprob(self) -> float:
        return self.cumulative_logprob / self.num_tokens if self.token_ids else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["token_ids"]
        d.update(num_tokens=self.num_tokens, mean_logprob=self.mean_logprob)
        return d


@dataclass
class TTSResult:
    request_id: str
    strategy: str
    samples: list[Sample]
    chosen: int | None  # index of the chosen sample (None: none qualified, e.g. nothing verified)
    answer: str | None = None  # self-consistency: the majority answer
    votes: dict[str, int] | None = None
    seconds: float = 0.0  # from adding the request to its last sample finishing

    @property
    def text(self) -> str:
        return "" if self.chosen is None else self.samples[self.chosen].text

    @property
    def num_generated_tokens(self) -> int:
        return sum(s.num_tokens for s in self.samples)

    def to_dict(self) -> dict:
        """The documented `tts` field of a server response."""
        return {"strategy": self.strategy, "chosen_index": self.chosen, "answer": self.answer, "votes": self.votes,
                "num_generated_tokens": self.num_generated_tokens,
                "samples": [s.to_dict() for s in self.samples]}
