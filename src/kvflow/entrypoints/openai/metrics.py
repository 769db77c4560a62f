"""Prometheus metrics of the server (``GET /metrics``), named like vLLM's with a ``kvflow:`` prefix.

Latency histograms and finish-reason counters are fed by the AsyncEngine's observer callbacks (on
the engine thread; prometheus_client is thread-safe). Gauges and engine counters (running, waiting,
KV blocks, prefix cache, preemptions, token totals) are read from the engine's latest stats snapshot
at scrape time, so they cost nothing between scrapes.

A sequence is one completion: a request with n=2 finishes two sequences.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvflow.engine.async_engine import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)


class _EngineCollector:
    def __init__(self, stats: Callable[[], EngineStats], in_flight: Callable[[], int]):
        self._stats = stats
        self._in_flight = in_flight

    def collect(self):
        s = self._stats()
        gauges = [
            ("kvflow:num_requests_running", "Sequences in the running batch", s.num_running),
            ("kvflow:num_requests_waiting", "Sequences waiting to be scheduled (including preempted ones)", s.num_waiting),
            ("kvflow:num_requests_in_flight", "HTTP-level requests accepted and not yet finished", self._in_flight()),
            ("kvflow:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (cached-but-free blocks count as free)", s.kv_cache_usage),
            ("kvflow:kv_cache_used_blocks", "KV-cache blocks held by requests", s.num_used_blocks),
            ("kvflow:kv_cache_free_blocks", "KV-cache blocks free (including cached, evictable ones)", s.num_free_blocks),
            ("kvflow:kv_cache_total_blocks", "KV-cache blocks in the pool", s.num_blocks),
            ("kvflow:kv_cache_cached_blocks", "Blocks holding a prefix-cache entry (in use or free)", s.num_cached_blocks),
            ("kvflow:prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens looked up", s.prefix_cache_hit_rate),
            ("kvflow:spec_decode_acceptance_rate", "Accepted / drafted speculative tokens",
             s.spec_accepted_tokens / s.spec_draft_tokens if s.spec_draft_tokens else 0.0),
            ("kvflow:spec_decode_mean_k", "Mean speculation length chosen per proposal round", s.spec_mean_k),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = [
            ("kvflow:prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded; recomputation after preemption included)", s.prompt_tokens_total),
            ("kvflow:generation_tokens", "Tokens generated", s.generation_tokens_total),
            ("kvflow:num_preemptions", "Sequences preempted (their KV blocks freed, to be recomputed)", s.num_preemptions),
            ("kvflow:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", s.prefix_cache_queries),
            ("kvflow:prefix_cache_hits", "Prompt tokens served from the prefix cache", s.prefix_cache_hits),
            ("kvflow:engine_steps", "Engine steps (forward passes) run", s.num_steps),
            ("kvflow:spec_decode_draft_tokens", "Speculative tokens sent to verification", s.spec_draft_tokens),
            ("kvflow:spec_decode_accepted_tokens", "Speculative tokens accepted", s.spec_accepted_tokens),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


class _InstanceCollector:
    """A cluster's gauges per instance (label `instance`) and its migration / hand-over counters."""

    GAUGES = [("kvflow:instance_num_requests_running", "Sequences running, per instance", "num_running"),
              ("kvflow:instance_num_requests_waiting", "Sequences waiting, per instance", "num_waiting"),
              ("kvflow:instance_kv_cache_used_blocks", "KV-cache blocks held by requests, per instance", "num_used_blocks"),
              ("kvflow:instance_kv_cache_total_blocks", "KV-cache blocks in the pool, per instance", "num_blocks"),
              ("kvflow:instance_prefix_cache_hit_rate", "Prefix-cache hit rate, per instance", "prefix_cache_hit_rate"),
              ("kvflow:instance_generation_tokens", "Tokens generated, per instance", "generation_tokens_total")]

    def __init__(self, per_instance: Callable[[], dict[str, EngineStats]], counters: Callable[[], dict] | None):
        self._per_instance = per_instance
        self._counters = counters

    def collect(self):
        stats = self._per_instance()
        for name, doc, attr in self.GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["instance"])
            for iid, s in sorted(stats.items()):
                family.add_metric([iid], getattr(s, attr))
            yield family
        for key, value in (self._counters() if self._counters else {}).items():
            yield GaugeMetricFamily(f"kvflow:cluster_{key}", f"Cluster: {key.replace('_', ' ')}", value=value)


class ServerMetrics:
    """The server's registry; also the AsyncEngine's observer (first_token, inter_token, sequence_finished).
    Behind a cluster (kvflow.cluster), `per_instance` adds each instance's gauges; the unlabelled ones
    are the cluster's totals."""

    def __init__(self, stats: Callable[[], EngineStats], in_flight: Callable[[], int],
                 per_instance: Callable[[], dict[str, EngineStats]] | None = None,
                 cluster_counters: Callable[[], dict] | None = None):
        disable_created_metrics()  # no *_created series: they only double the scrape
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_success = Counter("kvflow:request_success", "Finished sequences by finish reason",
                                       ["finished_reason"], registry=r)
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(finished_reason=reason)
        self.requests_rejected = Counter("kvflow:requests_rejected", "Requests refused before running, by reason",
                                         ["reason"], registry=r)
        for reason in ("invalid", "queue_full", "unauthorized", "model_not_found"):
            self.requests_rejected.labels(reason=reason)
        self.ttft = Histogram("kvflow:time_to_first_token_seconds", "Time to first token (arrival to first sampled token)",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("kvflow:inter_token_latency_seconds", "Time between consecutive tokens of a sequence",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("kvflow:e2e_request_latency_seconds", "Arrival to finish, per sequence",
                             buckets=_E2E_BUCKETS, registry=r)
        r.register(_EngineCollector(stats, in_flight))
        if per_instance is not None:
            r.register(_InstanceCollector(per_instance, cluster_counters))

    # EngineObserver
    def first_token(self, ttft: float) -> None:
        self.ttft.observe(ttft)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def sequence_finished(self, finish_reason: str, e2e_latency: float) -> None:
        self.request_success.labels(finished_reason=finish_reason).inc()
        self.e2e.observe(e2e_latency)

    def rejected(self, reason: str) -> None:
        self.requests_rejected.labels(reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
