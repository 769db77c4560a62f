"""int8 smoothing (model/smoothing.py): it changes no product before rounding, and a smoothed int8
load of a random-weight model computes what its float weights compute, within int8 rounding."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvflow.model import smoothing
from kvflow.model.smoothing import Smoothing, smoothing_scales


def _rand_smoothing(layers: int, hidden: int, inter: int, gen) -> Smoothing:
    def s(n):
        return torch.rand(n, generator=gen) * 10 + 0.05
    return Smoothing([s(hidden) for _ in range(layers)], [s(hidden) for _ in range(layers)],
                     [s(inter) for _ in range(layers)])


def test_smoothing_preserves_the_float_products_exactly_before_rounding():
    gen = torch.Generator().manual_seed(0)
    H, I, T = 24, 40, 7
    sm = _rand_smoothing(2, H, I, gen)
    x = torch.randn(T, H, generator=gen, dtype=torch.float64)
    w = {n: torch.randn(I if n in ("gate", "up") else H, I if n == "down" else H, generator=gen,
                        dtype=torch.float64) for n in ("q", "gate", "up", "down")}
    t = {n: sm.weight_transform(f"model.layers.1.{'self_attn' if n == 'q' else 'mlp'}.{n}_proj.weight")
         for n in w}
    ws = {n: t[n](w[n]).double() for n in w}
    # q|k|v and gate|up: their input divided by s (folded into the norm weight)
    xs = x / sm.qkv[1].double()
    torch.testing.assert_close(xs @ ws["q"].T, x @ w["q"].T, rtol=1e-6, atol=1e-9)
    xs = x / sm.gate_up[1].double()
    mlp = (F.silu(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T
    mlp_s = (F.silu(xs @ ws["gate"].T) * (xs @ ws["up"].T)) @ ws["down"].T  # up rows / s_down
    torch.testing.assert_close(mlp_s, mlp, rtol=1e-6, atol=1e-9)
    # a chunk of up_proj's rows gets the matching slice of s_down
    torch.testing.assert_close(t["up"](w["up"][8:20], 8).double(), ws["up"][8:20], rtol=1e-6, atol=0)
    # names smoothing does not touch
    assert sm.weight_transform("model.layers.0.self_attn.o_proj.weight") is None
    assert sm.weight_transform("lm_head.weight") is None


def test_smoothing_scales_balance_activation_and_weight_ranges():
    act = torch.tensor([100.0, 1.0, 0.0])
    wmax = torch.tensor([0.01, 1.0, 0.5])
    s = smoothing_scales(act, wmax, alpha=0.5)
    # after smoothing, max|x_j| / s_j == max|W_j| * s_j for live channels (alpha 0.5)
    torch.testing.assert_close((act / s)[:2], (wmax * s)[:2])
    assert s[2] > 0  # a dead channel gets a finite, positive scale


def test_smoothed_int8_load_matches_float_within_rounding(tiny_model_dir, tmp_path, monkeypatch):
    from kvflow.layers import kernel_choice
    from kvflow.layers.quantized_linear import QuantizedLinear
    from kvflow.model.loader import load_model
    from kvflow.worker.model_runner import allocate_kv_caches, build_batch
    monkeypatch.setenv("KVFLOW_CACHE", str(tmp_path))
    ref = load_model(tiny_model_dir, torch.float32, "cpu")
    q = load_model(tiny_model_dir, torch.float32, "cpu", quantization="int8")
    assert list((tmp_path / "smoothing").glob("*.pt")), "the smoothing scales were not cached"
    layer = q.model.layers[0]
    assert not torch.equal(layer.input_layernorm.weight, ref.model.layers[0].input_layernorm.weight)  # folded
    assert isinstance(q.model.lm_head, QuantizedLinear) and set(q.model.lm_head.kernel_methods(64)) == {"w8a16"}
    again = load_model(tiny_model_dir, torch.float32, "cpu", quantization="int8")  # from the cache
    torch.testing.assert_close(again.model.layers[0].input_layernorm.weight, layer.input_layernorm.weight)

    kernel_choice.force({"int8": "w8a8"})  # int8 activations wherever the head allows them
    try:
        kernel_choice.calibrate(q.model)
    finally:
        kernel_choice.force(None)
    ids = ref.tokenizer.encode(smoothing.CALIBRATION_TEXT[:300])
    outs = []
    for m in (ref.model, q.model):
        caches = allocate_kv_caches(m.config, 8, 16, torch.float32, torch.device("cpu"))
        batch = build_batch([(ids, 0, list(range(8)))], 16, torch.device("cpu"))
        with torch.inference_mode():
            outs.append(m.compute_logits(m(batch.input_ids, batch.positions, caches, batch.meta)))
    rel = (outs[1] - outs[0]).norm() / outs[0].norm()
    # measured 0.061 (int8 rounding over random weights); a wrong fold or transform gives ~1
    assert rel < 0.12, f"smoothed int8 logits differ from float32 by {rel:.3f} (relative)"
