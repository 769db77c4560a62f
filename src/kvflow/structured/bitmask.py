"""The step's grammar bitmask: one row per sampling row of a structured request, none for others."""
from __future__ import annotations

import torch

from kvflow.core.scheduler import ScheduledRequest


def grammar_bitmask(sampled: list[ScheduledRequest], vocab_size: int) -> tuple[torch.Tensor, list[int]] | None:
    """(bitmask [sampling rows, ceil(V / 32)] int32 on the CPU, the rows that have a grammar), or
    None when no sampled request has one. A request owns 1 + len(drafts) consecutive rows, in order;
    rows of other requests stay all-ones and are not touched by the sampler."""
    spans: list[tuple[ScheduledRequest, int]] = []
    row = 0
    for s in sampled:
        if s.request.grammar is not None:
            assert s.spec_parents is None, "structured requests verify draft chains, never trees"
            spans.append((s, row))
        row += len(s.spec_token_ids) + 1
    if not spans:
        return None
    bitmask = torch.full((row, (vocab_size + 31) // 32), -1, dtype=torch.int32)  # -1: every token allowed
    for s, first in spans:
        s.request.grammar.fill_rows(bitmask, first, s.spec_token_ids)
    rows = [r for s, first in spans for r in range(first, first + len(s.spec_token_ids) + 1)]
    return bitmask, rows
