"""The step's grammar bitmask: one row per sampling row of a structured request, none for others."""
from __future__ import annotations

import torch

from kvflow.core.scheduler import ScheduledRequest


def grammar_bitmask(sampled: list[ScheduledRequest], vocab_size: int) -> tuple[torch.Tensor, list[int]] | None:
    """(bitmask [rows, ceil(V / 32)] int32 on the CPU, the sampling rows they belong to), or None
    when no sampled request has a grammar. A request owns 1 + len(drafts) consecutive rows, in order."""
    spans: list[tuple[ScheduledRequest, int]] = []
    row = 0
    for s in sampled:
        if s.request.grammar is not None:
            assert s.spec_parents is None, "structured requests verify draft chains, never trees"
            spans.append((s, row))
        row += len(s.spec_token_ids) + 1
    if not spans:
        return None
    rows = [r for s, first in spans for r in range(first, first + len(s.spec_token_ids) + 1)]
    bitmask = torch.full((len(rows), (vocab_size + 31) // 32), -1, dtype=torch.int32)  # -1: every token allowed
    at = 0
    for s, _ in spans:
        s.request.grammar.fill_rows(bitmask, at, s.spec_token_ids)
        at += len(s.spec_token_ids) + 1
    return bitmask, rows
