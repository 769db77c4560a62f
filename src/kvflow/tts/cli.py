"""`kvflow tts`: test-time compute from the command line.

    kvflow tts "What is 17 * 3?" --chat --strategy self_consistency --n 8 --temperature 0.8
    kvflow tts PROMPT --strategy repeated_sampling --expect 51       (verifier: the answer equals 51)
    kvflow tts PROMPT --strategy best_of_n --prune-margin 1.0 --thinking-budget 256
"""
from __future__ import annotations

import argparse
import json

from kvflow.tts.answers import EXTRACTORS


def add_tts_parser(subparsers) -> argparse.ArgumentParser:
    from kvflow.entrypoints.args import add_engine_args
    from kvflow.entrypoints.cli import _add_sampling_args

    p = subparsers.add_parser("tts", help="test-time compute: n samples, one answer", description=(
        "Draw n samples of each prompt (they share the prompt's KV) and return the one a strategy picks: "
        "self_consistency (majority vote on the extracted answer), best_of_n (highest mean token logprob), "
        "repeated_sampling (the first sample whose answer equals --expect)."))
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.add_argument("--strategy", choices=["self_consistency", "best_of_n", "repeated_sampling"],
                   default="self_consistency")
    p.add_argument("--extractor", choices=sorted(EXTRACTORS), default="default",
                   help="how to read a sample's final answer (default: \\boxed{} else the last number)")
    p.add_argument("--expect", metavar="ANSWER", help="repeated_sampling: the answer the verifier accepts")
    p.add_argument("--prune-margin", type=float, help="abort samples whose mean logprob trails the best by this much")
    p.add_argument("--prune-min-tokens", type=int, default=16, help="only after this many tokens (default 16)")
    p.add_argument("--thinking-budget", type=int, help="tokens of thinking before the engine closes it")
    p.add_argument("--thinking-end", default="</think>", help="the model's end-of-thinking text (default </think>)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt, with every sample")
    add_engine_args(p)
    _add_sampling_args(p, max_tokens=128)
    p.set_defaults(func=cmd_tts, n=None)
    return p


def _strategy(args):
    from kvflow.errors import InvalidRequestError
    from kvflow.tts import BestOfN, RepeatedSampling, SelfConsistency
    extract = EXTRACTORS[args.extractor]
    if args.strategy == "self_consistency":
        return SelfConsistency(extract)
    if args.strategy == "best_of_n":
        return BestOfN()
    if args.expect is None:
        raise InvalidRequestError("--strategy repeated_sampling needs --expect ANSWER (the verifier's accepted answer)")
    return RepeatedSampling(lambda text: extract(text) == args.expect)


def cmd_tts(args) -> int:
    import dataclasses

    from kvflow.entrypoints.cli import _make_llm, _sampling_params
    from kvflow.tts import Pruning, generate

    params = _sampling_params(args)
    params = dataclasses.replace(params, n=args.n or 8, thinking_budget=args.thinking_budget,
                                 thinking_end=args.thinking_end)
    strategy = _strategy(args)
    pruning = None if args.prune_margin is None else Pruning(args.prune_margin, args.prune_min_tokens)
    llm = _make_llm(args)
    prompts = [llm.apply_chat_template([{"role": "user", "content": p}]) if args.chat else p for p in args.prompts]
    for prompt, result in zip(args.prompts, generate(llm, prompts, params, strategy, pruning)):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": result.text, "seconds": result.seconds, **result.to_dict()}))
        else:
            kept = sum(not s.pruned for s in result.samples)
            print(f"[{result.strategy}: sample {result.chosen} of {len(result.samples)} ({kept} not pruned), "
                  f"answer {result.answer!r}, votes {result.votes}, {result.num_generated_tokens} tokens, "
                  f"{result.seconds:.2f} s]\n{result.text}")
    return 0
