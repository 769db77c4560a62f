"""Plots of serving-benchmark results (matplotlib, drawn off-screen).

plot_serving(runs, path): one figure with the CDFs of TTFT, TPOT, inter-token and end-to-end
latency (one curve per request rate); with several runs (a rate sweep) a second row shows output
throughput and request throughput / goodput against the offered rate, and median / p99 TTFT and
TPOT against it.
"""
from __future__ import annotations

import math

import numpy as np


def _label(rate: float) -> str:
    return "rate inf" if math.isinf(rate) else f"rate {rate:g}/s"


def _cdf(ax, values_ms: list[float], label: str) -> None:
    v = np.sort(np.asarray([x for x in values_ms if x is not None], dtype=float))
    if v.size == 0:
        return
    y = np.arange(1, v.size + 1) / v.size
    ax.step(v, y, where="post", label=label)


def plot_serving(runs: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = len(runs) > 1
    fig, axes = plt.subplots(2 if sweep else 1, 4, figsize=(18, 8.5 if sweep else 4.5), squeeze=False)
    panels = [("ttfts", "TTFT (ms)"), ("tpots", "TPOT (ms)"), ("itls", "inter-token latency (ms)"),
              ("e2els", "end-to-end latency (ms)")]
    for ax, (key, title) in zip(axes[0], panels):
        for run in runs:
            values = run.get(key) or []
            if key == "itls":
                values = [x for per_req in values for x in (per_req or [])]
            _cdf(ax, [x * 1000.0 for x in values if x is not None], _label(run["request_rate"]))
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of requests" if key != "itls" else "fraction of tokens")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"CDF of {title.split(' (')[0]}")
    axes[0][0].legend(fontsize=8)

    if sweep:
        labels = ["inf" if math.isinf(r["request_rate"]) else f"{r['request_rate']:g}" for r in runs]
        x = np.arange(len(runs))
        ax = axes[1][0]
        ax.plot(x, [r["output_throughput"] for r in runs], "o-", label="output tok/s")
        ax.plot(x, [r["total_token_throughput"] for r in runs], "s--", label="total tok/s")
        ax.set_title("token throughput vs request rate")
        ax.set_ylabel("tokens / s")
        ax = axes[1][1]
        ax.plot(x, [r["request_throughput"] for r in runs], "o-", label="completed req/s")
        if any(r.get("request_goodput") is not None for r in runs):
            ax.plot(x, [r.get("request_goodput") or 0.0 for r in runs], "s--", label="goodput req/s")
        finite = [r["request_rate"] for r in runs if not math.isinf(r["request_rate"])]
        ax.plot(x, [r["request_rate"] if not math.isinf(r["request_rate"]) else (max(finite) if finite else np.nan)
                    for r in runs], ":", color="grey", label="offered (inf drawn at max)")
        ax.set_title("request throughput vs request rate")
        ax.set_ylabel("requests / s")
        for ax, name in ((axes[1][2], "ttft"), (axes[1][3], "tpot")):
            ax.plot(x, [r.get(f"median_{name}_ms") or np.nan for r in runs], "o-", label="median")
            ax.plot(x, [r.get(f"p99_{name}_ms") or np.nan for r in runs], "s--", label="p99")
            ax.set_title(f"{name.upper()} vs request rate")
            ax.set_ylabel("ms")
        for ax in axes[1]:
            ax.set_xticks(x, labels)
            ax.set_xlabel("request rate (req/s)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    r0 = runs[0]
    fig.suptitle(f"{r0.get('model', '')} via {r0.get('backend', '')}, {r0.get('dataset', '')} x {r0.get('num_prompts', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
