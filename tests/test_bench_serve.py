"""`kvflow bench serve`: the arrival process and the metric arithmetic on their own, then the whole
client against our own server (small N), checking the JSON it writes for completeness and
plausibility and its token counts against the server's own counters."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from kvflow.bench import serve as bench
from kvflow.entrypoints.args import engine_config
from test_server import MODEL, ServerProcess

KEY = "bench-key"


# ---------------- no server needed ----------------
def test_arrivals_poisson_gamma_and_inf():
    assert bench.arrival_times(5, math.inf, 1.0, 0) == [0.0] * 5
    t = np.array(bench.arrival_times(4001, 10.0, 1.0, seed=1))
    gaps = np.diff(t)
    assert np.all(gaps >= 0) and t[0] == 0.0
    assert gaps.mean() == pytest.approx(0.1, rel=0.08)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)  # exponential: CV 1
    bursty = np.diff(bench.arrival_times(4001, 10.0, 0.25, seed=1))
    assert bursty.mean() == pytest.approx(0.1, rel=0.15)  # same rate...
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.15)  # ...burstier: CV 1/sqrt(shape)
    assert bench.arrival_times(10, 3.0, 1.0, seed=7) == bench.arrival_times(10, 3.0, 1.0, seed=7)


def _result(ttft, latency, tokens, itl=None, prompt=10):
    return bench.RequestResult(success=True, prompt_len=prompt, output_tokens=tokens, ttft=ttft,
                               latency=latency, itl=itl or [], usage_reported=True)


def test_metrics_arithmetic_and_goodput():
    results = [_result(0.1, 1.1, 11, [0.1] * 10), _result(0.3, 0.3, 1), _result(0.2, 2.2, 5, [0.5] * 4),
               bench.RequestResult(success=False, error="HTTP 503")]
    assert results[0].tpot == pytest.approx(0.1) and results[1].tpot is None
    assert results[2].tpot == pytest.approx(0.5)
    m = bench.compute_metrics(results, duration=2.0, slos={"ttft": 0.25, "tpot": 0.2}, percentiles=[50, 99])
    assert (m["completed"], m["failed"]) == (3, 1)
    assert m["total_input_tokens"] == 30 and m["total_output_tokens"] == 17
    assert m["request_throughput"] == pytest.approx(1.5) and m["output_throughput"] == pytest.approx(8.5)
    assert m["total_token_throughput"] == pytest.approx(23.5)
    assert m["mean_ttft_ms"] == pytest.approx(200) and m["median_ttft_ms"] == pytest.approx(200)
    assert m["mean_tpot_ms"] == pytest.approx(300)  # only requests with 2+ tokens have a TPOT
    assert m["mean_itl_ms"] == pytest.approx((10 * 100 + 4 * 500) / 14)
    assert m["mean_e2el_ms"] == pytest.approx(1200)
    assert m["p99_e2el_ms"] <= 2200 and m["p50_e2el_ms"] == pytest.approx(1100)
    # Request 0 meets both SLOs; request 1 (one token: no TPOT) meets TPOT but not TTFT; request 2 neither.
    assert m["good_requests"] == 1 and m["request_goodput"] == pytest.approx(0.5)
    assert bench.compute_metrics(results, 2.0)["request_goodput"] is None
    assert bench.parse_goodput(["ttft:500", "tpot:50,e2el:2000"]) == {"ttft": 0.5, "tpot": 0.05, "e2el": 2.0}
    for bad in (["ttft"], ["foo:1"], ["ttft:x"], ["tpot:-1"]):
        with pytest.raises(ValueError):
            bench.parse_goodput(bad)
    text = bench.format_report({**m, "backend": "openai-completions", "request_rate": math.inf, "burstiness": 1.0,
                                "max_concurrency": None, "peak_concurrency": 3}, [50, 99])
    for label in ("Request throughput", "Request goodput", "Output token throughput", "Mean TTFT", "P99 TPOT",
                  "Median ITL", "Mean E2EL"):
        assert label in text


def test_parsers_wire_into_a_cli():
    from kvflow.entrypoints.openai import server as srv

    top = argparse.ArgumentParser(prog="kvflow")
    sub = top.add_subparsers(dest="command")
    srv.add_cli(sub)
    bench_p = sub.add_parser("bench").add_subparsers(dest="bench_command")
    bench.add_bench_serve_parser(bench_p)
    a = top.parse_args(["serve", "--port", "9", "--api-key", "k", "--max-queue-len", "3", "--max-num-seqs", "4",
                        "--no-enable-prefix-caching", "--kv-cache-memory-gb", "0.5"])
    assert a.func is srv.run_server and a.port == 9 and a.max_queue_len == 3
    cfg = engine_config(a)
    assert cfg.scheduler.max_num_seqs == 4 and cfg.cache.enable_prefix_caching is False
    assert cfg.cache.kv_cache_memory_gb == 0.5
    b = top.parse_args(["bench", "serve", "--base-url", "http://127.0.0.1:1", "--dataset", "random",
                        "--num-prompts", "3", "--request-rate", "inf", "--goodput", "ttft:5", "tpot:1"])
    assert b.func is bench.run and b.goodput == ["ttft:5", "tpot:1"]


# ---------------- against our server ----------------
@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(api_key=KEY)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.close()


def _run(capsys, *argv) -> tuple[int, str]:
    rc = bench.main([*argv, "--disable-tqdm"])
    out = capsys.readouterr()
    return rc, out.out + out.err


def _check_run(r: dict, n: int, output_len: int | None):
    assert r["completed"] == n and r["failed"] == 0 and not r["errors"]
    assert r["usage_reported"] is True
    assert len(r["ttfts"]) == len(r["e2els"]) == len(r["input_lens"]) == len(r["output_lens"]) == n
    for ttft, e2el, tpot, itl, out in zip(r["ttfts"], r["e2els"], r["tpots"], r["itls"], r["output_lens"]):
        assert 0 < ttft <= e2el
        if output_len is not None:
            assert out == output_len
        assert len(itl) <= out - 1
        assert all(x >= 0 for x in itl)
        if out > 1:
            assert tpot == pytest.approx((e2el - ttft) / (out - 1))
    assert r["total_output_tokens"] == sum(r["output_lens"])
    assert r["total_input_tokens"] == sum(r["input_lens"]) > 0
    assert r["request_throughput"] == pytest.approx(n / r["duration"])
    assert r["output_throughput"] == pytest.approx(r["total_output_tokens"] / r["duration"])
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p99"):
            assert r[f"{stat}_{name}_ms"] is not None and r[f"{stat}_{name}_ms"] >= 0, (stat, name)
        assert r[f"median_{name}_ms"] <= r[f"p99_{name}_ms"] + 1e-9
    assert r["mean_ttft_ms"] <= r["mean_e2el_ms"]
    assert max(r["start_times"]) <= r["duration"]


def test_bench_serve_sweep_completions_random(server, tmp_path, capsys):
    before = server.metrics()
    out_json, out_png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    rc, text = _run(capsys, "--base-url", server.url, "--api-key", KEY, "--backend", "openai-completions",
                    "--dataset", "random", "--num-prompts", "6", "--random-input-len", "24",
                    "--random-output-len", "6", "--ignore-eos", "--sweep-rates", "8,inf", "--max-concurrency", "4",
                    "--goodput", "ttft:600000", "tpot:600000", "--json", str(out_json), "--plot", str(out_png))
    assert rc == 0, text
    assert "Serving Benchmark Result" in text and "TTFT p50" in text  # one report per rate, then the table
    doc = json.loads(out_json.read_text())
    assert doc["sweep"] == [8.0, "inf"] and len(doc["runs"]) == 2
    for run in doc["runs"]:
        _check_run(run, 6, 6)
        assert run["peak_concurrency"] <= 4
        assert run["good_requests"] == 6 and run["request_goodput"] == pytest.approx(run["request_throughput"])
    assert out_png.stat().st_size > 10_000 and out_png.read_bytes()[:4] == b"\x89PNG"
    # The client's token counts are the server's: 2 x 6 requests x 6 tokens, plus the 2-token check request.
    m = server.wait_idle()
    assert m["kvflow:generation_tokens_total"] - before["kvflow:generation_tokens_total"] == 2 * 36 + 2
    assert m["kvflow:kv_cache_used_blocks"] == 0


def test_bench_serve_chat_sharegpt_goodput_zero(server, tmp_path, capsys):
    out_json = tmp_path / "chat.json"
    rc, text = _run(capsys, "--base-url", server.url + "/v1", "--api-key", KEY, "--backend", "openai-chat",
                    "--dataset", "sharegpt", "--num-prompts", "3", "--sharegpt-output-len", "5", "--ignore-eos",
                    "--request-rate", "20", "--goodput", "ttft:0.001", "--json", str(out_json))
    assert rc == 0, text
    r = json.loads(out_json.read_text())
    _check_run(r, 3, 5)
    assert r["model"] == MODEL and r["backend"] == "openai-chat" and r["request_rate"] == 20
    assert r["good_requests"] == 0 and r["request_goodput"] == 0.0
    assert all(p > 10 for p in r["input_lens"])  # chat template plus a real ShareGPT question


def test_bench_serve_reports_a_bad_server(server, capsys):
    rc, text = _run(capsys, "--base-url", server.url, "--api-key", "wrong", "--dataset", "random",
                    "--num-prompts", "2", "--random-input-len", "8", "--random-output-len", "2", "--model", MODEL)
    assert rc == 1 and "401" in text
