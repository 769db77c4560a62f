"""Online serving benchmark: load any OpenAI-compatible server (kvflow serve, vLLM, llama.cpp's
llama-server) with streaming requests arriving as a Poisson (or gamma) process, and measure what a
user sees.

    kvflow bench serve --base-url http://127.0.0.1:8000 --dataset random --num-prompts 64 \\
        --request-rate 4 [--burstiness 1] [--max-concurrency C] [--goodput ttft:500 tpot:50] \\
        [--sweep-rates 1,2,4,inf] [--json out.json] [--plot out.png]

Per request: TTFT (send to first non-empty text chunk), every inter-token latency (gap between
text chunks), end-to-end latency, and TPOT = (latency - TTFT) / (output tokens - 1). Token counts
come from the server's `usage` (requested with stream_options.include_usage); a server that does
not report usage falls back to counting text chunks, and the report says so. Reported: request and
token throughput, mean / median / std / p99 of each latency, and goodput (requests per second that
met every SLO given with --goodput).

Prompts come from kvflow.bench.datasets (ShareGPT, or random token ids decoded to text), tokenized
with --tokenizer (default: the served model if kvflow can resolve it, else smollm2-135m).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger("kvflow.bench.serve")

BACKENDS = {"openai-completions": "/v1/completions", "openai-chat": "/v1/chat/completions"}
SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class ServeRequest:
    prompt: str
    prompt_len: int  # by the client's tokenizer; the server's usage is preferred when reported
    output_len: int


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    start_time: float = 0.0  # seconds since the benchmark began
    usage_reported: bool = False
    error: str = ""
    text: str = ""

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


# ---------------- requests ----------------
def _headers(api_key: str | None) -> dict:
    h = {"Content-Type": "application/json"}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return h


def build_payload(backend: str, model: str, req: ServeRequest, temperature: float, ignore_eos: bool,
                  extra: dict | None) -> dict:
    payload: dict = {"model": model, "max_tokens": req.output_len, "temperature": temperature, "stream": True,
                     "stream_options": {"include_usage": True}}
    if backend == "openai-chat":
        payload["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        payload["prompt"] = req.prompt
    if ignore_eos:
        payload["ignore_eos"] = True  # vLLM and llama.cpp both read it
    payload.update(extra or {})
    return payload


def _chunk_text(backend: str, data: dict) -> str:
    choices = data.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if backend == "openai-chat":
        return (c.get("delta") or {}).get("content") or ""
    return c.get("text") or ""


async def send_request(session, url: str, backend: str, payload: dict, headers: dict, req: ServeRequest,
                       t0: float, timeout: float) -> RequestResult:
    """One streaming request; never raises (failures come back with success=False)."""
    import aiohttp

    res = RequestResult(prompt_len=req.prompt_len)
    start = time.perf_counter()
    res.start_time = start - t0
    last = start
    chunks, parts = 0, []
    usage = None
    try:
        async with session.post(url, json=payload, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                body = (await resp.text())[:500]
                res.error = f"HTTP {resp.status}: {body}"
                return res
            buf = b""
            done = False
            async for piece in resp.content.iter_any():
                now = time.perf_counter()
                buf += piece
                while b"\n" in buf and not done:
                    line, buf = buf.split(b"\n", 1)
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    obj = json.loads(data)
                    if "error" in obj and not obj.get("choices"):
                        err = obj["error"]
                        res.error = f"stream error: {err.get('message') if isinstance(err, dict) else err}"
                        return res
                    if obj.get("usage"):
                        usage = obj["usage"]
                    text = _chunk_text(backend, obj)
                    if text:
                        if chunks == 0:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last = now
                        chunks += 1
                        parts.append(text)
                if done:
                    break
        res.latency = time.perf_counter() - start
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - a benchmark reports failures, it does not stop on them
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.text = "".join(parts)
    if usage and usage.get("completion_tokens") is not None:
        res.usage_reported = True
        res.output_tokens = int(usage["completion_tokens"])
        if usage.get("prompt_tokens") is not None:
            res.prompt_len = int(usage["prompt_tokens"])
    else:
        res.output_tokens = chunks
    if chunks == 0 and res.output_tokens == 0:
        res.error = "the server returned no tokens"
        return res
    if chunks == 0:  # tokens but no visible text (e.g. all special tokens): first byte is the end
        res.ttft = res.latency
    res.success = True
    return res


def arrival_times(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Offsets (s) of n arrivals: gaps ~ Gamma(shape=burstiness, scale=1/(rate*burstiness)),
    which is a Poisson process for burstiness 1; all at 0 for rate inf."""
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


