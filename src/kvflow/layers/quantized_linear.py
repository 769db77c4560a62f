"""Linear layers whose weights stay quantized in memory, behind the same interface as
layers/linear.py's Linear (`forward(x [M, K]) -> [M, N]` in x's dtype, plus the kernel-choice hooks
of layers/kernel_choice.py).

Formats (torch's own CPU ops; oneDNN/AMX/VNNI underneath, no C of ours):
- int8: symmetric, one scale per output channel: w[n, k] = q[n, k] * scale[n], q in [-127, 127].
  Kernels: "w8a8" quantizes the activations per token at run time and multiplies int8 x int8 ->
  int32 (torch._int_mm); "w8a16" multiplies bfloat16 activations by the int8 weight
  (torch._weight_int8pack_mm: reads 1 byte per weight, the fastest for a few rows).
  W8A8 activations are two int8 terms per token, x ~ q1 a1 + q2 a2, q2 the rounding q1 left (so
  about 15 bits): one term cost +0.82% perplexity on SmolLM2-135M (ShareGPT, 8,192 tokens, all
  layers W8A8, with model/smoothing.py's smoothing), groups of 64 along K +0.52%, two terms +0.34%.
  The second term doubles the int8 products but not the weight bytes a step reads, and keeps the
  integer sums (one scale per row, as the int8 dot products need).
- int4: group-wise asymmetric, group 32 along K: w = (q - 8) * scale[g] + zero[g], q in [0, 15]
  (GGUF Q4_0 / Q4_1 map onto it exactly). Kernels: "int4pack" (torch._weight_int4pack_mm_for_cpu,
  bfloat16 activations) and "dequant" (unpack to bfloat16, then one bf16 matmul: wins for many rows).
The kernel per row count is chosen by measurement (kernel_choice.calibrate); every one of them
computes the same product up to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from kvflow.layers.kernel_choice import KernelPlan

INT4_GROUP = 32
_PACK_N = 64  # torch's CPU int4 pack interleaves blocks of 64 output channels


@dataclass
class QuantizedTensor:
    """A weight [N, K] as the loader produces it, before packing: rows can still be permuted and
    concatenated (q/k un-permute, q|k|v and gate|up fusion)."""
    kind: str  # "int8" | "int4"
    q: torch.Tensor  # int8 [N, K] in [-127, 127] | uint8 [N, K] in [0, 15]
    scale: torch.Tensor  # float32: [N] (int8) | [N, K / group] (int4)
    zero: torch.Tensor | None = None  # int4: float32 [N, K / group]
    group_size: int = 0

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        if self.kind == "int8":
            return self.q.float() * self.scale[:, None]
        N, K = self.q.shape
        g = self.group_size
        w = (self.q.float().view(N, K // g, g) - 8) * self.scale[..., None] + self.zero[..., None]
        return w.view(N, K)

    def index_rows(self, index: torch.Tensor) -> QuantizedTensor:
        return replace(self, q=self.q[index], scale=self.scale[index],
                       zero=None if self.zero is None else self.zero[index])

    @staticmethod
    def cat(parts: list[QuantizedTensor]) -> QuantizedTensor:
        """Concatenate along N; parts of different formats meet in the most precise one."""
        kinds = {p.kind for p in parts}
        if len(kinds) > 1 or len({p.group_size for p in parts}) > 1:
            parts = [p if p.kind == "int8" else quantize_int8(p.dequantize()) for p in parts]
        first = parts[0]
        return replace(first, q=torch.cat([p.q for p in parts]), scale=torch.cat([p.scale for p in parts]),
                       zero=None if first.zero is None else torch.cat([p.zero for p in parts]))


def quantize_int8(w: torch.Tensor) -> QuantizedTensor:
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return QuantizedTensor("int8", q, scale)


def quantize_int4(w: torch.Tensor, group_size: int = INT4_GROUP) -> QuantizedTensor:
    """Asymmetric min/max per group of `group_size` weights along K."""
    w = w.float()
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"int4 needs the input size ({K}) to be a multiple of {group_size}")
    g = w.view(N, K // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).view(N, K)
    return QuantizedTensor("int4", q, scale, lo + 8 * scale, group_size)


def quantize(w: torch.Tensor, kind: str) -> QuantizedTensor:
    return quantize_int8(w) if kind == "int8" else quantize_int4(w)


def _int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = x.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-12) / 127  # per-token scale
    return torch.round(x * (1 / a)).to(torch.int8), a


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x [M, K] as two int8 terms per token, x ~ q1 a1 + q2 a2: q1 the per-token rounding, q2 that of
    what q1 left (csrc/fused_decode.c's quantize_rows computes the same)."""
    xf = x.float()
    hi, a_hi = _int8_rows(xf)
    lo, a_lo = _int8_rows(xf - hi * a_hi)
    return hi, a_hi, lo, a_lo


