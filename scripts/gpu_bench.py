"""The stages of scripts/gpu_check.sh, one per subcommand, each writing one JSON file.

Every stage runs in its own process (gpu_check.sh wraps each in `timeout`), so a crash or a hang in
one leaves the others their time. Nothing is downloaded: models are random-weight Llamas built from
config.json (the shipped llama-3.1-8b shape, or a tiny one), and transformers runs the same shape.

`--smoke` shrinks every shape so the whole script can be checked on a CPU (`--device cpu`)."""
from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG_8B = ROOT / "src" / "kvflow" / "model" / "configs" / "llama-3.1-8b"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TOKENIZER_VOCAB = 49152  # prompts draw ids below this so the shipped tokenizer can decode them


# ---------------- shapes ----------------
def shapes(args) -> dict:
    if args.smoke:
        return dict(b1_prompt=32, b1_output=16, batch=4, batch_prompt=32, batch_output=8, prefill=256,
                    hf_b1_output=8, max_model_len=512, kv_gb=0.05, budget=256)
    return dict(b1_prompt=128, b1_output=256, batch=64, batch_prompt=512, batch_output=256, prefill=8192,
                hf_b1_output=64, max_model_len=8192 + 64, kv_gb=24.0, budget=8192)


def bench_model(args) -> str:
    """The folder of the benchmarked shape: Llama-3.1-8B, or (--smoke) the same config shrunk."""
    if not args.smoke:
        return str(CONFIG_8B)
    folder = Path(tempfile.mkdtemp(prefix="kvflow-smoke-"))
    cfg = json.loads((CONFIG_8B / "config.json").read_text())
    cfg.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=64, vocab_size=TOKENIZER_VOCAB)
    (folder / "config.json").write_text(json.dumps(cfg))
    for f in TOKENIZER_FILES:
        shutil.copy(CONFIG_8B / f, folder / f)
    return str(folder)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def write(path: str, result: dict) -> None:
    result.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, indent=2, default=str))


def random_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, TOKENIZER_VOCAB, (n, length), generator=gen).tolist()


# ---------------- env ----------------
def cmd_env(args) -> dict:
    res = {"python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine(),
           "cuda_available": torch.cuda.is_available()}
    from importlib.metadata import PackageNotFoundError, version
    for pkg in ("triton", "transformers", "tokenizers", "safetensors", "gguf", "numpy", "jinja2", "tqdm", "pytest"):
        try:
            res[pkg] = version(pkg)
        except PackageNotFoundError:  # a missing package is what this stage is here to report
            res[pkg] = "missing"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        res.update(gpu=p.name, gpu_memory_gb=p.total_memory / 2**30, sms=p.multi_processor_count)
    return res


# ---------------- bandwidth and matmul peak ----------------
def cmd_bandwidth(args) -> dict:
    """Device copy bandwidth (bytes read + written per second, as the roofline counts weight reads)
    and the bf16 matmul rate: the two rooflines the other stages are held against."""
    dev = args.device
    nbytes = (64 << 20) if args.smoke else (2 << 30)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(dev)
    reps = 5 if args.smoke else 20
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(dev)
    copy_s = (time.perf_counter() - t) / reps
    n = 1024 if args.smoke else 8192
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    for _ in range(3):
        a @ b
    sync(dev)
    reps = 3 if args.smoke else 20
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    mm_s = (time.perf_counter() - t) / reps
    return {"device": dev, "copy_bytes": nbytes, "copy_bandwidth_Bps": 2 * nbytes / copy_s,
            "matmul_n": n, "matmul_dtype": str(dtype), "matmul_flops_per_s": 2 * n ** 3 / mm_s}


# ---------------- greedy equality with transformers ----------------
def tiny_llama_folder(folder: Path):
    import transformers
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                      num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                                      max_position_embeddings=1024, rms_norm_eps=1e-6, initializer_range=0.1,
                                      bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
    torch.manual_seed(1234)
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copy(CONFIG_8B / f, folder / f)
    return model


