"""`kvflow sim run | calibrate | sweep`.

    kvflow sim run --instances 16 --dispatch prefix-affinity --migration --workload sessions \\
        --num-requests 10000 --request-rate 40 [--goodput ttft:2000 tpot:200] [--json out.json]
    kvflow sim run --trace recorded.jsonl --instances 2          # replay a recorded trace
    kvflow sim calibrate [--model M] [--out fit.json]             # time real engine steps, fit
    kvflow sim sweep --instances 16,64 --rates ... --plot docs/sim_sweep.png
"""
from __future__ import annotations

import argparse
import json
import math

from kvflow.cluster.policy import DISPATCH_POLICIES
from kvflow.sim.cluster import ClusterConfig, simulate, summarize
from kvflow.sim.instance import InstanceConfig
from kvflow.sim.step_model import StepTimeModel
from kvflow.sim import workload as wl

WORKLOADS = ("synthetic", "sessions", "sharegpt")


def add_sim_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sim", help="simulate a cluster of kvflow instances (dispatch, migration, P/D, autoscaling)",
                              description="Discrete-event simulation of a kvflow cluster; the dispatch, migration and "
                                          "autoscaling policies are kvflow.cluster's own.")
    sub = p.add_subparsers(dest="sim_command", metavar="{run,calibrate,sweep}", required=True)

    r = sub.add_parser("run", help="simulate one configuration and print the serving metrics")
    _add_cluster_args(r)
    _add_workload_args(r)
    r.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    r.add_argument("--save-trace", metavar="PATH", help="write the workload as a JSON-lines trace (to replay it)")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("calibrate", help="time real engine steps over a grid of batch shapes and fit the step time")
    c.add_argument("--model", default="smollm2-135m", help="model to time (default the bundled smollm2-135m)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--load-format", default=None, help="dummy: random weights (shapes are what matter)")
    c.add_argument("--out", default="kvflow-step-fit.json", help="where to write the fit (default %(default)s)")
    c.add_argument("--quick", action="store_true", help="a smaller grid (about 20 s here)")
    c.add_argument("--threads", type=int, default=None,
                   help="torch threads (as --threads-per-instance gives each cluster instance; default torch's)")
    c.add_argument("--concurrent", type=int, default=1,
                   help="time this many engines at once, each in its own process (as a cluster's instances "
                        "share one machine: their steps slow each other down); one fit over all their steps")
    c.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("sweep", help="p99 latency and goodput against request rate, per policy; writes a plot")
    _add_cluster_args(s, sweep=True)
    _add_workload_args(s)
    s.add_argument("--rates-per-instance", default="0.5,1,1.5,2,4,8",
                   help="request rates per instance to sweep (default %(default)s)")
    s.add_argument("--requests-per-instance", type=int, default=100,
                   help="requests per run per instance (default %(default)s)")
    s.add_argument("--plot", default="docs/sim_sweep.png", help="PNG to write (default %(default)s)")
    s.add_argument("--json", metavar="PATH", help="write every run's figures to this JSON file")
    s.set_defaults(func=cmd_sweep)
    return p


