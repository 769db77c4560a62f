"""FLOP accounting for a benchmark run, and the machine's measured matmul rate to compare it with.

Model FLOPs count the work a request needs, whichever engine runs it:
- every token fed to the model (the prompt, and each generated token but the last, which is
  sampled and never fed back) costs 2 FLOPs per weight of the decoder body
  (ModelConfig.num_params less the LM head);
- the LM head (2 * hidden * vocab) runs only where a token is sampled: output_len positions;
- attention costs 4 * layers * heads * head_dim * context per fed token (QK^T and PV), where
  context is the number of positions the token attends to (its own included).
Prompt tokens served from the prefix cache are not computed, so not counted. Padding,
recomputation after preemption and other overheads are not counted either: this is useful work.
"""
from __future__ import annotations

import time

import torch

from kvflow.config import ModelConfig


def request_flops(cfg: ModelConfig, prompt_len: int, output_len: int, num_cached: int = 0) -> float:
    """FLOPs one request needs; the first num_cached prompt tokens came from the prefix cache and
    cost nothing."""
    if output_len < 1:
        return 0.0
    fed = prompt_len + output_len - 1
    cached = min(num_cached, fed)
    head = cfg.hidden_size * cfg.vocab_size
    body = cfg.num_params - head
    # the token at position p attends to p + 1 positions: fed tokens sum contexts 1 .. fed
    context_sum = fed * (fed + 1) // 2 - cached * (cached + 1) // 2
    attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context_sum
    return 2.0 * body * (fed - cached) + 2.0 * head * output_len + float(attn)


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
                seconds: float = 2.0) -> float:
    """FLOP/s of y = x @ W^T with x [m, k] and W [n, k] (how nn.Linear runs), repeated for about
    `seconds` after a warm-up; the best of several timed rounds."""
    dev = torch.device(device)
    x = torch.randn(m, k, device=dev).to(dtype)
    w = torch.randn(n, k, device=dev).to(dtype)
    out = torch.empty(m, n, device=dev, dtype=dtype)
    flops_per = 2.0 * m * k * n

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    with torch.inference_mode():
        for _ in range(3):
            torch.matmul(x, w.t(), out=out)
        sync()
        t0 = time.perf_counter()
        torch.matmul(x, w.t(), out=out)
        sync()
        one = max(time.perf_counter() - t0, 1e-7)
        reps = max(1, int(seconds / 5 / one))
        best, deadline = 0.0, time.perf_counter() + seconds
        while True:
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.matmul(x, w.t(), out=out)
            sync()
            best = max(best, flops_per * reps / (time.perf_counter() - t0))
            if time.perf_counter() >= deadline:
                return best


def linear_shape(cfg: ModelConfig, num_tokens: int = 512) -> tuple[int, int, int]:
    """A batched MLP projection of the model: [num_tokens x hidden] @ [hidden x intermediate]."""
    return num_tokens, cfg.hidden_size, cfg.intermediate_size