@torch.inference_mode()
def hf_logprobs(model, ids: list[int], device: str) -> torch.Tensor:
    return torch.log_softmax(model(torch.tensor([ids], device=device)).logits[0].float(), -1).cpu()


@torch.inference_mode()
def hf_greedy(model, ids: list[int], n: int, device: str) -> list[int]:
    x = torch.tensor([ids], device=device)
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                         min_new_tokens=n, pad_token_id=0, temperature=None, top_p=None, top_k=None)
    return out[0, len(ids):].tolist()


def cmd_equality(args) -> dict:
    """float32: kvflow's greedy tokens equal transformers'. bfloat16: kvflow's prompt logprobs are as
    close to the float32 truth as transformers' own bfloat16 logprobs are (within 2x + 0.02)."""
    from kvflow import LLM, SamplingParams
    dev = args.device
    folder = Path(tempfile.mkdtemp(prefix="kvflow-eq-"))
    ref32 = tiny_llama_folder(folder).to(dev)
    prompts = random_prompts(4, 40, 1)[:2] + [p[:7] for p in random_prompts(2, 40, 2)]
    prompts = [[t % 1024 for t in p] for p in prompts]
    res: dict = {"device": dev, "attention_backend": args.attention_backend}
    # chunked prefill (32-token budget) and a shared prefix (prefix caching) on the way
    prompts.append(prompts[0][:32] + prompts[1][:5])
    opts = dict(device=dev, attention_backend=args.attention_backend, max_num_batched_tokens=32, block_size=16,
                num_gpu_blocks=256, enable_prefix_caching=True)
    llm = LLM(model=str(folder), dtype="float32", **opts)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    mismatches = []
    for i, (p, o) in enumerate(zip(prompts, outs)):
        want = hf_greedy(ref32, p, 24, dev)
        if o.outputs[0].token_ids != want:
            first = next(j for j, (a, b) in enumerate(zip(o.outputs[0].token_ids, want)) if a != b)
            mismatches.append({"prompt": i, "first_mismatch": first})
    res["float32"] = {"prompts": len(prompts), "greedy_mismatches": mismatches, "ok": not mismatches}
    del llm
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    llm16 = LLM(model=str(folder), dtype="bfloat16", **opts)
    errs_kv, errs_hf = [], []
    for p in prompts[:3]:
        out = llm16.generate(p, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0))
        got = torch.tensor([out.prompt_logprobs[i][p[i]].logprob for i in range(1, len(p))])
        truth = hf_logprobs(ref32, p, dev)[torch.arange(len(p) - 1), torch.tensor(p[1:])]
        hf16 = hf_logprobs(ref16, p, dev)[torch.arange(len(p) - 1), torch.tensor(p[1:])]
        errs_kv.append((got - truth).abs())
        errs_hf.append((hf16 - truth).abs())
    kv, hf = torch.cat(errs_kv), torch.cat(errs_hf)
    ok = float(kv.mean()) <= 2 * float(hf.mean()) + 0.02
    res["bfloat16"] = {"kvflow_vs_fp32_mean": float(kv.mean()), "kvflow_vs_fp32_max": float(kv.max()),
                       "hf_bf16_vs_fp32_mean": float(hf.mean()), "hf_bf16_vs_fp32_max": float(hf.max()), "ok": ok}
    res["ok"] = res["float32"]["ok"] and ok
    return res


# ---------------- kvflow benchmarks on the 8B shape ----------------
def make_llm(args, s: dict, **extra):
    from kvflow import LLM
    opts = dict(max_num_seqs=max(s["batch"], 1), max_num_batched_tokens=s["budget"], block_size=16,
                max_model_len=s["max_model_len"], kv_cache_memory_gb=s["kv_gb"], enable_prefix_caching=False)
    opts.update(extra)
    t = time.perf_counter()
    llm = LLM(model=bench_model(args), load_format="dummy", dtype=args.dtype, device=args.device,
              attention_backend=args.attention_backend, **opts)
    return llm, time.perf_counter() - t


