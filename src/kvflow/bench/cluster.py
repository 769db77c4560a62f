"""Real-cluster experiments on this machine (kvflow.cluster through its Python API, no HTTP):

    python -m kvflow.bench.cluster sessions [--sessions 8 --turns 3]   prefix-affinity vs round-robin
    python -m kvflow.bench.cluster skew                                 least-load with vs without migration
    python -m kvflow.bench.cluster cold                                 cold start from zero instances
    python -m kvflow.bench.cluster replay --trace T [--sim-fit F]       replay a trace (validates kvflow sim)
    python -m kvflow.bench.cluster calibrate --out F                    the sim's step fit, timed on the instances
    python -m kvflow.bench.cluster replay --trace T --record-fit F --out R   fit on the steps served (serving_fit)
    python -m kvflow.bench.cluster leave-one-out --from R1,R2,R3 --trace T   validate: each run vs the others' fit

`sessions`: multi-turn ShareGPT conversations; each turn's prompt is the conversation so far (the
previous prompt, the reply the model gave, the next human turn), sent when the previous turn ends.
Each policy gets its own conversations (so one run's prefix cache cannot help the other). Reports
the prefix-cache hit rate over both instances, TTFT p50/p99. `--trace FILE` also writes the run's
requests as JSON lines (arrival, prompt_token_ids, output_len) for `kvflow sim run --trace`.

`skew`: a burst of long requests lands on one instance (pinned), then short ones arrive through
least-load; run once with live migration off, once on. The KV pools are small (--num-blocks), so
the burst outgrows its instance's pool: without migration it preempts, with migration the policy
moves requests away once that instance passes the high watermark. Reports TTFT and TPOT p50/p99,
preemptions and the migrations (count, downtime and tokens copied ahead / during the stop each).

`cold`: an autoscaled cluster (--min-instances 0) is left to scale to zero; one request then waits
for a new instance. Reports the cold start's breakdown and its TTFT, first without the weight cache
(the model parsed from its GGUF file), then with it."""
from __future__ import annotations

import argparse
import asyncio
import json
import time

from kvflow.cluster.cluster import Cluster
from kvflow.sampling_params import SamplingParams

MODEL = "smollm2-135m"


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


async def _timed(client, prompt: list[int], params: SamplingParams, rid: str, priority: int = 0) -> dict:
    t0 = time.perf_counter()
    sent = time.time()  # wall clock too: compared with the instances' step logs (other processes)
    first = last = None
    first_seen = None
    ids: list[int] = []
    async for delta in client.generate(prompt, params, request_id=rid, priority=priority):
        now = time.perf_counter()
        if delta.outputs and delta.outputs[0].token_ids:
            if first is None:
                first, first_seen = now, time.time()
            last = now
            ids += delta.outputs[0].token_ids
    n = len(ids)
    return {"ttft": first - t0, "tpot": (last - first) / (n - 1) if n > 1 else 0.0, "ids": ids, "start": t0,
            "request_id": rid, "sent": sent, "first_seen": first_seen}


def _summary(rows: list[dict]) -> dict:
    ttft, tpot = [r["ttft"] for r in rows], [r["tpot"] for r in rows if r["tpot"]]
    return {"ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99), "tpot_p50": _pct(tpot, 50),
            "tpot_p99": _pct(tpot, 99), "n": len(rows)}


# ---------------- sessions: prefix-affinity vs round-robin ----------------
def _conversations(tokenizer, count: int, skip: int) -> list[list[str]]:
    from kvflow.bench.datasets import load_conversations, sharegpt_path
    out = []
    for conv in load_conversations(sharegpt_path()):
        turns = [t.get("value", "") for t in conv.get("conversations", []) if t.get("from") == "human"]
        turns = [t[:600] for t in turns if t.strip()]
        if len(turns) >= 3:
            out.append(turns)
        if len(out) >= count + skip:
            break
    return out[skip:skip + count]


