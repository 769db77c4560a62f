"""Quantized weights: round trips, every kernel against the dequantized reference, the embedding
lookup, the GGUF direct load (the bundled Q4_1 file and a tiny Q8_0/Q4_0 file written here), config
errors before any weight is read, dtype="auto", and the measured kernel choice (its cache and its
override; timings are never asserted)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kvflow.config import EngineConfig, resolve_auto_dtype
from kvflow.errors import ConfigError
from kvflow.layers import kernel_choice
from kvflow.layers.linear import Linear
from kvflow.layers.quantized_linear import (QuantizedEmbedding, QuantizedLinear, _unpack_int4,
                                            quantize_activations, quantize_int4, quantize_int8)


def _weight(n=128, k=96, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def test_int8_and_int4_round_trip_within_half_a_step():
    w = _weight()
    q8 = quantize_int8(w)
    assert q8.q.dtype == torch.int8 and q8.scale.shape == (128,)
    assert ((q8.dequantize() - w).abs() <= q8.scale[:, None] / 2 + 1e-6).all()
    q4 = quantize_int4(w)
    assert q4.q.max() <= 15 and q4.scale.shape == (128, 3)
    step = q4.scale.repeat_interleave(32, dim=1)
    assert ((q4.dequantize() - w).abs() <= step / 2 + 1e-5).all()


def test_int4_pack_layout_unpacks_to_the_same_values():
    q4 = quantize_int4(_weight())
    layer = QuantizedLinear(q4)
    assert torch.equal(_unpack_int4(layer.packed, 128, 96), q4.q.t())


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_every_kernel_matches_the_dequantized_weight(kind, rows):
    qt = (quantize_int8 if kind == "int8" else quantize_int4)(_weight())
    bias = torch.randn(128)
    layer = QuantizedLinear(qt, bias)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(1))
    want = x @ qt.dequantize().t() + bias
    for name, fn in layer.kernel_methods(rows).items():
        layer.set_kernel_plan(kernel_choice.KernelPlan.single(fn, name))
        got = layer(x)
        assert got.dtype == x.dtype and got.shape == (rows, 128)
        err = (got - want).abs().max() / want.abs().max()
        assert err < 0.03, f"{kind} kernel {name}, {rows} rows: relative error {err:.4f}"


def test_w8a8_activations_in_two_int8_terms():
    """x ~ q1 a1 + q2 a2 per token, to within half of a2's step, a2 about a1 / 254: with an outlier
    channel 50x the rest, W8A8 stays as close to the exact product as the weights allow (one int8 term
    per token leaves the other channels a few levels: over 100x the error)."""
    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(3))
    x[:, 5] *= 50
    hi, a_hi, lo, a_lo = quantize_activations(x)
    assert hi.dtype == lo.dtype == torch.int8 and int(hi.abs().max()) == 127
    assert torch.all((x - (hi * a_hi + lo * a_lo)).abs() <= a_lo / 2 * 1.001)
    assert torch.all(a_lo <= a_hi / 254 * 1.001)
    qt = quantize_int8(_weight())
    layer = QuantizedLinear(qt)
    layer.set_kernel_plan(kernel_choice.KernelPlan.single(layer.kernel_methods(6)["w8a8"], "w8a8"))
    want = x @ qt.dequantize().t()
    assert float((layer(x) - want).abs().max() / want.abs().max()) < 1e-4


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_embedding_rows_are_the_dequantized_weight(kind):
    qt = (quantize_int8 if kind == "int8" else quantize_int4)(_weight())
    emb = QuantizedEmbedding(QuantizedLinear(qt), torch.float32)
    ids = torch.tensor([0, 5, 63, 64, 100, 127, 5])
    want = qt.dequantize()[ids]
    tol = 1e-6 if kind == "int8" else 0.02 * want.abs().max()  # int4 scales are stored in bfloat16
    assert (emb(ids) - want).abs().max() <= tol


def test_bundled_q4_1_loads_exactly_without_a_float_copy():
    from gguf import GGUFReader, quants

    from engine_helpers import MODEL_PATH
    from kvflow.model.gguf_quant import convert
    if MODEL_PATH is None:
        pytest.skip("bundled model not installed")
    t = next(t for t in GGUFReader(MODEL_PATH).tensors if t.name == "blk.0.ffn_down.weight")
    assert t.tensor_type.name == "Q4_1"
    qt = convert(t, "int4", lambda *a: pytest.fail("Q4_1 must not be dequantized"))
    want = torch.from_numpy(np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
    assert qt.kind == "int4" and qt.group_size == 32
    assert torch.allclose(qt.dequantize(), want, atol=1e-5)


def _write_tiny_gguf(path, types: dict[str, str], extra=None):
    """A 1-layer llama GGUF (hidden 64, ffn 128, vocab 128) with the given GGML types per tensor;
    extra(writer) adds metadata."""
    import gguf
    gen = torch.Generator().manual_seed(0)
    shapes = {"token_embd.weight": (128, 64), "output_norm.weight": (64,), "blk.0.attn_norm.weight": (64,),
              "blk.0.ffn_norm.weight": (64,), "blk.0.attn_q.weight": (64, 64), "blk.0.attn_k.weight": (64, 64),
              "blk.0.attn_v.weight": (64, 64), "blk.0.attn_output.weight": (64, 64),
              "blk.0.ffn_gate.weight": (128, 64), "blk.0.ffn_up.weight": (128, 64), "blk.0.ffn_down.weight": (64, 128)}
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("embedding_length", 64), ("block_count", 1), ("feed_forward_length", 128),
                       ("attention.head_count", 4), ("attention.head_count_kv", 4), ("context_length", 256)):
        (w.add_uint32 if isinstance(value, int) else w.add_float32)(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    if extra is not None:
        extra(w)
    values = {}
    for name, shape in shapes.items():
        a = (torch.randn(*shape, generator=gen) * (0.02 if len(shape) > 1 else 1) + (1 if len(shape) == 1 else 0)).numpy()
        values[name] = a
        qtype = gguf.GGMLQuantizationType[types.get(name, "F32") if len(shape) > 1 else "F32"]
        data = gguf.quants.quantize(a, qtype) if qtype != gguf.GGMLQuantizationType.F32 else a
        w.add_tensor(name, data, raw_shape=data.shape if qtype == gguf.GGMLQuantizationType.F32 else None, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


def test_gguf_reader_steps_over_the_vocabulary(tmp_path):
    """kvflow's GGUF reader steps over arrays of strings and long arrays of numbers (a file's
    vocabulary, merges and token types, which it never reads: seconds of gguf-py's parsing) and reads
    every other field and every tensor as gguf-py does."""
    import gguf

    from kvflow.model.loader import _field_value, _open_gguf
    path = tmp_path / "vocab.gguf"

    def vocabulary(w):
        w.add_array("tokenizer.ggml.tokens", [f"token {i}" for i in range(5000)])
        w.add_array("tokenizer.ggml.token_type", [i % 3 for i in range(5000)])
        w.add_array("tokenizer.ggml.scores", [0.5, 0.25])
        w.add_uint32("tokenizer.ggml.eos_token_id", 7)
    _write_tiny_gguf(path, {"blk.0.attn_q.weight": "Q8_0"}, extra=vocabulary)
    ours, theirs = _open_gguf(path), gguf.GGUFReader(str(path))
    stepped = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type"}
    assert ours.fields.keys() == theirs.fields.keys() and stepped < ours.fields.keys()
    for key in stepped:
        assert _field_value(ours.fields[key]) == [] and len(_field_value(theirs.fields[key])) == 5000
    for key in ours.fields.keys() - stepped:
        assert _field_value(ours.fields[key]) == _field_value(theirs.fields[key]), key
    assert _field_value(ours.fields["tokenizer.ggml.scores"]) == [0.5, 0.25]
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours.tensors, theirs.tensors))


def test_tiny_q8_0_gguf_loads_into_int8_and_q4_0_into_int4(tmp_path):
    from kvflow.layers.quantized_linear import QuantizedTensor
    from kvflow.model.llama import LlamaForCausalLM
    from kvflow.model.loader import _open_gguf, _read_gguf
    path = tmp_path / "tiny.gguf"
    values = _write_tiny_gguf(path, {name: "Q8_0" for name in ("token_embd.weight", "blk.0.attn_q.weight",
                                     "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.attn_output.weight",
                                     "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight")} | {"blk.0.ffn_down.weight": "Q4_0"})
    config, state = _read_gguf(_open_gguf(path), path, "auto")
    assert state["model.embed_tokens.weight"].kind == "int8"
    assert state["model.layers.0.self_attn.o_proj.weight"].kind == "int8"
    assert state["model.layers.0.mlp.down_proj.weight"].kind == "int4"
    emb = state["model.embed_tokens.weight"].dequantize()
    assert (emb - torch.from_numpy(values["token_embd.weight"])).abs().max() < 0.02 * 4 / 127 + 1e-3

    _, float_state = _read_gguf(_open_gguf(path), path, "none")
    with torch.device("meta"):
        qnet, fnet = LlamaForCausalLM(config), LlamaForCausalLM(config)
    qnet.load_hf_state_dict(state)
    fnet.load_hf_state_dict(float_state)
    assert isinstance(qnet.lm_head, QuantizedLinear) and isinstance(qnet.embed_tokens, QuantizedEmbedding)
    assert isinstance(qnet.layers[0].self_attn.qkv_proj, QuantizedLinear)
    assert not any(isinstance(v, QuantizedTensor) for v in float_state.values())
    assert qnet.layers[0].mlp.down_proj.kind == "int4"
    for name in ("layers.0.self_attn.qkv_proj", "layers.0.mlp.gate_up_proj", "layers.0.mlp.down_proj", "lm_head"):
        x = torch.randn(3, fnet.get_submodule(name).in_features)
        want, got = fnet.get_submodule(name)(x), qnet.get_submodule(name)(x)
        assert (got - want).abs().max() / want.abs().max() < 0.05, name
    ids = torch.tensor([1, 7, 127])
    assert torch.allclose(qnet.embed_tokens(ids), fnet.embed_tokens(ids), atol=2e-3)


def test_bad_options_raise_config_error_before_loading(monkeypatch):
    import kvflow.worker.model_runner as model_runner
    from kvflow import LLM
    monkeypatch.setattr(model_runner, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError, match="quantization must be one of.*int8.*int4"):
        LLM(quantization="int3")
    with pytest.raises(ConfigError, match="dtype must be one of.*auto"):
        LLM(dtype="float8")
    with pytest.raises(ConfigError, match="CPU kernels only"):
        EngineConfig(device="cuda", quantization="int8").validate()


def test_auto_dtype_follows_the_cpu(monkeypatch):
    from kvflow import cpu_info
    monkeypatch.setattr(cpu_info, "native_bf16_flags", lambda: ["amx_bf16"])
    assert resolve_auto_dtype("cpu")[0] == torch.bfloat16
    monkeypatch.setattr(cpu_info, "native_bf16_flags", lambda: [])
    assert resolve_auto_dtype("cpu")[0] == torch.float32
    assert resolve_auto_dtype("cuda")[0] == torch.bfloat16


def test_kernel_choice_is_cached_forced_and_redone(tmp_path, monkeypatch):
    monkeypatch.setenv("KVFLOW_CACHE", str(tmp_path))
    model = torch.nn.Sequential(Linear(64, 96), Linear(64, 96), QuantizedLinear(quantize_int8(_weight(128, 64))))
    chosen = kernel_choice.calibrate(model)
    path = kernel_choice.cache_path()
    data = json.loads(path.read_text())
    assert data["key"] == kernel_choice.cache_key() and set(data["layers"]) == set(chosen)
    int8 = next(v for k, v in chosen.items() if k.startswith("int8"))
    assert len(int8) == len(kernel_choice.ROW_BUCKETS) and set(int8) <= {"w8a16", "w8a8", "dequant"}
    # A cached choice is used as is (even one no timing would give), until recalibrated.
    sig = next(k for k in data["layers"] if k.startswith("int8"))
    data["layers"][sig]["choice"] = ["dequant"] * len(kernel_choice.ROW_BUCKETS)
    data["layers"][sig]["planted"] = True
    path.write_text(json.dumps(data))
    assert kernel_choice.calibrate(model)[sig] == ["dequant"] * 6 and model[2].plan.names[0] == "dequant"
    kernel_choice.calibrate(model, recalibrate=True)
    assert "planted" not in json.loads(path.read_text())["layers"][sig]  # timed again and rewritten
    kernel_choice.force({"int8": "w8a8", "float": "gemv"})
    try:
        forced = kernel_choice.calibrate(model)
    finally:
        kernel_choice.force(None)
    assert forced[sig] == ["w8a8"] * 6
    fl = next(v for k, v in forced.items() if k.startswith("float"))
    assert fl[-1] == "torch"  # past the C kernel's row limit, torch runs
    x = torch.randn(4, 64)
    assert torch.allclose(model[0](x), torch.nn.functional.linear(x, model[0].weight, model[0].bias), atol=1e-4)
