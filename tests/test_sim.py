"""The cluster simulator: completes work, conserves KV blocks, and shows the policies' effects
(deterministic with a seed, so directions can be asserted)."""
import json

import pytest

from kvflow.entrypoints.cli import main
from kvflow.sim.cluster import ClusterConfig, simulate, summarize
from kvflow.sim.instance import InstanceConfig
from kvflow.sim.serving_fit import dispatch_delays, effective_steps, fit_serving
from kvflow.sim.step_model import StepTimeModel, fit
from kvflow.sim.workload import SimRequest, WorkloadSpec, chained_hashes, load_trace, synthetic

MODEL = StepTimeModel(a=0.01, b=1e-4, c=2e-4, d=1e-7)


def small(**kw) -> ClusterConfig:
    instance = kw.pop("instance", InstanceConfig(num_blocks=256, block_size=16, max_num_batched_tokens=256,
                                                 max_num_seqs=16))
    return ClusterConfig(instance=instance, max_model_len=2048, **kw)


def assert_pools_full(result):
    for inst in result.instances:
        assert inst.free_blocks == inst.cfg.num_blocks, inst.id
        assert len(inst.free_cached) <= inst.free_blocks
        assert not inst.decoding and not inst.prefilling and not inst.waiting
        assert inst.held_for_transfer == 0 and inst.reserved_for_migration == 0


@pytest.mark.parametrize("kw", [dict(dispatch="round-robin"), dict(dispatch="least-load", migration=True),
                                dict(dispatch="prefix-affinity"), dict(prefill_instances=1, decode_instances=2)])
def test_cluster_finishes_every_request_and_frees_every_block(kw):
    # overloaded on purpose: tight pools force preemptions (and migrations where on)
    requests = synthetic(WorkloadSpec(num_requests=300, request_rate=40, input_len=200, output_len=100, seed=3))
    result = simulate(small(num_instances=3, **kw), MODEL, requests)
    m = summarize(result, {"ttft": 1.0})
    assert m["completed"] == 300 and m["failed"] == 0
    assert_pools_full(result)
    for r in result.requests:
        assert r.generated == r.output_len and r.finish_time >= r.first_token_time > r.arrival
    if "prefill_instances" in kw:
        assert m["mean_kv_transfer_ms"] > 0
    assert m["p99_ttft_ms"] >= m["p50_ttft_ms"] > 0 and m["request_goodput"] is not None


def test_too_long_request_fails_alone():
    requests = [SimRequest(0, 0.0, (("a", 10),), 10, 5), SimRequest(1, 0.0, (("b", 4000),), 4000, 5)]
    m = summarize(simulate(small(num_instances=1), MODEL, requests))
    assert (m["completed"], m["failed"]) == (1, 1)


def test_prefix_affinity_hits_more_than_round_robin_on_sessions():
    spec = WorkloadSpec(num_requests=400, request_rate=4, input_len=64, input_cv=0.5, output_len=32,
                        output_cv=0.5, turns=4, think_time=1.0, seed=1)
    rates = {}
    for policy in ("round-robin", "prefix-affinity"):
        m = summarize(simulate(small(num_instances=4, dispatch=policy), MODEL, synthetic(spec)))
        rates[policy] = m["prefix_hit_rate"]
    assert rates["prefix-affinity"] > rates["round-robin"] + 0.2, rates


def skewed_burst() -> list[SimRequest]:
    reqs = []
    for i in range(60):
        long = i % 2 == 0 and i < 16  # round-robin sends every long request to the first instance
        n = 480 if long else 32
        reqs.append(SimRequest(i, i * 0.05, ((("p", i), n),), n, 400 if long else 16))
    return reqs


def test_migration_cuts_tail_ttft_under_a_skewed_burst():
    p99 = {}
    for migration in (False, True):
        cfg = small(num_instances=2, dispatch="round-robin", migration=migration,
                    instance=InstanceConfig(num_blocks=200, block_size=16))
        result = simulate(cfg, MODEL, skewed_burst())
        m = summarize(result)
        assert m["completed"] == 60
        assert_pools_full(result)
        p99[migration] = m["p99_ttft_ms"]
        if migration:
            assert m["migrations"] > 0 and m["migrations_by_reason"]["balance"] == m["migrations"]
            assert 0 < m["mean_migration_downtime_ms"] < 50
            assert any(r.num_migrations for r in result.requests)
    assert p99[True] < 0.8 * p99[False], p99


