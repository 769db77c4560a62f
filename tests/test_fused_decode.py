"""The one-call decode step (model/fused_decode.py, csrc/fused_decode.c) computes what the
layer-by-layer path computes (int8 W8A8, int4, bfloat16 models): the same final hidden states and the
same KV cache contents, for ragged batches, every KV cache dtype it takes, q/k/v biases, mixed steps
and draft trees, with the plain kernels and with AMX tiles where the CPU has them; engines give the
same greedy tokens either way; models it cannot run are left to the layer-by-layer path."""
from __future__ import annotations

import json

import pytest
import torch

from engine_helpers import assert_all_blocks_free, save_tiny_model
from kvflow import LLM, SamplingParams
from kvflow.layers import cpu_kernels, kernel_choice, op_select
from kvflow.worker.model_runner import build_batch

pytestmark = pytest.mark.skipif(cpu_kernels.kernels() is None, reason="no C compiler: the CPU kernels are off")


@pytest.fixture(scope="module", autouse=True)
def _w8a8():
    kernel_choice.force({"int8": "w8a8", "int4": "int4pack"})  # the layer-by-layer path the C step must equal
    yield
    kernel_choice.force(None)


@pytest.fixture(scope="module")
def tiny_dirs(tokenizer, tmp_path_factory) -> dict[str, str]:
    out = {}
    for arch in ("llama", "qwen2", "qwen3"):  # qwen2: q/k/v biases; qwen3: q/k norms (not taken)
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        save_tiny_model(path, tokenizer, arch)
        out[arch] = str(path)
    return out


def _engine(path: str, quantization: str = "int8", **options) -> LLM:
    if quantization == "bf16":  # a plain bfloat16 model
        return LLM(model=path, dtype="bfloat16", num_gpu_blocks=32, **options)
    return LLM(model=path, quantization=quantization, dtype="float32", num_gpu_blocks=32, **options)


# int4: torch's int4 kernel rounds the activations to bfloat16, the C step to int8 per group of 32;
# bf16: torch rounds the residual stream and every matmul output to bfloat16, the C step does not
TOL = {"int8": 1e-3, "int4": 5e-2, "bf16": 3e-2}
# the plain kernels, and the AMX tile ones where the CPU has them (csrc/fused_decode.c)
AMX = (False, True) if cpu_kernels.kernels().fused_use_amx(0) else (False,)


@pytest.mark.parametrize("arch,kv,quant", [("llama", "float32", "int8"), ("llama", "bfloat16", "int8"),
                                           ("llama", "int8", "int8"), ("qwen2", "float32", "int8"),
                                           ("llama", "bfloat16", "int4"), ("qwen2", "float32", "int4"),
                                           ("llama", "auto", "bf16"), ("qwen2", "int8", "bf16")])
def test_step_equals_layer_by_layer(tiny_dirs, monkeypatch, arch, kv, quant):
    llm = _engine(tiny_dirs[arch], quant, kv_cache_dtype=kv)
    runner = llm.engine.runner
    model, caches, bs = runner.model, runner.kv_caches, runner.block_size
    assert model.fused_decode is not None
    gen = torch.Generator().manual_seed(0)
    lens = [5, 23, 40]  # contexts of 1, 2 and 3 blocks, blocks not in order
    blocks = [[7], [2, 9], [4, 1, 12]]
    ids = [torch.randint(3, 1000, (n + 1,), generator=gen).tolist() for n in lens]
    with torch.inference_mode():
        for seq, b in zip(ids, blocks):  # the prompts, layer by layer
            pre = build_batch([(seq[:-1], 0, b)], bs, torch.device("cpu"))
            model._forward_layers(pre.input_ids, pre.positions, caches, pre.meta, None)
        dec = build_batch([(seq[-1:], n, b) for seq, n, b in zip(ids, lens, blocks)], bs, torch.device("cpu"))
        for amx in AMX:
            got = model.fused_decode.run(dec.input_ids, dec.positions, caches, dec.meta, None, amx)
            got_cache = [c.data.clone() for c in caches]
            want = model._forward_layers(dec.input_ids, dec.positions, caches, dec.meta, None)
            for c, g in zip(caches, got_cache):  # the C step wrote what the torch path writes
                diff, top = float((c.data.float() - g.float()).abs().max()), float(c.data.float().abs().max())
                assert diff <= (max(1.0, TOL[quant] * 127) if kv == "int8" else TOL[quant] * top), diff  # int8: steps
            assert float((got - want).abs().max()) <= TOL[quant] * float(want.abs().max())
            # the LM head in C equals torch's (which rounds its input to bfloat16 for int8 and int4 weights)
            assert model.fused_decode.head is not None
            logits, ref = model.fused_decode.run_head(want.float().contiguous(), amx), model.lm_head(want).float()
            assert float((logits - ref).abs().max()) <= 2e-2 * float(ref.abs().max())
        monkeypatch.setenv("KVFLOW_FUSED_OPS", "c")
        assert float((model.compute_logits(want) - ref).abs().max()) <= 2e-2 * float(ref.abs().max())
        # fewer layers (layer_skip drafts) stop early in both
        short = model.fused_decode.run(dec.input_ids, dec.positions, caches, dec.meta, 1)
        assert torch.allclose(short, model._forward_layers(dec.input_ids, dec.positions, caches, dec.meta, 1),
                              atol=TOL[quant] * float(short.abs().max()))


