"""The fused non-matmul ops (csrc/fused_ops.c) equal their plain-torch references, the measured
choice between them is made once per shape class, and a prompt chunk with no cached prefix
(SDPA is_causal over its own keys, no mask) equals the masked path over the cache."""
from __future__ import annotations

import pytest
import torch

from kvflow.layers import attention, cpu_kernels, op_select
from kvflow.layers.activation import _torch_silu_and_mul, silu_and_mul
from kvflow.layers.norm import RMSNorm
from kvflow.layers.rotary import RotaryEmbedding, apply_rotary, rotate_heads
from kvflow.worker.model_runner import build_batch

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture
def kernels_on(monkeypatch):
    if cpu_kernels.kernels() is None:
        pytest.skip("the CPU kernels are not available here (no C compiler)")
    monkeypatch.setenv("KVFLOW_FUSED_OPS", "c")


def _rand(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 37])
def test_add_rmsnorm_kernel(kernels_on, dtype, rows):
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = _rand(96, dtype=dtype, seed=3)
    x, res = _rand(rows, 96, dtype=dtype), _rand(rows, 96, dtype=dtype, seed=1) * 4
    want_res = x + res
    want = norm._norm(want_res)
    got, got_res = norm(x, res.clone())
    assert torch.equal(got_res, want_res)
    assert float((got.float() - want.float()).abs().max()) < TOL[dtype]
    assert float((norm(x).float() - norm._norm(x).float()).abs().max()) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_kernel(kernels_on, dtype):
    gu = _rand(20, 2 * 88, dtype=dtype) * 6  # wide range: exp's tails too; 88 = 5 x 16 + a tail
    got, want = silu_and_mul(gu), _torch_silu_and_mul(gu)
    assert float(((got.float() - want.float()).abs() / (1 + want.float().abs())).max()) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_kernel_in_place(kernels_on, dtype):
    Hq, Hk, D, T = 4, 2, 32, 19
    rope = RotaryEmbedding(D, 512, 10000.0, None)
    tables = rope.cos_sin(torch.randint(0, 512, (T,)), dtype)
    qkv = _rand(T, (Hq + 2 * Hk) * D, dtype=dtype)
    want = apply_rotary(qkv[:, :(Hq + Hk) * D].view(T, Hq + Hk, D), tables.cos, tables.sin)
    v_before = qkv[:, (Hq + Hk) * D:].clone()
    got = rotate_heads(qkv, Hq + Hk, D, tables)
    assert got.data_ptr() == qkv.data_ptr()  # rotated in place, inside the qkv rows
    assert float((got.float() - want.float()).abs().max()) < TOL[dtype] * 4
    assert torch.equal(qkv[:, (Hq + Hk) * D:], v_before)  # v untouched


