"""Reasoning budgets (Elastic Reasoning's separate budgets for thinking and for the answer).

A request with `params.thinking_budget` starts its output inside a thinking span (as with Qwen3 or
DeepSeek-R1, whose chat templates open `<think>` in the prompt). The span ends when the output's
tokens end with `thinking_end_ids` (the model closed it), or when the budget is spent: then the
scheduler appends those ids itself, as if they had been sampled. They enter the KV cache like any
other unprocessed token (the next step computes them as a chunk before sampling again), so the
forcing works in batches, with streaming, prefix caching, preemption and speculation. From the end
of thinking on, `max_tokens` counts the answer only.

The end of thinking is matched on token ids (the ids `thinking_end` tokenizes to): a model that
spells it with other tokens keeps thinking until its budget runs out."""
from __future__ import annotations

from kvflow.core.request import Request


def is_thinking(req: Request) -> bool:
    return req.params.thinking_budget is not None and req.answer_start is None


def note_natural_end(req: Request) -> None:
    """After a sampled token: did the model close its thinking span itself?"""
    end = req.thinking_end_ids
    if is_thinking(req) and end and tuple(req.output_token_ids[-len(end):]) == tuple(end):
        req.answer_start = req.num_output_tokens


def end_is_due(req: Request) -> bool:
    """Is the thinking budget spent with the span still open (so the engine must close it)?"""
    return is_thinking(req) and req.num_output_tokens >= req.params.thinking_budget


def answer_tokens(req: Request) -> int:
    """Output tokens that count against max_tokens: all of them without a thinking budget, the
    answer's with one (none while thinking: the thinking budget bounds that part)."""
    if req.params.thinking_budget is None:
        return req.num_output_tokens
    return 0 if req.answer_start is None else req.num_output_tokens - req.answer_start