async def _session(client, tok, turns: list[str], n_turns: int, out_len: int, tag: str, trace: list) -> list[dict]:
    history: list[int] = []
    rows = []
    for k, text in enumerate(turns[:n_turns]):
        prompt = history + tok.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
                                      add_special_tokens=False)
        params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
        trace.append({"arrival": time.perf_counter(), "prompt_token_ids": prompt, "output_len": out_len})
        row = await _timed(client, prompt, params, f"{tag}-{k}")
        rows.append(row)
        history = prompt + row["ids"] + tok.encode("<|im_end|>\n", add_special_tokens=False)
    return rows


def run_sessions(args) -> None:
    cluster = Cluster(MODEL, instances=2, threads_per_instance=1, dispatch_policy="round-robin",
                      max_model_len=2048)
    client = cluster.client
    tok = client.tokenizer
    convs = _conversations(tok, 2 * args.sessions, 0)
    results = {}
    trace: list[dict] = []
    from kvflow.cluster.policy import make_dispatch_policy
    for i, name in enumerate(("round-robin", "prefix-affinity")):
        client.dispatch_policy = make_dispatch_policy(name, client.engine.block_pool.block_size)
        before = client.instance_stats()
        mine = convs[i * args.sessions:(i + 1) * args.sessions]

        async def all_sessions(c):
            runs = [_session(c, tok, turns, args.turns, args.output_len, f"{name}-{j}", trace)
                    for j, turns in enumerate(mine)]
            return [r for rows in await asyncio.gather(*runs) for r in rows]
        t0 = time.perf_counter()
        rows = cluster.run(all_sessions)
        wall = time.perf_counter() - t0
        after = client.instance_stats()
        q = sum(after[k].prefix_cache_queries - before[k].prefix_cache_queries for k in after)
        h = sum(after[k].prefix_cache_hits - before[k].prefix_cache_hits for k in after)
        results[name] = {**_summary(rows), "prefix_hit_rate": h / q if q else 0.0, "wall_s": wall}
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results[name].items()}))
    if args.trace:
        t_first = min(r["arrival"] for r in trace)
        with open(args.trace, "w") as f:
            for r in trace:
                f.write(json.dumps({**r, "arrival": round(r["arrival"] - t_first, 4)}) + "\n")
    cluster.stop()


# ---------------- skew: least-load with and without migration ----------------
def run_skew(args) -> None:
    """Small KV pools (--num-blocks per instance) so that the burst pinned on one instance outgrows
    it: without migration that instance preempts (a preempted request waits, then recomputes), with
    migration the policy moves requests to the other instance once its virtual usage passes the
    high watermark."""
    cluster = Cluster(MODEL, instances=2, threads_per_instance=1, dispatch_policy="least-load",
                      migration_interval=args.migration_interval, num_gpu_blocks=args.num_blocks or 64,
                      max_model_len=1024, enable_prefix_caching=False)
    client = cluster.client
    tok = client.tokenizer
    cluster.generate([[1, 2, 3, 4]] * 2, SamplingParams(max_tokens=4))  # first steps' one-time costs
    for k, migrate in enumerate((True, False) if args.migration_first else (False, True)):
        client.cluster.enable_migration = migrate
        before = _preemptions(client)
        t0 = time.perf_counter()
        rows = cluster.run(lambda c: _skewed_burst(c, tok, args, "mig" if migrate else "nomig", 1000 * k))
        wall = time.perf_counter() - t0
        moved = [m for m in client.migrations if m.moved]
        longs = [r for r in rows if r["kind"] == "long"]
        shorts = [r for r in rows if r["kind"] == "short"]
        res = {**_summary(rows), "long_tpot_p99": _summary(longs)["tpot_p99"],
               "short_ttft_p99": _summary(shorts)["ttft_p99"], "preemptions": _preemptions(client) - before,
               "migrations": len(moved), "migrations_failed": len(client.migrations) - len(moved),
               "downtime_ms": [round(m.downtime_s * 1e3, 1) for m in moved],
               "tokens_ahead": [m.tokens_ahead for m in moved], "tokens_stopped": [m.tokens_stopped for m in moved],
               "wall_s": wall}
        print("least-load" + (" + migration" if migrate else ""),
              json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}), flush=True)
        client.migrations.clear()
    cluster.stop()


