"""Perplexity of the engine on a text, the way llama.cpp users measure it, for several precisions
on the same tokens: `kvflow bench perplexity --dataset sharegpt|FILE [--dtype ...]
[--kv-cache-dtype ...] [--quantization ...]`.

The text is tokenized once; windows of `context` tokens start every `stride` tokens, and each
window scores its last `stride` tokens (so every scored token sees at least context - stride tokens
before it, and each is scored once). Every variant runs the same windows through the engine itself
(LLM.generate with prompt_logprobs, max_tokens=1). The step token budget defaults to
context - stride, so the scored half of a window is a second prompt chunk that reads its keys and
values back from the KV cache, as decoding does: a prompt's first chunk attends over its fresh,
unquantized keys, and would hide the KV cache precision.

Reported per variant: perplexity = exp(mean negative log-likelihood of the scored tokens), and, on
the same positions, the share whose greedy next token (the top-1 of the distribution) equals the
float32 model's, and the mean |logprob difference| of the true token against float32.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import platform
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from kvflow.errors import ConfigError

logger = logging.getLogger(__name__)
REFERENCE = ("float32", "auto", None)  # (dtype, kv_cache_dtype, quantization) of the reference


@dataclass
class PerplexityConfig:
    model: str = "smollm2-135m"
    dataset: str = "sharegpt"  # "sharegpt" or a path: a ShareGPT-format .json or a plain text file
    num_tokens: int = 20000  # tokens of text to take (the first ones)
    context: int = 512
    stride: int = 256
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    kv_cache_dtypes: list[str] = field(default_factory=lambda: ["auto"])
    quantizations: list[str | None] = field(default_factory=lambda: [None])
    device: str = "cpu"
    reference: bool = True  # also run float32 (if not among the variants) for top-1 agreement
    engine_options: dict = field(default_factory=dict)
    use_tqdm: bool = False
    # float32 scores saved here after the first run and read back by later ones with the same
    # text and windows (so variants can be measured in separate processes against one reference)
    reference_file: str | None = None

    def validate(self) -> None:
        from kvflow.config import parse_dtype
        from kvflow.config import check_kv_cache_dtype
        if self.context < 2:
            raise ConfigError(f"context must be >= 2, got {self.context}")
        if not 1 <= self.stride < self.context:
            raise ConfigError(f"stride must be in [1, context), got {self.stride} (context {self.context})")
        if self.num_tokens < self.context:
            raise ConfigError(f"num_tokens ({self.num_tokens}) must be >= context ({self.context})")
        for d in self.dtypes:
            parse_dtype(d)
        self.kv_cache_dtypes = [check_kv_cache_dtype(k) for k in self.kv_cache_dtypes]
        if any(q is not None for q in self.quantizations) and not _engine_has_quantization():
            raise ConfigError("this build of kvflow has no weight quantization (EngineConfig has no "
                              "`quantization` field): leave out --quantization")

    def variants(self) -> list[tuple[str, str, str | None]]:
        return [(d, k, q) for d in self.dtypes for k in self.kv_cache_dtypes for q in self.quantizations]


def _engine_has_quantization() -> bool:
    from kvflow.config import EngineConfig
    return "quantization" in {f.name for f in fields(EngineConfig)}


# ---------------- text ----------------
def sharegpt_text(path: Path, max_chars: int) -> str:
    """Every turn of the file's first conversations, in order, until max_chars characters. Parsed
    record by record, so only the head of the 100+ MB file is read."""
    from kvflow.bench.datasets import sharegpt_path
    path = path or sharegpt_path()
    decoder = json.JSONDecoder()
    parts, total = [], 0
    with open(path, encoding="utf-8") as f:
        buf = f.read(1 << 20)
        i = buf.index("[") + 1
        while total < max_chars:
            while i < len(buf) and buf[i] in " \t\r\n,":
                i += 1
            if i < len(buf) and buf[i] == "]":
                break
            try:
                obj, i = decoder.raw_decode(buf, i)
            except json.JSONDecodeError:
                more = f.read(1 << 20)
                if not more:
                    break
                buf, i = buf[i:] + more, 0
                continue
            for turn in obj.get("conversations", []) if isinstance(obj, dict) else []:
                value = turn.get("value") if isinstance(turn, dict) else None
                if isinstance(value, str) and value.strip():
                    parts.append(value.strip())
                    total += len(value)
    if not parts:
        raise ConfigError(f"{path} holds no ShareGPT conversations")
    return "\n\n".join(parts)


def load_tokens(tokenizer, dataset: str, num_tokens: int) -> list[int]:
    if dataset == "sharegpt":
        text = sharegpt_text(None, max_chars=num_tokens * 8)
    else:
        path = Path(dataset)
        if not path.is_file():
            raise ConfigError(f"--dataset must be 'sharegpt' or a file; {dataset!r} is neither")
        if path.suffix == ".ids":  # token ids as they are (e.g. `llama-tokenize --ids`: another engine's tokens)
            return [int(t) for t in path.read_text().translate(str.maketrans("[],", "   ")).split()][:num_tokens]
        text = sharegpt_text(path, num_tokens * 8) if path.suffix == ".json" else path.read_text(encoding="utf-8")
    ids = tokenizer.encode(text, add_special_tokens=True)[:num_tokens]
    return ids


def windows(num_tokens: int, context: int, stride: int) -> list[int]:
    """Start of every window: each scores its last `stride` tokens."""
    return list(range(0, num_tokens - context + 1, stride))


# ---------------- one variant ----------------
def run_variant(cfg: PerplexityConfig, ids: list[int], variant: tuple[str, str, str | None]) -> dict:
    """Scored-token logprobs [N] and greedy top-1 tokens [N], in window order, plus timing."""
    from kvflow.llm import LLM
    from kvflow.sampling_params import SamplingParams
    dtype, kv, quant = variant
    options = {"enable_prefix_caching": False, "max_num_batched_tokens": cfg.context - cfg.stride,
               "max_model_len": cfg.context + 1, **cfg.engine_options, "kv_cache_dtype": kv}
    if quant is not None:
        options["quantization"] = quant
    llm = LLM(cfg.model, dtype=dtype, device=cfg.device, **options)
    starts = windows(len(ids), cfg.context, cfg.stride)
    prompts = [ids[s:s + cfg.context] for s in starts]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=cfg.use_tqdm)
    elapsed = time.perf_counter() - t0
    logprobs, top1 = [], []
    for prompt, out in zip(prompts, outs):
        if out.error:
            raise ConfigError(f"a window failed: {out.error}")
        for p in range(cfg.context - cfg.stride, cfg.context):
            entry = out.prompt_logprobs[p]
            logprobs.append(entry[prompt[p]].logprob)
            top1.append(next(t for t, lp in entry.items() if lp.rank == 1))
    num_blocks = llm.engine.block_pool.num_blocks
    del llm
    gc.collect()
    return {"logprobs": torch.tensor(logprobs, dtype=torch.float64), "top1": torch.tensor(top1),
            "seconds": elapsed, "tokens_processed": len(prompts) * cfg.context, "num_kv_blocks": num_blocks}


def summarize(variant: tuple[str, str, str | None], run: dict, ref: dict | None) -> dict:
    dtype, kv, quant = variant
    nll = -run["logprobs"].mean().item()
    res = {"dtype": dtype, "kv_cache_dtype": kv, "quantization": quant, "perplexity": math.exp(nll),
           "mean_nll": nll, "num_scored_tokens": len(run["logprobs"]), "seconds": run["seconds"],
           "tokens_per_s": run["tokens_processed"] / run["seconds"], "num_kv_blocks": run["num_kv_blocks"]}
    if ref is not None:
        res["top1_agreement"] = (run["top1"] == ref["top1"]).double().mean().item()
        res["mean_abs_logprob_diff"] = (run["logprobs"] - ref["logprobs"]).abs().mean().item()
        res["perplexity_vs_float32"] = res["perplexity"] / math.exp(-ref["logprobs"].mean().item()) - 1.0
    return res


def run_perplexity(cfg: PerplexityConfig) -> dict:
    from kvflow.llm import LLM
    cfg.validate()
    variants = cfg.variants()
    # Tokenize with the engine's tokenizer (loaded once through a tiny engine of the first variant).
    probe = LLM(cfg.model, dtype="float32", device=cfg.device, num_gpu_blocks=2, max_model_len=32)
    ids = load_tokens(probe.get_tokenizer(), cfg.dataset, cfg.num_tokens)
    del probe
    if len(ids) < cfg.context:
        raise ConfigError(f"the text has {len(ids)} tokens, fewer than one window of {cfg.context}")
    runs = {}
    saved = _load_reference(cfg, ids) if cfg.reference and REFERENCE not in variants else None
    if saved is not None:
        runs[REFERENCE] = saved
    order = ([REFERENCE] if cfg.reference and REFERENCE not in variants and saved is None else []) + variants
    for v in order:
        logger.info("perplexity: %s", v)
        runs[v] = run_variant(cfg, ids, v)
    ref = runs.get(REFERENCE) if cfg.reference else None
    if ref is not None and saved is None and cfg.reference_file:
        _save_reference(cfg, ids, ref)
    return {
        "model": cfg.model, "dataset": cfg.dataset, "num_tokens": len(ids), "context": cfg.context,
        "stride": cfg.stride, "num_windows": len(windows(len(ids), cfg.context, cfg.stride)),
        "engine_options": cfg.engine_options, "cpu": _cpu_name(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(),
        "reference": None if ref is None else summarize(REFERENCE, ref, None),
        "variants": [summarize(v, runs[v], ref) for v in variants],
    }


def _reference_key(cfg: PerplexityConfig, ids: list[int]) -> dict:
    return {"model": cfg.model, "dataset": cfg.dataset, "num_tokens": len(ids), "context": cfg.context,
            "stride": cfg.stride, "tokens_hash": hash(tuple(ids)) & 0xFFFFFFFF}


def _load_reference(cfg: PerplexityConfig, ids: list[int]) -> dict | None:
    path = Path(cfg.reference_file) if cfg.reference_file else None
    if path is None or not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("key") != _reference_key(cfg, ids):
        logger.warning("%s was saved for other text or windows: recomputing the float32 reference", path)
        return None
    run = data["run"]
    return {**run, "logprobs": torch.tensor(run["logprobs"], dtype=torch.float64), "top1": torch.tensor(run["top1"])}


def _save_reference(cfg: PerplexityConfig, ids: list[int], ref: dict) -> None:
    run = {**ref, "logprobs": ref["logprobs"].tolist(), "top1": ref["top1"].tolist()}
    Path(cfg.reference_file).write_text(json.dumps({"key": _reference_key(cfg, ids), "run": run}))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_result(res: dict) -> str:
    lines = [f"perplexity of {res['model']} on {res['dataset']}: {res['num_tokens']} tokens, "
             f"{res['num_windows']} windows of {res['context']} (stride {res['stride']}), {res['cpu']}, "
             f"{res['threads']} threads",
             f"{'dtype':<9} {'kv cache':<9} {'quant':<6} {'ppl':>9} {'vs f32':>8} {'top1=f32':>9} "
             f"{'|dlogp|':>8} {'kv blocks':>9} {'tok/s':>7}"]
    for v in res["variants"]:
        lines.append(f"{v['dtype']:<9} {v['kv_cache_dtype']:<9} {str(v['quantization'] or '-'):<6} "
                     f"{v['perplexity']:>9.4f} {100 * v.get('perplexity_vs_float32', 0.0):>+7.2f}% "
                     f"{100 * v.get('top1_agreement', float('nan')):>8.2f}% "
                     f"{v.get('mean_abs_logprob_diff', float('nan')):>8.4f} {v['num_kv_blocks']:>9} "
                     f"{v['tokens_per_s']:>7.0f}")
    return "\n".join(lines)


def add_bench_perplexity_parser(subparsers) -> None:
    """`kvflow bench perplexity` (cli.py wires this in next to `bench throughput`)."""
    p = subparsers.add_parser("perplexity", help="perplexity and top-1 agreement with float32, per precision",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="sharegpt",
                   help="sharegpt, or a file (ShareGPT .json, plain text, or token ids: .ids, e.g. from llama-tokenize --ids)")
    p.add_argument("--num-tokens", type=int, default=20000, help="tokens of text to use (default 20000)")
    p.add_argument("--context", type=int, default=512, help="window length, tokens (default 512)")
    p.add_argument("--stride", type=int, default=256, help="window step = tokens scored per window (default 256)")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"],
                   help="compute dtype(s) (default float32)")
    p.add_argument("--kv-cache-dtype", nargs="+", default=["auto"],
                   choices=["auto", "float32", "bfloat16", "fp8", "int8"], help="KV cache dtype(s) (default auto)")
    p.add_argument("--quantization", nargs="+", default=[None], help="weight quantization(s), passed to the engine")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-num-batched-tokens", type=int, help="step token budget (default context - stride)")
    p.add_argument("--kv-cache-memory-gb", type=float, help="memory for the KV cache, GiB (engine default 1.0)")
    p.add_argument("--no-reference", action="store_true", help="skip the float32 reference run")
    p.add_argument("--reference-file", metavar="PATH",
                   help="save the float32 reference scores here, or reuse them if saved for the same windows")
    p.add_argument("--json", metavar="PATH", help="write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_perplexity)


def cmd_bench_perplexity(args) -> int:
    options = {k: getattr(args, k) for k in ("max_num_batched_tokens", "kv_cache_memory_gb")
               if getattr(args, k) is not None}
    cfg = PerplexityConfig(model=args.model, dataset=args.dataset, num_tokens=args.num_tokens, context=args.context,
                           stride=args.stride, dtypes=args.dtype, kv_cache_dtypes=args.kv_cache_dtype,
                           quantizations=args.quantization, device=args.device, reference=not args.no_reference,
                           engine_options=options, reference_file=args.reference_file)
    res = run_perplexity(cfg)
    print(format_result(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0