@pytest.mark.parametrize("quant", ["int8", "bf16"])
def test_mixed_step_equals_layer_by_layer(tiny_dirs, quant):
    """Decodes, a chunk after a cached prefix (a prompt's second chunk, or draft tokens to verify) and a
    fresh prompt chunk in one step of 26 tokens (two AMX row tiles): each token attends as its own row, causally."""
    llm = _engine(tiny_dirs["llama"], quant)
    runner = llm.engine.runner
    model, caches, bs = runner.model, runner.kv_caches, runner.block_size
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (6, 20, 28, 19)]
    blocks = [[3], [5, 11], [8, 2], [14, 15]]
    with torch.inference_mode():
        for seq, b, cached in zip(seqs[:3], blocks, (5, 19, 23)):  # prefixes already in the cache
            pre = build_batch([(seq[:cached], 0, b)], bs, torch.device("cpu"))
            model._forward_layers(pre.input_ids, pre.positions, caches, pre.meta, None)
        items = [(seqs[0][5:], 5, blocks[0]), (seqs[1][19:], 19, blocks[1]),  # two decodes
                 (seqs[2][23:], 23, blocks[2]), (seqs[3], 0, blocks[3])]  # 5 after a prefix, 19 fresh
        batch = build_batch(items, bs, torch.device("cpu"))
        assert batch.input_ids.shape[0] == 26 and len(batch.meta.groups) >= 2
        want = model._forward_layers(batch.input_ids, batch.positions, caches, batch.meta, None)
        outs = [model.fused_decode.run(batch.input_ids, batch.positions, caches, batch.meta, None, amx) for amx in AMX]
        for got in outs:
            assert float((got - want).abs().max()) <= TOL[quant] * float(want.abs().max())
        if quant == "int8":  # the tiles' int32 sums and epilogue are the VNNI path's: the same bits
            assert all(torch.equal(outs[0], got) for got in outs)


@pytest.mark.parametrize("quant", ["int8", "bf16"])
def test_tree_step_equals_layer_by_layer(tiny_dirs, quant):
    """A decode beside a draft tree (a root and six nodes on two branches) in one step: each node sees the
    cached prefix, its ancestors and itself, with its depth's rotary position, as under the torch path's mask."""
    llm = _engine(tiny_dirs["llama"], quant)
    runner = llm.engine.runner
    model, caches, bs = runner.model, runner.kv_caches, runner.block_size
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (9, 30)]
    blocks = [[6], [10, 3]]
    parents = [-1, 0, 1, -1, 3, 0]  # two children of the root, a chain under each, and a sibling
    with torch.inference_mode():
        for seq, b, cached in zip(seqs, blocks, (8, 22)):
            pre = build_batch([(seq[:cached], 0, b)], bs, torch.device("cpu"))
            model._forward_layers(pre.input_ids, pre.positions, caches, pre.meta, None)
        items = [(seqs[0][8:], 8, blocks[0]), (seqs[1][22:29], 22, blocks[1])]  # a decode; root + 6 nodes
        batch = build_batch(items, bs, torch.device("cpu"), trees=[None, parents])
        assert batch.meta.groups[-1].tree and len(batch.meta.groups[-1].tree_nodes) == 6
        assert model.fused_decode.applies(batch.input_ids, caches, batch.meta)
        want = model._forward_layers(batch.input_ids, batch.positions, caches, batch.meta, None)
        for amx in AMX:
            got = model.fused_decode.run(batch.input_ids, batch.positions, caches, batch.meta, None, amx)
            assert float((got - want).abs().max()) <= TOL[quant] * float(want.abs().max())
        # the same nodes as a plain causal chunk give other states: the ancestor bits were applied
        causal = build_batch(items, bs, torch.device("cpu"))
        plain = model.fused_decode.run(causal.input_ids, batch.positions, caches, causal.meta, None)
        assert float((plain[4:] - want[4:]).abs().max()) > 10 * TOL[quant] * float(want.abs().max())