def _preemptions(client) -> int:
    return sum(h.stats.num_preemptions for h in client.instances.values())


async def _skewed_burst(c, tok, args, tag: str, offset: int) -> list[dict]:
    """args.burst long requests pinned to the first instance at once, then args.shorts short ones
    through the real policy, args.gap seconds apart. Every prompt starts with its own token (no
    prefix-cache sharing, within a run or across the two)."""
    first = next(iter(c.instances))
    policy = c.dispatch_policy

    class Pin:
        def choose(self, prompt, priority, loads):
            return first

        def on_dispatch(self, *a):
            pass

        def on_instance_removed(self, *a):
            pass

    base = tok.encode("Write a long essay about the history of computing, from the abacus to the cloud. ",
                      add_special_tokens=False) * 64

    def prompt(i: int, n: int) -> list[int]:
        return [1000 + offset + i] + base[:n - 1]

    async def one(kind: str, i: int, n_prompt: int, n_out: int) -> dict:
        params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
        row = await _timed(c, prompt(i, n_prompt), params, f"{tag}-{kind}-{i}")
        return {**row, "kind": kind}

    c.dispatch_policy = Pin()
    long_runs = [asyncio.ensure_future(one("long", i, args.long_prompt, args.long_len)) for i in range(args.burst)]
    await asyncio.sleep(0.3)
    c.dispatch_policy = policy
    short_runs = []
    for i in range(args.shorts):
        short_runs.append(asyncio.ensure_future(one("short", 100 + i, args.short_prompt, args.short_len)))
        await asyncio.sleep(args.gap)
    return list(await asyncio.gather(*long_runs, *short_runs))


# ---------------- replay: a recorded trace, for the simulator's validation ----------------
def run_replay(args) -> None:
    """Replay a JSON-lines trace (arrival, prompt_token_ids or prompt_len, output_len) open-loop on
    a fresh 2 x 1-thread cluster per policy; `kvflow sim run --trace` replays the same file. Prints
    and (--out) writes TTFT/TPOT p50/p99 per policy, with the per-request figures."""
    import random
    trace = [json.loads(line) for line in open(args.trace) if line.strip()]
    rng = random.Random(0)
    prompts = [r["prompt_token_ids"] if "prompt_token_ids" in r else
               [rng.randrange(100, 40000) for _ in range(int(r["prompt_len"]))] for r in trace]
    results = {}
    for name in args.policies.split(","):
        def start() -> Cluster:
            c = Cluster(MODEL, instances=2, threads_per_instance=1, dispatch_policy=name,
                        num_gpu_blocks=args.num_blocks or 1024, max_model_len=2048, enable_migration=args.migration)
            c.generate([[1, 2, 3, 4]] * 2, SamplingParams(max_tokens=4))  # first steps' one-time costs
            return c
        cluster = start()
        fit_path = None
        if args.calibrate:  # the step fit from these instances, right before they replay
            fit_path = f"{args.out or 'replay'}.fit-{name}.json"
            _calibrate_instances(cluster, fit_path, quick=True)
            if args.fresh_after_calibration:  # replay on new instances: nothing left from the calibration
                cluster.stop()
                cluster = start()
        client = cluster.client
        handles = dict(client.instances)
        before = _pool_counters(client, handles)
        client.ray.get([h.actor.call.remote(_start_step_log) for h in handles.values()])

        async def replay(c, tag=name):
            t0 = time.perf_counter()

            async def one(i, rec):
                await asyncio.sleep(max(0.0, float(rec["arrival"]) - (time.perf_counter() - t0)))
                params = SamplingParams(temperature=0.0, max_tokens=int(rec["output_len"]), ignore_eos=True)
                return await _timed(c, prompts[i], params, f"{tag}-{i}")
            return await asyncio.gather(*(one(i, rec) for i, rec in enumerate(trace)))
        rows = cluster.run(replay)
        logs = dict(zip(handles, client.ray.get([h.actor.call.remote(_stop_step_log) for h in handles.values()])))
        after = _pool_counters(client, handles)
        q, h, pre = (sum(a[i] - b[i] for a, b in zip(after, before)) for i in range(3))
        results[name] = {**_summary(rows), "prefix_hit_rate": h / q if q else 0.0, "preemptions": pre, "fit": fit_path,
                         "ttft": [r["ttft"] for r in rows], "tpot": [r["tpot"] for r in rows],
                         **_serving_records(logs, rows)}
        print(name, json.dumps({k: round(v, 4) for k, v in results[name].items() if isinstance(v, float)}),
              flush=True)
        cluster.stop()
    if args.record_fit:
        _fit_from_runs(results, args.record_fit)
    if args.sim_fit or args.calibrate:
        _compare_with_sim(args, results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f)


