"""Speculative-decoding counters reach /metrics: the engine's SpecStats → AsyncEngine's stats
snapshot → the Prometheus text."""
import pytest

pytest.importorskip("prometheus_client")

from kvflow import LLM, SamplingParams  # noqa: E402
from kvflow.engine.async_engine import AsyncEngine  # noqa: E402
from kvflow.entrypoints.openai.metrics import ServerMetrics  # noqa: E402


def test_spec_decode_counters_in_metrics():
    llm = LLM(speculative_config={"method": "ngram", "num_speculative_tokens": 3}, max_model_len=512)
    prompt = "one two three four five six seven eight. one two three four five six seven eight. one two"
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24))
    engine = AsyncEngine(llm.engine)
    engine._publish_stats()
    stats = engine.stats
    spec = llm.engine.speculator.stats
    assert stats.spec_draft_tokens == spec.num_drafts > 0
    assert 0 <= stats.spec_accepted_tokens == spec.num_accepted <= spec.num_drafts
    text = ServerMetrics(lambda: engine.stats, lambda: 0).render().decode()
    assert f"kvflow:spec_decode_draft_tokens_total {float(spec.num_drafts)}" in text
    assert f"kvflow:spec_decode_accepted_tokens_total {float(spec.num_accepted)}" in text
    assert "kvflow:spec_decode_acceptance_rate" in text and "kvflow:spec_decode_mean_k" in text