async def run_load(base_url: str, backend: str, model: str, requests: list[ServeRequest], rate: float,
                   burstiness: float = 1.0, max_concurrency: int | None = None, api_key: str | None = None,
                   temperature: float = 0.0, ignore_eos: bool = False, extra_body: dict | None = None,
                   seed: int = 0, timeout: float = 6 * 3600, progress: bool = False) -> tuple[list[RequestResult], float, int]:
    """Send every request on its arrival schedule; returns (results in order, duration s, peak concurrency)."""
    import aiohttp

    url = base_url.rstrip("/") + BACKENDS[backend]
    headers = _headers(api_key)
    offsets = arrival_times(len(requests), rate, burstiness, seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    active = peak = 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(requests), desc=f"rate {rate:g}", unit="req", file=sys.stderr)

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        t0 = time.perf_counter()

        async def one(req: ServeRequest) -> RequestResult:
            nonlocal active, peak
            payload = build_payload(backend, model, req, temperature, ignore_eos, extra_body)
            if sem is not None:
                await sem.acquire()
            active += 1
            peak = max(peak, active)
            try:
                return await send_request(session, url, backend, payload, headers, req, t0, timeout)
            finally:
                active -= 1
                if sem is not None:
                    sem.release()
                if bar is not None:
                    bar.update(1)

        tasks = []
        for req, at in zip(requests, offsets):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return list(results), duration, peak


# ---------------- metrics ----------------
def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 0.5, "tpot": 0.05} (seconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        for part in item.replace(",", " ").split():
            name, sep, value = part.partition(":")
            if not sep or name not in SLO_METRICS:
                raise ValueError(f"--goodput takes NAME:MS with NAME one of {', '.join(SLO_METRICS)}; got {part!r}")
            try:
                ms = float(value)
            except ValueError:
                raise ValueError(f"--goodput {name}: {value!r} is not a number of milliseconds") from None
            if ms <= 0:
                raise ValueError(f"--goodput {name}: must be > 0 ms, got {value}")
            slos[name] = ms / 1000.0
    return slos


def _stats(name: str, values_s: list[float], percentiles: list[float]) -> dict:
    arr = np.asarray(values_s, dtype=float) * 1000.0
    out = {}
    if arr.size == 0:
        out.update({f"mean_{name}_ms": None, f"median_{name}_ms": None, f"std_{name}_ms": None})
        out.update({f"p{_pct(p)}_{name}_ms": None for p in percentiles})
        return out
    out[f"mean_{name}_ms"] = float(arr.mean())
    out[f"median_{name}_ms"] = float(np.median(arr))
    out[f"std_{name}_ms"] = float(arr.std())
    for p in percentiles:
        out[f"p{_pct(p)}_{name}_ms"] = float(np.percentile(arr, p))
    return out


def _pct(p: float) -> str:
    return f"{p:g}"


def compute_metrics(results: list[RequestResult], duration: float, slos: dict[str, float] | None = None,
                    percentiles: list[float] | None = None) -> dict:
    percentiles = percentiles or [99.0]
    ok = [r for r in results if r.success]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    itls = [x for r in ok for x in r.itl]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    m = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
        "usage_reported": all(r.usage_reported for r in ok) if ok else False,
    }
    for name, values in (("ttft", [r.ttft for r in ok]), ("tpot", tpots), ("itl", itls),
                         ("e2el", [r.latency for r in ok])):
        m.update(_stats(name, values, percentiles))
    if slos:
        good = 0
        for r in ok:
            vals = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
            if all(vals[k] <= v for k, v in slos.items()):
                good += 1
        m["goodput_slos_ms"] = {k: v * 1000.0 for k, v in slos.items()}
        m["good_requests"] = good
        m["request_goodput"] = good / duration if duration > 0 else 0.0
    else:
        m["request_goodput"] = None
    return m