def _pool_counters(client, handles: dict) -> list[tuple[int, int, int]]:
    """(prefix-cache query tokens, hit tokens, preemptions) per instance, read on the engine
    threads now. Not client.instance_stats(): that is the last poll reply's copy, up to a poll
    timeout old; read right after a calibration it missed the calibration's lookups (~14k prompt
    tokens of random prompts, all misses), which then counted as the replay's and cut its measured
    hit rate to 0.07-0.11 (BENCHMARKS, second try)."""
    return client.ray.get([h.actor.call.remote(_counters) for h in handles.values()])


def _counters(engine) -> tuple[int, int, int]:
    stats = engine.block_pool.stats
    return stats.queries, stats.hits, engine.scheduler.num_preemptions


# ---------------- the step log: what each instance's steps cost while serving ----------------
def _start_step_log(engine) -> None:
    """On an instance's engine thread: from now on, time every step with its batch shape (wall
    clock, comparable across processes), and note when each request reaches the engine thread and
    when the step that made its first token ended. Wraps the engine's own methods; undone by
    _stop_step_log."""
    from kvflow.sim.calibrate import _shape
    log: dict = {"steps": [], "added": {}, "first": {}}
    originals = (engine.step, engine.runner.execute, engine.add_request)
    step_fn, execute_fn, add_fn = originals
    shape: dict = {}

    def execute(sched):
        shape.update(_shape(sched))
        shape["prefill_rows"] = sum(1 for x in sched.scheduled if x.start < x.request.num_prompt_tokens)
        return execute_fn(sched)

    def step():
        shape.clear()
        start = time.time()
        outputs = step_fn()
        end = time.time()
        if shape:
            log["steps"].append({**shape, "start": start, "end": end,
                                 "busy_after": engine.has_unfinished_requests()})
        for out in outputs or ():
            if out.request_id not in log["first"] and any(c.token_ids for c in out.outputs):
                log["first"][out.request_id] = end
        return outputs

    def add_request(request_id, *a, **kw):
        log["added"][request_id] = time.time()
        return add_fn(request_id, *a, **kw)

    engine.step, engine.runner.execute, engine.add_request = step, execute, add_request
    engine._kvflow_step_log = (log, originals)


def _stop_step_log(engine) -> dict:
    log, originals = engine._kvflow_step_log
    engine.step, engine.runner.execute, engine.add_request = originals
    del engine._kvflow_step_log
    return log


def _serving_records(logs: dict, rows: list[dict]) -> dict:
    """The instances' step logs and each request's timings, as serving_fit takes them."""
    steps = [{**s, "instance": iid} for iid, log in logs.items() for s in log["steps"]]
    where = {rid: iid for iid, log in logs.items() for rid in log["added"]}
    requests = []
    for r in rows:
        iid = where.get(r["request_id"])
        log = logs.get(iid, {"added": {}, "first": {}})
        requests.append({"request_id": r["request_id"], "instance": iid, "sent": r["sent"],
                         "added": log["added"].get(r["request_id"]), "first_seen": r["first_seen"],
                         "first_step_end": log["first"].get(r["request_id"])})
    return {"steps": steps, "requests": requests}


