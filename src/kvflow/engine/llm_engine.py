"""LLMEngine: add_request / step / abort. It builds the pieces (model runner, block pool,
scheduler, speculator, output processor) and runs one step at a time; the offline LLM, the async
server and a cluster instance all drive this same loop."""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from kvflow.config import EngineConfig, resolve_auto_dtype
from kvflow.core.detokenizer import IncrementalDetokenizer
from kvflow.core.kv_cache import BlockPool
from kvflow.core.request import Request, RequestStatus
from kvflow.core.scheduler import Scheduler
from kvflow.engine.output_processor import OutputProcessor, ParentRequest
from kvflow.errors import InvalidRequestError
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParams
from kvflow.spec_decode.config import SpeculativeConfig
from kvflow.spec_decode.profile import seed_samples
from kvflow.spec_decode.speculator import Speculator, build_proposer
from kvflow.structured.grammar import GrammarCompiler
from kvflow.structured.matcher import RequestGrammar, wait_any
from kvflow.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass
class ExportedRequest:
    """A request's whole state for another instance to continue it (see export_request)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[dict]  # Request.export_state() of each sample
    kv: list[list[torch.Tensor] | None]  # per sample: the KV of its computed tokens (ModelRunner.read_kv)
    sent: dict  # what the output processor already sent, so the deltas carry on where they stopped
    kv_from: int = 0  # kv holds tokens [kv_from:]; the first kv_from were copied ahead (live migration)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        config.validate()
        self.config = config
        torch.manual_seed(config.seed)
        if config.dtype == "auto":  # resolved once: everything downstream sees the concrete dtype
            resolved, why = resolve_auto_dtype(config.device)
            config.dtype = str(resolved).removeprefix("torch.")
            logger.info("dtype auto -> %s (%s)", config.dtype, why)
        self.runner = ModelRunner(config)
        self.model_config = self.runner.model_config
        self.tokenizer, self.eos_token_ids, self.model_path = (self.runner.tokenizer, self.runner.eos_token_ids,
                                                               self.runner.model_path)
        sched_cfg = config.scheduler
        sched_cfg.max_model_len = min(sched_cfg.max_model_len, self.model_config.max_position_embeddings)
        pool_tokens = self.runner.num_blocks * config.cache.block_size
        if pool_tokens < sched_cfg.max_model_len:
            # Every admitted request must be able to finish alone, whatever else runs.
            logger.warning("KV pool holds %d tokens: max_model_len lowered from %d", pool_tokens, sched_cfg.max_model_len)
            sched_cfg.max_model_len = pool_tokens
        self.block_pool = BlockPool(self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(sched_cfg, self.block_pool)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._grammars: GrammarCompiler | None = None  # built by the first structured request
        self._ids = itertools.count()
        self._aborted_samples: list[Request] = []  # finished outside a step: reported by the next one
        self.speculator: Speculator | None = None
        self._step_time_samples: list | None = None  # timed once per engine, for every "auto" speculator
        self.set_speculative_config(config.speculative_config)
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0

    def set_speculative_config(self, value: SpeculativeConfig | dict | str | None) -> None:
        """(Re)build the speculator, with fresh statistics; None turns speculation off. Only while idle."""
        if self.has_unfinished_requests():
            raise RuntimeError("the speculative config can change only while no request is in flight")
        spec = SpeculativeConfig.parse(value)
        self.speculator = None
        if spec is None or spec.max_tokens == 0:
            return
        draft_runner = None
        if spec.draft_model is not None:  # built here, beside the target, on the target's block ids
            draft_runner = ModelRunner(self.config, model=spec.draft_model, num_blocks=self.runner.num_blocks)
        proposer = build_proposer(spec, self.runner, draft_runner, self.config.scheduler.max_model_len)
        self.speculator = Speculator(spec, proposer, self.scheduler.reserve)
        if spec.auto and draft_runner is None:  # goodput needs step times before the first step
            if self._step_time_samples is None:
                self._step_time_samples = seed_samples(self.runner, self.block_pool, str(self.config.quantization),
                                                       self.config.recalibrate)
            self.speculator.step_time.fit_seed(self._step_time_samples)

    @property
    def parents(self) -> dict[str, ParentRequest]:
        return self.output_processor.parents

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
        compiled = None if params.structured_outputs is None else self.grammars.submit(params.structured_outputs)
        end_ids = () if params.thinking_budget is None else tuple(
            self.tokenizer.encode(params.thinking_end, add_special_tokens=False))
        children: list[Request] = []
        for i in range(params.n):
            detok = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens,
                                           params.stop_strings, params.include_stop_str_in_output)
            children.append(Request(f"{request_id}#{i}" if params.n > 1 else request_id, token_ids, params, arrival,
                                    priority=priority, index=i, parent_id=request_id,
                                    leader=children[0] if children else None, eos_token_ids=self.eos_token_ids,
                                    detokenizer=detok, grammar=None if compiled is None else RequestGrammar(compiled),
                                    thinking_end_ids=end_ids))
        self.output_processor.add(ParentRequest(request_id, text, token_ids, children))
        for child in children:
            self.scheduler.add(child)
        return request_id

    @property
    def grammars(self) -> GrammarCompiler:
        """Parses structured-output specs here and compiles them on its own threads (cached)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        return self._grammars

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
        parent = self.output_processor.pop(request_id)
        if parent is None:
            return False
        for child in parent.children:
            if not child.is_finished:
                self.scheduler.finish(child, "abort")
        return True

    def abort_sample(self, request_id: str, index: int) -> bool:
        """Stop one of a request's n samples now and free its own blocks (the prompt blocks it shares
        with its siblings stay theirs); the others go on. Test-time compute prunes samples this way.
        Its final output (finish_reason "abort") comes with the next step. False if already done."""
        parent = self.parents.get(request_id)
        if parent is None or not 0 <= index < len(parent.children) or parent.children[index].is_finished:
            return False
        child = parent.children[index]
        self.scheduler.finish(child, "abort")
        self._aborted_samples.append(child)
        return True

    def has_unfinished_requests(self) -> bool:
        """Whether a step has work: requests to advance, or finished samples to report. A request
        suspended for a migration (cluster/migration.py) waits outside the schedule: no work here."""
        return bool(self.scheduler.num_unfinished or self._aborted_samples)

    def get_num_unfinished_requests(self) -> int:
        return len(self.parents)

    # ---------------- the step ----------------
    def step(self) -> list[RequestOutput]:
        """One engine step, always in this order:

        1. Scheduler.schedule: running requests first (a decode token, their drafts, or the next
           prompt chunk), then waiting prompts, under one token budget; KV slots are allocated
           here (preempting the least important request when the pool is short).
        2. ModelRunner.execute: one forward pass over the flat batch, then sampling.
        3. Scheduler.update_from_output: advance num_computed_tokens, accept or roll back drafts,
           append tokens, check stops, finish requests, trim and publish blocks.
        4. Speculator: learn acceptance and step time, propose the next drafts, hand them to
           Scheduler.set_draft_tokens.
        5. OutputProcessor: one delta RequestOutput per request that advanced or finished.
        """
        failed = self._fail_broken_grammars()
        sched = self.scheduler.schedule()
        aborted, self._aborted_samples = self._aborted_samples, []
        if not sched.scheduled:
            compiling = [r.grammar for r in self.scheduler.waiting if r.grammar is not None and not r.grammar.ready]
            if compiling:  # only requests whose grammars are compiling: wait for one (briefly)
                wait_any(compiling, timeout=0.05)
            else:
                # max_model_len fits the pool, so a lone request always fits: no progress is a bug.
                assert not self.scheduler.num_unfinished or sched.num_preempted, "scheduler made no progress"
            return self.output_processor.make_outputs(failed + aborted)
        started = time.perf_counter()
        result = self.runner.execute(sched)
        seconds = time.perf_counter() - started
        update = self.scheduler.update_from_output(sched, result)
        if update.kv_moves:  # accepted draft-tree paths, down to contiguous slots, before anything reuses them
            self.runner.copy_kv_slots(update.kv_moves)
        self.num_prompt_tokens_total += update.num_prompt_tokens
        self.num_generation_tokens_total += update.num_generated_tokens
        if self.speculator is not None:
            for req, num_drafts, num_accepted in update.verified:
                self.speculator.record_verification(req, num_drafts, num_accepted)
            self.speculator.observe_step(sched, seconds, result)
            self.scheduler.set_draft_tokens(self.speculator.propose(self.scheduler))
        return self.output_processor.make_outputs(failed + aborted + update.touched)

    def _fail_broken_grammars(self) -> list[Request]:
        """Requests whose grammar parsed but failed to compile end with finish_reason "abort"."""
        failed = [r for r in self.scheduler.waiting if r.grammar is not None and r.grammar.error is not None]
        for req in failed:
            logger.error("request %s: its grammar failed to compile (%s)", req.request_id, req.grammar.error)
            self.scheduler.finish(req, "abort")
        return failed

    # ---------------- hand-over to another instance ----------------
    def export_request(self, request_id: str, kv_from: int = 0, suspend: bool = False) -> ExportedRequest:
        """Take a request out of this engine with everything needed to continue it elsewhere: its
        samples' state and the KV of their computed tokens. Its blocks here are freed.

        Live migration (cluster/migration.py) copies the full blocks ahead while the request runs:
        `kv_from` (a multiple of the block size) then skips the tokens already copied, if every
        sample still has them computed (else the whole KV goes, with kv_from 0). `suspend` keeps
        the request here, out of the schedule with its blocks, until `resume_request` (the copy
        failed) or `release_request` (it now runs elsewhere)."""
        parent = self.parents.get(request_id) if suspend else self.output_processor.pop(request_id)
        if parent is None:
            raise InvalidRequestError(f"no unfinished request {request_id!r}")
        running = [c.status == RequestStatus.RUNNING and c.num_computed_tokens > 0 for c in parent.children]
        assert kv_from % self.block_pool.block_size == 0, "KV is copied ahead in whole blocks"
        if not all(r and c.num_computed_tokens >= kv_from for r, c in zip(running, parent.children)):
            kv_from = 0
        first_block = kv_from // self.block_pool.block_size
        states, kv = [], []
        for child, is_running in zip(parent.children, running):
            kv.append(self.runner.read_kv(child.block_ids[first_block:], child.num_computed_tokens - kv_from)
                      if is_running else None)
            states.append(child.export_state())
            if child.is_finished:
                continue
            if suspend:
                self.scheduler.suspend(child)
            else:
                self.scheduler.finish(child, "migrated")
        sent = {"sent_tokens": parent.sent_tokens, "sent_text": parent.sent_text,
                "sent_finished": parent.sent_finished, "sent_prompt_logprobs": parent.sent_prompt_logprobs}
        return ExportedRequest(parent.request_id, parent.prompt, parent.prompt_token_ids, states, kv, sent, kv_from)

    def resume_request(self, request_id: str) -> None:
        """A suspended request (export_request(suspend=True)) runs here again."""
        for child in self.parents[request_id].children:
            if child in self.scheduler.suspended:
                self.scheduler.resume(child)

    def release_request(self, request_id: str) -> None:
        """A suspended request now runs on another instance: forget it and free its blocks."""
        parent = self.output_processor.pop(request_id)
        for child in parent.children:
            if not child.is_finished:
                self.scheduler.finish(child, "migrated")

    def import_request(self, exported: ExportedRequest, reserved_blocks: list[int] = ()) -> None:
        """Continue a request exported by another engine with the same model. Raises
        InvalidRequestError (and keeps nothing) if this engine has no room for it.
        `reserved_blocks`: blocks of this engine already holding the KV of the first
        `exported.kv_from` tokens (copied ahead by a live migration; one-sample requests only)."""
        if exported.request_id in self.parents:
            raise InvalidRequestError(f"request_id {exported.request_id!r} is already in use")
        assert not reserved_blocks or len(exported.children) == 1, "KV is copied ahead for one sample only"
        children = [Request.from_state(state, self.tokenizer) for state in exported.children]
        first_block = exported.kv_from // self.block_pool.block_size
        taken = []
        for child, kv in zip(children, exported.kv):
            if child.is_finished:
                continue
            if child.params.structured_outputs is not None:  # the matcher replays what was generated
                child.grammar = RequestGrammar(self.grammars.submit(child.params.structured_outputs),
                                               replay=child.output_token_ids)
            if not self.scheduler.add_imported(child, reserved_blocks):
                for c in taken:
                    self.scheduler.finish(c, "abort")
                raise InvalidRequestError(f"no room for request {exported.request_id!r} on this instance")
            taken.append(child)
            if child.status == RequestStatus.RUNNING:
                self.runner.write_kv(child.block_ids[first_block:], kv)
        self.output_processor.add(ParentRequest(exported.request_id, exported.prompt, exported.prompt_token_ids,
                                                children, **exported.sent))
