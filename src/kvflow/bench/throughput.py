"""Offline throughput benchmark, after vLLM's `benchmark_throughput`: a fixed list of requests
(ShareGPT or random token ids), all submitted at once, timed from first to last token.

Both backends do identical work: prompts go in as token ids, decoding is greedy with EOS ignored,
and each request generates exactly its output length. Reported: requests/s, total (prompt +
output) tokens/s, output tokens/s, the model FLOP/s achieved (see kvflow.bench.flops) next to the
matmul rate this machine reaches in the same process for a batched linear layer of the model, and
with a single request, its time to first token and decode rate.
"""
from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvflow.bench import datasets, memory
from kvflow.bench.datasets import BenchRequest
from kvflow.bench.flops import linear_shape, matmul_rate, request_flops
from kvflow.config import ModelConfig, parse_dtype, parse_quantization
from kvflow.cpu_info import cpu_model_name
from kvflow.errors import ConfigError

logger = logging.getLogger(__name__)

BACKENDS = ("kvflow", "hf")
DATASETS = ("sharegpt", "random")


@dataclass
class ThroughputConfig:
    backend: str = "kvflow"
    dataset: str = "sharegpt"
    model: str = "smollm2-135m"
    dtype: str = "auto"
    device: str = "cpu"
    quantization: str | None = None  # kvflow backend: int8 | int4 | auto (see LLM)
    recalibrate: bool = False
    seed: int = 0
    num_prompts: int = 64
    input_len: int = 128  # random dataset
    output_len: int | None = None  # random: default 128; sharegpt: None keeps each reply's length
    dataset_path: str | None = None
    hf_batch_size: int = 64
    matmul_seconds: float = 2.0  # 0: skip the matmul measurement
    matmul_tokens: int = 512  # rows of the timed matmul
    warmup: bool = True
    use_tqdm: bool = True
    engine_options: dict = field(default_factory=dict)  # LLM(**options): vLLM names

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        parse_dtype(self.dtype, self.device)
        parse_quantization(self.quantization)
        for name in ("num_prompts", "input_len", "hf_batch_size", "matmul_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.output_len is not None and self.output_len < 1:
            raise ConfigError(f"output_len must be >= 1, got {self.output_len}")
        if self.matmul_seconds < 0:
            raise ConfigError(f"matmul_seconds must be >= 0, got {self.matmul_seconds}")
        if self.dataset_path is not None and self.dataset != "sharegpt":
            raise ConfigError("dataset_path applies to the sharegpt dataset only")


def make_requests(cfg: ThroughputConfig, tokenizer, vocab_size: int) -> list[BenchRequest]:
    if cfg.dataset == "random":
        return datasets.sample_random(tokenizer, vocab_size, cfg.num_prompts, cfg.input_len,
                                      cfg.output_len or 128, cfg.seed)
    return datasets.sample_sharegpt(tokenizer, cfg.num_prompts, cfg.seed,
                                    Path(cfg.dataset_path) if cfg.dataset_path else None, cfg.output_len)


def _check_lengths(requests: list[BenchRequest], max_len: int, what: str) -> None:
    worst = max(requests, key=lambda r: r.prompt_len + r.output_len)
    if worst.prompt_len + worst.output_len > max_len:
        raise ConfigError(f"a request needs {worst.prompt_len} prompt + {worst.output_len} output tokens, "
                          f"over the {what} of {max_len}: lower --input-len/--output-len or raise --max-model-len")


def _measure_matmul(cfg: ThroughputConfig, model_cfg: ModelConfig) -> dict:
    if cfg.matmul_seconds == 0:
        return {}
    m, k, n = linear_shape(model_cfg, cfg.matmul_tokens)
    dtype = parse_dtype(cfg.dtype, cfg.device)
    rate = matmul_rate(m, k, n, dtype, cfg.device, cfg.matmul_seconds)
    return {"matmul_shape": [m, k, n], "matmul_dtype": str(dtype).removeprefix("torch."), "matmul_flops_per_s": rate}


def make_llm(cfg: ThroughputConfig):
    from kvflow.llm import LLM
    return LLM(cfg.model, dtype=cfg.dtype, device=cfg.device, seed=cfg.seed, quantization=cfg.quantization,
               recalibrate=cfg.recalibrate, **cfg.engine_options)


def run_kvflow(cfg: ThroughputConfig) -> tuple[dict, list[BenchRequest]]:
    from kvflow.sampling_params import SamplingParams

    rss_before = memory.current_rss_bytes()
    llm = make_llm(cfg)
    model_cfg = llm.engine.model_config
    mem = {"rss_before_load_bytes": rss_before, "rss_after_load_bytes": memory.current_rss_bytes(),
           **memory.engine_memory(llm.engine)}
    requests = make_requests(cfg, llm.get_tokenizer(), model_cfg.vocab_size)
    _check_lengths(requests, llm.engine.config.scheduler.max_model_len, "max_model_len")
    if cfg.warmup:  # one small request outside the timing: first-call allocations and kernel choice
        llm.generate([requests[0].prompt_token_ids[:8]], SamplingParams(temperature=0, ignore_eos=True, max_tokens=2))
    matmul = _measure_matmul(cfg, model_cfg)
    speculator = llm.engine.speculator
    if speculator is not None:  # count the timed run only
        from kvflow.spec_decode.speculator import SpecStats
        speculator.stats = SpecStats()
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=r.output_len) for r in requests]
    prompts = [r.prompt_token_ids for r in requests]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=cfg.use_tqdm)
    elapsed = time.perf_counter() - start
    failed = [o.error for o in outs if o.error]
    if failed:
        raise ConfigError(f"{len(failed)} of {len(outs)} requests were rejected: {failed[0]}")
    output_tokens = [len(o.outputs[0].token_ids) for o in outs]
    cached = [o.num_cached_tokens for o in outs]
    result = {"elapsed_s": elapsed, "output_tokens": output_tokens, "num_cached_tokens": sum(cached),
              "model_config": model_cfg, **matmul, **mem, "resolved_dtype": llm.engine.config.dtype}
    result["model_flops"] = sum(request_flops(model_cfg, r.prompt_len, o, c)
                                for r, o, c in zip(requests, output_tokens, cached))
    if speculator is not None:
        result["spec_decode"] = speculator.stats.as_dict()
    if len(outs) == 1 and outs[0].metrics is not None:
        m = outs[0].metrics
        if m.first_token_time is not None:
            result["ttft_s"] = m.first_token_time - m.arrival_time
            if m.last_token_time is not None and output_tokens[0] > 1 and m.last_token_time > m.first_token_time:
                result["decode_tokens_per_s"] = (output_tokens[0] - 1) / (m.last_token_time - m.first_token_time)
    return result, requests