def _fit_from_runs(results: dict, out: str):
    """One step-time fit (and the front end's delays) from the serving steps of every policy's run."""
    from kvflow.cpu_info import cpu_model_name
    from kvflow.sim.serving_fit import dispatch_delays, fit_serving, output_delays
    steps = [s for res in results.values() for s in res["steps"]]
    requests = [r for res in results.values() for r in res["requests"]]
    model = fit_serving(steps, requests, source=f"{MODEL} on {cpu_model_name()}, 1 thread, 2 instances of a "
                                                f"cluster while serving ({', '.join(results)})")
    model.save(out)
    ins, outs = dispatch_delays(steps, requests), output_delays(requests)
    print(f"serving fit: step = {model.a * 1e3:.2f} ms + {model.b * 1e6:.1f} us x prefill tokens + "
          f"{model.c * 1e6:.1f} us x decode rows + {model.d * 1e9:.2f} ns x context tokens ({len(steps)} steps); "
          f"dispatch delay {model.dispatch_delay * 1e3:.1f} ms (median of {len(ins)}), output delay "
          f"{model.output_delay * 1e3:.1f} ms (median of {len(outs)}) -> {out}", flush=True)
    return model


def run_fit(args) -> None:
    """A fit from the step logs replays saved (--from run.json[,run2.json...]): fit on some runs,
    validate on another."""
    runs = {}
    for k, path in enumerate(args.from_run.split(",")):
        runs.update({f"{name} (run {k + 1})": res for name, res in json.load(open(path)).items()})
    _fit_from_runs(runs, args.out or "kvflow-serving-fit.json")


def run_compare(args) -> None:
    """The simulator against a saved replay (--from run.json) with a fit (--sim-fit)."""
    real = json.load(open(args.from_run))
    for res in real.values():
        res["fit"] = None
    _compare_with_sim(args, real)


def run_leave_one_out(args) -> None:
    """--from run1.json,run2.json,...: each run against the simulator fitted on the other runs'
    serving steps only; then all runs pooled against those out-of-sample simulations pooled."""
    from kvflow.cpu_info import cpu_model_name
    from kvflow.sim.serving_fit import fit_serving
    paths = args.from_run.split(",")
    runs = [json.load(open(p)) for p in paths]
    print(f"CPU: {cpu_model_name()}; trace {args.trace}; runs {', '.join(paths)}")
    pooled: dict = {}
    for k, run in enumerate(runs):
        others = [r for j, r in enumerate(runs) if j != k]
        model = fit_serving([s for r in others for res in r.values() for s in res["steps"]],
                            [q for r in others for res in r.values() for q in res["requests"]])
        print(f"\nrun {k + 1} against the fit on runs {[j + 1 for j in range(len(runs)) if j != k]} "
              f"({model.a * 1e3:.1f} ms + {model.b * 1e6:.0f} us x prefill tokens + {model.c * 1e6:.0f} us x "
              f"decode rows + {model.d * 1e9:.0f} ns x context tokens)")
        for name, res in run.items():
            sim = _simulate_trace(args, name, model)
            slot = pooled.setdefault(name, {"ttft": [], "tpot": [], "sim_ttft": [], "sim_tpot": []})
            slot["ttft"] += res["ttft"]
            slot["tpot"] += res["tpot"]
            slot["sim_ttft"] += sim["ttft"]
            slot["sim_tpot"] += sim["tpot"]
            _print_rows(name, res, sim)
    print("\nall runs pooled against the out-of-sample simulations pooled")
    for name, slot in pooled.items():
        _print_rows(name, slot, {"ttft": slot["sim_ttft"], "tpot": slot["sim_tpot"]})


