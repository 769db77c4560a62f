"""Time the C step (model/fused_decode.py) of this tree's kernel library against another build of it,
in one process, alternating call by call (these VMs drift too much between processes for a kernel
change of 10-30% to show otherwise). The other build must take the same structs: e.g. the previous
commit's, built by `PYTHONPATH=<old checkout>/src python -c "from kvflow.layers import cpu_kernels;
print(cpu_kernels.kernels())"` (it prints the library's path).
Usage (under the CPU lock): PYTHONPATH=src python scripts/ab_kernels.py OTHER.so int8|int4|bf16 [TOKENS ...]
Prints, per step size, the median ms of the other build and of this one, with the plain kernels and
with AMX tiles where the CPU has them (a step of TOKENS tokens at context 200: one request's chunk).
AB_REQUESTS=R AB_CONTEXT=C: R requests with C tokens of context each (their own blocks), TOKENS each
(a batch verifying TOKENS - 1 drafts per request)."""
import os
import ctypes
import statistics
import sys
import time

import torch

from kvflow.core.request import Request
from kvflow.layers import cpu_kernels
from kvflow.llm import LLM
from kvflow.sampling_params import SamplingParams
from kvflow.worker.model_runner import build_batch

other_path, kind = sys.argv[1], sys.argv[2]
sizes = [int(n) for n in sys.argv[3:]] or [1, 4, 16, 64, 128]
ours = cpu_kernels.kernels()
other = ctypes.CDLL(other_path)
p, i = ctypes.c_void_p, ctypes.c_int
other.fused_decode_step.argtypes, other.fused_decode_step.restype = [p, p], i
other.fused_use_amx.argtypes, other.fused_use_amx.restype = [i], i
amx_sides = (False, True) if ours.fused_use_amx(0) else (False,)

llm = LLM("smollm2-135m", **({"dtype": "bfloat16"} if kind == "bf16" else {"quantization": kind}))
runner, pool = llm.engine.runner, llm.engine.block_pool
requests, context = int(os.environ.get("AB_REQUESTS", 1)), int(os.environ.get("AB_CONTEXT", 200))
probes = [Request(f"probe{r}", [0], SamplingParams(), 0.0) for r in range(requests)]
assert all(pool.allocate_slots(probe, context + max(sizes)) for probe in probes)
times: dict[tuple, list[float]] = {}
with torch.inference_mode():
    for n in sizes:
        batch = build_batch([([11] * n, context, probe.block_ids) for probe in probes], runner.block_size,
                            runner.device)
        for amx in amx_sides:
            for _ in range(7):
                for name, lib in (("other", other), ("this", ours)):
                    cpu_kernels._lib = lib
                    started = time.perf_counter()
                    runner.model.fused_decode.run(batch.input_ids, batch.positions, runner.kv_caches, batch.meta,
                                                  None, amx)
                    times.setdefault((n, amx, name), []).append(time.perf_counter() - started)
cpu_kernels._lib = ours
print(f"{kind}: C step ms, {requests} request(s) at context {context}, other build / this one")
for n in sizes:
    print(f"{n:4d} tokens each  " + "  ".join(
        f"{'AMX' if amx else 'plain'} {statistics.median(times[n, amx, 'other']) * 1e3:.1f} / "
        f"{statistics.median(times[n, amx, 'this']) * 1e3:.1f}" for amx in amx_sides))
