"""Simulated requests and the workloads that make them.

A prompt is not a list of token ids here but a list of *segments*, (key, length) pairs: two prompts
share a prefix exactly when they start with the same segments. That is all prefix caching and
prefix-affinity dispatch need (chained block hashes, computed from the segments), and it keeps
100k requests of a thousand tokens each out of memory. A recorded trace with real token ids is cut
into one segment per block, so equal blocks still hash equal.

Workloads:
- synthetic: Poisson or gamma arrivals (a coefficient of variation, CV, of the gaps), prompt and
  output lengths drawn from lognormal distributions with a mean and a CV;
- sessions: multi-turn conversations; a follow-up turn arrives a think time after the previous
  answer and its prompt is the previous prompt + the answer + new text (so it shares a prefix);
- sharegpt: the ShareGPT conversations `kvflow bench serve` uses (token lengths by a tokenizer);
- trace: JSON lines recorded elsewhere (arrival time, prompt tokens or length, output length).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvflow.errors import ConfigError

Segment = tuple[object, int]  # (key, number of tokens)


@dataclass(slots=True, eq=False)
class Session:
    """The turns still to come of one conversation: (new prompt tokens, output tokens) each."""

    turns: list[tuple[int, int]]
    think_time: float
    next_turn: int = 1


@dataclass(slots=True, eq=False)
class SimRequest:
    request_id: int
    arrival: float
    prompt: tuple[Segment, ...]
    prompt_len: int
    output_len: int
    priority: int = 0  # > 0: high priority (as kvflow.cluster.policy counts it)
    session: Session | None = None
    # ---- progress, owned by the instance running it ----
    generated: int = 0  # output tokens so far
    num_computed: int = 0  # prompt (or recompute) tokens in the KV cache, while prefilling
    prefill_target: int = 0  # tokens the current prefill computes: prompt, + output after a preemption
    dec_k0: int = 0  # instance step at which decoding (re)started
    dec_base: int = 0  # KV slots the request needs at step dec_k0
    gen0: int = 0  # generated at dec_k0
    epoch: int = 0  # bumped whenever the request leaves an instance: stale heap entries are skipped
    instance: object = None
    migrating_to: object = None
    # ---- what happened, for the report ----
    first_token_time: float | None = None
    finish_time: float | None = None
    hit_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    looked_up: bool = False
    num_preemptions: int = 0
    num_migrations: int = 0
    kv_transfer_time: float = 0.0
    # A recorded trace knows the tokens: the prompt's and, where a later prompt of the trace extends
    # this one, the answer's (load_trace). Then blocks hash by their tokens, as the engine's do, so a
    # follow-up turn also hits the blocks of the previous answer and the block that straddles them.
    token_ids: tuple[int, ...] | None = field(default=None, repr=False)
    _prompt_hashes: list[int] | None = field(default=None, repr=False)

    def output_segment(self, num_tokens: int) -> Segment:
        return (("out", self.request_id), num_tokens)

    def prompt_hashes(self, block_size: int) -> list[int]:
        if self._prompt_hashes is None:
            self._prompt_hashes = (token_hashes(self.token_ids, block_size, self.prompt_len)
                                   if self.token_ids is not None else
                                   chained_hashes(self.prompt, block_size, self.prompt_len))
        return self._prompt_hashes

    def content_hashes(self, block_size: int, num_tokens: int) -> list[int]:
        """Hashes of the full blocks among the first num_tokens of prompt + output."""
        if self.token_ids is not None:
            if num_tokens <= self.prompt_len:
                return self.prompt_hashes(block_size)[:num_tokens // block_size]
            if num_tokens <= len(self.token_ids):
                return token_hashes(self.token_ids, block_size, num_tokens)
            # the answer's tokens are unknown past here: its blocks can match nothing else
            known = token_hashes(self.token_ids, block_size, len(self.token_ids))
            return known + [hash(("out", self.request_id, i))
                            for i in range(len(known), num_tokens // block_size)]
        prompt_blocks = self.prompt_hashes(block_size)
        if num_tokens <= self.prompt_len - self.prompt_len % block_size:
            return prompt_blocks[:num_tokens // block_size]
        content = self.prompt + (self.output_segment(num_tokens - self.prompt_len),)
        start = len(prompt_blocks)
        return prompt_blocks + chained_hashes(content, block_size, num_tokens, start_block=start,
                                              parent=prompt_blocks[-1] if prompt_blocks else None)


def token_hashes(ids: tuple[int, ...], block_size: int, num_tokens: int) -> list[int]:
    """Chained hashes of the full blocks among ids[:num_tokens] (by their tokens)."""
    hashes: list[int] = []
    parent = None
    for i in range(num_tokens // block_size):
        parent = hash((parent, "tok", ids[i * block_size:(i + 1) * block_size]))
        hashes.append(parent)
    return hashes


def chained_hashes(segments: tuple[Segment, ...], block_size: int, num_tokens: int,
                   start_block: int = 0, parent: int | None = None) -> list[int]:
    """Block i's hash covers blocks 0..i (hash of the parent's hash and the block's pieces)."""
    hashes: list[int] = []
    pieces: list[tuple] = []
    filled = 0  # tokens in the block being built
    pos = 0  # token position of the segment start
    skip_to = start_block * block_size
    end = (num_tokens // block_size) * block_size
    for key, length in segments:
        seg_start, seg_end = max(pos, skip_to), min(pos + length, end)
        off = seg_start
        while off < seg_end:
            take = min(block_size - filled, seg_end - off)
            pieces.append((key, off - pos, take))
            filled += take
            off += take
            if filled == block_size:
                parent = hash((parent, tuple(pieces)))
                hashes.append(parent)
                pieces, filled = [], 0
        pos += length
        if pos >= end:
            break
    return hashes


# ---------------------------------------------------------------- distributions
def lengths(rng: np.random.Generator, n: int, mean: float, cv: float, low: int, high: int) -> np.ndarray:
    """n integer lengths with this mean and coefficient of variation (lognormal; cv 0: all equal)."""
    if mean < 1:
        raise ConfigError(f"a mean length must be >= 1, got {mean}")
    if cv <= 0:
        values = np.full(n, mean)
    else:
        sigma2 = math.log1p(cv * cv)
        values = rng.lognormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2), n)
    return np.clip(np.rint(values), low, high).astype(int)


