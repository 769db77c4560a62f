"""A/B, in one process and call by call, of a fresh bf16 prefill step (4 x 128 made-up tokens through
ModelRunner.synthetic_step): SiLU*up in torch and chunk rows gathered (before) against the C
SiLU*up kernel where op_select picks it and back-to-back chunks sliced as views (after).
Usage (under the CPU lock): PYTHONPATH=src python scripts/ab_prefill_ops.py [ROUNDS]"""
import statistics
import sys
import time

import kvflow.layers.activation as activation
import kvflow.layers.attention as attention
from kvflow.llm import LLM

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 12
runner = LLM("smollm2-135m", dtype="bfloat16").engine.runner
tables = [[i * 9 + j for j in range(9)] for i in range(4)]


def gathered(group):
    return lambda x: x[group.token_index]


variants = {"before": (lambda gate_up: False, gathered),
            "after": (activation._use_kernel, attention._group_rows)}
times = {name: [] for name in variants}
for _ in range(3):
    runner.synthetic_step(tables, 128, 0, 1)
for _ in range(rounds):
    for name, (use_kernel, group_rows) in variants.items():
        activation._use_kernel, attention._group_rows = use_kernel, group_rows
        t = time.perf_counter()
        runner.synthetic_step(tables, 128, 0, 1)
        times[name].append((time.perf_counter() - t) * 1e3)
for name, ts in times.items():
    print(f"{name}: median {statistics.median(ts):.1f} ms over {rounds} ({', '.join(f'{t:.0f}' for t in ts)})")
