"""Engine configuration. Field names follow vLLM where the concept is the same."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvflow.errors import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


DTYPE_CHOICES = ("auto", *_DTYPES)
# Weight formats kept in memory: int8 (per-output-channel, W8A8 / W8A16 kernels), int4 (group-wise),
# "auto" = the GGUF file's own type per tensor (Q8_0 -> int8, Q4_x -> int4, float -> none).
QUANTIZATION_CHOICES = ("none", "int8", "int4", "auto")


def parse_dtype(dtype: str | torch.dtype, device: str = "cpu") -> torch.dtype:
    """A dtype name (or "auto", see resolve_auto_dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return resolve_auto_dtype(device)[0]
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {dtype!r}")
    return _DTYPES[dtype]


def resolve_auto_dtype(device: str = "cpu") -> tuple[torch.dtype, str]:
    """dtype="auto": bfloat16 on CUDA and on CPUs with native bf16 (avx512_bf16 / AMX), else
    float32 (emulated bf16 matmuls are slower than float32 ones). Returns (dtype, why)."""
    from kvflow.cpu_info import cpu_model_name, native_bf16_flags
    if str(device).startswith("cuda"):
        return torch.bfloat16, "CUDA device"
    flags = native_bf16_flags()
    if flags:
        return torch.bfloat16, f"{cpu_model_name()} has {'/'.join(flags)}"
    return torch.float32, f"{cpu_model_name()} has no native bfloat16"


def parse_quantization(quantization: str | None) -> str:
    """None/"none" -> "none"; otherwise one of QUANTIZATION_CHOICES."""
    q = "none" if quantization is None else quantization
    if q not in QUANTIZATION_CHOICES:
        raise ConfigError(f"quantization must be one of {list(QUANTIZATION_CHOICES)} (or None), got {quantization!r}")
    return q


@dataclass
class ModelConfig:
    """Architecture hyperparameters, read from GGUF metadata or a Hugging Face config.json."""
    architecture: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    qk_norm: bool = False  # Qwen3 normalises q and k per head

    @property
    def num_params(self) -> int:
        """Parameters used per token (embedding lookup excluded, LM head included)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        mlp = 3 * h * self.intermediate_size
        return self.num_layers * (attn + mlp) + h * self.vocab_size


@dataclass
class CacheConfig:
    block_size: int = 16
    # Memory for the KV pool; num_gpu_blocks overrides it when set (tests use tiny pools).
    kv_cache_memory_gb: float = 1.0
    num_blocks: int | None = None
    enable_prefix_caching: bool = True


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    max_model_len: int = 2048


@dataclass
class EngineConfig:
    model: str = "smollm2-135m"
    dtype: str = "auto"
    device: str = "cpu"
    seed: int = 0
    quantization: str | None = None  # QUANTIZATION_CHOICES
    recalibrate: bool = False  # re-time the linear kernels instead of reading the cached choice
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative_config: object = None  # SpeculativeConfig | dict | JSON string

    def validate(self) -> None:
        parse_dtype(self.dtype, self.device)
        if parse_quantization(self.quantization) != "none" and not str(self.device).startswith("cpu"):
            raise ConfigError(f"quantization={self.quantization!r} has CPU kernels only; on {self.device} "
                              f"use quantization='none' (choices {list(QUANTIZATION_CHOICES)})")
        c, s = self.cache, self.scheduler
        if c.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {c.block_size}")
        if c.num_blocks is not None and c.num_blocks < 2:
            raise ConfigError(f"num_gpu_blocks must be >= 2, got {c.num_blocks}")
        if c.kv_cache_memory_gb <= 0:
            raise ConfigError(f"kv_cache_memory_gb must be > 0, got {c.kv_cache_memory_gb}")
        if s.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {s.max_num_batched_tokens}")
        if s.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {s.max_num_seqs}")
        if s.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {s.max_model_len}")
