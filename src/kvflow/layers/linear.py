"""Linear layer: plain torch, except that on CPU a float32 matmul with a few rows (decoding) goes to
a C kernel that streams each weight row once per step (see csrc/gemv.c): batch-1 decode is bound
by memory bandwidth, and MKL's sgemm reaches about a third of it here."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.layers import cpu_kernels


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.can_run_gemv(x, self.weight):
            return cpu_kernels.gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
