"""Where one decode step's time goes, and an A/B of the sampler's argmax: torch.argmax (before) against
argmax_rows = max(dim).indices (after), in alternating blocks of steps. Usage (under the CPU lock):
  PYTHONPATH=src python scripts/profile_decode_step.py [int8|int4|auto|none] [ROWS]"""
import sys, time, statistics, torch
from torch.profiler import profile, ProfilerActivity
import kvflow.layers.sampler as sampler
from kvflow.llm import LLM
from kvflow.sampling_params import SamplingParams
quant = sys.argv[1] if len(sys.argv) > 1 else "int8"
rows = int(sys.argv[2]) if len(sys.argv) > 2 else 1
llm = LLM("smollm2-135m", quantization=None if quant == "none" else quant)
eng = llm.engine
params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=300)
for i in range(rows):
    eng.add_request(f"r{i}", list(range(100 + i, 132 + i)), params)
for _ in range(10):  # prefill + warm decode steps
    eng.step()
fast, slow = sampler.argmax_rows, (lambda x: x.argmax(dim=-1))
times = {"argmax": [], "max": []}
n = 20
for rep in range(4):
    for name, fn in (("argmax", slow), ("max", fast)):
        sampler.argmax_rows = fn
        t0 = time.perf_counter()
        for _ in range(n):
            eng.step()
        times[name].append((time.perf_counter() - t0) / n * 1e3)
sampler.argmax_rows = fast
for k, v in times.items():
    print(f"{quant} rows={rows} sampler {k}: median {statistics.median(v):.2f} ms/step {['%.2f' % x for x in v]} -> {1000 / statistics.median(v) * rows:.1f} tok/s")
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(n):
        eng.step()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
