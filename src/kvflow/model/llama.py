"""Llama-family decoder: Llama 2/3/3.1, Mistral, SmolLM2, and Qwen2 (q/k/v biases) and Qwen3
(per-head q/k RMSNorm), which differ from Llama only by those two flags.

Weights follow Hugging Face names; q/k/v and gate/up are fused at load into one matmul each.
The forward pass runs over a flat batch of tokens from many requests.
"""
from __future__ import annotations

import torch
from torch import nn

from kvflow.config import ModelConfig
from kvflow.layers.activation import silu_and_mul
from kvflow.layers.attention import AttentionMetadata, paged_attention, writes_kv_with_rotary
from kvflow.layers.linear import Linear
from kvflow.layers.norm import RMSNorm
from kvflow.layers.quantized_linear import QuantizedTensor, cat_rows, install_quantized
from kvflow.layers.rotary import RotaryEmbedding, apply_rotary, rotate_heads
from kvflow.model.fused_decode import FusedDecodeStep


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

    def forward(self, x, cos_sin, kv_cache, meta: AttentionMetadata, keep_rows: torch.Tensor | None = None):
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        v = qkv[:, self.q_size + self.kv_size:].view(T, self.num_kv_heads, self.head_dim)
        cos, sin = cos_sin
        kv_written = self.q_norm is None and writes_kv_with_rotary(qkv, kv_cache, meta)
        if kv_written:  # one kernel rotates q and k in place and writes k and v into the pool
            from kvflow.layers.triton.rotary import rotary_and_write_kv_
            heads = rotary_and_write_kv_(qkv.view(T, -1, self.head_dim), self.num_heads, self.num_kv_heads,
                                         cos_sin.cos32, cos_sin.sin32, kv_cache[0], kv_cache[1], meta.slot_mapping)
            q, k = heads[:, :self.num_heads], heads[:, self.num_heads:self.num_heads + self.num_kv_heads]
        elif self.q_norm is None:  # rotate q and k in one pass: they sit side by side in qkv
            qk = rotate_heads(qkv, self.num_heads + self.num_kv_heads, self.head_dim, cos_sin)
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        else:
            q = self.q_norm(qkv[:, :self.q_size].view(T, self.num_heads, self.head_dim))
            k = self.k_norm(qkv[:, self.q_size:self.q_size + self.kv_size].view(T, self.num_kv_heads, self.head_dim))
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        scales = getattr(kv_cache, "scale", None)  # int8 caches: per (token, head) scales
        o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale,
                            *((None, None) if scales is None else (scales[0], scales[1])), kv_written=kv_written)
        o = o.reshape(T, self.q_size)
        return self.o_proj(o if keep_rows is None else o[keep_rows])


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, cos_sin, kv_cache, meta, keep_rows: torch.Tensor | None = None):
        """The residual stream is carried beside the layer output (as vLLM does) so that each add
        fuses into the norm after it: returns (mlp output, residual), and the caller's next norm adds
        them. residual None: x is the embedding, the first layer's residual. keep_rows: every token's
        keys and values are written, but only these rows go on past attention."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos_sin, kv_cache, meta, keep_rows)
        if keep_rows is not None:
            residual = residual[keep_rows]
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


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
        self.fused_decode: FusedDecodeStep | None = None  # set by enable_fused_decode

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, num_layers: int | None = None,
                keep_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [T, hidden] for a flat batch of T tokens. `num_layers` stops early
        (layer_skip self-speculation drafts with the first layers and the same norm and head).
        keep_rows: only these tokens' hidden states are wanted ([len(keep_rows), hidden] comes back):
        the last layer runs its output projection and MLP on them alone (an 8k-token prompt chunk
        that samples one token skips 1/num_layers of its matmuls)."""
        def layer_by_layer():
            return self._forward_layers(input_ids, positions, kv_caches, meta, num_layers, keep_rows)

        if self.fused_decode is not None:
            out = self.fused_decode.maybe_run(input_ids, positions, kv_caches, meta, num_layers, layer_by_layer)
            if out is not None:
                return out if keep_rows is None else out[keep_rows]
        return layer_by_layer()

    def _forward_layers(self, input_ids, positions, kv_caches, meta, num_layers, keep_rows=None):
        x = self.embed_tokens(input_ids)
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        residual = None
        layers = self.layers[:num_layers]
        for i, (layer, kv_cache) in enumerate(zip(layers, kv_caches)):
            x, residual = layer(x, residual, cos_sin, kv_cache, meta, keep_rows if i == len(layers) - 1 else None)
        return self.norm(x) if residual is None else self.norm(x, residual)[0]

    def enable_fused_decode(self) -> bool:
        """Decode steps in one C call where every layer is int8, int4 or bf16 (model/fused_decode.py)."""
        self.fused_decode = FusedDecodeStep.build(self)
        return self.fused_decode is not None

    def warm_up_op_choices(self, max_rows: int) -> None:
        """Make the measured C-vs-torch choices of the fused ops (layers/op_select.py) for every
        row class up to max_rows now, at start-up, rather than inside the first request of each size."""
        layer, cfg = self.layers[0], self.config
        dtype = self.norm.weight.dtype  # the compute dtype (embeddings may be stored quantized)
        if self.norm.weight.device.type != "cpu":
            return
        attn = layer.self_attn
        rows = 1
        while True:
            x = torch.randn(rows, cfg.hidden_size).to(dtype)
            layer.input_layernorm(x)
            layer.input_layernorm(x, x.clone())
            silu_and_mul(torch.randn(rows, 2 * cfg.intermediate_size).to(dtype))
            if attn.q_norm is None:
                qkv = torch.randn(rows, attn.q_size + 2 * attn.kv_size).to(dtype)
                rotate_heads(qkv, attn.num_heads + attn.num_kv_heads, attn.head_dim,
                             self.rotary.cos_sin(torch.zeros(rows, dtype=torch.long), dtype))
            if rows >= max_rows:
                break
            rows *= 2

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        def in_torch():
            return self.lm_head(hidden).float()

        if self.fused_decode is not None:
            logits = self.fused_decode.maybe_head(hidden, in_torch)
            if logits is not None:
                return logits
        return in_torch()

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