def weight_bytes(cfg, dtype: torch.dtype) -> int:
    """Bytes of weights read per decode step (every matmul weight, the LM head, one embedding row)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return (cfg.num_params + cfg.hidden_size) * elem


def cmd_decode1(args) -> dict:
    from kvflow import SamplingParams
    s = shapes(args)
    llm, load_s = make_llm(args, s)
    prompt = random_prompts(1, s["b1_prompt"], 3)[0]
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=s["b1_output"])
    llm.generate(prompt, params)  # warm-up on the same lengths: every kernel variant compiled
    sync(args.device)
    out = llm.generate(prompt, params)
    m = out.metrics
    n = len(out.outputs[0].token_ids)
    decode_s = m.last_token_time - m.first_token_time
    cfg = llm.engine.model_config
    kv_elem = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    mean_ctx = s["b1_prompt"] + n / 2
    kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_elem * mean_ctx
    return {"device": args.device, "dtype": args.dtype, "attention_backend": args.attention_backend,
            "load_s": load_s, "prompt_len": s["b1_prompt"], "output_len": n,
            "ttft_s": m.first_token_time - m.arrival_time, "decode_tokens_per_s": (n - 1) / decode_s,
            "bytes_per_token": weight_bytes(cfg, getattr(torch, args.dtype)) + kv_bytes, "model_params": cfg.num_params}


def cmd_batch(args) -> dict:
    from kvflow import SamplingParams
    s = shapes(args)
    llm, load_s = make_llm(args, s)
    prompts = random_prompts(s["batch"], s["batch_prompt"], 4)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=s["batch_output"])
    llm.generate([p[:16] for p in prompts[:8]], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=4))
    sync(args.device)
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync(args.device)
    elapsed = time.perf_counter() - t
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"device": args.device, "dtype": args.dtype, "attention_backend": args.attention_backend,
            "load_s": load_s, "batch": s["batch"], "prompt_len": s["batch_prompt"], "output_len": s["batch_output"],
            "elapsed_s": elapsed, "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / elapsed}


def cmd_prefill(args) -> dict:
    """TTFT of one long prompt in one chunk, against the FLOP roofline (matmuls + causal attention)."""
    from kvflow import SamplingParams
    s = shapes(args)
    llm, load_s = make_llm(args, s, max_num_seqs=1)
    n = s["prefill"]
    prompt = random_prompts(1, n, 5)[0]
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=1)
    llm.generate(prompt[:512], params)
    sync(args.device)
    ttfts = []
    for _ in range(2):
        out = llm.generate(prompt, params)
        ttfts.append(out.metrics.first_token_time - out.metrics.arrival_time)
    cfg = llm.engine.model_config
    matmul_flops = 2 * (cfg.num_params - cfg.vocab_size * cfg.hidden_size) * n + 2 * cfg.vocab_size * cfg.hidden_size
    attn_flops = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * n * n  # QK^T + PV is 4 n^2 d; causal: half
    with kernel_profile(args.device) as prof:
        llm.generate(prompt, params)
    phases = phase_times(llm, prompt, params, args.device)
    from kvflow.layers import op_select
    return {"device": args.device, "dtype": args.dtype, "attention_backend": args.attention_backend,
            "load_s": load_s, "prompt_len": n, "ttft_s": min(ttfts), "ttfts_s": ttfts,
            "flops": matmul_flops + attn_flops, "fresh_chunk_choices": {repr(k): v for k, v in op_select.decisions().items() if k[0] == "fresh_chunk_attention"},
            "profile": prof.summary(1, flops=matmul_flops), "phases_ms": phases}


def phase_times(llm, prompt: list[int], params, device: str) -> dict:
    """One more request, with the engine's parts timed (ms) and the device synced around each:
    where a TTFT goes besides the forward pass's kernels."""
    eng, times = llm.engine, {}

    def timed(obj, name, label):
        real = getattr(obj, name)

        def wrapper(*a, **k):
            sync(device)
            t = time.perf_counter()
            out = real(*a, **k)
            sync(device)
            times[label] = times.get(label, 0.0) + 1e3 * (time.perf_counter() - t)
            return out
        setattr(obj, name, wrapper)
        return real

    saved = [(obj, name, timed(obj, name, label)) for obj, name, label in (
        (eng.scheduler, "schedule", "schedule"), (eng.runner, "_build_batch", "build_batch"),
        (eng.runner.model, "forward", "forward"), (eng.runner.model, "compute_logits", "logits"),
        (eng.runner, "execute", "execute"), (eng.scheduler, "update_from_output", "update"),
        (eng.output_processor, "make_outputs", "outputs"))]
    t = time.perf_counter()
    out = llm.generate(prompt, params)
    times["generate"] = 1e3 * (time.perf_counter() - t)
    times["ttft"] = 1e3 * (out.metrics.first_token_time - out.metrics.arrival_time)
    for obj, name, real in saved:
        setattr(obj, name, real)
    return times


