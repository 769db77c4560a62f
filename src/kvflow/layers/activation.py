"""SiLU(gate) * up over the output of the fused gate_up matmul, in one pass where a C kernel
measures faster than torch's two (layers/op_select.py); on CUDA in one Triton kernel."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvflow.layers import cpu_kernels, op_select


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] = [gate | up] -> silu(gate) * up [T, I]."""
    if gate_up.is_cuda and gate_up.dim() == 2 and gate_up.stride(1) == 1:
        from kvflow.layers.triton.silu_mul import silu_mul
        return silu_mul(gate_up)
    if _use_kernel(gate_up):
        return cpu_kernels.silu_mul(gate_up)
    return _torch_silu_and_mul(gate_up)


def _torch_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
    return F.silu(gate) * up


def _use_kernel(gate_up: torch.Tensor) -> bool:
    if not (cpu_kernels.can_run_fused(gate_up) and gate_up.dim() == 2 and gate_up.is_contiguous()):
        return False
    key = ("silu_mul", gate_up.dtype, gate_up.shape[1], op_select.rows_class(gate_up.shape[0]))

    def candidates():
        x = gate_up.detach().clone()
        return {"c": lambda: cpu_kernels.silu_mul(x), "torch": lambda: _torch_silu_and_mul(x)}

    return op_select.choose(key, candidates) == "c"
