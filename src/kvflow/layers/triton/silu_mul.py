"""SiLU(gate) * up over the fused gate_up projection's output [T, 2I] -> [T, I], in one pass."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(X, Out, s_x, s_o, I, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(X + t * s_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + t * s_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + t * s_o + offs, (g / (1.0 + tl.exp(-g)) * u).to(Out.dtype.element_ty), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] (gate then up, last dim contiguous) -> [T, I]."""
    assert x.dim() == 2 and x.stride(1) == 1 and x.shape[1] % 2 == 0
    T, I = x.shape[0], x.shape[1] // 2
    out = torch.empty(T, I, dtype=x.dtype, device=x.device)
    block = 1024
    if T:
        _silu_mul_kernel[(T, triton.cdiv(I, block))](x, out, x.stride(0), out.stride(0), I, BLOCK=block)
    return out


def silu_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
