"""`kvflow bench structured`: what JSON-schema output costs, and how often it comes out valid.

A batch of chat requests (32 by default) asks for JSON describing a person, a product or a city.
The structured run constrains each reply with a JSON schema (greedy, each ending when its grammar
ends or at max_tokens). The free run then generates, for the same prompts, exactly as many tokens
per request with no constraint (EOS ignored), so both runs do the same work in the same batch
shapes: the time ratio is the cost of the bitmasks and matchers (prefix caching is off, so both
runs compute their prompts). Runs alternate (structured, free, structured, free, ...); reported
are the ratio of the fastest of each and the median ratio of back-to-back pairs, which damp a
shared machine's noise. The first compile of the schema is timed apart (then it is cached).

Validity: every structured reply that ended on its own (finish_reason "stop") must parse as JSON
and validate against the schema (jsonschema); replies cut by max_tokens are counted apart.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

from kvflow.cpu_info import cpu_model_name
from kvflow.entrypoints.args import add_engine_args, engine_options

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["person", "product", "city"]},
        "year": {"type": "integer", "minimum": 0, "maximum": 2100},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "kind", "year", "score", "tags", "active"],
}
SUBJECTS = ["Ada Lovelace", "the Eiffel Tower", "a bicycle", "Tokyo", "Marie Curie", "a coffee mug", "Lisbon",
            "Alan Turing", "a laptop", "Nairobi", "Frida Kahlo", "a violin", "Montreal", "Isaac Newton",
            "a teapot", "Cairo"]


def prompts(llm, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        subject = SUBJECTS[i % len(SUBJECTS)]
        style = ["Describe", "Summarize", "Give facts about", "Write a record for"][i // len(SUBJECTS) % 4]
        msg = [{"role": "user", "content": f"{style} {subject} as JSON with name, kind, year, score, tags, active."}]
        out.append(llm.apply_chat_template(msg))
    return out


def _timed(llm, prompts, params):
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - start, outs


def run(llm, n: int, max_tokens: int, repeats: int) -> dict:
    import jsonschema

    from kvflow.sampling_params import SamplingParams, StructuredOutputsParams

    ids = prompts(llm, n)
    shaped = SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=StructuredOutputsParams(json=SCHEMA))
    llm.generate([ids[0][:8]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    llm.generate([ids[0]], SamplingParams(temperature=0, max_tokens=1, structured_outputs=shaped.structured_outputs))
    first_compile = time.perf_counter() - start  # (includes one prefill and one token)
    times = {"structured": [], "free": []}
    outs = None
    for _ in range(repeats):
        t, outs = _timed(llm, ids, shaped)
        times["structured"].append(t)
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        free = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=k) for k in lengths]
        times["free"].append(_timed(llm, ids, free)[0])
    ended, valid, cut = 0, 0, 0
    for o in outs:
        c = o.outputs[0]
        if c.finish_reason != "stop":
            cut += 1
            continue
        ended += 1
        try:
            jsonschema.validate(json.loads(c.text), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    best = {k: min(v) for k, v in times.items()}
    pair_ratios = sorted(a / b for a, b in zip(times["structured"], times["free"]))
    return {"cpu": cpu_model_name() or platform.processor(), "num_requests": n, "max_tokens": max_tokens,
            "output_tokens": tokens, "times_s": times, "structured_tok_s": tokens / best["structured"],
            "free_tok_s": tokens / best["free"], "time_ratio": best["structured"] / best["free"],
            "pair_ratio_median": pair_ratios[len(pair_ratios) // 2],
            "first_compile_s": first_compile, "ended": ended, "valid": valid, "cut_by_length": cut,
            "example": outs[0].outputs[0].text}


def format_result(r: dict) -> str:
    return "\n".join([
        f"CPU: {r['cpu']}",
        f"{r['num_requests']} requests, {r['output_tokens']} output tokens per run (max_tokens {r['max_tokens']})",
        f"structured: {r['structured_tok_s']:.1f} tok/s   free: {r['free_tok_s']:.1f} tok/s   "
        f"time ratio structured/free: {r['time_ratio']:.3f} of the fastest runs, "
        f"{r['pair_ratio_median']:.3f} median of back-to-back pairs",
        f"valid: {r['valid']}/{r['ended']} of the replies that ended on their own; {r['cut_by_length']} cut by max_tokens",
        f"first request with a new schema (compile + 1 token): {r['first_compile_s'] * 1000:.0f} ms",
        f"example: {r['example']}"])


def cmd_bench_structured(args) -> int:
    from kvflow.llm import LLM
    # Prefix caching off unless asked for: the second run of a pair would otherwise skip the prefill.
    llm = LLM(args.model, dtype=args.dtype, device=args.device, seed=args.seed,
              **{"max_num_seqs": max(32, args.num_prompts), "enable_prefix_caching": False, **engine_options(args)})
    result = run(llm, args.num_prompts, args.max_tokens, args.repeats)
    print(format_result(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def add_bench_structured_parser(subparsers) -> None:
    """`kvflow bench structured` (hooked in by kvflow.entrypoints.cli)."""
    p = subparsers.add_parser("structured", help="JSON-schema output: cost against free output, and validity",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=32, help="requests in the batch (default 32)")
    p.add_argument("--max-tokens", type=int, default=160, help="per reply (default 160)")
    p.add_argument("--repeats", type=int, default=3, help="structured/free run pairs (default 3)")
    p.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    add_engine_args(p)
    p.set_defaults(func=cmd_bench_structured)
