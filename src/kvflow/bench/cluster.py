"""Real-cluster experiments on this machine (kvflow.cluster through its Python API, no HTTP):

    python -m kvflow.bench.cluster sessions [--sessions 8 --turns 3]   prefix-affinity vs round-robin
    python -m kvflow.bench.cluster skew                                 least-load with vs without migration
    python -m kvflow.bench.cluster cold                                 cold start from zero instances

`sessions`: multi-turn ShareGPT conversations; each turn's prompt is the conversation so far (the
previous prompt, the reply the model gave, the next human turn), sent when the previous turn ends.
Each policy gets its own conversations (so one run's prefix cache cannot help the other). Reports
the prefix-cache hit rate over both instances, TTFT p50/p99. `--trace FILE` also writes the run's
requests as JSON lines (arrival, prompt_token_ids, output_len) for `kvflow sim run --trace`.

`skew`: a burst of long requests lands on one instance (pinned), then short ones arrive through
least-load; run once with live migration off, once on. Reports TTFT and TPOT p50/p99 and the
migrations (count, mean downtime).

`cold`: an autoscaled cluster (--min-instances 0) is left to scale to zero; one request then waits
for a new instance. Reports the cold start's breakdown and its TTFT, first without the weight cache
(the model parsed from its GGUF file), then with it."""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from kvflow.cluster.cluster import Cluster
from kvflow.sampling_params import SamplingParams

MODEL = "smollm2-135m"


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


async def _timed(client, prompt: list[int], params: SamplingParams, rid: str, priority: int = 0) -> dict:
    t0 = time.perf_counter()
    first = last = None
    ids: list[int] = []
    async for delta in client.generate(prompt, params, request_id=rid, priority=priority):
        now = time.perf_counter()
        if delta.outputs and delta.outputs[0].token_ids:
            first = first or now
            last = now
            ids += delta.outputs[0].token_ids
    n = len(ids)
    return {"ttft": first - t0, "tpot": (last - first) / (n - 1) if n > 1 else 0.0, "ids": ids, "start": t0}


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
    cluster = Cluster(MODEL, instances=2, threads_per_instance=1, dispatch_policy="least-load",
                      migration_interval=0.2)
    client = cluster.client
    tok = client.tokenizer
    for migrate in (False, True):
        client.cluster.enable_migration = migrate
        rows = cluster.run(lambda c: _skewed_burst(c, tok, args, "mig" if migrate else "nomig"))
        moved = [m for m in client.migrations if m.moved]
        res = {**_summary(rows), "migrations": len(moved),
               "downtime_ms_mean": statistics.mean(m.downtime_s for m in moved) * 1e3 if moved else 0.0}
        print("least-load" + (" + migration" if migrate else ""),
              json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))
        client.migrations.clear()
    cluster.stop()


async def _skewed_burst(c, tok, args, tag: str) -> list[dict]:
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
                      add_special_tokens=False)
    long_params = SamplingParams(temperature=0.0, max_tokens=args.long_len, ignore_eos=True)
    short_params = SamplingParams(temperature=0.0, max_tokens=args.short_len, ignore_eos=True)
    c.dispatch_policy = Pin()
    long_runs = [asyncio.ensure_future(_timed(c, base * 4 + [100 + i], long_params, f"{tag}-long-{i}"))
                 for i in range(args.burst)]
    await asyncio.sleep(0.3)
    c.dispatch_policy = policy
    short_runs = []
    for i in range(args.burst):
        short_runs.append(asyncio.ensure_future(_timed(c, base * 2 + [200 + i], short_params, f"{tag}-short-{i}")))
        await asyncio.sleep(args.gap)
    return list(await asyncio.gather(*long_runs, *short_runs))


# ---------------- cold start ----------------
def run_cold(args) -> None:
    for cache in (False, True):
        cluster = Cluster(MODEL, instances=1, min_instances=0, max_instances=1, idle_timeout=1.0, weight_cache=cache)
        client = cluster.client
        while client.instances:
            time.sleep(0.1)
        ids = client.tokenizer.encode("The three most useful things to know about the solar system are")
        row = cluster.run(lambda c: _timed(c, ids, SamplingParams(temperature=0.0, max_tokens=8), f"cold-{cache}"))
        cold = client.cold_starts[-1]
        print(f"weight cache {'on' if cache else 'off'}: cold-start TTFT {row['ttft']:.2f} s = actor/process start "
              f"{cold.process_s:.2f} s + engine and weights {cold.engine_s:.2f} s + first token "
              f"{row['ttft'] - cold.total_s:.2f} s")
        cluster.stop()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m kvflow.bench.cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=["sessions", "skew", "cold"])
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--trace", default=None)
    p.add_argument("--burst", type=int, default=4)
    p.add_argument("--long-len", type=int, default=160)
    p.add_argument("--short-len", type=int, default=32)
    p.add_argument("--gap", type=float, default=0.5)
    args = p.parse_args(argv)
    {"sessions": run_sessions, "skew": run_skew, "cold": run_cold}[args.experiment](args)


if __name__ == "__main__":
    main()