def format_report(res: dict, percentiles: list[float]) -> str:
    w = 50
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="=")]

    def row(label, value, fmt="{:<40} {:<10}"):
        lines.append(fmt.format(label, value))

    def num(v, digits=2):
        return "n/a" if v is None else f"{v:.{digits}f}"

    row("Backend:", res["backend"])
    row("Request rate (req/s):", "inf" if math.isinf(res["request_rate"]) else f"{res['request_rate']:g}")
    row("Burstiness:", f"{res['burstiness']:g}")
    row("Max concurrency:", res["max_concurrency"] or "none")
    row("Successful requests:", res["completed"])
    row("Failed requests:", res["failed"])
    row("Benchmark duration (s):", num(res["duration"]))
    row("Total input tokens:", res["total_input_tokens"])
    row("Total generated tokens:", res["total_output_tokens"])
    row("Request throughput (req/s):", num(res["request_throughput"]))
    if res.get("request_goodput") is not None:
        row("Request goodput (req/s):", num(res["request_goodput"]))
    row("Output token throughput (tok/s):", num(res["output_throughput"]))
    row("Total token throughput (tok/s):", num(res["total_token_throughput"]))
    row("Peak concurrent requests:", res["peak_concurrency"])
    if not res["usage_reported"]:
        lines.append("(the server reported no usage: output tokens counted as text chunks)")
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append("{s:{c}^{n}}".format(s=f" {title} ", n=w, c="-"))
        row(f"Mean {name.upper()} (ms):", num(res[f"mean_{name}_ms"]))
        row(f"Median {name.upper()} (ms):", num(res[f"median_{name}_ms"]))
        row(f"Std {name.upper()} (ms):", num(res[f"std_{name}_ms"]))
        for p in percentiles:
            row(f"P{_pct(p)} {name.upper()} (ms):", num(res[f"p{_pct(p)}_{name}_ms"]))
    lines.append("=" * w)
    if res.get("errors"):
        lines.append(f"first error: {res['errors'][0]}")
    return "\n".join(lines)


def format_sweep(runs: list[dict]) -> str:
    cols = [("rate", 7), ("done", 5), ("fail", 5), ("req/s", 7), ("out tok/s", 10), ("TTFT p50", 9),
            ("TTFT p99", 9), ("TPOT p50", 9), ("TPOT p99", 9), ("E2E p50", 9), ("goodput", 8)]
    head = " ".join(f"{c:>{w}}" for c, w in cols)
    lines = [head, "-" * len(head)]

    def ms(v):
        return "n/a" if v is None else f"{v:.0f}"

    for r in runs:
        rate = "inf" if math.isinf(r["request_rate"]) else f"{r['request_rate']:g}"
        vals = [rate, r["completed"], r["failed"], f"{r['request_throughput']:.2f}", f"{r['output_throughput']:.1f}",
                ms(r["median_ttft_ms"]), ms(r.get("p99_ttft_ms")), ms(r["median_tpot_ms"]), ms(r.get("p99_tpot_ms")),
                ms(r["median_e2el_ms"]),
                "n/a" if r.get("request_goodput") is None else f"{r['request_goodput']:.2f}"]
        lines.append(" ".join(f"{str(v):>{w}}" for v, (_, w) in zip(vals, cols)))
    lines.append("(latencies in ms; rates in requests/s)")
    return "\n".join(lines)