def test_engine_generation_scored_the_same_by_the_layer_by_layer_path(tiny_dirs, monkeypatch):
    """Greedy tokens generated through the C step (batched, ragged) get the logprobs the layer-by-layer
    path gives the same tokens (teacher-forced): the engine feeds the step correctly, step after step.
    Tokens themselves may part at near-ties: the torch LM head rounds its input to bfloat16."""
    llm = _engine(tiny_dirs["llama"])
    prompts = [[5, 6, 7, 8], list(range(10, 40)), [99] * 17]
    calls = []
    fused = llm.engine.runner.model.fused_decode
    run = fused.run
    monkeypatch.setattr(fused, "run", lambda *a: calls.append(1) or run(*a))
    monkeypatch.setenv("KVFLOW_FUSED_OPS", "c")  # forces a side of every measured choice
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0))
    assert_all_blocks_free(llm)
    assert len(calls) >= 23 and all(len(o.outputs[0].token_ids) == 24 for o in outs)
    monkeypatch.setenv("KVFLOW_FUSED_OPS", "torch")
    calls.clear()
    seqs = [o.prompt_token_ids + list(o.outputs[0].token_ids) for o in outs]
    refs = llm.generate(seqs, SamplingParams(max_tokens=1, prompt_logprobs=0))
    assert not calls
    for o, ref in zip(outs, refs):
        n, comp = len(o.prompt_token_ids), o.outputs[0]
        got = torch.tensor([comp.logprobs[i][t].logprob for i, t in enumerate(comp.token_ids)])
        want = torch.tensor([ref.prompt_logprobs[n + i][t].logprob for i, t in enumerate(comp.token_ids)])
        assert float((got - want).abs().max()) < 0.05, (got, want)


def test_not_taken_where_it_cannot_run(tiny_dirs):
    assert _engine(tiny_dirs["qwen3"]).engine.runner.model.fused_decode is None  # per-head q/k norms
    float_llm = LLM(model=tiny_dirs["llama"], dtype="float32", num_gpu_blocks=32)
    assert float_llm.engine.runner.model.fused_decode is None  # float32 keeps the exact layer-by-layer path


def test_start_up_chooses_every_step_size_once(tiny_dirs, monkeypatch, tmp_path):
    """The C-step-or-torch choice of every step size (1 to 128 tokens) is made while the engine starts,
    not inside the first request of each size, and kept on disk: a second process on the machine (here:
    the same one with its memory of choices dropped) starts without timing any step."""
    monkeypatch.setenv("KVFLOW_CACHE", str(tmp_path))
    monkeypatch.delenv("KVFLOW_FUSED_OPS", raising=False)
    monkeypatch.setattr(op_select, "_choice", {})
    monkeypatch.setattr(op_select, "_saved", None)
    saved = []
    real_save = op_select._save
    monkeypatch.setattr(op_select, "_save", lambda key, choice: (saved.append(key), real_save(key, choice)))
    runner = _engine(tiny_dirs["llama"]).engine.runner
    fused, cache_dtype = runner.model.fused_decode, runner.kv_caches[0][0].dtype
    assert all(fused.choices_known(1 << i, cache_dtype) for i in range(8))
    steps = {k for k in saved if k.startswith("('fused_decode'")}
    assert len(steps) == 8 and steps <= set(json.loads(op_select.cache_path().read_text()))
    saved.clear()
    monkeypatch.setattr(op_select, "_choice", {})
    monkeypatch.setattr(op_select, "_saved", None)
    _engine(tiny_dirs["llama"])
    assert not [k for k in saved if k.startswith("('fused")]


def test_one_side_runs_every_step_size(tiny_dirs, monkeypatch):
    """Once every size class is timed, the side that won most classes runs all of them (the two sides
    round differently: a request's greedy tokens must not depend on the size of its step)."""
    monkeypatch.delenv("KVFLOW_FUSED_OPS", raising=False)
    fused = _engine(tiny_dirs["llama"]).engine.runner.model.fused_decode
    monkeypatch.setattr(fused, "_votes", {})
    classes = [1 << i for i in range(8)]
    choices = {fused._head_key(c): "torch" if c == 4 else "c" for c in classes}  # 7 of 8 classes: C
    monkeypatch.setattr(op_select, "_choice", dict(choices))
    never = lambda: pytest.fail("a timed class is not timed again")  # noqa: E731
    assert fused._runs_in_c(fused._head_key, fused._head_key(4), never)  # the class that timed torch faster
    monkeypatch.setattr(fused, "_votes", {})
    monkeypatch.setattr(op_select, "_choice", {k: "torch" if c > 2 else "c" for c, k in zip(classes, choices)})
    assert not fused._runs_in_c(fused._head_key, fused._head_key(1), never)  # 6 of 8: torch for all
    monkeypatch.setenv("KVFLOW_FUSED_OPS", "c")  # a forced side still wins
    assert fused._runs_in_c(fused._head_key, fused._head_key(8), never)
