"""How to pick one answer out of n samples (Large Language Monkeys' "when to verify, when to vote").

- RepeatedSampling: a verifier callable checks each finished sample; the first verified one wins,
  and with `stop_at_first` the samples still running are aborted then (their KV is freed).
- SelfConsistency: majority vote over the final answer each sample states (an extractor).
- BestOfN: the highest score: mean token logprob by default, or a reward/verifier callable.

A strategy sees samples as they finish (`on_finished`, which may end the search) and picks one
at the end (`choose`). Pruned samples take no part in the choice."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Protocol

from kvflow.errors import InvalidRequestError
from kvflow.tts.answers import EXTRACTORS, default_answer
from kvflow.tts.samples import Sample


@dataclass
class Choice:
    index: int | None
    answer: str | None = None
    votes: dict[str, int] | None = None


class Strategy(Protocol):
    name: str

    def on_finished(self, sample: Sample) -> bool:
        """A sample just finished; True ends the search (the rest are aborted)."""

    def choose(self, samples: list[Sample]) -> Choice: ...


def _candidates(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if not s.pruned and s.finish_reason not in (None, "abort")]


@dataclass
class RepeatedSampling:
    verifier: Callable[[str], bool]
    stop_at_first: bool = True
    name: str = "repeated_sampling"

    def on_finished(self, sample: Sample) -> bool:
        if sample.finish_reason == "abort":
            return False
        sample.verified = bool(self.verifier(sample.text))
        return sample.verified and self.stop_at_first

    def choose(self, samples: list[Sample]) -> Choice:
        verified = [s for s in samples if s.verified]
        return Choice(min(verified, key=lambda s: s.finish_rank).index if verified else None)


@dataclass
class SelfConsistency:
    extractor: Callable[[str], str | None] = default_answer
    name: str = "self_consistency"

    def on_finished(self, sample: Sample) -> bool:
        return False

    def choose(self, samples: list[Sample]) -> Choice:
        """The most common answer (ties: the one of the lowest sample index); of the samples giving it, the one
        with the highest mean logprob. Samples without an answer do not vote."""
        for s in _candidates(samples):
            s.answer = self.extractor(s.text)
        voters = [s for s in _candidates(samples) if s.answer is not None]
        if not voters:  # nobody stated an answer: fall back to the most likely sample
            return Choice(BestOfN().choose(samples).index, votes={})
        votes = Counter(s.answer for s in voters)
        answer = votes.most_common(1)[0][0]
        best = max((s for s in voters if s.answer == answer), key=lambda s: s.mean_logprob)
        return Choice(best.index, answer, dict(votes))


@dataclass
class BestOfN:
    score: Callable[[str], float] | None = None  # None: the sample's mean token logprob
    name: str = "best_of_n"

    def on_finished(self, sample: Sample) -> bool:
        return False

    def choose(self, samples: list[Sample]) -> Choice:
        candidates = _candidates(samples)
        for s in candidates:
            s.score = s.mean_logprob if self.score is None else float(self.score(s.text))
        if not candidates:
            return Choice(None)
        return Choice(max(candidates, key=lambda s: s.score).index)


def strategy_from_dict(spec: dict) -> Strategy:
    """The strategies a JSON request can name (no callables over HTTP):
    {"strategy": "self_consistency", "extractor": "default" | "boxed" | "last_number"} or
    {"strategy": "best_of_n"} (by mean logprob)."""
    name = spec.get("strategy")
    if name == "self_consistency":
        extractor = spec.get("extractor", "default")
        if extractor not in EXTRACTORS:
            raise InvalidRequestError(f"tts.extractor must be one of {sorted(EXTRACTORS)}, got {extractor!r}")
        return SelfConsistency(EXTRACTORS[extractor])
    if name == "best_of_n":
        return BestOfN()
    if name == "repeated_sampling":
        raise InvalidRequestError("tts.strategy repeated_sampling needs a verifier callable: use the offline API "
                                  "(kvflow.tts.RepeatedSampling)")
    raise InvalidRequestError(f"tts.strategy must be 'self_consistency' or 'best_of_n', got {name!r}")
