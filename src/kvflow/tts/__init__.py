"""Test-time compute over the engine: spend more samples per prompt for a better answer.

All n samples of a prompt are one engine request (SamplingParams.n): they share the prompt's KV
blocks and its prefill. Strategies (strategies.py) decide which sample to return; pruning
(pruning.py) aborts samples that fall behind while they run; `thinking_budget` (a SamplingParams
field, applied by the engine) bounds each sample's reasoning.

    from kvflow import LLM, SamplingParams
    from kvflow.tts import SelfConsistency, generate
    result = generate(llm, "What is 17 * 3?", SamplingParams(n=8, temperature=0.8), SelfConsistency())[0]
    result.text, result.answer, result.votes
"""
from kvflow.tts.answers import boxed_answer, default_answer, last_number
from kvflow.tts.pass_at_k import pass_at_k
from kvflow.tts.pruning import Pruning
from kvflow.tts.runner import generate
from kvflow.tts.samples import Sample, TTSResult
from kvflow.tts.strategies import BestOfN, RepeatedSampling, SelfConsistency, Strategy, strategy_from_dict

__all__ = ["generate", "Sample", "TTSResult", "Strategy", "RepeatedSampling", "SelfConsistency", "BestOfN",
           "Pruning", "strategy_from_dict", "pass_at_k", "boxed_answer", "last_number", "default_answer"]