def _add_cluster_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    g = p.add_argument_group("cluster")
    if sweep:
        g.add_argument("--instances", default="16,64", help="instance counts, comma-separated (default %(default)s)")
    else:
        g.add_argument("--instances", type=int, default=4, help="colocated instances (default %(default)s)")
        g.add_argument("--dispatch", choices=DISPATCH_POLICIES, default="least-load")
        g.add_argument("--migration", action="store_true", help="Llumnix live migration on")
        g.add_argument("--prefill-instances", type=int, default=0, help="P/D split: prefill instances")
        g.add_argument("--decode-instances", type=int, default=0, help="P/D split: decode instances")
        g.add_argument("--autoscale", action="store_true", help="autoscaling on (colocated)")
        g.add_argument("--min-instances", type=int, default=1)
        g.add_argument("--max-instances", type=int, default=8)
        g.add_argument("--idle-timeout", type=float, default=60.0, help="seconds under low load before scale-in")
        g.add_argument("--cold-start", type=float, default=2.0, help="seconds for a new instance to start")
    g.add_argument("--step-fit", metavar="PATH", help="step-time fit from `kvflow sim calibrate` (default: the shipped one)")
    g.add_argument("--num-blocks", type=int, default=2048, help="KV blocks per instance (default %(default)s)")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--max-num-batched-tokens", type=int, default=512)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--max-model-len", type=int, default=4096)
    g.add_argument("--kv-bytes-per-token", type=int, default=23040, help="default: SmolLM2-135M in bf16")
    g.add_argument("--bandwidth", type=float, default=5e9, help="bytes/s for migration and KV transfer")
    g.add_argument("--goodput", nargs="*", metavar="NAME:MS", default=["ttft:2000", "tpot:200"],
                   help="SLOs for goodput, as in `kvflow bench serve` (default ttft:2000 tpot:200)")


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=WORKLOADS, default="synthetic")
    g.add_argument("--trace", metavar="PATH", help="replay a JSON-lines trace instead (arrival, prompt_token_ids "
                                                   "or prompt_len, output_len)")
    g.add_argument("--num-requests", type=int, default=1000)
    g.add_argument("--request-rate", type=float, default=10.0, help="requests (sessions: sessions) per second")
    g.add_argument("--arrival-cv", type=float, default=1.0, help="CV of inter-arrival gaps (1: Poisson)")
    g.add_argument("--input-len", type=float, default=256, help="mean prompt tokens")
    g.add_argument("--input-cv", type=float, default=1.0)
    g.add_argument("--output-len", type=float, default=128, help="mean output tokens")
    g.add_argument("--output-cv", type=float, default=1.0)
    g.add_argument("--system-prompt-len", type=int, default=0, help="tokens of a system prompt every request shares")
    g.add_argument("--turns", type=float, default=4.0, help="sessions: mean turns per session")
    g.add_argument("--think-time", type=float, default=5.0, help="sessions: seconds between an answer and the next turn")
    g.add_argument("--high-priority-fraction", type=float, default=0.0)
    g.add_argument("--tokenizer", default="smollm2-135m", help="sharegpt: tokenizer for lengths")
    g.add_argument("--seed", type=int, default=0)


def build_workload(args, request_rate: float | None = None, num_requests: int | None = None) -> list[wl.SimRequest]:
    rate = args.request_rate if request_rate is None else request_rate
    n = args.num_requests if num_requests is None else num_requests
    if args.trace:
        return wl.load_trace(args.trace, args.block_size)
    if args.workload == "sharegpt":
        return wl.sharegpt(n, rate, args.arrival_cv, args.seed, args.tokenizer)
    spec = wl.WorkloadSpec(num_requests=n, request_rate=rate, arrival_cv=args.arrival_cv,
                           input_len=args.input_len, input_cv=args.input_cv, output_len=args.output_len,
                           output_cv=args.output_cv, max_model_len=args.max_model_len,
                           system_prompt_len=args.system_prompt_len,
                           high_priority_fraction=args.high_priority_fraction,
                           turns=args.turns if args.workload == "sessions" else 0, think_time=args.think_time,
                           seed=args.seed)
    return wl.synthetic(spec)


def cluster_config(args, **overrides) -> ClusterConfig:
    instance = InstanceConfig(num_blocks=args.num_blocks, block_size=args.block_size,
                              max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                              enable_prefix_caching=not args.no_prefix_caching)
    base = dict(instance=instance, max_model_len=args.max_model_len, kv_bytes_per_token=args.kv_bytes_per_token,
                migration_bandwidth=args.bandwidth, kv_transfer_bandwidth=args.bandwidth)
    if hasattr(args, "dispatch"):
        base.update(num_instances=args.instances, dispatch=args.dispatch, migration=args.migration,
                    prefill_instances=args.prefill_instances, decode_instances=args.decode_instances,
                    autoscale=args.autoscale, min_instances=args.min_instances, max_instances=args.max_instances,
                    idle_timeout_s=args.idle_timeout, cold_start_s=args.cold_start)
    base.update(overrides)
    return ClusterConfig(**base)


def _slos(args) -> dict[str, float]:
    from kvflow.bench.serve import parse_goodput
    try:
        return parse_goodput(args.goodput)
    except ValueError as e:
        from kvflow.errors import ConfigError
        raise ConfigError(str(e)) from None


def cmd_run(args) -> int:
    slos = _slos(args)
    model = StepTimeModel.load(args.step_fit)
    requests = build_workload(args)
    if args.save_trace:
        wl.save_trace(requests, args.save_trace)
    metrics = summarize(simulate(cluster_config(args), model, requests), slos)
    print(format_summary(metrics, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k != "func"}, **metrics}, f, indent=1)
    return 0


