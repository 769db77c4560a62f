"""Fused RMSNorm, optionally with the residual add before it (one read and one write of the hidden
state instead of three). Rounds where Hugging Face Llama rounds: the sum in the model's dtype, the
normalised value back to that dtype before the weight multiplies it."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.layers.triton import next_pow2


@triton.jit
def _rms_norm_kernel(X, Res, W, Out, ResOut, s_x, s_r, s_o, s_ro, N, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * s_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x = x + tl.load(Res + row * s_r + offs, mask=mask, other=0.0).to(tl.float32)
        x_rounded = x.to(ResOut.dtype.element_ty)
        tl.store(ResOut + row * s_ro + offs, x_rounded, mask=mask)
        x = x_rounded.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    y = (x * rstd).to(Out.dtype.element_ty).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * s_o + offs, (y * w).to(Out.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             residual_out: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x: [T, N] (last dim contiguous). Without residual: norm(x). With: (norm(x + residual), x + residual),
    the sum written to `residual_out` (a new tensor by default; `residual` itself updates it in place)."""
    assert x.dim() == 2 and x.stride(1) == 1 and weight.is_contiguous()
    T, N = x.shape
    out = torch.empty_like(x)
    res_out = out if residual is None else residual_out if residual_out is not None else torch.empty_like(x)
    res_in = residual if residual is not None else x
    if T:
        _rms_norm_kernel[(T,)](x, res_in, weight, out, res_out, x.stride(0), res_in.stride(0), out.stride(0),
                               res_out.stride(0), N, eps, HAS_RESIDUAL=residual is not None, BLOCK=next_pow2(N))
    return out if residual is None else (out, res_out)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None):
    """The layers.norm.RMSNorm arithmetic."""
    if residual is not None:
        s = x + residual
        return rms_norm_reference(s, weight, eps), s
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)
