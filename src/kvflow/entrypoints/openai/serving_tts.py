"""The `tts` request extra: run each prompt's n samples as one engine request, let a
kvflow.tts SampleSearch watch them (pruning the ones that fall behind through
AsyncEngine.abort_sample), and answer with the sample its strategy chose.

The response carries the chosen sample as its choice and a `tts` field with every sample (text,
tokens, mean logprob, extracted answer, pruned or not): an object for chat, a list with one
object per prompt for completions. `usage.completion_tokens` counts every sample's tokens."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from kvflow.engine.async_engine import AsyncEngine, RequestStream
from kvflow.tts import Pruning, Strategy, TTSResult, strategy_from_dict
from kvflow.tts.search import SampleSearch


@dataclass
class TTSPlan:
    """The strategy and pruning a request asked for, checked before anything reaches the engine."""
    strategy: Strategy
    pruning: Pruning | None
    n: int

    @classmethod
    def parse(cls, options) -> TTSPlan:
        strategy = strategy_from_dict({"strategy": options.strategy, "extractor": options.extractor})
        prune = None if options.prune is None else Pruning(options.prune.margin, options.prune.min_tokens)
        return cls(strategy, prune, options.n)

    def searches(self, streams: list[RequestStream]) -> list[SampleSearch]:
        return [SampleSearch(s.request_id, self.n, self.strategy, self.pruning) for s in streams]


async def run_searches(engine: AsyncEngine, streams: list[RequestStream],
                       searches: list[SampleSearch]) -> list[TTSResult]:
    """Feed each stream's deltas to its search until every sample has ended."""
    async def one(stream: RequestStream, search: SampleSearch) -> TTSResult:
        async for delta in stream:
            for index in search.add(delta):
                engine.abort_sample(stream.request_id, index)
        return search.result()

    return list(await asyncio.gather(*(one(s, q) for s, q in zip(streams, searches))))


def chosen(result: TTSResult) -> tuple[str, str | None]:
    """The chosen sample's text and finish reason (the most likely one if none was chosen)."""
    i = result.chosen if result.chosen is not None else max(result.samples, key=lambda s: s.mean_logprob).index
    return result.samples[i].text, result.samples[i].finish_reason
