"""The offline entry point: run strategies for many prompts at once on one engine, so the samples
of all prompts share each step's batch (and each prompt's samples share its prefill)."""
from __future__ import annotations

import dataclasses

from tqdm import tqdm

from kvflow.sampling_params import SamplingParams
from kvflow.tts.pruning import Pruning
from kvflow.tts.samples import TTSResult
from kvflow.tts.search import SampleSearch
from kvflow.tts.strategies import Strategy


def generate(llm, prompts, params: SamplingParams, strategy: Strategy, pruning: Pruning | None = None,
             n: int | None = None, use_tqdm: bool = False) -> list[TTSResult]:
    """One TTSResult per prompt (a string, token ids, or a list of those), in order. `llm` is an
    LLM or an LLMEngine; `n` (else params.n) samples per prompt."""
    engine = getattr(llm, "engine", llm)
    if n is not None:
        params = dataclasses.replace(params, n=n)
    single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], int))
    batch = [prompts] if single else list(prompts)
    searches: dict[str, SampleSearch] = {}
    for prompt in batch:
        rid = engine.add_request(None, prompt, params)
        searches[rid] = SampleSearch(rid, params.n, strategy, pruning)
    bar = tqdm(total=len(batch), desc="sampling", unit="prompt", disable=not use_tqdm)
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                search = searches.get(out.request_id)
                if search is None:
                    continue
                for index in search.add(out):
                    engine.abort_sample(out.request_id, index)
                bar.update(int(out.finished))
    except BaseException:
        for rid in searches:
            engine.abort(rid)
        raise
    finally:
        bar.close()
    return [s.result() for s in searches.values()]
