"""Rotary position embedding (rotate-half layout, as Hugging Face Llama/Qwen use), with Llama 3.1 and
linear rope scaling, and GGUF's per-frequency factors."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvflow.errors import ModelLoadError
from kvflow.layers import cpu_kernels, op_select


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    if kind == "freq_factors":  # GGUF stores Llama 3.1 scaling as a tensor of divisors
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32)
    raise ModelLoadError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")


def _llama3_frequencies(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> "RotaryTables":
        """Looked up once per step and shared by every layer."""
        cos32, sin32 = self.cos[positions], self.sin[positions]
        return RotaryTables(cos32.unsqueeze(1).to(dtype), sin32.unsqueeze(1).to(dtype), cos32, sin32)


@dataclass
class RotaryTables:
    """One step's rotary tables: [T, 1, D] in the compute dtype (torch path) and float32 [T, D]
    (the C kernel, which rounds once at the end). Unpacks as (cos, sin) like the tuple it replaces."""
    cos: torch.Tensor
    sin: torch.Tensor
    cos32: torch.Tensor
    sin32: torch.Tensor

    def __iter__(self):
        return iter((self.cos, self.sin))


def rotate_heads(rows: torch.Tensor, num_heads: int, head_dim: int, tables: RotaryTables) -> torch.Tensor:
    """Rotary embedding of the first num_heads heads of each row of rows [T, stride] (the q and k
    parts of a fused qkv matmul output) -> [T, num_heads, head_dim]. The C kernel rotates them in
    place and returns a view; the torch path returns a new tensor. Chosen by measurement on CPU; on
    CUDA a Triton kernel rotates in place."""
    T = rows.shape[0]
    if rows.is_cuda and rows.stride(1) == 1:
        from kvflow.layers.triton.rotary import rotary_
        return rotary_(rows[:, :num_heads * head_dim].view(T, num_heads, head_dim), tables.cos32, tables.sin32)
    if _use_kernel(rows, num_heads, head_dim, tables):
        cpu_kernels.rotary_(rows, num_heads, head_dim, tables.cos32, tables.sin32)
        return rows[:, :num_heads * head_dim].view(T, num_heads, head_dim)
    return apply_rotary(rows[:, :num_heads * head_dim].view(T, num_heads, head_dim), tables.cos, tables.sin)


def _use_kernel(rows: torch.Tensor, num_heads: int, head_dim: int, tables: RotaryTables) -> bool:
    if not (cpu_kernels.can_run_fused(rows) and rows.is_contiguous() and rows.dim() == 2):
        return False
    key = ("rotary", rows.dtype, num_heads, head_dim, op_select.rows_class(rows.shape[0]))

    def candidates():
        scratch = rows.detach().clone()
        view = scratch[:, :num_heads * head_dim].view(-1, num_heads, head_dim)
        return {"c": lambda: cpu_kernels.rotary_(scratch, num_heads, head_dim, tables.cos32, tables.sin32),
                "torch": lambda: apply_rotary(view, tables.cos, tables.sin)}

    return op_select.choose(key, candidates) == "c"


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]."""
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