def format_summary(m: dict, args) -> str:
    def ms(key):
        return "n/a" if m.get(key) is None else f"{m[key]:.1f}"

    lines = [f"{' Simulated cluster ':=^56}",
             f"{'Requests completed / failed:':<40} {m['completed']} / {m['failed']}",
             f"{'Duration (simulated s):':<40} {m['duration']:.2f}",
             f"{'Request throughput (req/s):':<40} {m['request_throughput']:.2f}",
             f"{'Output token throughput (tok/s):':<40} {m['output_throughput']:.1f}"]
    if m.get("request_goodput") is not None:
        lines.append(f"{'Request goodput (req/s):':<40} {m['request_goodput']:.2f}")
    for name in ("ttft", "tpot", "e2el"):
        lines.append(f"{name.upper() + ' mean / p50 / p99 (ms):':<40} {ms(f'mean_{name}_ms')} / "
                     f"{ms(f'p50_{name}_ms')} / {ms(f'p99_{name}_ms')}")
    lines += [f"{'Prefix cache hit rate:':<40} {m['prefix_hit_rate']:.3f}",
              f"{'Preemptions:':<40} {m['preemptions']}",
              f"{'Migrations (aborted):':<40} {m['migrations']} ({m['migrations_aborted']}) "
              f"{m['migrations_by_reason']}",
              f"{'Mean migration downtime (ms):':<40} {ms('mean_migration_downtime_ms')}",
              f"{'Mean KV transfer (ms, P/D):':<40} {ms('mean_kv_transfer_ms')}",
              f"{'Instances used / instance-seconds:':<40} {m['num_instances_used']} / {m['instance_seconds']:.1f}",
              f"{'Simulator wall time (s) / events:':<40} {m['sim_wall_seconds']:.2f} / {m['sim_events']}",
              "=" * 56]
    return "\n".join(lines)


def cmd_calibrate(args) -> int:
    from kvflow.sim.calibrate import calibrate

    options = {"device": args.device}
    if args.load_format:
        options["load_format"] = args.load_format
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.concurrent > 1:
        fit = _calibrate_concurrently(args, options)
    else:
        fit = calibrate(args.model, out=args.out, quick=args.quick, **options)
    print(f"step time = {fit.a * 1e3:.3f} ms + {fit.b * 1e6:.2f} us x prefill tokens + {fit.c * 1e6:.2f} us x decode rows"
          f" + {fit.d * 1e9:.2f} ns x context tokens   ({len(fit.samples)} steps, {fit.source}) -> {args.out}")
    return 0


def _calibrate_concurrently(args, options: dict) -> StepTimeModel:
    """args.concurrent - 1 more `kvflow sim calibrate` processes beside this one, started together;
    the fit is over every process's measured steps."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from kvflow.sim.calibrate import calibrate
    from kvflow.sim.step_model import fit as fit_steps
    tmp = Path(tempfile.mkdtemp(prefix="kvflow-calibrate-"))
    cmd = [sys.executable, "-m", "kvflow.entrypoints.cli", "sim", "calibrate", "--model", args.model,
           "--device", args.device] + (["--quick"] if args.quick else []) + (
           ["--threads", str(args.threads)] if args.threads else []) + (
           ["--load-format", args.load_format] if args.load_format else [])
    others = [subprocess.Popen(cmd + ["--out", str(tmp / f"{i}.json")], stdout=subprocess.DEVNULL)
              for i in range(args.concurrent - 1)]
    mine = calibrate(args.model, quick=args.quick, **options)
    samples = list(mine.samples)
    for i, proc in enumerate(others):
        if proc.wait() != 0:
            from kvflow.errors import ConfigError
            raise ConfigError(f"calibration process {i + 1} of {args.concurrent} failed (exit {proc.returncode})")
        samples += StepTimeModel.load(tmp / f"{i}.json").samples
    result = fit_steps(samples, source=f"{mine.source}, {args.concurrent} engines at once")
    result.save(args.out)
    return result


def cmd_sweep(args) -> int:
    from kvflow.sim.sweep import run_sweep

    run_sweep(args)
    return 0


def parse_list(text: str, kind=float) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        from kvflow.errors import ConfigError
        raise ConfigError(f"expected a comma-separated list of numbers, got {text!r}") from None
    if not values or any(v <= 0 or math.isnan(v) for v in values):
        from kvflow.errors import ConfigError
        raise ConfigError(f"expected positive numbers, got {text!r}")
    return values
