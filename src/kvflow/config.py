"""Engine configuration. Field names follow vLLM where the concept is the same."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from kvflow.errors import ConfigError

ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "fp8", "int8")
_KV_ALIASES = {"fp8_e4m3": "fp8", "float": "float32", "bf16": "bfloat16"}
LOAD_FORMATS = ("auto", "dummy")
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


def _opt(default, help: str, **meta):
    """An engine option: its help text (and choices) travel with the field, so the CLI, the
    server and LLM(**options) all read one definition (see entrypoints/args.py)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class CacheConfig:
    block_size: int = _opt(16, "tokens per KV-cache block")
    kv_cache_memory_gb: float = _opt(1.0, "memory for the KV cache, GiB")
    num_gpu_blocks: int | None = _opt(None, "KV-cache blocks (overrides --kv-cache-memory-gb; tests use tiny pools)",
                                      type=int)
    enable_prefix_caching: bool = _opt(True, "reuse the KV blocks of shared prompt prefixes")
    kv_cache_dtype: str = _opt("auto", "KV cache precision: auto (the compute dtype), float32, bfloat16, fp8 (e4m3), "
                                       "int8 (per token and head scale)", choices=list(KV_CACHE_DTYPES))


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = _opt(512, "token budget of one engine step")
    max_num_seqs: int = _opt(64, "most sequences in one step")
    max_model_len: int = _opt(2048, "longest prompt + output in tokens (capped by the model's context)")


@dataclass
class EngineConfig:
    model: str = _opt("smollm2-135m", "bundled model name, .gguf file or Hugging Face folder")
    dtype: str = _opt("auto", "compute dtype; auto = bfloat16 on CUDA and on CPUs with native bf16 "
                              "(avx512_bf16 / AMX), else float32", choices=list(DTYPE_CHOICES))
    device: str = _opt("cpu", "torch device (cpu, cuda, cuda:1, ...)")
    seed: int = _opt(0, "engine random seed")
    quantization: str | None = _opt(None, "weights kept quantized in memory: int8 (per channel; W8A8 / W8A16), "
                                          "int4 (group-wise), auto (the GGUF file's own type), none",
                                    type=str, choices=list(QUANTIZATION_CHOICES))
    recalibrate: bool = _opt(False, "time the linear kernels and fused C ops again instead of reading the "
                                    "cached choices")
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative_config: object = _opt(None, 'speculative decoding as JSON, e.g. \'{"method": "ngram", '
                                            '"num_speculative_tokens": 4}\' (methods ngram, recycle, draft; '
                                            'K an integer or "auto")', type=str, metavar="JSON")
    attention_backend: str = _opt("auto", "attention kernels: auto = the C kernels on CPU, Triton on CUDA "
                                          "(also the environment variable KVFLOW_ATTENTION_BACKEND)",
                                  choices=list(ATTENTION_BACKENDS))
    load_format: str = _opt("auto", "dummy: random weights from the model folder's config.json (benchmarks "
                                    "without weights)", choices=list(LOAD_FORMATS))
    enforce_eager: bool = _opt(False, "never capture CUDA graphs (they replay decode-only steps on CUDA)")

    @classmethod
    def from_options(cls, **options) -> EngineConfig:
        """Build from flat option names (LLM's keywords, the CLI's flags: vLLM's names)."""
        config = cls()
        owners = {name: owner for owner in (config, config.cache, config.scheduler)
                  for name in (f.name for f in fields(owner)) if name not in ("cache", "scheduler")}
        for name, value in options.items():
            if name not in owners:
                raise ConfigError(f"unknown option {name!r}; known options: {', '.join(sorted(owners))}")
            setattr(owners[name], name, value)
        return config

    def validate(self) -> None:
        parse_dtype(self.dtype, self.device)
        if parse_quantization(self.quantization) != "none" and not str(self.device).startswith("cpu"):
            raise ConfigError(f"quantization={self.quantization!r} has CPU kernels only; on {self.device} "
                              f"use quantization='none' (choices {list(QUANTIZATION_CHOICES)})")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}; "
                              f"got {self.attention_backend!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {self.load_format!r}")
        c, s = self.cache, self.scheduler
        c.kv_cache_dtype = check_kv_cache_dtype(c.kv_cache_dtype)
        if c.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {c.block_size}")
        if c.num_gpu_blocks is not None and c.num_gpu_blocks < 2:
            raise ConfigError(f"num_gpu_blocks must be >= 2, got {c.num_gpu_blocks}")
        if c.kv_cache_memory_gb <= 0:
            raise ConfigError(f"kv_cache_memory_gb must be > 0, got {c.kv_cache_memory_gb}")
        if s.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {s.max_num_batched_tokens}")
        if s.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {s.max_num_seqs}")
        if s.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {s.max_model_len}")


