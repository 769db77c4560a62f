"""`kvflow sim sweep`: p99 TTFT, p99 TPOT and goodput against request rate for each cluster
configuration, at each instance count, in one plot.

Configurations, all at the same instance count N: round-robin, least-load, prefix-affinity (all
colocated, no migration), least-load + live migration (Llumnix), and a prefill/decode split with
N/4 prefill and 3N/4 decode instances (Splitwise). Every configuration replays the very same
requests at a given rate (same seed), so the curves differ by policy alone.
"""
from __future__ import annotations

import json
import logging
import time

from kvflow.sim.cli import build_workload, cluster_config, parse_list, _slos
from kvflow.sim.cluster import simulate, summarize
from kvflow.sim.step_model import StepTimeModel

logger = logging.getLogger("kvflow.sim.sweep")


def configurations(n: int) -> dict[str, dict]:
    prefill = max(1, n // 4)
    return {
        "round-robin": dict(dispatch="round-robin"),
        "least-load": dict(dispatch="least-load"),
        "prefix-affinity": dict(dispatch="prefix-affinity"),
        "least-load + migration": dict(dispatch="least-load", migration=True),
        f"P/D split {prefill}:{n - prefill} (least-load)": dict(dispatch="least-load", prefill_instances=prefill,
                                                             decode_instances=n - prefill),
    }


def run_sweep(args) -> list[dict]:
    model = StepTimeModel.load(args.step_fit)
    slos = _slos(args)
    counts = parse_list(args.instances, int)
    rates = parse_list(args.rates_per_instance)
    turns = args.turns if args.workload == "sessions" else 1.0
    runs = []
    for n in counts:
        for rate in rates:
            # sessions: the rate is of requests; sessions start at rate / turns per second
            requests_rate = rate * n / turns
            for name, overrides in configurations(n).items():
                requests = build_workload(args, request_rate=requests_rate, num_requests=args.requests_per_instance * n)
                t = time.perf_counter()
                m = summarize(simulate(cluster_config(args, num_instances=n, **overrides), model, requests), slos)
                m.update(instances=n, rate_per_instance=rate, config=name)
                runs.append(m)
                print(f"N={n:<4} rate/inst={rate:<5g} {name:<34} p99 TTFT {m['p99_ttft_ms']:9.0f} ms  "
                      f"p99 TPOT {m['p99_tpot_ms']:7.1f} ms  goodput {m['request_goodput']:7.2f} req/s  "
                      f"hit {m['prefix_hit_rate']:.2f}  migr {m['migrations']:5d}  ({time.perf_counter() - t:.1f} s)",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    if args.plot:
        plot(runs, args.plot, slos)
        print(f"plot: {args.plot}")
    return runs


def plot(runs: list[dict], path: str, slos: dict[str, float]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["instances"] for r in runs})
    panels = (("p99_ttft_ms", "p99 TTFT (ms)", True), ("p99_tpot_ms", "p99 TPOT (ms)", True),
              ("request_goodput", "goodput per instance (req/s)", False))
    fig, axes = plt.subplots(len(counts), len(panels), figsize=(5 * len(panels), 3.6 * len(counts)), squeeze=False)
    for row, n in enumerate(counts):
        mine = [r for r in runs if r["instances"] == n]
        for col, (key, label, log) in enumerate(panels):
            ax = axes[row][col]
            for k, name in enumerate(dict.fromkeys(r["config"] for r in mine)):
                pts = sorted((r["rate_per_instance"], r[key]) for r in mine if r["config"] == name and r[key] is not None)
                ys = [y / n if key == "request_goodput" else y for _, y in pts]
                # dashed where a policy may coincide with another (prefix-affinity falls back to least-load)
                ax.plot([x for x, _ in pts], ys, marker="o", label=name, linestyle=("-", "-", "--", "-", "-")[k % 5])
            ax.set_xlabel("request rate per instance (req/s)")
            ax.set_ylabel(label)
            ax.set_title(f"{n} instances")
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    slo_text = ", ".join(f"{k} <= {v * 1000:g} ms" for k, v in slos.items())
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"kvflow sim: simulated cluster (step time fitted on kvflow; goodput SLOs {slo_text})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
