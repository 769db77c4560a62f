"""Engine configuration. Field names follow vLLM where the concept is the same."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvflow.errors import ConfigError
from kvflow.layers.kv_quant import check_kv_cache_dtype

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


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
    # "auto" (the compute dtype) | "float32" | "bfloat16" | "fp8" (e4m3) | "int8" (per token and head scale)
    kv_cache_dtype: str = "auto"


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    max_model_len: int = 2048


@dataclass
class EngineConfig:
    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative_config: object = None  # SpeculativeConfig | dict | JSON string

    def validate(self) -> None:
        parse_dtype(self.dtype)
        c, s = self.cache, self.scheduler
        c.kv_cache_dtype = check_kv_cache_dtype(c.kv_cache_dtype)
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
