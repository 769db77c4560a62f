"""Lossless verification.

The sampler draws one target token per position from the target distribution p (argmax when
greedy). A draft token is accepted while it equals the target's draw at its position; the first
mismatch's draw is the bonus token. For deterministic drafts (prompt lookup, token recycling, greedy
draft models) this *is* speculative sampling's rule: accepting d with probability min(1, p(d)/q(d))
= p(d) and otherwise sampling from norm(max(0, p - q)) = p without d, so the output follows the
target distribution exactly (core/scheduler.py's `accepted_prefix` applies it). `rejection_sample` is the general rule for drafts drawn from a
distribution q."""
from __future__ import annotations

import torch


def rejection_sample(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                     generator: torch.Generator | None = None) -> list[int]:
    """Speculative sampling (Leviathan et al., Chen et al.). p: [K+1, V] target probabilities,
    q: [K, V] draft probabilities, drafts: [K] tokens drawn from q. Returns the accepted drafts
    followed by one token from the residual (or from p[K] when every draft was accepted)."""
    out: list[int] = []
    for i, d in enumerate(drafts.tolist()):
        ratio = (p[i, d] / q[i, d]).clamp(max=1.0)
        if torch.rand((), generator=generator) < ratio:
            out.append(d)
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        total = residual.sum()
        residual = residual / total if total > 0 else p[i]
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(p[len(out)], 1, generator=generator)))
    return out