def run_hf(cfg: ThroughputConfig) -> tuple[dict, list[BenchRequest]]:
    from kvflow.bench.hf_backend import HFRunner, load_tokenizer

    if cfg.engine_options:
        logger.warning("engine options %s do not apply to the hf backend", sorted(cfg.engine_options))
    torch.manual_seed(cfg.seed)
    runner = HFRunner(cfg.model, cfg.dtype, cfg.device)
    model_cfg = runner.model_config
    requests = make_requests(cfg, load_tokenizer(cfg.model), model_cfg.vocab_size)
    _check_lengths(requests, model_cfg.max_position_embeddings, "model's context length")
    if cfg.warmup:
        runner.warmup()
    matmul = _measure_matmul(cfg, model_cfg)
    run = runner.run(requests, cfg.hf_batch_size, cfg.use_tqdm)
    result = {"elapsed_s": run["elapsed_s"], "output_tokens": run["output_tokens"], "model_config": model_cfg, **matmul}
    result["model_flops"] = sum(request_flops(model_cfg, r.prompt_len, o) for r, o in zip(requests, run["output_tokens"]))
    if len(requests) == 1:
        ttft = runner.ttft(requests[0])
        result["ttft_s"] = ttft
        out = run["output_tokens"][0]
        if out > 1 and run["elapsed_s"] > ttft:
            result["decode_tokens_per_s"] = (out - 1) / (run["elapsed_s"] - ttft)
    return result, requests


