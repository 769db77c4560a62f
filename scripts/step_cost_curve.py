"""What one engine forward + LM head + sampling costs against the tokens in the step, the C step
(model/fused_decode.py) against the layer-by-layer path, forced each way (KVFLOW_FUSED_OPS), at a
context of 200 tokens: the cost curve speculation and batching pay. Median of 7 per point.
Usage (under the CPU lock): PYTHONPATH=src python scripts/step_cost_curve.py int8|int4|auto|bf16 [TOKENS ...]"""
import os
import statistics
import sys

import torch

from kvflow.core.request import Request
from kvflow.llm import LLM
from kvflow.sampling_params import SamplingParams
from kvflow.spec_decode.profile import _run

q = sys.argv[1] if len(sys.argv) > 1 else "int8"
sizes = [int(n) for n in sys.argv[2:]] or [1, 2, 4, 9, 16, 32, 64, 128]
llm = LLM("smollm2-135m", **({"dtype": "bfloat16"} if q == "bf16" else {"quantization": q}))
runner, pool = llm.engine.runner, llm.engine.block_pool
probe = Request("probe", [0], SamplingParams(), 0.0)
assert pool.allocate_slots(probe, 200 + max(sizes))
ms = {}
with torch.inference_mode():
    for n in sizes:
        for side in ("c", "torch"):
            os.environ["KVFLOW_FUSED_OPS"] = side
            _run(runner, probe.block_ids, n, 200, n)  # warm-up (and the AMX-or-not choice)
            ms[n, side] = statistics.median(_run(runner, probe.block_ids, n, 200, n) for _ in range(7)) * 1e3
print(f"{q}: ms per step at context 200, tokens: C step / layer by layer")
print("  ".join(f"{n}: {ms[n, 'c']:.1f}/{ms[n, 'torch']:.1f}" for n in sizes))
