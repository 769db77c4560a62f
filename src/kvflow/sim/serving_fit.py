"""The simulator's step-time model fitted on a real cluster's own steps while it serves.

`kvflow sim calibrate` times a grid of batch shapes on an engine that does nothing else. On a
machine whose cores the instances share with the front end and Ray, a serving step costs more
than that (the front end's dispatch and polling, Ray's transport of each delta run on the same
cores), and the gap between two steps (stats published, commands applied, outputs handed to the
event loop) is not in a timed `engine.step()` at all. So here the samples are the steps the
instances ran while serving (`python -m kvflow.bench.cluster replay --record-fit`):

- a step's cost (least squares on absolute errors: the simulated time is a sum of steps) is the time from its start to the next step's start while the engine had work
  (what the next step waited for), or its own duration when the engine went idle after it;
- dispatch_delay: client send -> the request applied on its instance's engine thread, taken only
  from requests whose instance ran no step in between (otherwise the wait for that step, which the
  simulator models itself, would be counted twice); the median;
- output_delay: end of the step that made the first token -> the client holds it; the median.
"""
from __future__ import annotations

import statistics

from kvflow.errors import ConfigError
from kvflow.sim.step_model import StepTimeModel, fit

SHAPE = ("prefill_tokens", "decode_rows", "context_tokens")


def effective_steps(steps: list[dict]) -> list[dict]:
    """Step records {prefill_tokens, decode_rows, context_tokens, start, end, busy_after, instance}
    -> fit samples {shape..., seconds}: start to the next start of the same instance when it stayed
    busy, else start to end."""
    out = []
    by_instance: dict[object, list[dict]] = {}
    for s in steps:
        by_instance.setdefault(s.get("instance"), []).append(s)
    for recs in by_instance.values():
        recs.sort(key=lambda s: s["start"])
        for cur, nxt in zip(recs, recs[1:] + [None]):
            seconds = nxt["start"] - cur["start"] if cur["busy_after"] and nxt is not None else cur["end"] - cur["start"]
            out.append({**{k: cur[k] for k in SHAPE}, "seconds": seconds})
    return out


def dispatch_delays(steps: list[dict], requests: list[dict]) -> list[float]:
    """requests {instance, sent, added}: added - sent for those whose instance ran no step
    between the two (the engine thread picked the request up at once)."""
    spans: dict[object, list[tuple[float, float]]] = {}
    for s in steps:
        spans.setdefault(s.get("instance"), []).append((s["start"], s["end"]))
    out = []
    for r in requests:
        if r.get("added") is None:
            continue
        busy = any(start < r["added"] and end > r["sent"] for start, end in spans.get(r.get("instance"), ()))
        if not busy:
            out.append(r["added"] - r["sent"])
    return out


def output_delays(requests: list[dict]) -> list[float]:
    """requests {first_step_end, first_seen}: when the client saw the first token minus when the
    step that made it ended."""
    return [r["first_seen"] - r["first_step_end"] for r in requests
            if r.get("first_step_end") is not None and r.get("first_seen") is not None]


def fit_serving(steps: list[dict], requests: list[dict], source: str = "") -> StepTimeModel:
    samples = effective_steps(steps)
    model = fit(samples, source=source, relative=False)
    ins, outs = dispatch_delays(steps, requests), output_delays(requests)
    if not outs:
        raise ConfigError("no request with both its first token's step and the client's receipt recorded")
    model.dispatch_delay = max(0.0, statistics.median(ins)) if ins else 0.0
    model.output_delay = max(0.0, statistics.median(outs))
    return model