def _simulate_trace(args, name: str, model) -> dict:
    from kvflow.sim import workload as wl
    from kvflow.sim.cluster import ClusterConfig as SimConfig, simulate
    from kvflow.sim.instance import InstanceConfig
    config = SimConfig(num_instances=2, dispatch=name, migration=args.migration, max_model_len=2048,
                       instance=InstanceConfig(num_blocks=args.num_blocks or 1024), stale_loads=True)
    result = simulate(config, model, wl.load_trace(args.trace, 16))
    done = result.requests
    seen = sum(i.prompt_tokens_seen for i in result.instances)
    return {"ttft": [r.first_token_time - r.arrival for r in done],
            "tpot": [(r.finish_time - r.first_token_time) / (r.output_len - 1) for r in done if r.output_len > 1],
            "prefix_hit_rate": sum(i.hit_tokens for i in result.instances) / max(1, seen)}


def _print_rows(name: str, real: dict, sim: dict) -> None:
    import numpy as np
    for metric in ("ttft", "tpot"):
        values = [v for v in real[metric] if metric == "ttft" or v > 0]
        for q in (50, 99):
            a, b = float(np.percentile(values, q)), float(np.percentile(sim[metric], q))
            print(f"| {name} | {metric.upper()} p{q} | {a * 1e3:.0f} ms | {b * 1e3:.0f} ms | {(b - a) / a * 100:+.0f}% |")


def _compare_with_sim(args, real: dict) -> None:
    """The simulator on the same trace, instances and policies; p50/p99 of both computed the same way
    (numpy's linear interpolation over the per-request figures)."""
    from kvflow.sim.step_model import StepTimeModel
    print("| policy | metric | real | simulated | difference |\n|---|---|---|---|---|")
    for name, res in real.items():
        sim = _simulate_trace(args, name, StepTimeModel.load(res["fit"] or args.sim_fit))
        print(f"| {name} | prefix hit rate | {res.get('prefix_hit_rate', float('nan')):.2f} | "
              f"{sim['prefix_hit_rate']:.2f} | |")
        res["sim"] = {"ttft": sim["ttft"], "tpot": sim["tpot"]}
        _print_rows(name, res, sim)


# ---------------- calibrate: the simulator's step fit, measured on the cluster's instances ----------------
def run_calibrate(args) -> None:
    """`kvflow sim calibrate`'s grid, timed on both instances of a 2 x 1-thread cluster at once (each
    on its engine thread): the steps cost what they cost when two instances share the machine, as
    in the runs the simulator is compared with."""
    cluster = Cluster(MODEL, instances=2, threads_per_instance=1, max_model_len=2048,
                      enable_prefix_caching=False, num_gpu_blocks=args.num_blocks or 2304)
    cluster.generate([[1, 2, 3, 4]] * 2, SamplingParams(max_tokens=4))
    _calibrate_instances(cluster, args.out or "kvflow-step-fit.json", quick=False)
    cluster.stop()


def _calibrate_instances(cluster, out: str, quick: bool):
    from functools import partial

    from kvflow.cpu_info import cpu_model_name
    from kvflow.sim.step_model import fit
    client = cluster.client
    refs = [h.actor.call.remote(partial(_measure_grid, quick=quick)) for h in client.instances.values()]
    samples = [s for part in client.ray.get(refs) for s in part]
    result = fit(samples, source=f"{MODEL} on {cpu_model_name()}, 1 thread, {len(refs)} instances of a cluster at once")
    result.save(out)
    print(f"step time = {result.a * 1e3:.3f} ms + {result.b * 1e6:.2f} us x prefill tokens + {result.c * 1e6:.2f} us "
          f"x decode rows + {result.d * 1e9:.2f} ns x context tokens ({len(samples)} steps) -> {out}", flush=True)
    return result


def _measure_grid(engine, quick: bool = False) -> list[dict]:
    from types import SimpleNamespace

    from kvflow.sim.calibrate import QUICK_GRID, measure
    return measure(SimpleNamespace(engine=engine), **(QUICK_GRID if quick else {}))