# ---------------- setup ----------------
def _api_base(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


async def _served_model(base: str, api_key: str | None) -> str:
    import aiohttp

    async with aiohttp.ClientSession(trust_env=False) as s:
        async with s.get(base + "/v1/models", headers=_headers(api_key),
                         timeout=aiohttp.ClientTimeout(total=30)) as resp:
            if resp.status != 200:
                raise RuntimeError(f"GET {base}/v1/models: HTTP {resp.status}: {(await resp.text())[:200]}")
            data = await resp.json(content_type=None)
    models = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
    if not models:
        raise RuntimeError(f"{base}/v1/models lists no model; pass --model")
    return models[0]


def load_tokenizer(name: str):
    """kvflow's loader for bundled names, .gguf files and local folders; else transformers (hub id)."""
    try:
        from kvflow.bench.hf_backend import load_tokenizer as kv_load
        return kv_load(name)
    except Exception as e:  # noqa: BLE001 - fall back to transformers below
        logger.debug("kvflow cannot load tokenizer %r (%s); trying transformers", name, e)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(name)


def make_requests(args: argparse.Namespace, tokenizer) -> list[ServeRequest]:
    from kvflow.bench import datasets

    if args.dataset == "random":
        lo = max(1, int(args.random_input_len * (1 - args.random_range_ratio)))
        hi = max(lo, int(args.random_input_len * (1 + args.random_range_ratio)))
        olo = max(1, int(args.random_output_len * (1 - args.random_range_ratio)))
        ohi = max(olo, int(args.random_output_len * (1 + args.random_range_ratio)))
        rng = random.Random(args.seed)
        out = []
        for i in range(args.num_prompts):
            ilen, olen = rng.randint(lo, hi), rng.randint(olo, ohi)
            br = datasets.sample_random(tokenizer, len(tokenizer), 1, ilen, olen, seed=args.seed * 100003 + i)[0]
            text = tokenizer.decode(br.prompt_token_ids, skip_special_tokens=True)
            out.append(ServeRequest(text, br.prompt_len, br.output_len))
        return out
    path = args.dataset_path
    reqs = datasets.sample_sharegpt(tokenizer, args.num_prompts, seed=args.seed, path=path,
                                    output_len=args.sharegpt_output_len)
    return [ServeRequest(r.prompt if r.prompt is not None else tokenizer.decode(r.prompt_token_ids),
                         r.prompt_len, r.output_len) for r in reqs]


def _parse_rate(text: str) -> float:
    t = text.strip().lower()
    if t in ("inf", "infinity"):
        return math.inf
    rate = float(t)
    if not rate > 0:
        raise ValueError(f"request rates must be > 0 or inf, got {text!r}")
    return rate


async def _check_server(base: str, backend: str, model: str, args) -> None:
    """One short request before anything else: fails fast on a wrong URL, key or model (and warms
    the server up; it is not measured)."""
    req = ServeRequest("Hello, my name is", 5, 2)
    results, _, _ = await run_load(base, backend, model, [req], math.inf,
                                   api_key=args.api_key, temperature=args.temperature, ignore_eos=True,
                                   extra_body=args.extra_body, timeout=args.timeout)
    if not results[0].success:
        raise RuntimeError(f"the test request failed: {results[0].error}")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        slos = parse_goodput(args.goodput)
        rates = [_parse_rate(r) for r in args.sweep_rates.split(",") if r.strip()] if args.sweep_rates else \
            [_parse_rate(str(args.request_rate))]
        percentiles = sorted({float(p) for p in str(args.metric_percentiles).split(",") if p.strip()})
        if any(not 0 < p <= 100 for p in percentiles):
            raise ValueError(f"--metric-percentiles must be in (0, 100], got {args.metric_percentiles}")
        if args.num_prompts < 1:
            raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
        if args.burstiness <= 0:
            raise ValueError(f"--burstiness must be > 0, got {args.burstiness}")
        if args.max_concurrency is not None and args.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
        if isinstance(args.extra_body, str):
            args.extra_body = json.loads(args.extra_body)
            if not isinstance(args.extra_body, dict):
                raise ValueError("--extra-body must be a JSON object")
    except (ValueError, json.JSONDecodeError) as e:
        print(f"kvflow bench serve: error: {e}", file=sys.stderr)
        return 2
    base = _api_base(args.base_url)
    try:
        model = args.model or asyncio.run(_served_model(base, args.api_key))
        if not args.skip_check:
            asyncio.run(_check_server(base, args.backend, model, args))
        tok_name = args.tokenizer or model
        try:
            tokenizer = load_tokenizer(tok_name)
        except Exception as e:  # noqa: BLE001
            if args.tokenizer:
                raise
            logger.warning("cannot load a tokenizer named %r (%s); using smollm2-135m's", tok_name, e)
            tok_name = "smollm2-135m"
            tokenizer = load_tokenizer(tok_name)
        requests = make_requests(args, tokenizer)
    except Exception as e:  # noqa: BLE001 - a one-line error for the command line
        print(f"kvflow bench serve: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1

    runs = []
    for rate in rates:
        results, duration, peak = asyncio.run(run_load(
            base, args.backend, model, requests, rate, args.burstiness, args.max_concurrency, args.api_key,
            args.temperature, args.ignore_eos, args.extra_body, args.seed, args.timeout,
            progress=not args.disable_tqdm))
        res = {"backend": args.backend, "base_url": args.base_url, "model": model, "tokenizer": tok_name,
               "dataset": args.dataset, "num_prompts": len(requests), "request_rate": rate,
               "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
               "peak_concurrency": peak, "percentiles": percentiles,
               **compute_metrics(results, duration, slos, percentiles)}
        res.update({
            "input_lens": [r.prompt_len for r in results], "output_lens": [r.output_tokens for r in results],
            "ttfts": [r.ttft if r.success else None for r in results],
            "e2els": [r.latency if r.success else None for r in results],
            "tpots": [r.tpot for r in results], "itls": [r.itl for r in results],
            "start_times": [r.start_time for r in results],
            "errors": [r.error for r in results if r.error],
        })
        if args.save_text:
            res["generated_texts"] = [r.text for r in results]
        runs.append(res)
        print(format_report(res, percentiles))
    if len(runs) > 1:
        print(format_sweep(runs))
    if args.json:
        doc = runs[0] if len(runs) == 1 else {"sweep": [r["request_rate"] for r in runs], "runs": runs}
        _write_json(doc, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        from kvflow.bench.plots import plot_serving
        plot_serving(runs, args.plot)
        print(f"wrote {args.plot}")
    return 0 if all(r["completed"] > 0 for r in runs) else 1


def _jsonable(obj):
    if isinstance(obj, float) and (math.isinf(obj) or math.isnan(obj)):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else None)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _write_json(doc: dict, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(doc), f, indent=1)


# ---------------- command line ----------------
def _add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    g.add_argument("--backend", choices=sorted(BACKENDS), default="openai-completions")
    g.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer key (default $OPENAI_API_KEY)")
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", choices=["sharegpt", "random"], default="sharegpt")
    g.add_argument("--dataset-path", default=None, help="a ShareGPT-format JSON file (default: the bundled one)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer for prompt lengths (default: the model's if kvflow can resolve it, else smollm2-135m)")
    g.add_argument("--num-prompts", type=int, default=100)
    g.add_argument("--random-input-len", type=int, default=128)
    g.add_argument("--random-output-len", type=int, default=64)
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random lengths uniform in len*(1-r) .. len*(1+r)")
    g.add_argument("--sharegpt-output-len", type=int, default=None, help="fix every ShareGPT output length")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--ignore-eos", action="store_true", help="generate exactly the requested output lengths")
    g.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", default="inf", help="requests per second (Poisson arrivals), or inf: all at once")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of inter-arrival times: 1 = Poisson, < 1 burstier, > 1 more regular")
    g.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    g.add_argument("--sweep-rates", default=None, help="comma-separated rates (e.g. 1,2,4,inf): one run each, one table")
    g.add_argument("--timeout", type=float, default=6 * 3600, help="per-request timeout, seconds")
    g.add_argument("--skip-check", action="store_true", help="skip the short test request sent before measuring")
    g = p.add_argument_group("output")
    g.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 (names: ttft, tpot, e2el)")
    g.add_argument("--metric-percentiles", default="99", help="comma-separated percentiles to report (default 99)")
    g.add_argument("--json", default=None, help="write every metric and per-request data to this file")
    g.add_argument("--plot", default=None, help="draw latency CDFs (and throughput vs rate for a sweep) to this image")
    g.add_argument("--save-text", action="store_true", help="keep the generated texts in the JSON")
    g.add_argument("--disable-tqdm", action="store_true")


def add_bench_serve_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Add `serve` under `kvflow bench` (cli.py wires this in)."""
    p = bench_subparsers.add_parser("serve", help="online serving benchmark against an OpenAI-compatible server",
                                    description=__doc__.split("\n\n")[0])
    _add_args(p)
    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvflow.bench.serve", description=__doc__.split("\n\n")[0])
    _add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
