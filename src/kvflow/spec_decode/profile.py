"""Seeding the step-time model: time a few batch shapes (tokens in the step x context) on the real
model before the first request, so the first goodput choices are already right. About twenty
forward passes (~2 s for the bundled model on 2 CPU threads); only "auto" speculation needs it.

Besides one request's steps, it times batches of decodes, each request at a long context in blocks
of its own: their keys come from memory, not from the cache one request's few hundred keys fit in,
and a batch's steps are priced by that per-key cost (a seed that had only one request's keys
under-priced 64-decode steps by 66-89%).

The KV slots it writes are taken from the block pool like any request's and given back, so cached
prefixes are never overwritten. The timings are kept (`seed_samples`), in this process and on disk
beside the kernel choices, per model file, precision, pool and machine: an engine that starts again
on the same machine times nothing (in float32 the seed is ~7 s on one thread)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from kvflow.cache import cache_dir, file_key, write_atomic
from kvflow.core.kv_cache import BlockPool
from kvflow.core.request import Request
from kvflow.model.fused_decode import MAX_ROWS as FUSED_MAX_ROWS
from kvflow.sampling_params import SamplingParams
from kvflow.spec_decode.goodput import StepLayout, StepShape
from kvflow.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

SHORT, LONG = 16, 512
# (tokens, context before them, sampled rows): the token curve at a short context, the cost of a
# sampled row, and the cost of context for one token (decode kernel) and for a chunk.
# The curve bends most at a few tokens (one token runs the decode kernel, two or more the chunk path).
# The C step (model/fused_decode.py) takes up to FUSED_MAX_ROWS tokens: both sides of that edge are
# timed, and a step twice as long gives the slope past it.
EDGE = FUSED_MAX_ROWS
SHAPES = ((1, SHORT, 1), (2, SHORT, 2), (4, SHORT, 4), (8, SHORT, 8), (16, SHORT, 16), (32, SHORT, 32),
          (64, SHORT, 64), (EDGE, SHORT, EDGE), (EDGE + 1, SHORT, EDGE + 1), (2 * EDGE, SHORT, 2 * EDGE),
          (32, SHORT, 1), (1, LONG, 1), (32, LONG, 32))
DECODE_BATCHES = (16, 64)  # requests, each one decode token at the long context


def shape_of(tokens: int, start: int, rows: int) -> StepShape:
    lay = StepLayout()
    if tokens == 1:
        lay.add_decode(start + 1, rows)
    else:
        lay.add_chunk(tokens, start + tokens, rows)
    return lay.shape()


_remembered: dict[str, list[tuple[StepShape, float]]] = {}


def seed_samples(runner: ModelRunner, pool: BlockPool, quantization: str,
                 recalibrate: bool = False) -> list[tuple[StepShape, float]]:
    """time_shapes, timed once per (model file, precision, KV cache, pool, this machine) and kept
    (`recalibrate` times them again)."""
    from kvflow.layers import cpu_kernels, kernel_choice, op_select
    path = Path(runner.model_path)
    key = {"model": file_key(path) if path.exists() else str(path), "dtype": str(runner.dtype),
           "quantization": quantization, "kv": str(runner.kv_cache_dtype), "device": str(runner.device),
           "block_size": pool.block_size, "num_blocks": pool.num_blocks,
           "positions": runner.model_config.max_position_embeddings,
           "shapes": [SHAPES, DECODE_BATCHES, "in turns"],
           "kernels": cpu_kernels.source_digest(), **kernel_choice.cache_key(),
           # which side runs each step size (chosen at start-up, before this) is in that file
           "op_choices": op_select.cache_path().name}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    file = cache_dir("calibration") / f"step-times-{digest}.json"
    samples = None if recalibrate else _remembered[digest] if digest in _remembered else _load(file)
    if samples is None:
        samples = time_shapes(runner, pool)
        try:
            write_atomic(file, json.dumps({"key": key, "samples": [(dataclasses.asdict(s), t) for s, t in samples]},
                                          default=str))
        except OSError as e:  # a read-only cache: this process still keeps them
            logger.debug("step times not saved: %s", e)
    _remembered[digest] = samples
    return samples


def _load(file: Path) -> list[tuple[StepShape, float]] | None:
    try:
        return [(StepShape(**shape), seconds) for shape, seconds in json.loads(file.read_text())["samples"]]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: time them
        return None


@torch.inference_mode()
def time_shapes(runner: ModelRunner, pool: BlockPool, repeats: int = 2) -> list[tuple[StepShape, float]]:
    # the longest probe (32 tokens after the long context) must fit the pool and the model's positions
    room = min(pool.num_blocks * pool.block_size, runner.model_config.max_position_embeddings)
    long = min(LONG, room - 128)
    shapes = [(n, c if c == SHORT else long, r) for n, c, r in SHAPES]
    if long < 4 * SHORT:
        shapes = [s for s in shapes if s[1] == SHORT]
    need = max(c + n for n, c, _ in shapes)
    probe = Request("__step_time_probe__", [0], SamplingParams(), 0.0)
    if not pool.allocate_slots(probe, need):
        return []
    batch_probes: list[Request] = []
    try:
        _run(runner, [probe.block_ids], *shapes[0])  # warm-up
        # the shapes take turns, so that a slow spell of the machine does not bend the curve
        best = [float("inf")] * len(shapes)
        for _ in range(repeats):
            for i, (n, c, rows) in enumerate(shapes):
                best[i] = min(best[i], _run(runner, [probe.block_ids], n, c, rows))
        out = [(shape_of(n, c, rows), t) for (n, c, rows), t in zip(shapes, best)]
        if long >= 4 * SHORT:
            out += _time_decode_batches(runner, pool, long, repeats, batch_probes)
        return out
    finally:
        for req in [probe, *batch_probes]:
            pool.free(req)


def _time_decode_batches(runner: ModelRunner, pool: BlockPool, context: int, repeats: int,
                         probes: list[Request]) -> list[tuple[StepShape, float]]:
    """Batches of DECODE_BATCHES decodes at `context`, each request in its own blocks (as many as
    the pool holds beside everything else; `probes` collects them for the caller to free)."""
    out = []
    for size in DECODE_BATCHES:
        while len(probes) < size:
            req = Request(f"__step_time_probe_{len(probes)}__", [0], SamplingParams(), 0.0)
            if not pool.allocate_slots(req, context + 1):
                return out
            probes.append(req)
        tables = [req.block_ids for req in probes[:size]]
        best = min(_run(runner, tables, 1, context, 1) for _ in range(repeats))
        lay = StepLayout()
        for _ in range(size):
            lay.add_decode(context + 1, 1)
        out.append((lay.shape(), best))
    return out


def _run(runner: ModelRunner, tables: list[list[int]], n: int, start: int, rows: int) -> float:
    started = time.perf_counter()
    logits = runner.synthetic_step(tables, n, start, rows)
    torch.log_softmax(logits, dim=-1).argmax(dim=-1).tolist()
    return time.perf_counter() - started