def int4_supported(n: int, k: int) -> bool:
    return n % _PACK_N == 0 and k % INT4_GROUP == 0


class QuantizedLinear(nn.Module):
    """y = x @ W.T (+ bias) with W kept as int8 or packed int4. Activations enter and leave in the
    model's compute dtype; the kernels themselves take bfloat16 or int8 activations."""

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None = None, a16: bool = False):
        super().__init__()
        self.kind = weight.kind
        # a16: int8 weights, but activations never rounded to int8 (W8A16 only). The LM head: per-token
        # int8 activations there cost +0.44% perplexity on SmolLM2 (model/smoothing.py's probes).
        self.a16 = a16 and weight.kind == "int8"
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        if self.kind == "int8":
            self.register_buffer("q", weight.q.contiguous())
            self.register_buffer("scale", weight.scale.float().contiguous())
            self.register_buffer("scale_bf16", weight.scale.to(torch.bfloat16))
        else:
            assert int4_supported(self.out_features, self.in_features), weight.shape
            self.group_size = weight.group_size
            self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(weight.q.to(torch.int32), 1))
            # [K / group, N, 2] (scale, zero): the layout the int4 kernel reads
            sz = torch.stack([weight.scale.t(), weight.zero.t()], dim=-1)
            self.register_buffer("scales_zeros", sz.to(torch.bfloat16).contiguous())
        self.plan = KernelPlan.single(self._methods()[self.default_method()])

    # ---- kernels ----
    def default_method(self) -> str:
        return "w8a16" if self.kind == "int8" else "int4pack"

    def _methods(self) -> dict:
        if self.a16:
            return {"w8a16": self._w8a16}
        if self.kind == "int8":
            return {"w8a16": self._w8a16, "w8a8": self._w8a8, "dequant": self._dequant}
        return {"int4pack": self._int4pack, "dequant": self._dequant}

    def _w8a16(self, x):
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scale_bf16)

    def _w8a8(self, x):
        hi, a_hi, lo, a_lo = quantize_activations(x)
        M = x.shape[0]
        y = torch._int_mm(torch.cat([hi, lo]), self.q.t())
        return (y[:M] * a_hi * self.scale) + (y[M:] * a_lo * self.scale)

    def _int4pack(self, x):
        return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, self.group_size, self.scales_zeros)

    def _dequant(self, x):
        w_t = self.dequantized_t(torch.bfloat16)
        return x.to(torch.bfloat16) @ w_t

    def dequantized_t(self, dtype: torch.dtype) -> torch.Tensor:
        """W.T [K, N] in `dtype` (plain torch: the reference every kernel is tested against)."""
        if self.kind == "int8":
            return (self.q.t().to(dtype) * self.scale.to(dtype))
        K, N, g = self.in_features, self.out_features, self.group_size
        q = _unpack_int4(self.packed, N, K).view(K // g, g, N)
        sz = self.scales_zeros.to(dtype)[:, None]  # [K / g, 1, N, 2]
        w = q.to(dtype).sub_(8).mul_(sz[..., 0]).add_(sz[..., 1])
        return w.view(K, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.plan.pick(x.shape[0])(x).to(x.dtype)
        return y if self.bias is None else y + self.bias

    # ---- kernel_choice hooks ----
    def kernel_kind(self) -> str:
        return "int8-a16" if self.a16 else self.kind

    def kernel_signature(self) -> str:
        return f"{self.kernel_kind()}:{self.in_features}x{self.out_features}"

    def kernel_methods(self, rows: int) -> dict:
        return self._methods()

    def set_kernel_plan(self, plan: KernelPlan) -> None:
        self.plan = plan

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


def _unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """torch's CPU int4 pack -> q.T [K, N]. Byte (b, k, j) of the [N/64, K, 32] pack holds
    q[64b + j, k] in its low nibble and q[64b + 32 + j, k] in its high one."""
    p = packed.view(n // _PACK_N, k, _PACK_N // 2)
    both = torch.cat([p & 15, p >> 4], dim=-1)  # [N/64, K, 64]
    return both.permute(1, 0, 2).reshape(k, n)


class QuantizedEmbedding(nn.Module):
    """Token embedding read from a QuantizedLinear's weight (the tied LM head, or its own): rows are
    dequantized as they are looked up, so no float copy of the table exists."""

    def __init__(self, source: QuantizedLinear, dtype: torch.dtype):
        super().__init__()
        self.source = [source]  # a list: not registered as a child (it is the lm_head, or owned by us)
        self.owned = None
        self.dtype = dtype

    @classmethod
    def owning(cls, source: QuantizedLinear, dtype: torch.dtype) -> QuantizedEmbedding:
        emb = cls(source, dtype)
        emb.owned = source  # registered, so its buffers count as the model's
        return emb

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        src = self.source[0]
        if src.kind == "int8":
            return (src.q[ids].to(self.dtype) * src.scale[ids, None].to(self.dtype))
        N, K, g = src.out_features, src.in_features, src.group_size
        p = src.packed.view(N // _PACK_N, K, _PACK_N // 2)
        j = ids % _PACK_N
        rows = p[ids // _PACK_N, :, j % (_PACK_N // 2)]  # [T, K] bytes
        q = (rows >> (4 * (j // (_PACK_N // 2)))[:, None].to(torch.uint8)) & 15
        sz = src.scales_zeros[:, ids].to(self.dtype)  # [K / g, T, 2]
        scale = sz[..., 0].t().repeat_interleave(g, dim=1)
        zero = sz[..., 1].t().repeat_interleave(g, dim=1)
        return (q.to(self.dtype) - 8) * scale + zero


# ---------------- putting quantized weights into a model ----------------
def cat_rows(parts: list) -> torch.Tensor | QuantizedTensor:
    """Fuse weights along the output dimension (q|k|v, gate|up): tensors, QuantizedTensors, or a mix
    (the float parts are then quantized to int8)."""
    if not any(isinstance(p, QuantizedTensor) for p in parts):
        return torch.cat(parts, dim=0)
    return QuantizedTensor.cat([p if isinstance(p, QuantizedTensor) else quantize_int8(p) for p in parts])


def install_quantized(model: nn.Module, weights: dict[str, QuantizedTensor], dtype: torch.dtype) -> None:
    """Replace the Linear (and the Embedding) named by each `<module>.weight` in `weights` with its
    quantized form. A tied LM head and embedding share one quantized tensor."""
    built: dict[int, QuantizedLinear] = {}

    def linear_for(qt: QuantizedTensor, bias, a16: bool = False) -> QuantizedLinear:
        key = id(qt)
        if key not in built:
            if qt.kind == "int4" and not int4_supported(*qt.shape):  # the int4 pack needs N % 64 == 0
                qt = quantize_int8(qt.dequantize())
            built[key] = QuantizedLinear(qt, bias, a16)
        return built[key]

    emb = weights.pop("embed_tokens.weight", None)
    for name, qt in weights.items():
        path = name.removesuffix(".weight")
        old = model.get_submodule(path)
        bias = old.bias if getattr(old, "bias", None) is not None and old.bias.device.type != "meta" else None
        model.set_submodule(path, linear_for(qt, bias, a16=path == "lm_head"))
    if emb is not None:
        if id(emb) in built:  # tied: the LM head's weight
            model.embed_tokens = QuantizedEmbedding(built[id(emb)], dtype)
        else:
            model.embed_tokens = QuantizedEmbedding.owning(linear_for(emb, None), dtype)
