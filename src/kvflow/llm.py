"""LLM: the synchronous offline API (generate, chat), as vLLM users know it."""
from __future__ import annotations

import logging

from tqdm import tqdm

from kvflow.config import EngineConfig
from kvflow.engine.llm_engine import LLMEngine
from kvflow.errors import InvalidRequestError
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLM:
    """`LLM(model="smollm2-135m", dtype="auto", device="cpu", max_num_seqs=64, ...)`.

    dtype: "auto" (bfloat16 on CUDA and on CPUs with native bf16, else float32), "float32",
    "bfloat16", "float16". quantization: None | "int8" | "int4" | "auto" (the GGUF file's own
    type): weights stay quantized in memory. recalibrate: time the linear kernels again instead of
    using the cached choice (see kvflow.layers.kernel_choice).

    Options follow vLLM's names and are the fields of kvflow.config's EngineConfig, CacheConfig and
    SchedulerConfig (the same as the command line's flags): block_size, num_gpu_blocks,
    kv_cache_memory_gb, enable_prefix_caching, max_num_batched_tokens, max_num_seqs, max_model_len,
    speculative_config ({"method": "ngram" | "recycle" | "draft", "num_speculative_tokens": K | "auto", ...}).
    """

    def __init__(self, model: str = "smollm2-135m", dtype: str = "auto", device: str = "cpu",
                 seed: int = 0, speculative_config: dict | str | None = None, **options):
        config = EngineConfig.from_options(model=model, dtype=dtype, device=device, seed=seed,
                                           speculative_config=speculative_config, **options)
        self.engine = LLMEngine(config)
        self._next_id = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False, priority: list[int] | None = None) -> list[RequestOutput] | RequestOutput:
        """Prompts: a string, a list of token ids, or a list of either. One RequestOutput per prompt,
        in order. In a list, a prompt that cannot run comes back with `error` set while the others
        finish; a single prompt that cannot run raises InvalidRequestError."""
        if not isinstance(prompts, (str, list, tuple)):
            raise InvalidRequestError(f"prompts must be a string, a list of token ids, or a list of those; "
                                      f"got {type(prompts).__name__}")
        single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(batch)
        if len(params) != len(batch):
            raise InvalidRequestError(f"got {len(batch)} prompts but {len(params)} sampling params")
        results: dict[str, RequestOutput] = {}
        ids = []
        for i, (prompt, p) in enumerate(zip(batch, params)):
            rid = f"gen-{self._next_id}"
            self._next_id += 1
            ids.append(rid)
            try:
                self.engine.add_request(rid, prompt, p, priority=priority[i] if priority else 0)
            except InvalidRequestError as e:
                if single:
                    raise
                logger.warning("prompt %d rejected: %s", i, e)
                results[rid] = RequestOutput(rid, prompt if isinstance(prompt, str) else None,
                                             prompt if isinstance(prompt, list) else [], [], True, error=str(e))
        self._run(results, len(batch), use_tqdm)
        outputs = [results[rid] for rid in ids]
        return outputs[0] if single else outputs

    def _run(self, results: dict[str, RequestOutput], total: int, use_tqdm: bool) -> None:
        bar = tqdm(total=total, desc="generating", unit="req", disable=not use_tqdm, initial=len(results))
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():  # deltas: merge each into what came before
                if out.request_id in results:
                    results[out.request_id].add(out)
                else:
                    results[out.request_id] = out
                if out.finished:
                    bar.update(1)
        bar.close()

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False, add_generation_prompt: bool = True):
        """Apply the model's chat template, then generate. One conversation or a list of them."""
        single = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if single else messages
        prompts = [self.apply_chat_template(m, add_generation_prompt) for m in conversations]
        outs = self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
        return outs[0] if single else outs

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        tok = self.engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise InvalidRequestError("this model has no chat template; use generate() with a plain prompt")
        ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