def test_scale_to_zero_then_cold_start():
    requests = [SimRequest(0, 0.0, (("a", 64),), 64, 8), SimRequest(1, 100.0, (("b", 64),), 64, 8)]
    cfg = small(num_instances=0, autoscale=True, min_instances=0, max_instances=2, idle_timeout_s=5.0,
                cold_start_s=2.0)
    result = simulate(cfg, MODEL, requests)
    m = summarize(result)
    assert m["completed"] == 2
    for r in result.requests:  # both found no instance: each waited for a cold start
        assert 2.0 <= r.first_token_time - r.arrival < 2.5
    assert m["num_instances_used"] == 2  # the first scaled to zero in between
    assert m["instance_seconds"] < 20
    assert_pools_full(result)


def test_chained_hashes_see_shared_prefixes_only():
    a = chained_hashes(((1, 40), (2, 30)), 16, 70)
    b = chained_hashes(((1, 40), (3, 30)), 16, 70)
    assert len(a) == 4 and a[:2] == b[:2] and a[2] != b[2]  # block 2 mixes segment 1's tail with 2 vs 3
    assert chained_hashes(((1, 40), (2, 30)), 16, 70, start_block=2, parent=a[1]) == a[2:]


def test_fit_recovers_a_known_model():
    truth = StepTimeModel(a=0.02, b=3e-4, c=5e-4, d=2e-6)
    samples = [{"prefill_tokens": p, "decode_rows": r, "context_tokens": c,
                "seconds": truth.step_time(p, r, c)}
               for p in (0, 64, 256) for r in (0, 4, 16) for c in (100, 1000, 5000) if p or r]
    got = fit(samples)
    assert got.step_time(128, 8, 3000) == pytest.approx(truth.step_time(128, 8, 3000), rel=1e-6)
    assert StepTimeModel.load().a > 0  # the shipped fit loads


def test_serving_fit_recovers_step_cost_and_front_end_delays(tmp_path):
    """Steps logged back to back (a 3 ms gap between them the engine's step timer does not see),
    then an idle spell; requests reach the engine 4 ms after they are sent (one while its instance
    was stepping: not a clean sample), tokens the client 6 ms after their step."""
    truth = StepTimeModel(a=0.02, b=3e-4, c=5e-4, d=2e-6)
    gap = 0.003
    steps, t = [], 100.0
    shapes = [(p, r, c) for p in (0, 64, 256) for r in (0, 4, 16) for c in (100, 1000, 5000) if p or r]
    for i, (p, r, c) in enumerate(shapes):
        busy = i % 5 != 4  # every fifth step leaves the engine idle for a while
        dur = truth.step_time(p, r, c) - gap  # what the step's own timer sees
        steps.append({"prefill_tokens": p, "decode_rows": r, "context_tokens": c, "start": t, "end": t + dur,
                      "busy_after": busy, "instance": "i0"})
        t += dur + (gap if busy else 1.0)
    samples = effective_steps(steps)
    idle_ones = [s for s, st in zip(samples, steps) if not st["busy_after"]]
    assert all(s["seconds"] == pytest.approx(truth.step_time(s["prefill_tokens"], s["decode_rows"],
                                                             s["context_tokens"]) - gap) for s in idle_ones)
    idle_end = steps[4]["end"]  # the engine is idle from here for 1 s
    requests = [{"instance": "i0", "sent": idle_end + 0.1 + k * 0.01, "added": idle_end + 0.104 + k * 0.01,
                 "first_step_end": idle_end + 0.2, "first_seen": idle_end + 0.206} for k in range(3)]
    requests.append({"instance": "i0", "sent": steps[0]["start"], "added": steps[1]["start"],  # waited for a step
                     "first_step_end": steps[2]["end"], "first_seen": steps[2]["end"] + 0.006})
    assert dispatch_delays(steps, requests) == pytest.approx([0.004] * 3)
    model = fit_serving(steps, requests)
    assert model.dispatch_delay == pytest.approx(0.004) and model.output_delay == pytest.approx(0.006)
    assert model.step_time(128, 8, 3000) == pytest.approx(truth.step_time(128, 8, 3000), rel=0.05)
    model.save(tmp_path / "fit.json")
    again = StepTimeModel.load(tmp_path / "fit.json")
    assert (again.dispatch_delay, again.output_delay) == (model.dispatch_delay, model.output_delay)