def run_throughput(cfg: ThroughputConfig) -> dict:
    """Run the benchmark; returns every figure as a JSON-ready dict."""
    cfg.validate()
    raw, requests = (run_kvflow if cfg.backend == "kvflow" else run_hf)(cfg)
    elapsed = raw["elapsed_s"]
    prompt_tokens = sum(r.prompt_len for r in requests)
    output_tokens = sum(raw["output_tokens"])
    model_cfg: ModelConfig = raw["model_config"]
    res = {
        "backend": cfg.backend, "dataset": cfg.dataset, "model": cfg.model, "dtype": cfg.dtype,
        "device": cfg.device, "seed": cfg.seed, "num_prompts": len(requests),
        "input_len": cfg.input_len if cfg.dataset == "random" else None,
        "output_len": (cfg.output_len or 128) if cfg.dataset == "random" else cfg.output_len,
        "engine_options": cfg.engine_options if cfg.backend == "kvflow" else {},
        "hf_batch_size": cfg.hf_batch_size if cfg.backend == "hf" else None,
        "elapsed_s": elapsed,
        "num_prompt_tokens": prompt_tokens,
        "num_output_tokens": output_tokens,
        "num_expected_output_tokens": sum(r.output_len for r in requests),
        "num_total_tokens": prompt_tokens + output_tokens,
        "requests_per_s": len(requests) / elapsed,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "num_cached_tokens": raw.get("num_cached_tokens", 0),
        "model_params": model_cfg.num_params,
        "model_flops": raw["model_flops"],
        "model_flops_per_s": raw["model_flops"] / elapsed,
        "matmul_shape": raw.get("matmul_shape"),
        "matmul_dtype": raw.get("matmul_dtype"),
        "matmul_flops_per_s": raw.get("matmul_flops_per_s"),
        "flops_ratio": (raw["model_flops"] / elapsed / raw["matmul_flops_per_s"]) if raw.get("matmul_flops_per_s") else None,
        "ttft_s": raw.get("ttft_s"),
        "decode_tokens_per_s": raw.get("decode_tokens_per_s"),
        "speculative_config": _spec_config(cfg) if cfg.backend == "kvflow" else None,
        "spec_decode": raw.get("spec_decode"),
        "resolved_dtype": raw.get("resolved_dtype", str(parse_dtype(cfg.dtype, cfg.device)).removeprefix("torch.")),
        "quantization": cfg.quantization if cfg.backend == "kvflow" else None,
        "peak_rss_bytes": memory.peak_rss_bytes(),
        "rss_before_load_bytes": raw.get("rss_before_load_bytes"),
        "rss_after_load_bytes": raw.get("rss_after_load_bytes"),
        "weights_bytes": raw.get("weights_bytes"),
        "kv_cache_bytes": raw.get("kv_cache_bytes"),
        "model_file_bytes": raw.get("model_file_bytes"),
        "cpu_model": cpu_model_name(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "machine": platform.machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return res


def _spec_config(cfg: ThroughputConfig) -> dict | None:
    value = cfg.engine_options.get("speculative_config")
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        return json.loads(value)
    from dataclasses import asdict
    return asdict(value)  # a SpeculativeConfig


def format_result(res: dict) -> str:
    lines = [
        f"backend {res['backend']}, dataset {res['dataset']}, {res['num_prompts']} requests, "
        f"model {res['model']} ({res['resolved_dtype']}"
        + (f", quantization {res['quantization']}" if res.get("quantization") else "")
        + f", {res['device']}, {res['torch_threads']} threads, {res['cpu_model']})",
        f"Throughput: {res['requests_per_s']:.2f} requests/s, {res['total_tokens_per_s']:.1f} total tokens/s, "
        f"{res['output_tokens_per_s']:.1f} output tokens/s",
        f"Tokens: {res['num_prompt_tokens']} prompt + {res['num_output_tokens']} output in {res['elapsed_s']:.2f} s"
        + (f" ({res['num_cached_tokens']} prompt tokens from the prefix cache)" if res["num_cached_tokens"] else ""),
    ]
    mib = 1 << 20
    memline = f"Memory: peak RSS {res['peak_rss_bytes'] / mib:.0f} MiB"
    if res.get("weights_bytes") is not None:
        memline += (f" (before loading {res['rss_before_load_bytes'] / mib:.0f} MiB, after {res['rss_after_load_bytes'] / mib:.0f} MiB; weights {res['weights_bytes'] / mib:.0f} MiB,"
                    f" KV pool {res['kv_cache_bytes'] / mib:.0f} MiB, model file {res['model_file_bytes'] / mib:.0f} MiB)")
    lines.append(memline)
    flops = f"Model compute: {res['model_flops_per_s'] / 1e9:.1f} GFLOP/s"
    if res["matmul_flops_per_s"]:
        m, k, n = res["matmul_shape"]
        flops += (f" = {100 * res['flops_ratio']:.0f}% of the measured matmul rate "
                  f"{res['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s ([{m} x {k}] @ [{k} x {n}], {res['matmul_dtype']})")
    lines.append(flops)
    if res["ttft_s"] is not None:
        single = f"Single request: TTFT {1000 * res['ttft_s']:.1f} ms"
        if res["decode_tokens_per_s"] is not None:
            single += f", decode {res['decode_tokens_per_s']:.1f} tokens/s"
        lines.append(single)
    spec = res.get("spec_decode")
    if spec is not None:
        lines.append(f"Speculative decoding ({res['speculative_config'].get('method')}): "
                     f"{spec['accepted_tokens']} of {spec['draft_tokens']} draft tokens accepted "
                     f"(acceptance rate {spec['acceptance_rate']:.2f}), mean K {spec['mean_k']:.2f}, "
                     f"K histogram {spec['k_histogram']}")
    return "\n".join(lines)


def write_json(res: dict, path: str) -> None:
    try:
        Path(path).write_text(json.dumps(res, indent=2) + "\n")
    except OSError as e:
        raise ConfigError(f"cannot write --json file {path}: {e}") from None
