"""Triton kernels (layers/triton) against their plain-torch references, and the whole engine through
the triton attention backend.

On a machine without CUDA the kernels run under Triton's interpreter on CPU tensors (the kvflow
package turns TRITON_INTERPRET on before any kernel is defined; it is set here too, before triton is
imported, for the same reason). With CUDA they are compiled and run on the GPU (scripts/gpu_check.sh).
Shapes are small: the interpreter runs each program of the grid one after another in Python."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kvflow.layers.triton.chunk_attention import chunk_attention, chunk_attention_reference  # noqa: E402
from kvflow.layers.triton.paged_decode import paged_decode_attention, paged_decode_reference  # noqa: E402
from kvflow.layers.triton.rms_norm import rms_norm, rms_norm_reference  # noqa: E402
from kvflow.layers.triton.rotary import rotary_, rotary_reference  # noqa: E402
from kvflow.layers.triton.silu_mul import silu_mul, silu_mul_reference  # noqa: E402

from kvflow.layers.triton import INTERPRET  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Triton's interpreter casts float32 to bfloat16 by truncation, not round-to-nearest: results come
# out up to two ulps low in magnitude (a relative 2**-6), where a GPU rounds like torch.
BF16_RTOL = 2 ** -6 if INTERPRET else 2 ** -8
# Max abs error against a float32 reference on O(1) outputs: a couple of output roundings (bf16
# has an 8-bit mantissa); on a GPU the bf16/fp16 kernels also round the probabilities for tl.dot.
ATOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _pool(num_blocks, block_size, kv_heads, head_dim, dtype, gen):
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return (torch.randn(shape, generator=gen).to(DEVICE, dtype), torch.randn(shape, generator=gen).to(DEVICE, dtype))


def _tables(num_reqs, width, num_blocks, gen):
    """Each request gets `width` distinct blocks in random (non-contiguous) order."""
    return torch.stack([torch.randperm(num_blocks, generator=gen)[:width] for _ in range(num_reqs)]).to(DEVICE)


# ---------------- paged decode ----------------
DECODE_CASES = [
    # (Hq, Hk, head_dim, block_size)
    (4, 4, 64, 16),    # MHA
    (8, 2, 64, 8),     # GQA 4
    (8, 1, 96, 32),    # MQA, head_dim masked to 128
    (6, 2, 128, 64),   # GQA 3 (group padded to the tile)
    (2, 1, 256, 16),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_paged_decode_matches_reference(case, dtype):
    Hq, Hk, D, BS = case
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    k_cache, v_cache = _pool(48, BS, Hk, D, dtype, gen)
    width = 6
    ctx = torch.tensor([1, width * BS, 5 * BS // 2 + 3])  # one key, a full table, ragged
    tables = _tables(3, width, 48, gen)
    q = torch.randn(3, Hq, D, generator=gen).to(DEVICE, dtype)
    want = paged_decode_reference(q, k_cache, v_cache, tables, ctx.to(DEVICE), D ** -0.5)
    got = paged_decode_attention(q, k_cache, v_cache, tables, ctx.to(DEVICE), D ** -0.5)
    assert got.dtype == dtype
    err = (got.float() - want).abs().max().item()
    assert err < ATOL[dtype], f"{case} {dtype}: max error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paged_decode_split_k(dtype):
    """Split-K (the second, reduce kernel) gives the one-split answer, with empty trailing splits for
    the short request, and writes into a view of a larger output buffer."""
    Hq, Hk, D, BS = 8, 2, 64, 16
    gen = torch.Generator().manual_seed(7)
    k_cache, v_cache = _pool(64, BS, Hk, D, dtype, gen)
    ctx = torch.tensor([40 * BS - 5, 3]).to(DEVICE)
    tables = _tables(2, 40, 64, gen)
    q = torch.randn(2, Hq, D, generator=gen).to(DEVICE, dtype)
    want = paged_decode_reference(q, k_cache, v_cache, tables, ctx, D ** -0.5)
    one = paged_decode_attention(q, k_cache, v_cache, tables, ctx, D ** -0.5, num_splits=1)
    buffer = torch.full((5, Hq, D), 7.0, dtype=dtype, device=DEVICE)
    split = paged_decode_attention(q, k_cache, v_cache, tables, ctx, D ** -0.5, out=buffer[:2], num_splits=5)
    assert split.data_ptr() == buffer.data_ptr() and bool((buffer[2:] == 7.0).all())
    for got in (one, split):
        assert (got.float() - want).abs().max().item() < ATOL[dtype]
    assert (one.float() - split.float()).abs().max().item() < ATOL[dtype]


# ---------------- chunk (prefill) attention ----------------
CHUNK_CASES = [
    # (Hq, Hk, head_dim, block_size)
    (4, 4, 64, 16),
    (8, 2, 64, 8),
    (4, 1, 80, 32),
]


def _chunk_batch(q_lens, prefixes, Hq, D, BS, dtype, gen, lead=2):
    """Chunks back to back after `lead` other rows (where decodes would sit)."""
    q_lens, prefixes = torch.tensor(q_lens), torch.tensor(prefixes)
    seq = prefixes + q_lens
    qsl = lead + torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(q_lens, 0)])
    width = int((seq.max() + BS - 1) // BS)
    q = torch.randn(int(qsl[-1]), Hq, D, generator=gen).to(DEVICE, dtype)
    return q, qsl.to(DEVICE), seq.to(DEVICE), width


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CHUNK_CASES, ids=str)
@pytest.mark.parametrize("prefixed", [False, True], ids=["no-prefix", "cached-prefix"])
def test_chunk_attention_matches_reference(case, dtype, prefixed):
    Hq, Hk, D, BS = case
    gen = torch.Generator().manual_seed(11)
    k_cache, v_cache = _pool(64, BS, Hk, D, dtype, gen)
    q_lens = [37, 1, 5]  # a chunk longer than one query tile, a single token, a short one
    prefixes = [2 * BS + 3, 20, BS] if prefixed else [0, 0, 0]
    q, qsl, seq, width = _chunk_batch(q_lens, prefixes, Hq, D, BS, dtype, gen)
    tables = _tables(3, width, 64, gen)
    out = torch.full_like(q, 5.0)
    chunk_attention(q, k_cache, v_cache, tables, qsl, seq, max(q_lens), D ** -0.5, out=out)
    want = chunk_attention_reference(q, k_cache, v_cache, tables, qsl, seq, D ** -0.5)
    assert bool((out[:2] == 5.0).all()), "rows outside the chunks were written"
    err = (out[2:].float() - want[2:]).abs().max().item()
    assert err < ATOL[dtype], f"{case} {dtype} prefixed={prefixed}: max error {err:.2e}"


def test_chunk_attention_strided_table():
    """A block table that is a column slice of a wider one (as build_batch hands the chunk group)."""
    Hq, Hk, D, BS = 4, 2, 64, 8
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache = _pool(32, BS, Hk, D, torch.float32, gen)
    q, qsl, seq, width = _chunk_batch([9, 4], [11, 0], Hq, D, BS, torch.float32, gen, lead=0)
    wide = _tables(2, 10, 32, gen)
    tables = wide[:, :width]
    assert not tables.is_contiguous()
    got = chunk_attention(q, k_cache, v_cache, tables, qsl, seq, 9, D ** -0.5)
    want = chunk_attention_reference(q, k_cache, v_cache, tables, qsl, seq, D ** -0.5)
    assert (got - want).abs().max().item() < ATOL[torch.float32]


# ---------------- the backend over a real mixed batch ----------------
@pytest.mark.parametrize("fresh_by_sdpa", [False, True], ids=["chunk-kernel", "sdpa-fresh"])
@pytest.mark.parametrize("block_size", [8, 16])
def test_triton_backend_equals_torch_backend(block_size, fresh_by_sdpa, monkeypatch):
    """A step with two decodes and three prompt chunks (two with no cached prefix, one with), through
    build_batch: the triton backend gives the torch backend's output and leaves the same KV pool,
    whichever way it runs the prefix-free chunks (on a GPU that is measured; forced here)."""
    from kvflow.layers import attention
    from kvflow.layers.triton import attention as triton_attention
    from kvflow.worker.model_runner import build_batch

    monkeypatch.setattr(triton_attention, "_fresh_by_sdpa", lambda *args: fresh_by_sdpa)

    Hq, Hk, D, NB = 4, 2, 64, 32
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache = _pool(NB, block_size, Hk, D, torch.float32, gen)
    blocks = torch.randperm(NB, generator=gen).tolist()
    items = [([1], 5, blocks[0:2]), ([1], 17, blocks[2:5]), ([1] * 7, 0, blocks[5:7]),
             ([1] * 3, 0, blocks[12:13]), ([1] * 12, 2 * block_size + 1, blocks[7:12])]
    batch = build_batch(items, block_size, DEVICE)
    T = batch.input_ids.shape[0]
    q, k, v = (torch.randn(T, h, D, generator=gen).to(DEVICE) for h in (Hq, Hk, Hk))
    results = {}
    for name in ("torch", "triton"):
        kc, vc = k_cache.clone(), v_cache.clone()
        batch.meta.backend = name
        results[name] = attention.paged_attention(q, k, v, kc, vc, batch.meta, D ** -0.5), kc, vc
    (want, kw, vw), (got, kg, vg) = results["torch"], results["triton"]
    assert torch.equal(kw, kg) and torch.equal(vw, vg)
    err = (got - want).abs().amax(dim=(1, 2))
    assert float(err.max()) < 2e-5, f"triton vs torch, max error per token: {err.tolist()}"


def test_fresh_chunks_by_sdpa_padded_to_buckets():
    """Prefix-free chunks through SDPA, each padded to its bucket length (a view over the next chunk's
    rows where there is room, a padded copy at the end of the batch) = the reference over the pool."""
    from kvflow.layers.triton.attention import fresh_chunk_attention, padded_length

    Hq, Hk, D, BS = 4, 2, 32, 16
    lens = [5, 300, 37]  # buckets 8 (a view), 512 (a copy: runs past the batch), 64 (a copy)
    assert [padded_length(n) for n in lens] == [8, 512, 64]
    starts = torch.tensor([0, 5, 305, 342])
    T = int(starts[-1])
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(T, h, D, generator=gen) for h in (Hq, Hk, Hk))
    blocks = [-(-n // BS) for n in lens]
    tables = torch.zeros(len(lens), max(blocks), dtype=torch.long)
    perm = torch.randperm(sum(blocks), generator=gen)
    k_cache, v_cache = torch.zeros(sum(blocks), BS, Hk, D), torch.zeros(sum(blocks), BS, Hk, D)
    for r, (n, nb) in enumerate(zip(lens, blocks)):
        tables[r, :nb] = perm[sum(blocks[:r]):sum(blocks[:r]) + nb]
        pos = torch.arange(n)
        k_cache[tables[r, pos // BS], pos % BS] = k[int(starts[r]):int(starts[r]) + n]
        v_cache[tables[r, pos // BS], pos % BS] = v[int(starts[r]):int(starts[r]) + n]
    got = fresh_chunk_attention(q, k, v, starts.tolist(), D ** -0.5, torch.full_like(q, float("nan")))
    want = chunk_attention_reference(q, k_cache, v_cache, tables, starts, torch.tensor(lens), D ** -0.5)
    assert (got - want).abs().max().item() < 1e-5


def test_backend_selection(monkeypatch):
    from kvflow.errors import ConfigError
    from kvflow.layers import attention

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(attention, "_default_backend", "auto")
    assert attention.resolve_backend(None, cpu) == "cpu"
    assert attention.resolve_backend("auto", cuda) == "triton"
    assert attention.resolve_backend("torch", cuda) == "torch"
    attention.set_attention_backend("triton")  # the process default: an engine's "auto" defers to it
    assert attention.resolve_backend("auto", cpu) == "triton"
    assert attention.resolve_backend("cpu", cpu) == "cpu"
    with pytest.raises(ConfigError, match="auto, torch, cpu, triton"):
        attention.set_attention_backend("flash")


# ---------------- fused elementwise kernels ----------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm(dtype, with_residual):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 96, generator=gen).to(DEVICE, dtype)
    w = (1 + 0.3 * torch.randn(96, generator=gen)).to(DEVICE, dtype)
    res = torch.randn(5, 96, generator=gen).to(DEVICE, dtype) if with_residual else None
    want = rms_norm_reference(x, w, 1e-6, res)
    got = rms_norm(x, w, 1e-6, res, residual_out=res)  # the model's call: the residual stream updated in place
    if with_residual:
        assert got[1] is res
        if dtype == torch.bfloat16:
            torch.testing.assert_close(got[1].float(), want[1].float(), rtol=BF16_RTOL, atol=0)
        else:
            assert torch.equal(got[1], want[1]), "the residual sum must round exactly as torch's add"
        got, want = got[0], want[0]
    assert got.dtype == dtype
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2 * BF16_RTOL, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_in_place_on_fused_qkv_view(dtype):
    """q and k rotated in one call on the strided view of the fused qkv output, v untouched."""
    from kvflow.layers.rotary import RotaryEmbedding

    T, Hq, Hk, D = 6, 4, 2, 64
    rope = RotaryEmbedding(D, 64, 10000.0, None)
    cos, sin = rope.cos_sin(torch.tensor([0, 1, 2, 17, 40, 63]), dtype)
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(T, (Hq + 2 * Hk) * D, generator=gen).to(DEVICE, dtype)
    v_before = qkv[:, (Hq + Hk) * D:].clone()
    qk = qkv[:, :(Hq + Hk) * D].view(T, Hq + Hk, D)
    want = rotary_reference(qk.clone(), cos.to(DEVICE), sin.to(DEVICE))
    got = rotary_(qk, cos.to(DEVICE), sin.to(DEVICE))
    assert got.data_ptr() == qkv.data_ptr() and torch.equal(qkv[:, (Hq + Hk) * D:], v_before)
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2 * BF16_RTOL, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=1e-2 if dtype == torch.bfloat16 else 1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_and_write_kv(dtype):
    """The fused kernel: q and k rotated in place exactly as rotary_ rotates them, the rotated k and
    the untouched v written to their slots (scattered over non-contiguous blocks), no other slot touched."""
    from kvflow.layers.rotary import RotaryEmbedding
    from kvflow.layers.triton.rotary import rotary_and_write_kv_

    T, Hq, Hk, D, NB, BS = 5, 12, 4, 64, 6, 4  # 20 heads: a full tile of 16 and a masked one
    rope = RotaryEmbedding(D, 64, 10000.0, None)
    tables = rope.cos_sin(torch.tensor([0, 3, 9, 21, 40]), dtype)
    gen = torch.Generator().manual_seed(6)
    qkv = torch.randn(T, Hq + 2 * Hk, D, generator=gen).to(DEVICE, dtype)
    k_cache, v_cache = _pool(NB, BS, Hk, D, dtype, gen)
    slots = torch.tensor([22, 1, 13, 4, 17], device=DEVICE)
    want_qk = rotary_(qkv[:, :Hq + Hk].clone(), tables.cos32.to(DEVICE), tables.sin32.to(DEVICE))
    want_k, want_v = k_cache.clone().view(-1, Hk, D), v_cache.clone().view(-1, Hk, D)
    want_k[slots], want_v[slots] = want_qk[:, Hq:], qkv[:, Hq + Hk:]
    v_before = qkv[:, Hq + Hk:].clone()
    rotary_and_write_kv_(qkv, Hq, Hk, tables.cos32.to(DEVICE), tables.sin32.to(DEVICE), k_cache, v_cache, slots)
    assert torch.equal(qkv[:, :Hq + Hk], want_qk) and torch.equal(qkv[:, Hq + Hk:], v_before)
    assert torch.equal(k_cache.view(-1, Hk, D), want_k) and torch.equal(v_cache.view(-1, Hk, D), want_v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul(dtype):
    gen = torch.Generator().manual_seed(4)
    x = (3 * torch.randn(7, 2 * 1100, generator=gen)).to(DEVICE, dtype)  # two column tiles, the second partial
    got, want = silu_mul(x), silu_mul_reference(x)
    assert got.shape == (7, 1100)
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2 * BF16_RTOL, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=1e-2 if dtype == torch.bfloat16 else 1e-3)


# ---------------- the whole engine through the triton backend ----------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random-weight 2-layer Llama (GQA 2, head_dim 32) saved as a Hugging Face folder, with the
    shipped SmolLM2 tokenizer files beside it; (folder, transformers model)."""
    import shutil

    import transformers

    from kvflow.model.loader import CONFIGS_DIR

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.2,
                                      bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
    torch.manual_seed(99)
    model = transformers.LlamaForCausalLM(config).float().eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(str(path), safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(CONFIGS_DIR / "llama-3.1-8b" / f, path / f)
    return path, model


def test_engine_greedy_triton_equals_torch_and_transformers(tiny_llama, monkeypatch):
    """Chunked prefill (16-token budget, 8-token blocks), decodes batched with prompt chunks, and
    prefix-cache hits: the triton backend gives the torch backend's and transformers' greedy tokens."""
    from engine_helpers import assert_all_blocks_free, hf_greedy
    from kvflow import LLM, SamplingParams
    from kvflow.layers.triton import attention as triton_attention

    calls = {"paged_decode_attention": 0, "chunk_attention": 0}  # both kernels must have run
    for name in calls:
        def spy(*args, _fn=getattr(triton_attention, name), _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(triton_attention, name, spy)

    path, hf = tiny_llama
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(3, 256, (21,), generator=gen).tolist()
    prompts = [shared + torch.randint(3, 256, (n,), generator=gen).tolist() for n in (9, 4)]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    outputs = {}
    for backend in ("torch", "triton"):
        llm = LLM(model=str(path), dtype="float32", device=str(DEVICE), attention_backend=backend, block_size=8,
                  max_num_batched_tokens=16, num_gpu_blocks=32, enable_prefix_caching=True)
        first = llm.generate(prompts[0], params)  # fills the cache with the shared prefix
        second = llm.generate(prompts, params)  # both reuse it; their chunks share steps with decodes
        assert second[1].num_cached_tokens >= 16, "the shared prefix was not reused"
        outputs[backend] = [first.outputs[0].token_ids] + [o.outputs[0].token_ids for o in second]
        assert_all_blocks_free(llm)
        if backend == "torch":
            assert not any(calls.values())
    assert all(calls.values()), calls
    want = [hf_greedy(hf, p, 6) for p in (prompts[0], *prompts)]
    assert outputs["triton"] == outputs["torch"] == want


def test_decode_graph_buffers_match_the_eager_step(tiny_llama):
    """The CUDA-graph path's static buffers (one packed host row per request, padding rows sent to a
    scratch block) give the hidden states of the ordinary step. On CPU the graph is not captured,
    so the same buffers run eagerly; on a GPU the test captures and replays."""
    from kvflow import LLM, SamplingParams
    from kvflow.worker.cuda_graphs import DecodeGraphs
    from kvflow.worker.model_runner import build_batch

    path, _ = tiny_llama
    llm = LLM(model=str(path), dtype="float32", device=str(DEVICE), attention_backend="triton", block_size=8,
              num_gpu_blocks=32, enforce_eager=True)
    runner = llm.engine.runner
    outs = llm.generate([[5, 6, 7, 8, 9] * 3, list(range(20, 31))], SamplingParams(temperature=0.0, max_tokens=1))
    # Two requests decoding their next token over the blocks the prompts just filled (blocks 0-3 of a
    # fresh pool; block 31 stays free and is the scratch block).
    reqs = [(o.prompt_token_ids + o.outputs[0].token_ids, len(o.prompt_token_ids)) for o in outs]
    tables = [[0, 1], [2, 3]]
    graphs = DecodeGraphs(runner.model, runner.kv_caches, 8, max_num_seqs=4, max_model_len=64, scratch_block=31,
                          device=DEVICE)
    if DEVICE.type == "cuda":
        graphs.capture()
    got = graphs.run([t[-1] for t, _ in reqs], [s for _, s in reqs], tables)  # padded to the bucket of 2
    batch = build_batch([([t[-1]], s, tab) for (t, s), tab in zip(reqs, tables)], 8, DEVICE)
    batch.meta.backend = "triton"
    want = runner.model(batch.input_ids, batch.positions, runner.kv_caches, batch.meta)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert graphs.sizes == [1, 2, 4]


def test_engine_triton_speculative_decoding_and_preemption(tiny_llama):
    """n-gram speculative decoding (verification chunks: the last token plus drafts over a cached
    prefix) and preemption (a 10-block pool for three requests that need 4 each): greedy tokens
    through the triton backend are still transformers' tokens."""
    from engine_helpers import assert_all_blocks_free, hf_greedy
    from kvflow import LLM, SamplingParams

    path, hf = tiny_llama
    gen = torch.Generator().manual_seed(1)
    motif = torch.randint(3, 256, (6,), generator=gen).tolist()
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() + motif * 3 for n in (3, 6, 9)]
    llm = LLM(model=str(path), dtype="float32", device=str(DEVICE), attention_backend="triton", block_size=8,
              max_num_batched_tokens=32, num_gpu_blocks=10, enable_prefix_caching=False,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))
    assert llm.engine.speculator.stats.num_drafts > 0, "no draft was verified"
    assert llm.engine.scheduler.num_preemptions > 0, "no request was preempted"
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, 8) for p in prompts]
    assert_all_blocks_free(llm)