def _start_decoding(llm, prompts: list[list[int]], steps: int) -> None:
    """Queue the prompts and step until every request is past its prompt (decode-only from here)."""
    from kvflow import SamplingParams
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=steps + 4)
    for p in prompts:
        llm.engine.add_request(None, p, params)
    sched = llm.engine.scheduler
    while sched.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running):
        llm.engine.step()


def _finish(llm) -> None:
    while llm.engine.has_unfinished_requests():
        llm.engine.step()


GEMM_KERNEL_WORDS = ("gemm", "xmma", "cutlass", "nvjet", "gemv")  # cuBLAS / CUTLASS kernel names


class kernel_profile:
    """torch.profiler around a block of `steps` engine steps (or one request): wall time, device busy
    time (the gap is host work the GPU waits for), matmul time and the top kernels, per step."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.device = device

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile
        self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else []))
        self.prof.__enter__()
        sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.wall = time.perf_counter() - self.t0
        self.prof.__exit__(*exc)

    def summary(self, steps: int, flops: float) -> dict:
        """flops: the matmul FLOPs of one step (for the matmul rate)."""
        key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        events = [e for e in self.prof.key_averages() if getattr(e, key) > 0]
        kernels = [e for e in events if not self.cuda or e.device_type.name == "CUDA"]
        top = sorted(kernels, key=lambda e: getattr(e, key), reverse=True)[:25]
        gemm_s = sum(getattr(e, key) for e in kernels if any(w in e.key.lower() for w in GEMM_KERNEL_WORDS)) / 1e6
        return {
            "wall_ms_per_step": 1e3 * self.wall / steps,
            "matmul_ms_per_step": 1e3 * gemm_s / steps,
            "matmul_flops_per_s": flops * steps / gemm_s if gemm_s else None,
            "device_busy_ms_per_step": sum(getattr(e, key) for e in kernels) / 1e3 / steps if self.cuda else None,
            "top": [{"name": e.key[:90], "calls_per_step": e.count / steps, "ms_per_step": getattr(e, key) / 1e3 / steps}
                    for e in top]}


def cmd_profile(args) -> dict:
    """Where a decode step's time goes, at batch 1 and at bigger batches."""
    s = shapes(args)
    llm, _ = make_llm(args, s, max_num_seqs=4 * s["batch"])
    res: dict = {"device": args.device, "dtype": args.dtype}
    steps = 8 if args.smoke else 24
    cfg = llm.engine.model_config
    for bs in (1, s["batch"], 4 * s["batch"]):
        prompts = random_prompts(bs, 64, 6)
        _start_decoding(llm, prompts, 4)  # warm-up: every graph bucket and kernel compiled
        _finish(llm)
        _start_decoding(llm, prompts, steps)
        with kernel_profile(args.device) as prof:
            for _ in range(steps):
                llm.engine.step()
        _finish(llm)
        res[f"batch_{bs}"] = prof.summary(steps, flops=2 * cfg.num_params * bs)
    return res


# ---------------- transformers on the same shapes ----------------
def hf_model(args):
    import transformers
    cfg = transformers.AutoConfig.from_pretrained(bench_model(args))
    t = time.perf_counter()
    with torch.device(args.device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, args.dtype))
    return model.eval(), time.perf_counter() - t