def test_front_end_delays_shift_the_simulated_latencies():
    reqs = lambda: [SimRequest(i, 0.5 * i, ((("p", i), 40),), 40, 8) for i in range(4)]  # noqa: E731
    base = simulate(small(num_instances=1), MODEL, reqs()).requests
    delayed = simulate(small(num_instances=1), StepTimeModel(a=0.01, b=1e-4, c=2e-4, d=1e-7, dispatch_delay=0.004,
                                                               output_delay=0.006), reqs()).requests
    for a, b in zip(sorted(base, key=lambda r: r.request_id), sorted(delayed, key=lambda r: r.request_id)):
        assert b.first_token_time - b.arrival == pytest.approx(a.first_token_time - a.arrival + 0.010)
        assert b.finish_time - b.first_token_time == pytest.approx(a.finish_time - a.first_token_time)


def test_stale_loads_send_a_burst_where_the_real_front_end_would():
    """Four requests sent at once, least-load, 5 ms to reach an instance: with live loads they spread
    over both instances; with the loads as of each instance's last step plus the requests that have
    reached it (what the real front end knows), all four tie and go to one; one sent 10 ms later
    sees them counted in and goes to the other."""
    model = StepTimeModel(a=0.01, b=1e-4, c=2e-4, d=1e-7, dispatch_delay=0.005)

    def placed(stale: bool) -> list:
        reqs = [SimRequest(i, 0.0 if i < 4 else 0.01, ((("p", i), 40),), 40, 4) for i in range(5)]
        seen = {}
        import kvflow.sim.instance as si
        orig = si.SimInstance.add

        def add(self, req):
            seen[req.request_id] = self.id
            return orig(self, req)
        si.SimInstance.add = add
        try:
            simulate(small(num_instances=2, dispatch="least-load", stale_loads=stale), model, reqs)
        finally:
            si.SimInstance.add = orig
        return [seen[i] for i in range(5)]
    assert len(set(placed(False)[:4])) == 2
    stale = placed(True)
    assert len(set(stale[:4])) == 1 and stale[4] != stale[0]


def test_trace_follow_up_hits_the_previous_answer(tmp_path):
    """Turn 2's prompt is turn 1's prompt + its 24-token answer + new text: the simulator learns the
    answer from the trace and, like the engine, serves its full blocks from the prefix cache."""
    first = list(range(100, 150))  # 50 tokens: 3 full blocks, 2 tokens in the 4th
    answer = list(range(500, 524))
    second = first + answer + list(range(900, 930))
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps(x) for x in (
        {"arrival": 0.0, "prompt_token_ids": first, "output_len": 24},
        {"arrival": 5.0, "prompt_token_ids": second, "output_len": 8})) + "\n")
    reqs = load_trace(trace, 16)
    assert reqs[0].token_ids == tuple(first + answer)
    result = simulate(small(num_instances=1), MODEL, reqs)
    # the answer's last token never gets KV: 50 + 23 = 73 tokens, 4 full blocks cached
    assert sorted(r.hit_tokens for r in result.requests) == [0, 64]


def test_cli_run_replays_a_trace(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    lines = [{"arrival": 0.1 * i, "prompt_token_ids": list(range(40)) + [i], "output_len": 8} for i in range(10)]
    trace.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert len(load_trace(trace, 16)) == 10
    out = tmp_path / "m.json"
    assert main(["sim", "run", "--trace", str(trace), "--instances", "2", "--dispatch", "prefix-affinity",
                 "--json", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["completed"] == 10 and m["prefix_hit_rate"] > 0.5  # 2 of 3 blocks shared after the first
    assert "TTFT" in capsys.readouterr().out
    trace.write_text('{"arrival": 0}\n')
    assert main(["sim", "run", "--trace", str(trace)]) == 2
    assert "line 1" in capsys.readouterr().err


def test_cli_sweep_writes_a_plot(tmp_path):
    plot, data = tmp_path / "sweep.png", tmp_path / "sweep.json"
    assert main(["sim", "sweep", "--instances", "4", "--rates-per-instance", "0.5,1", "--requests-per-instance", "10",
                 "--workload", "sessions", "--plot", str(plot), "--json", str(data)]) == 0
    runs = json.loads(data.read_text())
    assert len(runs) == 2 * 5 and all(r["completed"] > 0 for r in runs)
    assert plot.stat().st_size > 10_000
