"""KV cache precision (kv_cache_dtype = auto | float32 | bfloat16 | fp8 | int8).

- a bad name fails with ConfigError naming the choices, before any weight loads;
- the pool holds more blocks for narrower dtypes in the same memory;
- quantize / dequantize stay within each format's rounding bound;
- the paged decode C kernel, reading the stored (quantized) cache, equals the torch path and a float
  reference over the dequantized cache;
- the engine with each KV dtype stays within a logprob tolerance of float32 on the same tokens:
  batched, with chunked prefill (the later chunks read the cache), a prefix-cache hit, and preemption.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine_helpers import PARAGRAPHS, assert_all_blocks_free
from kvflow import SamplingParams
from kvflow.config import ModelConfig
from kvflow.errors import ConfigError
from kvflow.layers import attention, cpu_kernels, kv_quant
from kvflow.worker.model_runner import build_batch, bytes_per_block

QUANTIZED = [torch.bfloat16, torch.float8_e4m3fn, torch.int8]
# The C step's AMX attention (float32 queries on a bfloat16 cache) where the CPU and OS allow the tiles
AMX = (False, True) if cpu_kernels.kernels() is not None and cpu_kernels.kernels().fused_use_amx(0) else (False,)


# ---------------- configuration ----------------
def test_unknown_kv_cache_dtype_fails_before_weights_load(monkeypatch):
    import kvflow.worker.model_runner as llm_engine
    from kvflow import LLM

    def no_load(*a, **k):
        raise AssertionError("weights loaded before the kv_cache_dtype check")
    monkeypatch.setattr(llm_engine, "load_model", no_load)
    with pytest.raises(ConfigError, match="kv_cache_dtype.*auto.*bfloat16.*fp8.*int8.*'fp4'"):
        LLM("smollm2-135m", kv_cache_dtype="fp4")


def test_cli_and_server_accept_kv_cache_dtype():
    import argparse

    from kvflow.entrypoints.args import add_engine_args, engine_config
    from kvflow.entrypoints.cli import build_parser

    args = build_parser().parse_args(["generate", "--kv-cache-dtype", "int8", "hi"])
    assert args.kv_cache_dtype == "int8"
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_config(p.parse_args(["--kv-cache-dtype", "fp8"])).cache.kv_cache_dtype == "fp8"


def test_block_count_follows_kv_cache_dtype():
    cfg = ModelConfig("llama", 100, 576, 1536, 30, 9, 3, 64, 1e-5, 1e4, 2048)
    per = {name: bytes_per_block(cfg, 16, kv_quant.storage_dtype(name, torch.float32))
           for name in ("auto", "bfloat16", "fp8", "int8")}
    elems = 2 * 30 * 16 * 3 * 64
    assert per == {"auto": 4 * elems, "bfloat16": 2 * elems, "fp8": elems, "int8": elems + 4 * elems // 64}
    assert kv_quant.storage_dtype("auto", torch.bfloat16) == torch.bfloat16


# ---------------- quantization round trip ----------------
@pytest.mark.parametrize("dtype", QUANTIZED, ids=str)
def test_quantize_round_trip_bound(dtype):
    x = torch.randn(50, 3, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 20, 50)[:, None, None]
    values, scale = kv_quant.quantize(x, dtype)
    assert values.dtype == dtype and (scale is None) == (dtype != torch.int8)
    back = kv_quant.dequantize(values, scale, torch.float32)
    err = (back - x).abs()
    if dtype == torch.int8:  # half a step of amax / 127 per (token, head)
        assert bool((err <= x.abs().amax(-1, keepdim=True) / 254 * 1.0001).all())
    else:  # relative rounding: 2^-8 for bf16, 2^-4 for e4m3 (plus e4m3's subnormal step 2^-10)
        rel = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -4
        assert bool((err <= x.abs() * rel + (2 ** -10 if dtype != torch.bfloat16 else 0)).all())


# ---------------- decode kernel on quantized caches ----------------
def _cache_and_batch(cache_dtype, q_dtype, Hq=6, Hk=2, D=32, BS=4, NB=40):
    gen = torch.Generator().manual_seed(1)
    k_cache = torch.zeros(NB, BS, Hk, D, dtype=cache_dtype)
    v_cache = torch.zeros_like(k_cache)
    scales = [torch.zeros(NB, BS, Hk) for _ in range(2)] if cache_dtype == torch.int8 else [None, None]
    # Fill every slot through the same write the layers use.
    slots = torch.arange(NB * BS)
    for cache, scale in ((k_cache, scales[0]), (v_cache, scales[1])):
        kv_quant.write(cache, scale, slots, (torch.randn(NB * BS, Hk, D, generator=gen) * 3).to(q_dtype))
    # three decodes of different context lengths, then a 3-token chunk with a cached prefix
    items = [([1], 9, [0, 1, 2]), ([1], 1, [3]), ([1], 30, list(range(4, 12))), ([1, 1, 1], 20, list(range(12, 18)))]
    batch = build_batch(items, BS, torch.device("cpu"))
    T = 6
    q, k, v = ((torch.randn(T, h, D, generator=gen)).to(q_dtype) for h in (Hq, Hk, Hk))
    return q, k, v, k_cache, v_cache, scales, batch


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cache_dtype", [torch.float32, *QUANTIZED], ids=str)
def test_decode_kernel_reads_quantized_cache(monkeypatch, cache_dtype, q_dtype):
    q, k, v, k_cache, v_cache, (ks, vs), batch = _cache_and_batch(cache_dtype, q_dtype)
    if not cpu_kernels.can_run_decode(q, k_cache):
        pytest.skip("the CPU decode kernel is not available here (no C compiler)")
    D = q.shape[-1]

    def run():
        c = [t if t is None else t.clone() for t in (k_cache, v_cache, ks, vs)]
        return attention.paged_attention(q, k, v, c[0], c[1], batch.meta, D ** -0.5, c[2], c[3]).float()
    with_kernel = run()
    monkeypatch.setattr(cpu_kernels, "can_run_decode", lambda *a: False)
    plain = run()
    # Float reference for the decodes: SDPA over the dequantized cache (after this step's writes).
    kc, vc = k_cache.clone(), v_cache.clone()
    ksc, vsc = (None, None) if ks is None else (ks.clone(), vs.clone())
    kv_quant.write(kc, ksc, batch.meta.slot_mapping, k)
    kv_quant.write(vc, vsc, batch.meta.slot_mapping, v)
    kf, vf = kv_quant.dequantize(kc, ksc, torch.float32), kv_quant.dequantize(vc, vsc, torch.float32)
    g = batch.meta.groups[0]
    for b in range(3):
        n = int(g.ctx_lens[b])
        slots = (g.block_tables[b][:, None] * kc.shape[1] + torch.arange(kc.shape[1])).flatten()[:n]
        keys = kf.flatten(0, 1)[slots].transpose(0, 1)  # [Hk, n, D]
        vals = vf.flatten(0, 1)[slots].transpose(0, 1)
        want = F.scaled_dot_product_attention(q[b].float()[:, None], keys, vals, scale=D ** -0.5, enable_gqa=True)[:, 0]
        tol = 5e-2 if q_dtype == torch.bfloat16 else 1e-4  # bf16: a few ulps of outputs up to ~4
        assert float((with_kernel[b] - want).abs().max()) < tol, f"request {b}: kernel vs float reference"
    tol = 5e-2 if q_dtype == torch.bfloat16 else 1e-5  # (the torch path rounds K/V and SDPA to bf16)
    err = (with_kernel - plain).abs().amax(dim=(1, 2))
    assert float(err.max()) < tol, f"kernel vs torch path, max error per token: {err.tolist()}"


def _kernel_cases():
    return [(dtype, False) for dtype in (torch.float32, torch.bfloat16, torch.int8)] + [
        (torch.bfloat16, True) for amx in AMX if amx]


@pytest.mark.parametrize("cache_dtype,amx", _kernel_cases(), ids=str)
def test_decode_kernel_rows_of_one_request_share_a_pass(cache_dtype, amx):
    """Rows that read the same blocks (a request's verify chunk in the C step) are attended in one pass
    over the keys, each masking the keys past its own length: bit for bit the result of each row alone."""
    Hq, Hk, D, BS, NB = 6, 2, 64, 16, 24
    gen = torch.Generator().manual_seed(11)
    k_cache, v_cache = torch.zeros(NB, BS, Hk, D, dtype=cache_dtype), torch.zeros(NB, BS, Hk, D, dtype=cache_dtype)
    ks = vs = None
    if cache_dtype == torch.int8:
        ks, vs = torch.zeros(NB, BS, Hk), torch.zeros(NB, BS, Hk)
    slots = torch.arange(NB * BS)
    for cache, scale in ((k_cache, ks), (v_cache, vs)):
        kv_quant.write(cache, scale, slots, torch.randn(NB * BS, Hk, D, generator=gen))
    a, b, c = [5, 0, 9], [3, 14], [20, 7, 1, 12]  # block tables of three requests (not contiguous)
    # request a: a chain of 4 rows crossing a block boundary; b: one decode; c: 2 rows, then 1 row
    # again after b (not adjacent: its own pass); d: another request whose table starts like a's
    rows = [(a, 30), (a, 31), (a, 32), (a, 33), (b, 20), (c, 50), (c, 51), (b, 21), (c, 52), (a[:2] + [17], 33)]
    width = 4
    tables = torch.tensor([t + [0] * (width - len(t)) for t, _ in rows])
    ctx = torch.tensor([n for _, n in rows])
    q = torch.randn(len(rows), Hq, D, generator=gen)
    if not cpu_kernels.can_run_decode(q, k_cache):
        pytest.skip("the CPU decode kernel is not available here (no C compiler)")
    together = cpu_kernels.paged_decode(q, k_cache, v_cache, tables, ctx, D ** -0.5, ks, vs, amx=amx)
    for i in range(len(rows)):
        alone = cpu_kernels.paged_decode(q[i:i + 1], k_cache, v_cache, tables[i:i + 1], ctx[i:i + 1], D ** -0.5, ks, vs,
                                         amx=amx)
        assert torch.equal(together[i], alone[0]), f"row {i}"


@pytest.mark.parametrize("cache_dtype,amx", _kernel_cases(), ids=str)
def test_decode_kernel_tree_node_equals_the_token_decoded_after_acceptance(cache_dtype, amx):
    """A draft-tree node sees its context and its ancestors, which sit among the tree's other slots
    (here one hidden node pushes its child into the next block); once the path is accepted the same
    keys sit in contiguous slots. The kernel's result depends only on the keys seen and their order:
    bit for bit the same, in any precision (greedy tokens cannot part between the two)."""
    Hq, Hk, D, BS, NB, T0 = 4, 2, 64, 16, 6, 14
    gen = torch.Generator().manual_seed(12)
    k_cache, v_cache = torch.zeros(NB, BS, Hk, D, dtype=cache_dtype), torch.zeros(NB, BS, Hk, D, dtype=cache_dtype)
    ks = vs = None
    if cache_dtype == torch.int8:
        ks, vs = torch.zeros(NB, BS, Hk), torch.zeros(NB, BS, Hk)
    tree_table, path_table = [0, 1], [0, 2]  # the same first block (the context), then each its own
    keys, vals = torch.randn(T0 + 3, Hk, D, generator=gen), torch.randn(T0 + 3, Hk, D, generator=gen)
    slot = lambda table, p: table[p // BS] * BS + p % BS  # noqa: E731
    tree_slots = [slot(tree_table, p) for p in range(T0 + 3)]  # context, then nodes 0, 1, 2
    path_slots = [slot(path_table, p) for p in range(T0)] + [slot(path_table, T0), slot(path_table, T0 + 1)]
    path_rows = list(range(T0)) + [T0, T0 + 2]  # nodes 0 and 2 accepted (node 1 is not 2's ancestor)
    for cache, scale, data in ((k_cache, ks, keys), (v_cache, vs, vals)):
        kv_quant.write(cache, scale, torch.tensor(tree_slots), data)
        kv_quant.write(cache, scale, torch.tensor(path_slots), data[path_rows])
    q = torch.randn(1, Hq, D, generator=gen)
    if not cpu_kernels.can_run_decode(q, k_cache):
        pytest.skip("the CPU decode kernel is not available here (no C compiler)")
    node = cpu_kernels.paged_decode(q, k_cache, v_cache, torch.tensor([tree_table]), torch.tensor([T0 + 3]), D ** -0.5,
                                    ks, vs, tree_start=torch.tensor([T0]), tree_bits=torch.tensor([0b101]), amx=amx)
    decoded = cpu_kernels.paged_decode(q, k_cache, v_cache, torch.tensor([path_table]), torch.tensor([T0 + 2]),
                                       D ** -0.5, ks, vs, amx=amx)
    assert torch.equal(node, decoded)


@pytest.mark.skipif(True not in AMX, reason="no AMX tiles on this CPU (or the OS does not grant them)")
@pytest.mark.parametrize("Hq,Hk,D", [(9, 3, 64), (8, 2, 128), (16, 1, 64)])
def test_decode_kernel_amx_matches_the_avx512_kernel(Hq, Hk, D):
    """The AMX tile kernel (queries and softmax weights rounded to bfloat16) against the AVX-512 one
    (float32 queries and weights) on a bfloat16 cache: requests of 1 to 300 keys (block tails, 16-key
    groups cut short, a request as rows of one run), values that differ by bfloat16's rounding only.
    Slots past a request's keys hold NaN: neither kernel may read them into a result."""
    BS, NB = 16, 64
    gen = torch.Generator().manual_seed(13)
    k_cache = torch.randn(NB, BS, Hk, D, generator=gen).bfloat16()
    v_cache = torch.randn(NB, BS, Hk, D, generator=gen).bfloat16()
    lens = [1, 15, 16, 17, 33, 64, 100, 300, 40, 41]
    perm = torch.randperm(NB, generator=gen).tolist()
    tables, used = [], 0
    for i, n in enumerate(lens[:8]):
        blocks = (n + BS - 1) // BS
        tables.append(perm[used:used + blocks])
        used += blocks
        tail = tables[-1][-1]
        k_cache[tail, n % BS or BS:] = float("nan")
        v_cache[tail, n % BS or BS:] = float("nan")
    tables += [tables[-1][:3], tables[-1][:3]]  # two rows of one run (a request's chunk): 40 and 41 keys
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    ctx = torch.tensor(lens)
    q = torch.randn(len(lens), Hq, D, generator=gen)
    got = cpu_kernels.paged_decode(q, k_cache, v_cache, table, ctx, D ** -0.5, amx=True)
    want = cpu_kernels.paged_decode(q, k_cache, v_cache, table, ctx, D ** -0.5)
    assert not got.isnan().any()
    assert float((got - want).abs().max()) < 2e-2 * float(want.abs().max()), float((got - want).abs().max())


# ---------------- the engine, against float32 ----------------
# Bounds on |logprob of a token - float32's logprob of the same token after the same prefix|
# (mean over tokens, worst token), measured on these prompts with margin: the mean is what
# perplexity sees; the worst token bounds outliers.
# Measured (Intel Xeon, Sapphire Rapids): bf16 mean 0.0024 / max 0.011; fp8 0.047 / 0.32; int8 0.012 / 0.082.
TOLERANCE = {"bfloat16": (0.01, 0.05), "fp8": (0.12, 0.8), "int8": (0.04, 0.3)}
SHARED = PARAGRAPHS[3] + "\n\n"


def _prompts(tokenizer) -> list[list[int]]:
    tails = [PARAGRAPHS[4][:300], PARAGRAPHS[5][:200], "Write a haiku about memory pages:", PARAGRAPHS[0][:250]]
    return [tokenizer.encode(SHARED + t) for t in tails]


@pytest.mark.parametrize("kv", list(TOLERANCE))
def test_kv_cache_dtype_logprobs_close_to_float32(make_llm, tokenizer, kv):
    """Chunked prefill (64-token budget), a prefix-cache hit, and a pool small enough to preempt."""
    llm = make_llm(kv_cache_dtype=kv, max_num_batched_tokens=64, num_gpu_blocks=13, max_model_len=208)
    engine = llm.engine
    prompts = _prompts(tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=0, ignore_eos=True)
    first = llm.generate(prompts[0], params)  # its shared-prefix blocks are then cached
    preempted = engine.scheduler.num_preemptions
    outs = [first] + llm.generate(prompts[1:], params)
    assert_all_blocks_free(llm)

    # float32 logprobs of the same tokens (teacher-forced, the default engine)
    full = [p + list(o.outputs[0].token_ids) for p, o in zip(prompts, outs)]
    ref = make_llm().generate(full, SamplingParams(max_tokens=1, prompt_logprobs=0))
    diffs = []
    for p, o, r in zip(prompts, outs, ref):
        c = o.outputs[0]
        for i, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            diffs.append(entry[tok].logprob - r.prompt_logprobs[len(p) + i][tok].logprob)
    d = torch.tensor(diffs).abs()
    mean_tol, max_tol = TOLERANCE[kv]
    assert float(d.mean()) < mean_tol and float(d.max()) < max_tol, (
        f"kv_cache_dtype={kv}: |logprob - float32| mean {float(d.mean()):.4f} (bound {mean_tol}), "
        f"max {float(d.max()):.4f} (bound {max_tol})")
    assert engine.runner.kv_cache_dtype == kv_quant.storage_dtype(kv, torch.float32)
    assert any(o.num_cached_tokens > 0 for o in outs[1:]), "no prefix-cache hit"
    assert engine.scheduler.num_preemptions > preempted, "the small pool never forced a preemption"
