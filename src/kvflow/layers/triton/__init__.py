"""Triton kernels for the CUDA path, each beside its plain-torch reference.

Triton decides at decoration time whether a kernel is compiled for a GPU or run by its interpreter
(`TRITON_INTERPRET=1`, numpy on CPU tensors). A machine without CUDA can only interpret, so importing
this package there turns the interpreter on (unless the variable is already set): the same kernels then
run in the CPU tests and in an engine forced to `attention_backend="triton"`.

Import the kernel modules lazily (only when the triton backend is chosen): importing triton costs a
second, and a process that imported them before the variable was set keeps compiled kernels.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dot_options(dtype: torch.dtype) -> tuple[bool, str]:
    """(upcast, input_precision) for a kernel's tl.dot on `dtype` inputs.

    The interpreter does bfloat16 arithmetic on the raw bits (wrong results), so under it every
    loaded tile is cast to float32 first. On a GPU, float32 inputs would go through TF32 tensor cores
    (10-bit mantissa); "ieee" keeps float32 models exact against transformers."""
    upcast = INTERPRET
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return upcast, precision
