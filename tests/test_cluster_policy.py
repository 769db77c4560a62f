"""Cluster policies (pure Python): dispatch, migration planning, autoscaling."""
import math

import pytest

from kvflow.cluster.policy import (
    DISPATCH_POLICIES, AutoscalePolicy, InstanceLoad, LeastLoad, MigrationPolicy, NoInstanceError,
    PrefixAffinity, RequestLoad, RoundRobin, make_dispatch_policy, virtual_usage)


def load(iid, used=0, total=100, running=0, waiting=0, demand=0, high=0, draining=False, waiting_high=0):
    return InstanceLoad(iid, running, waiting, total - used, total, demand, high, draining, waiting_high)


def test_virtual_usage_counts_queue_headroom_and_draining():
    assert virtual_usage(load("a", used=30, demand=20)) == pytest.approx(0.5)
    assert virtual_usage(load("a", used=30, high=1), priority_headroom_blocks=10) == pytest.approx(0.4)
    assert virtual_usage(load("a", draining=True)) == math.inf


def test_round_robin_cycles_and_skips_draining():
    rr = RoundRobin()
    loads = [load("a"), load("b"), load("c")]
    assert [rr.choose([1], 0, loads) for _ in range(4)] == ["a", "b", "c", "a"]
    loads[1].draining = True
    assert {rr.choose([1], 0, loads) for _ in range(4)} == {"a", "c"}
    with pytest.raises(NoInstanceError):
        rr.choose([1], 0, [load("a", draining=True)])


def test_least_load_picks_lowest_virtual_usage():
    loads = [load("a", used=50), load("b", used=10, demand=60), load("c", used=30)]
    assert LeastLoad().choose([1], 0, loads) == "c"
    loads[2].draining = True
    assert LeastLoad().choose([1], 0, loads) == "a"


def test_prefix_affinity_follows_shared_prefix_and_falls_back_when_full():
    policy = PrefixAffinity(block_size=4, max_usage=0.9)
    loads = [load("a", used=50), load("b", used=10)]
    first = list(range(12))
    policy.on_dispatch("a", first)  # a holds the first prompt, though it is busier
    follow_up = first + [99, 98, 97, 96, 95]
    assert policy.choose(follow_up, 0, loads) == "a"
    assert policy.last_hit_blocks == 3
    assert policy.choose([7] * 12, 0, loads) == "b"  # no shared prefix: least load
    loads[0] = load("a", used=95)
    assert policy.choose(follow_up, 0, loads) == "b"  # over the bound: least load
    policy.on_instance_removed("a")
    assert policy.choose(follow_up, 0, [load("a"), load("b", used=5)]) == "a"  # no memory left: least load


def test_prefix_affinity_lru_is_bounded_by_pool_size():
    policy = PrefixAffinity(block_size=2, cache_blocks=3)
    policy.on_dispatch("a", [1, 2, 3, 4])
    policy.on_dispatch("a", [5, 6, 7, 8])  # evicts the first prompt's first block
    loads = [load("a", used=40), load("b")]
    assert policy.choose([1, 2, 3, 4], 0, loads) == "b"


def test_make_dispatch_policy_names():
    for name in DISPATCH_POLICIES:
        assert make_dispatch_policy(name).name == name
    with pytest.raises(ValueError, match="round-robin"):
        make_dispatch_policy("random")


def test_migration_balances_smallest_request_one_in_one_out():
    policy = MigrationPolicy(high_watermark=0.8, low_watermark=0.5)
    loads = [load("hot1", used=90), load("hot2", used=85), load("cold", used=10), load("mid", used=60)]
    running = [RequestLoad("r1", "hot1", 40), RequestLoad("r2", "hot1", 5), RequestLoad("r3", "hot2", 8)]
    plan = policy.plan(loads, running)
    # both hot instances want the only cold target; it takes one request, the smallest of hot1
    assert [(m.request_id, m.source, m.target, m.reason) for m in plan] == [("r2", "hot1", "cold", "balance")]


def test_migration_needs_free_blocks_on_target():
    loads = [load("hot", used=90), load("cold", used=10, total=15)]
    assert virtual_usage(loads[1]) < 0.8  # cold but tiny: 5 free blocks
    assert MigrationPolicy().plan(loads, [RequestLoad("r", "hot", 8)]) == []


def test_migration_drains_and_frees_room_for_priority():
    policy = MigrationPolicy()
    loads = [load("drain", used=20, draining=True), load("busy", used=70, waiting=1, demand=40,
                                                            high=1, waiting_high=1),
             load("t1", used=0), load("t2", used=5)]
    running = [RequestLoad("d1", "drain", 10), RequestLoad("d2", "drain", 3),
               RequestLoad("low_small", "busy", 10), RequestLoad("low_big", "busy", 50),
               RequestLoad("vip", "busy", 10, priority=1)]
    plan = policy.plan(loads, running)
    assert [(m.request_id, m.reason) for m in plan] == [("d2", "drain"), ("low_big", "priority")]
    assert {m.target for m in plan} == {"t1", "t2"}  # one into each


def test_autoscaler_scales_out_on_pressure_not_while_starting():
    policy = AutoscalePolicy(min_instances=1, max_instances=3)
    hot = [load("a", used=90), load("b", used=85)]
    assert policy.decide(hot, num_starting=0, now=0).add == 1
    assert policy.decide(hot, num_starting=1, now=0).add == 0
    queued = [load("a", used=10, waiting=10)]
    assert policy.decide(queued, 0, 0).add == 1
    full = [load(i, used=95) for i in "abc"]
    assert policy.decide(full, 0, 0).add == 0  # at max


def test_autoscaler_scales_in_after_idle_timeout():
    policy = AutoscalePolicy(min_instances=1, max_instances=4, idle_timeout_s=10)
    loads = [load("a", used=50), load("b", used=5, running=1)]
    assert policy.decide(loads, 0, now=0).remove == []
    assert policy.decide(loads, 0, now=5).remove == []
    assert policy.decide(loads, 0, now=10).remove == ["b"]
    # a busy spell resets the timer
    policy = AutoscalePolicy(min_instances=1, idle_timeout_s=10)
    policy.decide(loads, 0, now=0)
    policy.decide([load("a", used=50), load("b", used=50)], 0, now=5)
    assert policy.decide(loads, 0, now=12).remove == []
    assert policy.decide(loads, 0, now=21).remove == []
    assert policy.decide(loads, 0, now=22).remove == ["b"]  # quiet again since 12


def test_autoscaler_scales_to_zero_and_back():
    policy = AutoscalePolicy(min_instances=0, max_instances=2, idle_timeout_s=10)
    busy = [load("a", used=5, running=1)]
    policy.decide(busy, 0, now=0)
    assert policy.decide(busy, 0, now=20).remove == []  # the last instance still has work
    idle = [load("a")]
    assert policy.decide(idle, 0, now=20).remove == ["a"]  # quiet since 0, now empty
    assert policy.decide([], 0, now=31).add == 0  # nothing waits: stay at zero
    assert policy.decide([], 0, now=40, num_pending=1).add == 1  # a request waits: cold start
    assert policy.decide([], 1, now=41, num_pending=1).add == 0  # already starting


def test_autoscaler_keeps_min_instances():
    policy = AutoscalePolicy(min_instances=2, max_instances=4, idle_timeout_s=0)
    assert policy.decide([], 0, now=0).add == 2
    assert policy.decide([load("a"), load("b")], 0, now=1).remove == []
    with pytest.raises(ValueError):
        AutoscalePolicy(min_instances=3, max_instances=2)
