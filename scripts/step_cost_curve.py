"""What one engine forward + LM head + sampling costs against the tokens in the step, at a context
of 200 tokens: the C step (model/fused_decode.py) with AMX tiles where the CPU has them, the C step
without them, and the layer-by-layer path, forced each way. The sides take turns call by call (the
VM's speed drifts); median of 7 per point. The cost curve speculation and batching pay.
Usage (under the CPU lock): PYTHONPATH=src python scripts/step_cost_curve.py int8|int4|auto|bf16 [TOKENS ...]"""
import os
import statistics
import sys

import torch

from kvflow.core.request import Request
from kvflow.llm import LLM
from kvflow.model.fused_decode import FusedDecodeStep
from kvflow.sampling_params import SamplingParams
from kvflow.spec_decode.profile import _run

q = sys.argv[1] if len(sys.argv) > 1 else "int8"
sizes = [int(n) for n in sys.argv[2:]] or [1, 2, 4, 9, 16, 32, 64, 128]
llm = LLM("smollm2-135m", **({"dtype": "bfloat16"} if q == "bf16" else {"quantization": q}))
runner, pool = llm.engine.runner, llm.engine.block_pool
probe = Request("probe", [0], SamplingParams(), 0.0)
assert pool.allocate_slots(probe, 200 + max(sizes))
measured_amx = FusedDecodeStep._choose_amx
SIDES = {"c": ("c", measured_amx), "c, no AMX": ("c", lambda *a: False), "torch": ("torch", measured_amx)}


def step(n: int, side: str) -> float:
    os.environ["KVFLOW_FUSED_OPS"], FusedDecodeStep._choose_amx = SIDES[side]
    return _run(runner, [probe.block_ids], n, 200, n)


ms = {}
with torch.inference_mode():
    for n in sizes:
        times = {side: [] for side in SIDES}
        for side in SIDES:
            step(n, side)  # warm-up (and the AMX-or-not choice)
        for _ in range(7):
            for side in SIDES:
                times[side].append(step(n, side))
        ms.update({(n, side): statistics.median(t) * 1e3 for side, t in times.items()})
print(f"{q}: ms per step at context 200, tokens: " + " / ".join(SIDES))
print("  ".join(f"{n}: " + "/".join(f"{ms[n, side]:.1f}" for side in SIDES) for n in sizes))