DISPATCH_POLICY_CHOICES = ("round-robin", "least-load", "prefix-affinity")  # kvflow.cluster.policy's names


@dataclass
class ClusterConfig:
    """Serving on several engine instances (kvflow.cluster, on Ray). `instances` None: one engine,
    in process, no Ray."""
    instances: int | None = _opt(None, "engine instances, each a Ray actor (omitted: one engine in this process, "
                                       "no Ray)", type=int)
    threads_per_instance: int = _opt(1, "torch threads of each instance")
    dispatch_policy: str = _opt("least-load", "where a new request goes: round-robin, least-load (Llumnix's "
                                              "virtual usage) or prefix-affinity (the instance that cached most "
                                              "of its prompt's leading blocks)", choices=list(DISPATCH_POLICY_CHOICES))
    enable_migration: bool = _opt(False, "live-migrate running requests between instances to balance load "
                                         "(Llumnix); draining instances are always migrated off")
    migration_interval: float = _opt(0.5, "seconds between two migration plans")
    prefill_instances: int = _opt(0, "prefill/decode split (Splitwise): instances that run prompts only "
                                     "(with --decode-instances; replaces --instances)")
    decode_instances: int = _opt(0, "prefill/decode split: instances that continue the decoding")
    min_instances: int | None = _opt(None, "autoscaling: fewest instances (0 scales to zero after --idle-timeout; "
                                           "omitted: no autoscaling)", type=int)
    max_instances: int | None = _opt(None, "autoscaling: most instances (default: --instances)", type=int)
    idle_timeout: float = _opt(60.0, "autoscaling: seconds an instance stays nearly idle before it is drained "
                                     "and stopped")
    ray_address: str | None = _opt(None, "join this Ray cluster (e.g. ray://host:10001 or auto); omitted: a "
                                         "local Ray started for this process", type=str)
    weight_cache: bool = _opt(True, "instances read a GGUF model's weights from the dequantized copy the loader "
                                    "keeps under $KVFLOW_CACHE/weights, so later (cold) starts skip the conversion")

    @property
    def enabled(self) -> bool:
        return bool(self.instances or self.prefill_instances or self.decode_instances or self.min_instances is not None)

    def validate(self) -> None:
        for name in ("instances", "min_instances", "max_instances"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if (self.prefill_instances > 0) != (self.decode_instances > 0):
            raise ConfigError("the prefill/decode split needs both prefill_instances and decode_instances >= 1, got "
                              f"{self.prefill_instances} and {self.decode_instances}")
        if self.threads_per_instance < 1:
            raise ConfigError(f"threads_per_instance must be >= 1, got {self.threads_per_instance}")
        if self.dispatch_policy not in DISPATCH_POLICY_CHOICES:
            raise ConfigError(f"dispatch_policy must be one of {', '.join(DISPATCH_POLICY_CHOICES)}, "
                              f"got {self.dispatch_policy!r}")
        if self.idle_timeout <= 0 or self.migration_interval <= 0:
            raise ConfigError("idle_timeout and migration_interval must be > 0")


def check_kv_cache_dtype(name: str) -> str:
    """The canonical name, or ConfigError naming the choices (called before any weight loads)."""
    if not isinstance(name, str) or _KV_ALIASES.get(name, name) not in KV_CACHE_DTYPES:
        raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    return _KV_ALIASES.get(name, name)


def option_fields() -> list:
    """Every engine option's dataclass field, in the order the help lists them."""
    skip = ("cache", "scheduler")
    return [f for cls in (EngineConfig, CacheConfig, SchedulerConfig) for f in fields(cls) if f.name not in skip]