def test_choice_is_measured_once_per_shape_class_and_machine(monkeypatch, tmp_path):
    """Measured once per class; kept on disk, so a later process on this machine does not time it
    again; recalibrating drops it."""
    if cpu_kernels.kernels() is None:
        pytest.skip("no C kernels")
    monkeypatch.delenv("KVFLOW_FUSED_OPS", raising=False)
    monkeypatch.setenv("KVFLOW_CACHE", str(tmp_path))
    monkeypatch.setattr(op_select, "_choice", {})
    monkeypatch.setattr(op_select, "_saved", None)
    calls = []

    def make():
        calls.append(1)
        return {"c": lambda: None, "torch": lambda: sum(range(2000))}
    assert op_select.choose(("t", 1), make) == "c"
    assert op_select.choose(("t", 1), make) == "c" and len(calls) == 1
    monkeypatch.setattr(op_select, "_choice", {})  # a new process
    monkeypatch.setattr(op_select, "_saved", None)
    assert op_select.choose(("t", 1), make) == "c" and len(calls) == 1
    op_select.forget_saved()
    assert op_select.choose(("t", 1), make) == "c" and len(calls) == 2
    order = []  # the candidates take turns, so that a slow spell of the machine lands on both
    op_select.choose(("t", 3), lambda: {"c": lambda: order.append("c"), "torch": lambda: order.append("torch")},
                     reps=3)
    assert order == ["c", "torch"] * 4
    monkeypatch.setenv("KVFLOW_FUSED_OPS", "torch")
    assert op_select.choose(("t", 2), make) == "torch" and len(calls) == 2
    assert [op_select.rows_class(n) for n in (1, 2, 3, 33, 64, 65)] == [1, 2, 4, 64, 64, 128]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefix_free_chunks_attend_causally_without_mask(dtype):
    """Two prompt chunks from position 0 (padded to the longer) next to a decode: the is_causal
    path over fresh keys equals the masked path over the cache, and builds no mask."""
    Hq, Hk, D, BS = 6, 2, 16, 4
    items = [([1], 7, [0, 1]), ([1] * 9, 0, [2, 3, 4]), ([1] * 5, 0, [5, 6])]
    batch = build_batch(items, BS, torch.device("cpu"))
    fresh = [g for g in batch.meta.groups if g.causal_fresh]
    assert len(fresh) == 1 and fresh[0].mask is None
    T = 15
    q, k, v = (_rand(T, h, D, dtype=dtype, seed=s) for s, h in ((0, Hq), (1, Hk), (2, Hk)))
    cache = [_rand(8, BS, Hk, D, dtype=dtype, seed=s) for s in (3, 4)]
    got = attention.paged_attention(q, k, v, cache[0].clone(), cache[1].clone(), batch.meta, D ** -0.5)
    assert fresh[0].mask is None
    fresh[0].causal_fresh = False
    want = attention.paged_attention(q, k, v, cache[0].clone(), cache[1].clone(), batch.meta, D ** -0.5)
    assert float((got.float() - want.float()).abs().max()) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_back_to_back_chunks_are_sliced_not_gathered(dtype):
    """Equal prompt chunks with no padding, after a decode, are views of the batch (flat_rows): the same
    result as gathering their rows, bit for bit. Unequal chunks (padded) keep the gather."""
    Hq, Hk, D, BS = 6, 2, 16, 4
    batch = build_batch([([1], 7, [0, 1]), ([1] * 6, 0, [2, 3]), ([1] * 6, 0, [4, 5])], BS, torch.device("cpu"))
    chunk = batch.meta.groups[-1]
    assert chunk.flat_rows == (1, 13)
    q, k, v = (_rand(13, h, D, dtype=dtype, seed=s) for s, h in ((0, Hq), (1, Hk), (2, Hk)))
    cache = [_rand(8, BS, Hk, D, dtype=dtype, seed=s) for s in (3, 4)]
    got = attention.paged_attention(q, k, v, cache[0].clone(), cache[1].clone(), batch.meta, D ** -0.5)
    chunk.flat_rows = None
    want = attention.paged_attention(q, k, v, cache[0].clone(), cache[1].clone(), batch.meta, D ** -0.5)
    assert torch.equal(got, want)
    uneven = build_batch([([1] * 6, 0, [2, 3]), ([1] * 5, 0, [4, 5])], BS, torch.device("cpu"))
    assert uneven.meta.groups[-1].flat_rows is None


def test_topk_kernel_equals_torch_topk():
    """The one-pass top-k (Token Recycling's table refresh) picks the values torch.topk picks, largest
    first, with ties and a row length that is not a multiple of 16; a row with fewer than k finite
    values goes back to torch (None)."""
    if cpu_kernels.kernels() is None:
        pytest.skip("no C kernels")
    x = _rand(9, 49157, dtype=torch.float32)
    x[0, 5] = x[0, 7] = x[0, 49156] = 50.0  # a three-way tie at the top, one in the tail
    x[1, ::2] = float("nan")  # NaN never enters
    for k in (1, 8, 32):
        got = cpu_kernels.topk_indices(x, k)
        want = torch.nan_to_num(x, nan=float("-inf")).topk(k, dim=-1).values
        assert torch.equal(torch.gather(x, 1, got), want), k
    assert set(cpu_kernels.topk_indices(x, 3)[0].tolist()) == {5, 7, 49156}
    few = torch.full((2, 40), float("-inf"))
    few[1, :3] = 1.0
    assert cpu_kernels.topk_indices(few, 8) is None
    assert cpu_kernels.topk_indices(x, 33) is None
