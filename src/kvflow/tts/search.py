"""One prompt's samples while they run: merges the engine's delta outputs, lets the strategy see
each finished sample, and says which running samples to abort (pruned, or the search is over).
The offline runner and the server both drive it, aborting through their own engine handle."""
from __future__ import annotations

import time

from kvflow.outputs import RequestOutput
from kvflow.tts.pruning import Pruning
from kvflow.tts.samples import Sample, TTSResult
from kvflow.tts.strategies import Strategy


class SampleSearch:
    def __init__(self, request_id: str, n: int, strategy: Strategy, pruning: Pruning | None = None):
        self.request_id = request_id
        self.samples = [Sample(i) for i in range(n)]
        self.strategy = strategy
        self.pruning = pruning
        self.stopped = False  # the strategy ended the search early
        self.started = time.perf_counter()
        self.finished_at: float | None = None

    def add(self, delta: RequestOutput) -> list[int]:
        """Merge one delta; returns the indices of running samples to abort now."""
        newly_finished = []
        for c in delta.outputs:
            s = self.samples[c.index]
            s.text += c.text
            s.token_ids.extend(c.token_ids)
            s.cumulative_logprob = c.cumulative_logprob or 0.0
            if c.finish_reason is not None and s.finish_reason is None:
                s.finish_reason = c.finish_reason
                s.finish_rank = sum(x.finish_rank is not None for x in self.samples)
                newly_finished.append(s)
        if delta.finished:
            self.finished_at = time.perf_counter()
        for s in newly_finished:
            if not self.stopped and self.strategy.on_finished(s):
                self.stopped = True
        if self.stopped:
            return [s.index for s in self.samples if not s.finished]
        if self.pruning is None:
            return []
        doomed = self.pruning.to_prune(self.samples)
        for i in doomed:
            self.samples[i].pruned = True
        return doomed

    def result(self) -> TTSResult:
        choice = self.strategy.choose(self.samples)
        end = self.finished_at or time.perf_counter()
        return TTSResult(self.request_id, self.strategy.name, self.samples, choice.index, choice.answer,
                         choice.votes, end - self.started)
