"""Adaptive compute: abort samples whose running mean token logprob falls behind the best one by
more than `margin` nats, once they have `min_tokens` tokens. An aborted sample's own KV blocks go
back to the pool at once (the prompt blocks it shares with its siblings stay)."""
from __future__ import annotations

from dataclasses import dataclass

from kvflow.errors import InvalidRequestError
from kvflow.tts.samples import Sample


@dataclass
class Pruning:
    margin: float = 1.0
    min_tokens: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.margin, (int, float)) or isinstance(self.margin, bool) or not self.margin >= 0:
            raise InvalidRequestError(f"tts prune margin must be a number >= 0, got {self.margin!r}")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 1:
            raise InvalidRequestError(f"tts prune min_tokens must be an integer >= 1, got {self.min_tokens!r}")

    def to_prune(self, samples: list[Sample]) -> list[int]:
        """Indices of running samples to abort now."""
        scored = [s for s in samples if not s.pruned and s.finish_reason != "abort" and s.num_tokens >= self.min_tokens]
        if not scored:
            return []
        best = max(s.mean_logprob for s in scored)
        return [s.index for s in scored if not s.finished and s.mean_logprob < best - self.margin]

    @classmethod
    def from_dict(cls, spec: dict | None) -> Pruning | None:
        if spec is None:
            return None
        if not isinstance(spec, dict) or set(spec) - {"margin", "min_tokens"}:
            raise InvalidRequestError(f"tts.prune must be an object with margin and min_tokens, got {spec!r}")
        return cls(**spec)