# ---------------- cold start ----------------
def run_cold(args) -> None:
    """The standby process (started by the autoscaler, imports and tokenizer done, no engine) is
    part of the design: the request is sent once it is ready, as a request after a quiet spell
    would find it. --no-standby measures a cold start that starts its process too."""
    for cache in ((False, True) if args.cache_off_too else (True,)):
        cluster = Cluster(MODEL, instances=1, min_instances=0, max_instances=1, idle_timeout=1.0, weight_cache=cache,
                          max_model_len=2048)
        client = cluster.client
        while client.instances or client._standby is None:
            time.sleep(0.1)
        if args.no_standby:  # stop the standby and start none: the cold start starts its process
            client._keep_standby = _no_standby
            client.ray.kill(client._standby[1])
            client._standby = None
        ids = client.tokenizer.encode("The three most useful things to know about the solar system are")
        row = cluster.run(lambda c: _timed(c, ids, SamplingParams(temperature=0.0, max_tokens=8), f"cold-{cache}"))
        cold = client.cold_starts[-1]
        print(f"weight cache {'on' if cache else 'off'}, standby {'off' if args.no_standby else 'on'}: "
              f"cold-start TTFT {row['ttft']:.2f} s = actor/process start "
              f"{cold.process_s:.2f} s + engine and weights {cold.engine_s:.2f} s + first token "
              f"{row['ttft'] - cold.total_s:.2f} s")
        cluster.stop()


async def _no_standby() -> None:
    return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m kvflow.bench.cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=["sessions", "skew", "cold", "replay", "calibrate", "fit", "compare",
                                                   "leave-one-out"])
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--trace", default=None, help="sessions: write the trace here; replay: the trace to replay")
    p.add_argument("--policies", default="round-robin,prefix-affinity", help="replay: dispatch policies")
    p.add_argument("--migration", action="store_true", help="replay: live migration on")
    p.add_argument("--out", default=None, help="replay: write per-policy figures (JSON) here; calibrate: the fit")
    p.add_argument("--calibrate", action="store_true",
                   help="replay: fit the step time on each cluster's instances right before it replays, "
                        "and simulate with that fit")
    p.add_argument("--fresh-after-calibration", action="store_true",
                   help="replay --calibrate: replay on a new cluster, not on the instances just timed")
    p.add_argument("--record-fit", default=None, metavar="FIT",
                   help="replay: fit the sim's step time (and front-end delays) on the steps the instances ran "
                        "while serving this replay (all policies), write it here")
    p.add_argument("--from", dest="from_run", default=None, metavar="RUN",
                   help="fit / compare: a replay's --out JSON (its step logs and per-request figures)")
    p.add_argument("--sim-fit", default=None, help="replay: also simulate the trace with this step-time fit, compare")
    p.add_argument("--burst", type=int, default=8, help="skew: long requests pinned to one instance")
    p.add_argument("--long-prompt", type=int, default=48)
    p.add_argument("--long-len", type=int, default=128)
    p.add_argument("--shorts", type=int, default=6, help="skew: short requests through least-load")
    p.add_argument("--short-prompt", type=int, default=32)
    p.add_argument("--short-len", type=int, default=32)
    p.add_argument("--gap", type=float, default=0.5)
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks (of 16 tokens) per instance (default: skew 64, replay 1024)")
    p.add_argument("--migration-interval", type=float, default=0.2)
    p.add_argument("--cache-off-too", action="store_true", help="cold: also a run without the weight cache")
    p.add_argument("--no-standby", action="store_true", help="cold: no standby process (the process starts too)")
    p.add_argument("--migration-first", action="store_true", help="skew: the run with migration first")
    args = p.parse_args(argv)
    experiments = {"sessions": run_sessions, "skew": run_skew, "cold": run_cold, "replay": run_replay,
                   "calibrate": run_calibrate, "fit": run_fit, "compare": run_compare,
                   "leave-one-out": run_leave_one_out}
    experiments[args.experiment](args)


if __name__ == "__main__":
    main()