@torch.inference_mode()
def _hf_generate(model, prompts: list[list[int]], n: int, device: str) -> float:
    x = torch.tensor(prompts, device=device)
    sync(device)
    t = time.perf_counter()
    model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                   pad_token_id=0, temperature=None, top_p=None, top_k=None)
    sync(device)
    return time.perf_counter() - t


def cmd_hf(args) -> dict:
    """transformers' generate: batch 1 (decode rate from two lengths) and the batched shape."""
    s = shapes(args)
    model, load_s = hf_model(args)
    res = {"device": args.device, "dtype": args.dtype, "load_s": load_s,
           "transformers": __import__("transformers").__version__}
    p1 = random_prompts(1, s["b1_prompt"], 3)
    _hf_generate(model, p1, 2, args.device)
    short = _hf_generate(model, p1, 1, args.device)
    long = _hf_generate(model, p1, s["hf_b1_output"] + 1, args.device)
    res.update(b1_ttft_s=short, b1_decode_tokens_per_s=s["hf_b1_output"] / (long - short))
    prompts = random_prompts(s["batch"], s["batch_prompt"], 4)
    elapsed = _hf_generate(model, prompts, s["batch_output"], args.device)
    res.update(batch=s["batch"], prompt_len=s["batch_prompt"], output_len=s["batch_output"], elapsed_s=elapsed,
               output_tokens_per_s=s["batch"] * s["batch_output"] / elapsed)
    return res


# ---------------- summary ----------------
def cmd_summarize(args) -> dict:
    out = Path(args.out).parent

    def load(name):
        p = out / f"{name}.json"
        return json.loads(p.read_text()) if p.exists() else None

    bw, d1, batch, hf, pre, eq, prof = (load(n) for n in ("bandwidth", "decode1", "batch", "hf", "prefill", "equality",
                                                          "profile"))
    res: dict = {"equality_ok": eq.get("ok") if eq else None}
    if bw and d1:
        roof = bw["copy_bandwidth_Bps"] / d1["bytes_per_token"]
        res.update(b1_roofline_tokens_per_s=roof, b1_decode_tokens_per_s=d1["decode_tokens_per_s"],
                   b1_fraction_of_roofline=d1["decode_tokens_per_s"] / roof, b1_goal=">= 0.80")
    if hf and d1:
        res["b1_vs_transformers"] = d1["decode_tokens_per_s"] / hf["b1_decode_tokens_per_s"]
    if batch and hf:
        res.update(batch_output_tokens_per_s=batch["output_tokens_per_s"],
                   hf_batch_output_tokens_per_s=hf["output_tokens_per_s"],
                   batch_vs_transformers=batch["output_tokens_per_s"] / hf["output_tokens_per_s"], batch_goal=">= 5x")
    big = prof and prof.get(f"batch_{4 * shapes(args)['batch']}")
    if big and bw and big.get("matmul_flops_per_s"):
        res.update(big_batch_decode_matmul_fraction_of_peak=big["matmul_flops_per_s"] / bw["matmul_flops_per_s"],
                   big_batch_goal=">= 0.50")
    if pre and bw:
        ideal = pre["flops"] / bw["matmul_flops_per_s"]
        res.update(prefill_ttft_s=pre["ttft_s"], prefill_flop_roofline_s=ideal, prefill_ttft_over_roofline=pre["ttft_s"] / ideal,
                   prefill_goal="<= 1.3")
    return res


COMMANDS = {"env": cmd_env, "bandwidth": cmd_bandwidth, "equality": cmd_equality, "decode1": cmd_decode1,
            "batch": cmd_batch, "prefill": cmd_prefill, "profile": cmd_profile, "hf": cmd_hf, "summarize": cmd_summarize}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("command", choices=sorted(COMMANDS))
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script on a CPU)")
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    write(args.out, {"stage": args.command, **COMMANDS[args.command](args)})


if __name__ == "__main__":
    main()
