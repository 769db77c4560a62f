"""RMSNorm, optionally fused with the residual add that precedes it (one pass returning both)."""
from __future__ import annotations

import torch

from kvflow.layers import cpu_kernels, op_select


class RMSNorm(torch.nn.Module):
    """Computed in float32 and cast back, exactly as Hugging Face Llama does.

    `norm(x)` returns rmsnorm(x); `norm(x, residual)` returns (rmsnorm(x + residual), x + residual)
    and updates `residual` in place (the decoder's residual stream, as vLLM carries it). On CPU a
    C kernel does either in one pass where it measures faster than torch (layers/op_select.py); on
    CUDA a Triton kernel always does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda and x.dim() == 2 and x.stride(1) == 1:  # one Triton kernel instead of six
            from kvflow.layers.triton.rms_norm import rms_norm
            return rms_norm(x, self.weight, self.eps, residual, residual_out=residual)
        if self._use_kernel(x, residual):
            out = cpu_kernels.add_rmsnorm(x, residual, self.weight, self.eps)
        else:
            if residual is not None:
                residual.add_(x)
            out = self._norm(x if residual is None else residual)
        return out if residual is None else (out, residual)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # skip the no-op casts: this runs 61 times a step
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def _use_kernel(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        if not cpu_kernels.can_run_fused(x) or (residual is not None and not residual.is_contiguous()):
            return False
        rows = x.numel() // x.shape[-1]
        key = ("add_rmsnorm", x.dtype, x.shape[-1], op_select.rows_class(rows), residual is not None)

        def candidates():
            xs = x.detach().clone()
            rs = None if residual is None else residual.detach().clone()

            def torch_path():
                if rs is not None:
                    rs.copy_(xs)  # (keeps the scratch values bounded over repetitions)
                return self._norm(xs if rs is None else rs.add_(xs))
            return {"c": lambda: cpu_kernels.add_rmsnorm(xs, rs, self.weight, self.eps), "torch": torch_path}

        return op_select.choose(key, candidates) == "c"
