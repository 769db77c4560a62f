"""`kvflow sim calibrate`: time real kvflow engine steps over a grid of batch shapes and fit the
simulator's step-time model.

For each (context length C, decode rows R): R requests with C-token random prompts are prefilled,
then a few pure decode steps are timed (R rows over R x C context), then a P-token prompt joins and
the one mixed step (R decodes + a P-token chunk) is timed; with R = 0, a lone P-token prefill. The
engine step is timed whole (scheduling and sampling included), as the simulator charges it.
"""
from __future__ import annotations

import itertools
import logging
import random
import time

from kvflow.sim.step_model import StepTimeModel, fit

logger = logging.getLogger("kvflow.sim.calibrate")

CONTEXTS = (128, 512, 1024)
ROWS = (0, 1, 8, 32)
PREFILLS = (0, 64, 256)
DECODE_REPEATS = 3
QUICK_GRID = dict(contexts=(128, 512), rows=(0, 4, 16), prefills=(0, 64, 256), repeats=2)


def _shape(sched) -> dict:
    prefill = decode = context = 0
    for s in sched.scheduled:
        req = s.request
        if s.start >= req.num_prompt_tokens:
            decode += 1
        else:
            prefill += s.num_new_tokens
        context += s.start + s.num_new_tokens
    return {"prefill_tokens": prefill, "decode_rows": decode, "context_tokens": context}


def measure(llm, contexts=CONTEXTS, rows=ROWS, prefills=PREFILLS, repeats: int = DECODE_REPEATS,
            seed: int = 0) -> list[dict]:
    from kvflow import SamplingParams

    engine = llm.engine
    shapes: list[dict] = []
    original = engine.runner.execute

    def recording(sched):  # the batch the scheduler built for the step being timed
        shapes.append(_shape(sched))
        return original(sched)

    engine.runner.execute = recording
    rng = random.Random(seed)
    vocab = min(engine.model_config.vocab_size, 32000)
    ids = itertools.count()
    params = SamplingParams(max_tokens=10_000, ignore_eos=True, temperature=0.0)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    def timed_step() -> dict | None:
        shapes.clear()
        t = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - t
        return {**shapes[-1], "seconds": seconds} if shapes else None

    samples: list[dict] = []
    try:
        for ctx, n_rows in itertools.product(contexts, rows):
            batch = [str(next(ids)) for _ in range(n_rows)]
            for rid in batch:
                engine.add_request(rid, prompt(ctx), params)
            while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                                  for r in engine.scheduler.running):
                engine.step()
            for _ in range(repeats if n_rows else 0):
                if (s := timed_step()) is not None:
                    samples.append(s)
            for p in prefills:
                if p == 0 or (n_rows == 0 and ctx != contexts[0]):
                    continue  # lone prefills: once is enough
                rid = str(next(ids))
                engine.add_request(rid, prompt(p), params)
                if (s := timed_step()) is not None:
                    samples.append(s)
                engine.abort(rid)
            for rid in batch:
                engine.abort(rid)
            logger.info("context %d, %d rows: %d samples", ctx, n_rows, len(samples))
    finally:
        engine.runner.execute = original
    return samples


def calibrate(model: str = "smollm2-135m", out: str | None = None, quick: bool = False, **options) -> StepTimeModel:
    from kvflow import LLM, SamplingParams
    from kvflow.cpu_info import cpu_model_name

    options.setdefault("enable_prefix_caching", False)  # every prompt token is really computed
    options.setdefault("max_num_batched_tokens", 512)
    options.setdefault("max_num_seqs", 64)
    llm = LLM(model=model, **options)
    # warm-up: first steps pay one-time costs (kernel choice, allocator)
    llm.generate(["warm up"] * 2, SamplingParams(max_tokens=4))
    grid = QUICK_GRID if quick else {}
    samples = measure(llm, **grid)
    device = options.get("device", "cpu")
    import torch
    source = f"{model} on {cpu_model_name() if device == 'cpu' else device}, {torch.get_num_threads()} threads"
    result = fit(samples, source=source)
    if out:
        result.save(out)
    return result
