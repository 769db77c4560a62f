"""Speculator: after each step, picks K and asks the proposer for each decoding request's drafts.
The scheduler then schedules them as extra tokens of the request (vLLM v1's rule), and the engine
verifies them against the target's draws from the same forward pass."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvflow.engine.request import Request
from kvflow.engine.scheduler import Scheduler
from kvflow.errors import ConfigError
from kvflow.spec_decode.config import SpeculativeConfig
from kvflow.spec_decode.goodput import StepTimeModel, choose_k
from kvflow.spec_decode.ngram import NgramProposer
from kvflow.spec_decode.recycle import TokenRecyclingProposer

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
    def __init__(self, config: SpeculativeConfig, engine):
        self.config = config
        self.stats = SpecStats()
        self.step_time = StepTimeModel()
        self.needs_blocks = False
        if config.method == "ngram":
            self.proposer = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        elif config.method == "recycle":
            self.proposer = TokenRecyclingProposer(engine.model_config.vocab_size, config.recycle_topk)
        else:
            self.proposer = _build_draft(config, engine)
            self.needs_blocks = True

    # ---- after a step ----
    def observe_step(self, num_tokens: int, seconds: float, sampled, sample_logits: torch.Tensor | None) -> None:
        self.step_time.observe(num_tokens, seconds)
        if isinstance(self.proposer, TokenRecyclingProposer) and sample_logits is not None:
            inputs = [t for s in sampled for t in s.token_ids[-(len(s.spec_token_ids) + 1):]]
            self.proposer.observe(inputs, sample_logits)

    def record_verification(self, req: Request, num_drafts: int, num_accepted: int) -> None:
        if not num_drafts:
            return
        req.num_draft_tokens += num_drafts
        req.num_accepted_tokens += num_accepted
        req.acceptance_ema = (1 - _EMA) * req.acceptance_ema + _EMA * num_accepted / num_drafts
        self.stats.num_drafts += num_drafts
        self.stats.num_accepted += num_accepted

    # ---- before the next step ----
    def propose(self, scheduler: Scheduler) -> None:
        decoding, base = [], 0
        for r in scheduler.running:
            r.spec_token_ids = []
            if r.num_computed_tokens == r.num_tokens - 1:
                decoding.append(r)
            else:
                base += r.num_tokens - r.num_computed_tokens
        base += sum(r.num_tokens for r in scheduler.waiting)
        base = min(base, scheduler.config.max_num_batched_tokens) + len(decoding)
        if not decoding:
            return
        limits = [self._room(r, scheduler) for r in decoding]
        max_k = self.config.max_tokens
        if self.needs_blocks:  # a draft model: choose K first, its drafts cost forward passes
            k = self._choose(decoding, [min(max_k, n) for n in limits], base, max_k)
            ready = [r for r, n in zip(decoding, limits) if n >= k and scheduler.reserve(r, r.num_tokens + k - 1)]
            drafts = self.proposer.propose(ready, k) if k else []
            decoding = ready
        else:
            drafts = self.proposer.propose(decoding, max_k)
            drafts = [d[:n] for d, n in zip(drafts, limits)]
            k = self._choose(decoding, [len(d) for d in drafts], base, max_k)
        for r, d in zip(decoding, drafts):
            r.spec_token_ids = d[:k]
        self.stats.num_steps += 1
        self.stats.sum_k += k
        self.stats.k_histogram[k] = self.stats.k_histogram.get(k, 0) + 1

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


def _build_draft(config: SpeculativeConfig, engine):
    from kvflow.config import parse_dtype
    from kvflow.model.loader import load_model
    from kvflow.spec_decode.draft import DraftProposer
    from kvflow.worker.model_runner import allocate_kv_caches

    runner = engine.runner
    if config.layer_skip is not None:
        total = engine.model_config.num_layers
        if config.layer_skip >= total:
            raise ConfigError(f"layer_skip must be below the target's {total} layers, got {config.layer_skip}")
        return DraftProposer(runner.model, runner.kv_caches, config.layer_skip, runner.block_size,
                             runner.device, shares_target_cache=True)
    dtype = parse_dtype(engine.config.dtype)
    max_len = engine.config.scheduler.max_model_len
    draft = load_model(config.draft_model, dtype, engine.config.device, max_positions=max_len)
    if draft.config.max_position_embeddings < max_len:
        raise ConfigError(f"draft model {config.draft_model!r} has a context of {draft.config.max_position_embeddings} "
                          f"tokens, below max_model_len {max_len}: pass max_model_len <= "
                          f"{draft.config.max_position_embeddings}")
    if draft.config.vocab_size != engine.model_config.vocab_size or draft.tokenizer.get_vocab() != engine.tokenizer.get_vocab():
        raise ConfigError(f"draft model {config.draft_model!r} has a different vocabulary "
                          f"({draft.config.vocab_size} tokens) from the target's ({engine.model_config.vocab_size}): "
                          f"a draft must share the target's tokenizer")
    # Same block ids as the target's pool: the draft's KV follows the target's block tables.
    caches = allocate_kv_caches(draft.config, engine.block_pool.num_blocks, runner.block_size, dtype, runner.device)
    return DraftProposer(draft.model, caches, draft.config.num_layers, runner.block_size, runner.device,
                         shares_target_cache=False)
