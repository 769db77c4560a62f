"""Where an offline run's time goes: LLM.generate of N random prompts, its engine steps split into
prefill (only prompt chunks), mixed and decode steps, with the time inside ModelRunner.execute.
Usage (under the CPU lock): PYTHONPATH=src python scripts/offline_phases.py [DTYPE] [NUM_PROMPTS] [IN] [OUT]
(defaults: bfloat16 64 128 128, the shape of issue 8's goal 3)."""
import collections
import random
import sys
import time

from kvflow.llm import LLM
from kvflow.sampling_params import SamplingParams

dtype = sys.argv[1] if len(sys.argv) > 1 else "bfloat16"
num, input_len, output_len = (int(a) for a in (sys.argv[2:5] + ["64", "128", "128"][len(sys.argv[2:5]):]))
llm = LLM("smollm2-135m", dtype=dtype)
engine, runner = llm.engine, llm.engine.runner
phases = collections.defaultdict(lambda: [0, 0.0, 0.0])  # kind -> steps, step seconds, execute seconds
current: dict = {}
execute, step = runner.execute, engine.step


def timed_execute(sched):
    t = time.perf_counter()
    out = execute(sched)
    lens = [s.num_new_tokens for s in sched.scheduled]
    current["kind"] = "prefill" if min(lens) > 1 else "decode" if max(lens) == 1 else "mixed"
    current["execute"] = time.perf_counter() - t
    return out


def timed_step():
    t = time.perf_counter()
    out = step()
    if current:
        p = phases[current["kind"]]
        p[0], p[1], p[2] = p[0] + 1, p[1] + time.perf_counter() - t, p[2] + current["execute"]
        current.clear()
    return out


runner.execute, engine.step = timed_execute, timed_step
rng = random.Random(0)
prompts = [[rng.randrange(1000, 40000) for _ in range(input_len)] for _ in range(num)]
llm.generate([prompts[0][:8]], SamplingParams(temperature=0, ignore_eos=True, max_tokens=2))  # warm-up
phases.clear()
start = time.perf_counter()
llm.generate(prompts, SamplingParams(temperature=0, ignore_eos=True, max_tokens=output_len), use_tqdm=False)
elapsed = time.perf_counter() - start
print(f"{num} x ({input_len}, {output_len}) {dtype}: {elapsed:.2f} s, {num * output_len / elapsed:.1f} output tok/s")
for kind, (n, total, inside) in phases.items():
    print(f"  {kind}: {n} steps, {total:.2f} s ({total / n * 1e3:.1f} ms a step), "
          f"in ModelRunner.execute {inside:.2f} s")
