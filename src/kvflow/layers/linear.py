"""Linear layer with float weights. On CPU a float32 matmul with a few rows (decoding) can also run
in a C kernel that streams each weight row once per step (csrc/gemv.c); whether it beats torch
(MKL/oneDNN) depends on the CPU, so layers/kernel_choice.py times both on the model's shapes and
each bucket of row counts uses the faster. Until calibrated, plain torch runs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.layers import cpu_kernels
from kvflow.layers.kernel_choice import KernelPlan


class Linear(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan = KernelPlan.single(self._torch, "torch")

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _gemv(self, x: torch.Tensor) -> torch.Tensor:
        if not cpu_kernels.can_run_gemv(x, self.weight):  # e.g. a bucket's bound exceeded
            return self._torch(x)
        return cpu_kernels.gemv(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plan.pick(x.shape[0])(x)

    # ---- kernel_choice hooks ----
    def kernel_kind(self) -> str:
        return "float"

    def kernel_signature(self) -> str:
        return f"float:{self.in_features}x{self.out_features}"

    def kernel_methods(self, rows: int) -> dict:
        methods = {"torch": self._torch}
        w = self.weight
        if (rows <= cpu_kernels.GEMV_MAX_ROWS and w.device.type == "cpu" and w.dtype == torch.float32
                and w.is_contiguous() and cpu_kernels.kernels() is not None):
            methods["gemv"] = self._gemv
        return methods

    def set_kernel_plan(self, plan: KernelPlan) -> None:
        self.plan = plan
