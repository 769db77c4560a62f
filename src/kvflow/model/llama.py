"""Llama-family decoder: Llama 2/3/3.1, Mistral, SmolLM2, and Qwen2 (q/k/v biases) and Qwen3
(per-head q/k RMSNorm), which differ from Llama only by those two flags.

Weights follow Hugging Face names; q/k/v and gate/up are fused at load into one matmul each.
The forward pass runs over a flat batch of tokens from many requests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.config import ModelConfig
from kvflow.layers.attention import AttentionMetadata, paged_attention
from kvflow.layers.linear import Linear
from kvflow.layers.norm import RMSNorm
from kvflow.layers.quantized_linear import QuantizedTensor, cat_rows, install_quantized
from kvflow.layers.rotary import RotaryEmbedding, apply_rotary


def _weight(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x, cos_sin, kv_cache, meta: AttentionMetadata):
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        v = qkv[:, self.q_size + self.kv_size:].view(T, self.num_kv_heads, self.head_dim)
        cos, sin = cos_sin
        if self.q_norm is None:  # rotate q and k in one pass: they sit side by side in qkv
            qk = apply_rotary(qkv[:, :self.q_size + self.kv_size].view(T, -1, self.head_dim), cos, sin)
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        else:
            q = self.q_norm(qkv[:, :self.q_size].view(T, self.num_heads, self.head_dim))
            k = self.k_norm(qkv[:, self.q_size:self.q_size + self.kv_size].view(T, self.num_kv_heads, self.head_dim))
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(o.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos_sin, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        with torch.device("cpu"):  # real even when the loader builds the weights on "meta"
            self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, num_layers: int | None = None) -> torch.Tensor:
        """Final hidden states [T, hidden] for a flat batch of T tokens. `num_layers` stops early
        (layer_skip self-speculation drafts with the first layers and the same norm and head)."""
        x = self.embed_tokens(input_ids)
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        for layer, kv_cache in zip(self.layers[:num_layers], kv_caches):
            x = layer(x, cos_sin, kv_cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take Hugging Face-named tensors (`model.layers.0.self_attn.q_proj.weight`, ...)."""
        state = {k.removeprefix("model."): v for k, v in state.items()}
        if self.config.tie_word_embeddings or "lm_head.weight" not in state:
            state["lm_head.weight"] = state["embed_tokens.weight"]  # the same tensor: no second copy
        for i in range(self.config.num_layers):
            p = f"layers.{i}."
            for kind in ("weight", "bias"):
                parts = [state.pop(f"{p}self_attn.{n}_proj.{kind}", None) for n in "qkv"]
                if parts[0] is not None:
                    state[f"{p}self_attn.qkv_proj.{kind}"] = cat_rows(parts)
            state[f"{p}mlp.gate_up_proj.weight"] = cat_rows(
                [state.pop(f"{p}mlp.gate_proj.weight"), state.pop(f"{p}mlp.up_proj.weight")])
        state = {k: v for k, v in state.items() if "rotary_emb" not in k}
        quantized = {k: state.pop(k) for k in list(state) if isinstance(state[k], QuantizedTensor)}
        missing, unexpected = self.load_state_dict(state, strict=False, assign=True)
        missing = [m for m in missing if not m.startswith("rotary.") and m not in quantized]
        if quantized:
            install_quantized(self, quantized, self.norm.weight.dtype)
        if missing or unexpected:
            raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