def arrivals(rng: np.random.Generator, n: int, rate: float, cv: float = 1.0) -> np.ndarray:
    """Arrival times of n requests at `rate` per second; gaps are gamma with this CV (1: Poisson)."""
    if rate <= 0:
        raise ConfigError(f"request rate must be > 0, got {rate}")
    if math.isinf(rate):
        return np.zeros(n)
    if cv <= 0:
        gaps = np.full(n, 1.0 / rate)
    else:
        shape = 1.0 / (cv * cv)
        gaps = rng.gamma(shape, 1.0 / (rate * shape), n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


@dataclass
class WorkloadSpec:
    num_requests: int = 1000
    request_rate: float = 10.0
    arrival_cv: float = 1.0
    input_len: float = 256
    input_cv: float = 1.0
    output_len: float = 128
    output_cv: float = 1.0
    max_model_len: int = 4096
    system_prompt_len: int = 0  # shared by every request (a common system prompt)
    high_priority_fraction: float = 0.0
    # sessions
    turns: float = 0  # > 0: multi-turn sessions with this mean number of turns
    think_time: float = 5.0
    seed: int = 0


def synthetic(spec: WorkloadSpec) -> list[SimRequest]:
    """Single requests, or with spec.turns > 0 the first turns of sessions (later turns are made
    when the previous one finishes)."""
    rng = np.random.default_rng(spec.seed)
    if spec.turns > 0:
        return _sessions(spec, rng)
    n = spec.num_requests
    times = arrivals(rng, n, spec.request_rate, spec.arrival_cv)
    ins = lengths(rng, n, spec.input_len, spec.input_cv, 1, spec.max_model_len // 2)
    outs = lengths(rng, n, spec.output_len, spec.output_cv, 1, spec.max_model_len // 2)
    prio = rng.random(n) < spec.high_priority_fraction
    system = _system(spec)
    return [SimRequest(i, float(times[i]), system + ((("p", i), int(ins[i])),),
                       spec.system_prompt_len + int(ins[i]), int(outs[i]), int(prio[i]))
            for i in range(n)]


def _system(spec: WorkloadSpec) -> tuple[Segment, ...]:
    return ((("system",), spec.system_prompt_len),) if spec.system_prompt_len > 0 else ()


def _sessions(spec: WorkloadSpec, rng: np.random.Generator) -> list[SimRequest]:
    """spec.num_requests turns in all, split into sessions of geometric length (mean spec.turns);
    spec.request_rate is the rate at which new sessions start."""
    sizes = []
    while sum(sizes) < spec.num_requests:
        sizes.append(int(rng.geometric(1.0 / max(spec.turns, 1.0))))
    sizes[-1] -= sum(sizes) - spec.num_requests
    times = arrivals(rng, len(sizes), spec.request_rate, spec.arrival_cv)
    system = _system(spec)
    firsts = []
    for s, size in enumerate(sizes):
        ins = lengths(rng, size, spec.input_len, spec.input_cv, 1, spec.max_model_len // 4)
        outs = lengths(rng, size, spec.output_len, spec.output_cv, 1, spec.max_model_len // 4)
        turns = [(int(a), int(b)) for a, b in zip(ins, outs)]
        first = SimRequest(s, float(times[s]), system + ((("p", s, 0), turns[0][0]),),
                           spec.system_prompt_len + turns[0][0], turns[0][1],
                           session=Session(turns, spec.think_time) if size > 1 else None)
        firsts.append(first)
    return firsts


def next_turn(previous: SimRequest, now: float, request_id: int, max_model_len: int) -> SimRequest | None:
    """The session's next turn: previous prompt + its answer + new text, `think_time` after the
    answer; None when the session is over (or the conversation no longer fits the context)."""
    session = previous.session
    if session is None or session.next_turn >= len(session.turns):
        return None
    new_len, output_len = session.turns[session.next_turn]
    prompt = previous.prompt + (previous.output_segment(previous.output_len), (("p", request_id), new_len))
    prompt_len = previous.prompt_len + previous.output_len + new_len
    if prompt_len + output_len > max_model_len:
        return None
    session.next_turn += 1
    return SimRequest(request_id, now + session.think_time, prompt, prompt_len, output_len,
                      previous.priority, session=session)


# ---------------------------------------------------------------- ShareGPT and traces
def sharegpt(num_requests: int, request_rate: float, arrival_cv: float = 1.0, seed: int = 0,
             tokenizer_name: str = "smollm2-135m", path: str | None = None) -> list[SimRequest]:
    """ShareGPT prompts as `kvflow bench serve` samples them (same filter, same seed, same lengths).
    A prompt drawn twice shares its segment key, so repeats hit the prefix cache."""
    from kvflow.bench.datasets import ShareGPT
    from kvflow.bench.serve import load_tokenizer

    data = ShareGPT(load_tokenizer(tokenizer_name), Path(path) if path else None)
    data.build_cache()
    chosen = data.sample(num_requests, seed)
    keys = {prompt: k for k, (prompt, _, _) in enumerate(chosen)}
    times = arrivals(np.random.default_rng(seed), num_requests, request_rate, arrival_cv)
    return [SimRequest(i, float(times[i]), ((("sharegpt", keys[p]), pl),), pl, ol)
            for i, (p, pl, ol) in enumerate(chosen)]


def load_trace(path: str | Path, block_size: int) -> list[SimRequest]:
    """JSON lines: {"arrival": s, "prompt_token_ids": [...] or "prompt_len": n, "output_len": n,
    "priority": p (optional)}. Token ids are cut into blocks so equal prefixes are recognised."""
    requests = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read trace {path}: {e}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            arrival, output_len = float(rec["arrival"]), int(rec["output_len"])
            if "prompt_token_ids" in rec:
                ids = [int(t) for t in rec["prompt_token_ids"]]
                prompt = tuple((("tok", tuple(ids[i:i + block_size])), len(ids[i:i + block_size]))
                               for i in range(0, len(ids), block_size))
                prompt_len = len(ids)
            else:
                prompt_len = int(rec["prompt_len"])
                prompt = ((("trace", lineno), prompt_len),)
            priority = int(rec.get("priority", 0))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"trace {path} line {lineno}: need arrival, output_len and prompt_token_ids or "
                              f"prompt_len ({type(e).__name__}: {e})") from None
        if prompt_len < 1 or output_len < 1:
            raise ConfigError(f"trace {path} line {lineno}: prompt and output lengths must be >= 1")
        req = SimRequest(len(requests), arrival, prompt, prompt_len, output_len, priority)
        if "prompt_token_ids" in rec:
            req.token_ids = tuple(ids)
        requests.append(req)
    if not requests:
        raise ConfigError(f"trace {path} holds no requests")
    requests.sort(key=lambda r: r.arrival)
    infer_answers(requests, block_size)
    return requests


def infer_answers(requests: list[SimRequest], block_size: int) -> None:
    """A multi-turn trace's follow-up prompt is the previous prompt + its answer + new text: where a
    later prompt extends a request's prompt by more than its output length, that request's answer
    tokens are the ones that follow (the first such prompt's). Only compared within prompts sharing
    their first block, so a large trace stays cheap."""
    groups: dict[tuple, list[SimRequest]] = {}
    for r in requests:  # sorted by arrival
        if r.token_ids is not None and len(r.token_ids) >= block_size:
            groups.setdefault(r.token_ids[:block_size], []).append(r)
    for group in groups.values():
        for i, a in enumerate(group):
            n = a.prompt_len
            for b in group[i + 1:]:
                if len(b.token_ids) > n + a.output_len and b.token_ids[:n] == a.token_ids[:n]:
                    a.token_ids = b.token_ids[:n + a.output_len]
                    break


def save_trace(requests: list[SimRequest], path: str | Path) -> None:
    """The workload as a trace (lengths only), for replaying on a real cluster or in the simulator."""
    with open(path, "w") as f:
        for r in requests:
            f.write(json.dumps({"arrival": round(r.arrival, 6), "prompt_len": r.prompt_len,
                                "output_len": r.output_len, "priority": r.priority}) + "\n")
