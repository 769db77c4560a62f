"""GGUF quantized tensors -> kvflow's in-memory formats (layers/quantized_linear.py), one tensor at a
time, so no float copy of the whole model ever exists.

- Q4_0 (w = d * (q - 8)) and Q4_1 (w = d * q + m), blocks of 32: exactly kvflow's int4, group 32
  (scale = d, zero = 0 or m + 8 d), read from the raw bytes without dequantizing.
- Q8_0 (w = d * q, blocks of 32) -> int8 with one scale per output channel: requantized from this
  tensor's values (our int8 kernels take one scale per channel).
- Q4_K and other types: dequantized (this tensor only) and requantized to the wanted format.
"""
from __future__ import annotations

import numpy as np
import torch

from kvflow.layers.quantized_linear import INT4_GROUP, QuantizedTensor, quantize

# The format quantization="auto" gives each GGUF type; types not named here stay float.
AUTO_KIND = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4"}
_Q4_BLOCK = {"Q4_0": 18, "Q4_1": 20}


def wanted_kind(mode: str, type_name: str) -> str:
    """"none" | "int8" | "int4" for a tensor of GGUF type `type_name` under quantization `mode`."""
    if mode == "auto":
        return AUTO_KIND.get(type_name, "none")
    return mode


def direct_int4(data: np.ndarray, type_name: str, n: int, k: int) -> QuantizedTensor:
    """Q4_0 / Q4_1 raw blocks [n, k/32 * block bytes] -> int4 group 32, exactly."""
    raw = np.array(data, dtype=np.uint8)  # a copy: the reader's map is read-only
    blocks = torch.from_numpy(raw).view(n, k // 32, _Q4_BLOCK[type_name])
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()[..., 0]
    qs = blocks[..., -16:]
    q = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(n, k)  # element j: low nibble of byte j, j+16: high
    if type_name == "Q4_0":
        zero = torch.zeros_like(d)
    else:
        m = blocks[..., 2:4].contiguous().view(torch.float16).float()[..., 0]
        zero = m + 8 * d
    return QuantizedTensor("int4", q.contiguous(), d, zero, INT4_GROUP)


_CHUNK_ROWS = 4096  # rows dequantized at once: bounds the float temporaries (the embedding is 49k rows)


def convert(tensor, kind: str, dequantize, transform=None) -> QuantizedTensor:
    """One GGUF tensor (a gguf ReaderTensor) -> QuantizedTensor of `kind`. `dequantize(raw rows, type)`
    gives float32 values [rows, k] when the raw blocks do not map onto `kind`; it is applied a chunk
    of rows at a time (each row is quantized on its own, so chunks give the same result).
    transform(w chunk, first row): applied to the float values before quantizing (int8 smoothing)."""
    type_name = tensor.tensor_type.name
    k, n = (int(d) for d in tensor.shape[:2])
    if kind == "int4" and type_name in _Q4_BLOCK and k % 32 == 0 and transform is None:
        return direct_int4(tensor.data, type_name, n, k)
    data = tensor.data.reshape(n, -1)

    def chunk(r: int) -> torch.Tensor:
        w = torch.from_numpy(np.asarray(dequantize(data[r:r + _CHUNK_ROWS], tensor.tensor_type),
                                        dtype=np.float32).reshape(-1, k))
        return w if transform is None else transform(w, r)
    parts = [quantize(chunk(r), kind) for r in range(0, n, _CHUNK_ROWS)]
    return parts[0] if len(parts) == 1 else QuantizedTensor.cat(parts)
