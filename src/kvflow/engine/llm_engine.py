"""LLMEngine: add_request / step / abort. One step = schedule, one forward pass, sample, update.
The offline LLM, the async server and a cluster instance all drive this same loop."""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from kvflow.config import EngineConfig, parse_dtype, parse_quantization, resolve_auto_dtype
from kvflow.engine.detokenizer import IncrementalDetokenizer
from kvflow.engine.kv_cache import BlockPool
from kvflow.engine.request import Request
from kvflow.engine.scheduler import Scheduler
from kvflow.errors import InvalidRequestError
from kvflow.model.loader import load_model
from kvflow.outputs import CompletionOutput, RequestOutput, TokenLogprob
from kvflow.sampling_params import SamplingParams
from kvflow.spec_decode.config import SpeculativeConfig
from kvflow.spec_decode.speculator import Speculator
from kvflow.spec_decode.verifier import accepted_prefix
from kvflow.worker.model_runner import ModelRunner, StepResult

logger = logging.getLogger(__name__)


@dataclass
class _Parent:
    """A user request: its n samples are n child Requests sharing the prompt."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        config.validate()
        self.config = config
        torch.manual_seed(config.seed)
        if config.dtype == "auto":  # resolved once; everything downstream sees the concrete dtype
            resolved, why = resolve_auto_dtype(config.device)
            config.dtype = str(resolved).removeprefix("torch.")
            logger.info("dtype auto -> %s (%s)", config.dtype, why)
        dtype = parse_dtype(config.dtype)
        self.device = torch.device(config.device)
        quant = parse_quantization(config.quantization)
        extra = {"quantization": quant} if quant != "none" else {}  # (keeps test doubles of load_model working)
        loaded = load_model(config.model, dtype, config.device, max_positions=config.scheduler.max_model_len, **extra)
        from kvflow.layers import kernel_choice
        kernel_choice.calibrate(loaded.model, recalibrate=config.recalibrate)
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = loaded.eos_token_ids
        self.model_path = loaded.path
        sched_cfg = config.scheduler
        sched_cfg.max_model_len = min(sched_cfg.max_model_len, loaded.config.max_position_embeddings)
        num_blocks = self._num_blocks(dtype)
        if num_blocks * config.cache.block_size < sched_cfg.max_model_len:
            # Every admitted request must be able to finish alone, whatever else runs.
            logger.warning("KV pool holds %d tokens: max_model_len lowered from %d", num_blocks * config.cache.block_size,
                           sched_cfg.max_model_len)
            sched_cfg.max_model_len = num_blocks * config.cache.block_size
        self.block_pool = BlockPool(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(sched_cfg, self.block_pool)
        self.runner = ModelRunner(loaded.model, config.cache, num_blocks, dtype, self.device)
        spec = SpeculativeConfig.parse(config.speculative_config)
        self.speculator = Speculator(spec, self) if spec is not None and spec.max_tokens > 0 else None
        self.parents: dict[str, _Parent] = {}
        self._ids = itertools.count()
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0

    def _num_blocks(self, dtype: torch.dtype) -> int:
        c = self.config.cache
        if c.num_blocks is not None:
            return c.num_blocks
        per_block = ModelRunner.bytes_per_block(self.model_config, c.block_size, dtype)
        return max(2, int(c.kv_cache_memory_gb * (1 << 30)) // per_block)

    # ---------------- requests ----------------
    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0) -> str:
        """Queue a request. Raises InvalidRequestError (and queues nothing) if it cannot run."""
        params = params or SamplingParams()
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.parents:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use")
        text, token_ids = self._prompt_ids(prompt)
        self._check_prompt(token_ids)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidRequestError(f"priority must be an integer, got {priority!r}")
        arrival = time.time() if arrival_time is None else arrival_time
        children = []
        for i in range(params.n):
            child = Request(f"{request_id}#{i}" if params.n > 1 else request_id, token_ids, params, arrival,
                            priority=priority, index=i, leader=children[0] if children else None,
                            eos_token_ids=self.eos_token_ids)
            child.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens,
                                                       params.stop_strings, params.include_stop_str_in_output)
            children.append(child)
        self.parents[request_id] = _Parent(request_id, text, token_ids, children)
        for child in children:
            self.scheduler.add(child)
        return request_id

    def _prompt_ids(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            return prompt, self.tokenize(prompt)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise InvalidRequestError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        return None, list(prompt)

    def _check_prompt(self, ids: list[int]) -> None:
        limit = self.config.scheduler.max_model_len
        if not ids:
            raise InvalidRequestError("prompt is empty (0 tokens)")
        if len(ids) >= limit:
            raise InvalidRequestError(
                f"prompt is {len(ids)} tokens, over the model's context length of {limit} (max_model_len) "
                f"less one token to generate")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks. Returns False if it is unknown or already done."""
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return False
        for child in parent.children:
            if not child.is_finished:
                self.scheduler.finish(child, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self.parents)

    # ---------------- the step ----------------
    def step(self) -> list[RequestOutput]:
        """Run one forward pass; return outputs for every request that advanced or finished."""
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            # max_model_len fits the pool, so a lone request always fits: no progress is a bug.
            assert not self.scheduler.num_unfinished or sched.num_preempted, "scheduler made no progress"
            return []
        started = time.perf_counter()
        result = self.runner.execute(sched)
        seconds = time.perf_counter() - started
        self.num_prompt_tokens_total += sum(min(s.num_new_tokens, max(0, s.request.num_prompt_tokens - s.start))
                                            for s in sched.scheduled)
        for s in sched.scheduled:  # sampled requests are corrected below for rejected drafts
            s.request.num_computed_tokens = s.start + s.num_new_tokens
        touched = self._apply_result(result)
        self.scheduler.update_after_step(sched.scheduled)
        if self.speculator is not None:
            self.speculator.observe_step(sched.num_tokens, seconds, result.sampled, result.sample_logits)
            self.speculator.propose(self.scheduler)
        return [self._output(p) for p in touched]

    def _apply_result(self, result: StepResult) -> list[_Parent]:
        now = time.time()
        touched: dict[str, _Parent] = {}
        for req, first_pos, lps in result.prompt_logprobs:
            self._add_prompt_logprobs(req, first_pos, lps)
        out = result.sampler_output
        row = 0
        for s in result.sampled:
            req, drafts = s.request, s.spec_token_ids
            targets = out.token_ids[row:row + len(drafts) + 1]
            accepted = accepted_prefix(drafts, targets)
            req.num_computed_tokens -= len(drafts) - accepted  # rejected drafts' KV is not kept
            req.draft_num_computed = min(req.draft_num_computed, req.num_computed_tokens)
            if self.speculator is not None:
                self.speculator.record_verification(req, len(drafts), accepted)
            for j, token in enumerate(targets[:accepted + 1]):  # accepted drafts, then the target's own token
                self._append(req, token, out, row + j, now)
                if req.is_finished:
                    break
            row += len(drafts) + 1
            parent_id = req.request_id.rsplit("#", 1)[0] if req.params.n > 1 else req.request_id
            touched[parent_id] = self.parents[parent_id]
        for parent_id, parent in touched.items():
            if parent.finished:
                del self.parents[parent_id]
        return list(touched.values())

    def _append(self, req: Request, token: int, out, row: int, now: float) -> None:
        req.append_token(token)
        self.num_generation_tokens_total += 1
        req.cumulative_logprob += out.logprobs[row]
        if req.logprobs is not None:
            req.logprobs.append(self._logprob_entry(out, row, token, req.params.logprobs))
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        req.metrics.last_token_time = now
        self._check_stop(req, token)

    def _check_stop(self, req: Request, token: int) -> None:
        p = req.params
        stop_str = req.detokenizer.add_token(token)
        if req.num_output_tokens >= p.min_tokens:
            if token in (p.stop_token_ids or ()):
                return self.scheduler.finish(req, "stop", token)
            if not p.ignore_eos and token in req.eos_token_ids:
                return self.scheduler.finish(req, "stop", None)
            if stop_str is not None:
                return self.scheduler.finish(req, "stop", stop_str)
        if p.max_tokens is not None and req.num_output_tokens >= p.max_tokens:
            return self.scheduler.finish(req, "length")
        if req.num_tokens >= self.config.scheduler.max_model_len:
            return self.scheduler.finish(req, "length")

    def _logprob_entry(self, out, row: int, token: int, n_top: int) -> dict[int, TokenLogprob]:
        """The sampled token's logprob and rank, plus this request's top-n_top alternatives."""
        entry = {token: TokenLogprob(out.logprobs[row], out.sampled_ranks[row], self._token_text(token))}
        if n_top:
            ids, lps = out.top_ids[row, :n_top].tolist(), out.top_logprobs[row, :n_top].tolist()
            for rank, (tid, lp) in enumerate(zip(ids, lps), 1):
                entry.setdefault(tid, TokenLogprob(lp, rank, self._token_text(tid)))
        return entry

    def _add_prompt_logprobs(self, req: Request, first_pos: int, lps: torch.Tensor) -> None:
        n_top = req.params.prompt_logprobs
        targets = torch.tensor(req.prompt_token_ids[first_pos:first_pos + lps.shape[0]], device=lps.device)
        chosen = lps.gather(1, targets[:, None]).squeeze(1)
        ranks = (lps > chosen[:, None]).sum(dim=1) + 1
        top_lp, top_ids = lps.topk(n_top, dim=-1) if n_top else (None, None)
        for i, tid in enumerate(targets.tolist()):
            entry = {tid: TokenLogprob(float(chosen[i]), int(ranks[i]), self._token_text(tid))}
            if n_top:
                for rank, (t, lp) in enumerate(zip(top_ids[i].tolist(), top_lp[i].tolist()), 1):
                    entry.setdefault(t, TokenLogprob(lp, rank, self._token_text(t)))
            req.prompt_logprobs.append(entry)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _output(self, parent: _Parent) -> RequestOutput:
        finished = parent.finished
        outputs = []
        for c in parent.children:
            text = c.detokenizer.visible_text(c.is_finished)
            logprobs = None if c.logprobs is None else list(c.logprobs)  # a snapshot: the engine keeps appending
            outputs.append(CompletionOutput(c.index, text, list(c.output_token_ids), c.cumulative_logprob,
                                            logprobs, c.finish_reason, c.stop_reason))
        lead = parent.children[0]
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outputs, finished,
                             prompt_logprobs=lead.prompt_logprobs, num_cached_tokens=lead.num_cached_tokens,
                             metrics=lead.metrics, metrics_by_sample=[c.metrics for c in parent.children])
