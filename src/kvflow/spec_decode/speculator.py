"""Speculator: after each step, picks K and asks the proposer for each decoding request's drafts.
The engine hands them to Scheduler.set_draft_tokens; the scheduler schedules them as extra tokens
of the request (vLLM v1's rule) and verifies them against the target's draws from the same pass.

The speculator is handed what it needs: a proposer and a way to reserve KV slots (draft models
write their KV ahead of verification). It reads the scheduler's queues and never writes them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from kvflow.core.request import Request
from kvflow.core.scheduler import ModelRunnerOutput, Scheduler, SchedulerOutput
from kvflow.errors import ConfigError
from kvflow.spec_decode.config import SpeculativeConfig
from kvflow.spec_decode.draft import DraftProposer
from kvflow.spec_decode.goodput import StepTimeModel, choose_k
from kvflow.spec_decode.ngram import NgramProposer
from kvflow.spec_decode.recycle import TokenRecyclingProposer
from kvflow.worker.model_runner import ModelRunner

_EMA = 0.3  # weight of the newest step in a request's acceptance-rate average


@dataclass
class SpecStats:
    num_drafts: int = 0  # draft tokens sent to verification
    num_accepted: int = 0
    num_steps: int = 0  # proposal rounds
    sum_k: int = 0  # of the K chosen each round
    k_histogram: dict[int, int] = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_drafts if self.num_drafts else 0.0

    @property
    def mean_k(self) -> float:
        return self.sum_k / self.num_steps if self.num_steps else 0.0

    def as_dict(self) -> dict:
        return {"draft_tokens": self.num_drafts, "accepted_tokens": self.num_accepted,
                "acceptance_rate": round(self.acceptance_rate, 4), "mean_k": round(self.mean_k, 3),
                "k_histogram": dict(sorted(self.k_histogram.items()))}


class Speculator:
    def __init__(self, config: SpeculativeConfig, proposer, reserve: Callable[[Request, int], bool]):
        self.config = config
        self.proposer = proposer
        self.reserve = reserve  # own blocks for this many positions, all or nothing
        self.stats = SpecStats()
        self.step_time = StepTimeModel()

    @property
    def needs_blocks(self) -> bool:
        """Draft models compute KV for their drafts, so K is chosen before proposing."""
        return isinstance(self.proposer, DraftProposer)

    # ---- after a step ----
    def observe_step(self, sched: SchedulerOutput, seconds: float, out: ModelRunnerOutput) -> None:
        self.step_time.observe(sched.num_tokens, seconds)
        if isinstance(self.proposer, TokenRecyclingProposer) and out.sample_logits is not None:
            by_id = {s.request.request_id: s for s in sched.scheduled}
            # the sampled rows, in the runner's order: each request's last known token, then its drafts
            inputs = [t for rid in out.sampled for t in by_id[rid].token_ids[-(len(by_id[rid].spec_token_ids) + 1):]]
            self.proposer.observe(inputs, out.sample_logits)

    def record_verification(self, req: Request, num_drafts: int, num_accepted: int) -> None:
        if not num_drafts:
            return
        req.num_draft_tokens += num_drafts
        req.num_accepted_tokens += num_accepted
        req.acceptance_ema = (1 - _EMA) * req.acceptance_ema + _EMA * num_accepted / num_drafts
        self.stats.num_drafts += num_drafts
        self.stats.num_accepted += num_accepted

    # ---- before the next step ----
    def propose(self, scheduler: Scheduler) -> dict[Request, list[int]]:
        """Drafts for the next step, per decoding request."""
        decoding, base = [], 0
        for r in scheduler.running:
            if r.num_computed_tokens == r.num_tokens - 1:
                decoding.append(r)
            else:
                base += r.num_tokens - r.num_computed_tokens
        base += sum(r.num_tokens for r in scheduler.waiting)
        base = min(base, scheduler.config.max_num_batched_tokens) + len(decoding)
        if not decoding:
            return {}
        limits = [self._room(r, scheduler) for r in decoding]
        max_k = self.config.max_tokens
        if self.needs_blocks:  # a draft model: choose K first, its drafts cost forward passes
            k = self._choose(decoding, [min(max_k, n) for n in limits], base, max_k)
            ready = [r for r, n in zip(decoding, limits) if n >= k and self.reserve(r, r.num_tokens + k - 1)]
            drafts = self.proposer.propose(ready, k) if k else []
            decoding = ready
        else:
            drafts = self.proposer.propose(decoding, max_k)
            drafts = [d[:n] for d, n in zip(drafts, limits)]
            k = self._choose(decoding, [len(d) for d in drafts], base, max_k)
        self.stats.num_steps += 1
        self.stats.sum_k += k
        self.stats.k_histogram[k] = self.stats.k_histogram.get(k, 0) + 1
        return {r: d[:k] for r, d in zip(decoding, drafts) if k and d}

    def _choose(self, reqs: list[Request], draft_lens: list[int], base: int, max_k: int) -> int:
        if not self.config.auto:
            return max_k
        return choose_k([r.acceptance_ema for r in reqs], draft_lens, base, max_k, self.step_time)

    @staticmethod
    def _room(r: Request, scheduler: Scheduler) -> int:
        """Drafts beyond max_tokens or the context would be thrown away: don't propose them."""
        room = scheduler.config.max_model_len - r.num_tokens
        if r.params.max_tokens is not None:
            room = min(room, r.params.max_tokens - r.num_output_tokens - 1)
        return max(0, room)


def build_proposer(config: SpeculativeConfig, target: ModelRunner, draft: ModelRunner | None, max_model_len: int):
    """The proposer a config names. `draft` is the draft model's runner (method "draft" with a draft_model)."""
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "recycle":
        return TokenRecyclingProposer(target.model_config.vocab_size, config.recycle_topk)
    if config.layer_skip is not None:
        total = target.model_config.num_layers
        if config.layer_skip >= total:
            raise ConfigError(f"layer_skip must be below the target's {total} layers, got {config.layer_skip}")
        return DraftProposer(target.model, target.kv_caches, config.layer_skip, target.block_size, target.device,
                             shares_target_cache=True)
    _check_draft(config, target, draft, max_model_len)
    return DraftProposer(draft.model, draft.kv_caches, draft.model_config.num_layers, draft.block_size, draft.device,
                         shares_target_cache=False)


def _check_draft(config: SpeculativeConfig, target: ModelRunner, draft: ModelRunner, max_len: int) -> None:
    draft_len = draft.model_config.max_position_embeddings
    if draft_len < max_len:
        raise ConfigError(f"draft model {config.draft_model!r} has a context of {draft_len} tokens, below "
                          f"max_model_len {max_len}: pass max_model_len <= {draft_len}")
    vocab = target.model_config.vocab_size
    if draft.model_config.vocab_size != vocab or draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
        raise ConfigError(f"draft model {config.draft_model!r} has a different vocabulary "
                          f"({draft.model_config.vocab_size} tokens) from the target's ({vocab}): "
                          f"a draft must share the target's tokenizer")
