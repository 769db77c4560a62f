"""Decode steps of a quantized or bfloat16 Llama-family model in one C call (layers/csrc/fused_decode.c).

At batch 1 a small model's decode step is mostly per-op overhead: layer by layer through torch,
SmolLM2-135M's int8 step makes ~600 torch calls. The C step runs every layer's norms, matmuls (int8
W8A8 with AVX-512 VNNI, int4 read from torch's pack with int8 activations, or bfloat16 with AVX-512
BF16), rotary, KV write and paged attention itself; Python makes one call, and a second one for the
LM head.

It applies to steps of up to MAX_ROWS tokens: decodes, and also short prompt chunks and speculative
drafts, linear or trees (each token attends as its own row: `_attention_rows`; a tree node sees its
ancestors only), on a model whose every layer's matmuls are int8 (W8A8-able), int4 or bfloat16 and
that has no per-head q/k norm, with a float32, bfloat16 or int8 KV cache. Float32 models keep the layer-by-layer path
(the one the greedy-equality tests hold exact). Whether it runs is measured like the other fused
ops (layers/op_select.py): a step of each size class is timed against the layer-by-layer path (on
that step's own inputs: re-running a step rewrites the same KV slots, so timing it twice is
harmless), at start-up on made-up tokens (ModelRunner._time_fused_steps) or else by the first real
step of the class; KVFLOW_FUSED_OPS=c | torch forces a side. Its int8 numerics are the torch W8A8
path's; int4 layers quantize their activations to int8 per group of 32 (as llama.cpp's Q4_1 x Q8_1
does); bf16 ones are torch's bf16 matmul's; the residual stream stays in float32.
"""
from __future__ import annotations

import ctypes

import torch

from kvflow.layers import cpu_kernels, op_select
from kvflow.layers.attention import AttentionMetadata, resolve_backend
from kvflow.layers.linear import Linear
from kvflow.layers.quantized_linear import QuantizedLinear

_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_CACHE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
_KINDS = {"int8": 0, "int4": 1, "bf16": 2, "int8_a16": 3}  # csrc/fused_decode.c's LINEAR_*
# Steps of more tokens are not even timed: there, torch's batched kernels (oneDNN) and its prompt
# attention win (each token attending as its own row costs its whole context). Up to here the C step
# is timed against the layer-by-layer path: with AMX tiles, on a Xeon (Sapphire Rapids), 128 int8
# tokens took 157 ms against 313, bfloat16 206 against 218.
MAX_ROWS = 128


class _Linear(ctypes.Structure):
    _fields_ = [("kind", _I), ("q", _P), ("scale", _P), ("qsum", _P), ("sz", _P), ("bias", _P), ("N", _I),
                ("K", _I), ("group", _I)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _P), ("post_norm", _P), ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear),
                ("down", _Linear), ("k_cache", _P), ("v_cache", _P), ("k_scale", _P), ("v_scale", _P)]


class _Step(ctypes.Structure):
    _fields_ = [(n, _I) for n in ("M", "H", "Hq", "Hk", "D", "I", "BS", "max_blocks", "cache_kind", "num_layers")] + [
        ("eps", _F), ("attn_scale", _F)] + [
        (n, _P) for n in ("slots", "tables", "ctx_lens", "tree_start", "tree_bits", "cos", "sin", "final_norm",
                          "x")]


def _kind(m: torch.nn.Module) -> str | None:
    """How the C step multiplies by this layer's weights, or None if it cannot: int8 (W8A8, or W8A16
    for the LM head), int4 (torch's pack, groups of 32) or bfloat16, on the CPU."""
    if isinstance(m, QuantizedLinear):
        ok = ((m.kind == "int8" or (m.kind == "int4" and m.group_size == 32))
              and next(m.buffers()).device.type == "cpu")
        return None if not ok else "int8_a16" if m.a16 else m.kind
    w = getattr(m, "weight", None)
    ok = isinstance(m, Linear) and w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.is_contiguous()
    return "bf16" if ok else None


class FusedDecodeStep:
    """Built once per model by `build`; `maybe_run` runs a step or returns None (not applicable or
    measured slower)."""

    def __init__(self, model: torch.nn.Module):
        cfg = model.config
        self.model = model
        self.keep: list[torch.Tensor] = []  # float32 norms and weight row sums the C structs point at
        self._votes: dict[tuple, bool] = {}  # size-class key -> its family's vote, once all are timed
        self.layers = (_Layer * cfg.num_layers)()
        for c_layer, layer in zip(self.layers, model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            c_layer.input_norm = self._keep(layer.input_layernorm.weight.float())
            c_layer.post_norm = self._keep(layer.post_attention_layernorm.weight.float())
            for field, linear in (("qkv", attn.qkv_proj), ("o", attn.o_proj), ("gate_up", mlp.gate_up_proj),
                                  ("down", mlp.down_proj)):
                setattr(c_layer, field, self._linear(linear))
        self.final_norm = self._keep(model.norm.weight.float())
        self.head = self._linear(model.lm_head) if _kind(model.lm_head) is not None else None
        self.cache_key: tuple | None = None
        self.step = _Step(H=cfg.hidden_size, Hq=cfg.num_heads, Hk=cfg.num_kv_heads, D=cfg.head_dim,
                          I=cfg.intermediate_size, eps=cfg.rms_norm_eps, attn_scale=cfg.head_dim ** -0.5,
                          final_norm=self.final_norm)
        self.query_probe = torch.empty(1, cfg.num_heads, cfg.head_dim)  # the C step's queries: float32 rows
        # AMX tile matmuls (csrc/fused_decode.c) and, on a bfloat16 cache, attention scores
        # (csrc/paged_decode.c): compiled in on CPUs that have them, and then timed against the plain
        # kernels per row count, for the step and the LM head apart
        self.amx_available = bool(cpu_kernels.kernels().fused_use_amx(0))

    @classmethod
    def build(cls, model: torch.nn.Module) -> FusedDecodeStep | None:
        """None unless every layer can run in the C step on this machine."""
        if cpu_kernels.kernels() is None or not hasattr(model, "layers"):
            return None
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if attn.q_norm is not None or any(_kind(m) is None for m in linears):
                return None
        return cls(model)

    def _keep(self, t: torch.Tensor) -> int:
        t = t.contiguous()
        self.keep.append(t)
        return t.data_ptr()

    def _linear(self, m: QuantizedLinear | Linear) -> _Linear:
        kind = _kind(m)
        bias = None if m.bias is None else self._keep(m.bias.float())
        c = _Linear(kind=_KINDS[kind], bias=bias, N=m.out_features, K=m.in_features)
        if kind == "int8_a16":
            c.q, c.scale = m.q.data_ptr(), m.scale.data_ptr()
        elif kind == "int8":
            c.q, c.scale, c.qsum = m.q.data_ptr(), m.scale.data_ptr(), self._keep(m.q.sum(1, dtype=torch.int32))
        elif kind == "int4":
            c.q, c.sz, c.group = m.packed.data_ptr(), m.scales_zeros.data_ptr(), m.group_size
        else:
            c.q = m.weight.data_ptr()
        return c

    # ---- per step ----
    def applies(self, input_ids: torch.Tensor, kv_caches: list, meta: AttentionMetadata) -> bool:
        k_cache = kv_caches[0][0]
        return (input_ids.shape[0] <= MAX_ROWS and input_ids.device.type == "cpu"
                and k_cache.dtype in _CACHE_KINDS and resolve_backend(meta.backend, input_ids.device) == "cpu"
                and cpu_kernels.can_run_decode(self.query_probe, k_cache))

    def maybe_run(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                  meta: AttentionMetadata, num_layers: int | None, layer_by_layer) -> torch.Tensor | None:
        if not self.applies(input_ids, kv_caches, meta):
            return None
        key = self._step_key(input_ids.shape[0], kv_caches[0][0].dtype)

        def candidates():
            return {"c": lambda: self.run(input_ids, positions, kv_caches, meta, num_layers),
                    "torch": lambda: layer_by_layer()}

        if not self._runs_in_c(lambda rows: self._step_key(rows, kv_caches[0][0].dtype), key, candidates):
            return None
        return self.run(input_ids, positions, kv_caches, meta, num_layers)

    def maybe_head(self, hidden: torch.Tensor, in_torch) -> torch.Tensor | None:
        """Float32 logits of the LM head in C for a few rows (after a fused step), or None."""
        M = hidden.shape[0]
        if self.head is None or M > MAX_ROWS or hidden.device.type != "cpu":
            return None
        x = hidden.float().contiguous()
        candidates = {"c": lambda: self.run_head(x), "torch": in_torch}
        if not self._runs_in_c(self._head_key, self._head_key(M), lambda: candidates):
            return None
        return self.run_head(x)

    def _runs_in_c(self, key_of, key: tuple, candidates) -> bool:
        """Whether the C side runs this step (or head). Each size class is timed; once every class
        is, the side that won most of them runs them all: the two sides round differently, and a
        request's logits must not depend on the size of the step that computed them (greedy output
        with speculation, or in a batch, equals greedy output alone)."""
        if op_select.mode() == "measure" and key in self._votes:
            return self._votes[key]
        own = op_select.choose(key, candidates, reps=3) == "c"
        keys = [key_of(1 << i) for i in range(MAX_ROWS.bit_length())]
        if op_select.mode() != "measure" or not all(op_select.known(k) for k in keys):
            return own  # a side forced (KVFLOW_FUSED_OPS), or sizes still untimed
        vote = 2 * sum(op_select.choose(k, None) == "c" for k in keys) >= len(keys)
        self._votes.update(dict.fromkeys(keys, vote))
        return vote

    def _step_key(self, rows: int, cache_dtype: torch.dtype) -> tuple:
        return ("fused_decode", self.step.H, len(self.layers), self.layers[0].qkv.kind, cache_dtype,
                op_select.rows_class(rows))

    def _head_key(self, rows: int) -> tuple:
        return "fused_head", self.head.N, self.head.K, self.head.kind, op_select.rows_class(rows)

    def choices_known(self, rows: int, cache_dtype: torch.dtype) -> bool:
        """Whether steps of `rows` tokens know which side runs them (and so, as the timing of the C side
        makes it too, whether AMX tiles do)."""
        return op_select.known(self._step_key(rows, cache_dtype)) and (
            self.head is None or op_select.known(self._head_key(rows)))

    def run_head(self, x: torch.Tensor, amx: bool | None = None) -> torch.Tensor:
        """Float32 logits of x [M, H] (float32, contiguous). amx: use the AMX tiles; None: the measured choice."""
        M = x.shape[0]
        if amx is None:
            key = ("fused_head_amx", self.head.N, self.head.K, self.head.kind, op_select.rows_class(M))
            amx = self._choose_amx(key, lambda a: self.run_head(x, a))
        logits = torch.empty(M, self.head.N)
        lib = cpu_kernels.kernels()
        lib.fused_use_amx(int(amx))
        if lib.fused_linear(ctypes.byref(self.head), x.data_ptr(), M, logits.data_ptr()) != 0:
            raise MemoryError("fused_linear: out of memory for its scratch")
        return logits

    def _choose_amx(self, key: tuple, run) -> bool:
        if not self.amx_available:
            return False
        return op_select.choose(key, lambda: {"amx": lambda: run(True), "plain": lambda: run(False)},
                                names=("amx", "plain"), reps=3) == "amx"

    def _set_caches(self, kv_caches: list) -> None:
        key = tuple(getattr(c, "data", c).data_ptr() for c in kv_caches)  # no per-layer view each step
        if key == self.cache_key:
            return
        for c_layer, cache in zip(self.layers, kv_caches):
            scale = getattr(cache, "scale", None)
            c_layer.k_cache, c_layer.v_cache = cache[0].data_ptr(), cache[1].data_ptr()
            c_layer.k_scale, c_layer.v_scale = (None, None) if scale is None else (scale[0].data_ptr(),
                                                                                  scale[1].data_ptr())
        self.cache_key = key

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta: AttentionMetadata,
            num_layers: int | None, amx: bool | None = None) -> torch.Tensor:
        """The step's final hidden states. amx: use the AMX tiles; None: the measured choice."""
        if amx is None:
            key = ("fused_step_amx", self.step.H, self.layers[0].qkv.kind, op_select.rows_class(input_ids.shape[0]))
            amx = self._choose_amx(key, lambda a: self.run(input_ids, positions, kv_caches, meta, num_layers, a))
        model = self.model
        self._set_caches(kv_caches)
        x = model.embed_tokens(input_ids).float().contiguous()
        cos, sin = model.rotary.cos[positions].contiguous(), model.rotary.sin[positions].contiguous()
        tables, ctx_lens, tree_start, tree_bits = _attention_rows(meta, input_ids.shape[0])
        slots = meta.slot_mapping.contiguous()
        k_cache = kv_caches[0][0]
        s = self.step
        s.M, s.BS, s.max_blocks = input_ids.shape[0], k_cache.shape[1], tables.shape[1]
        s.cache_kind, s.num_layers = _CACHE_KINDS[k_cache.dtype], min(num_layers or len(self.layers), len(self.layers))
        s.slots, s.tables, s.ctx_lens = slots.data_ptr(), tables.data_ptr(), ctx_lens.data_ptr()
        s.tree_start = None if tree_start is None else tree_start.data_ptr()
        s.tree_bits = None if tree_bits is None else tree_bits.data_ptr()
        s.cos, s.sin, s.x = cos.data_ptr(), sin.data_ptr(), x.data_ptr()
        lib = cpu_kernels.kernels()
        lib.fused_use_amx(int(amx))
        if lib.fused_decode_step(ctypes.byref(self.layers), ctypes.byref(s)) != 0:
            raise MemoryError("fused_decode_step: out of memory for the step's scratch")
        return x.to(model.norm.weight.dtype)


def _attention_rows(meta: AttentionMetadata, num_tokens: int) -> tuple[torch.Tensor, ...]:
    """Each token's block-table row and how many keys it attends (its position + 1), so that every
    token of the step, decode, prompt chunk or draft token, is one row of the single-query decode
    kernel. Causal by construction: the C step writes every token's KV before any token attends.
    Draft-tree nodes also get where their tree starts and their ancestor bits (None, None when the
    step has no tree)."""
    groups = meta.groups
    if len(groups) == 1 and groups[0].ctx_lens is not None and groups[0].ctx_lens.shape[0] == num_tokens:
        return groups[0].block_tables.contiguous(), groups[0].ctx_lens.contiguous(), None, None  # decodes only
    width = max(g.block_tables.shape[1] for g in groups)
    tables = torch.zeros(num_tokens, width, dtype=torch.long)
    ctx_lens = torch.zeros(num_tokens, dtype=torch.long)
    for g in groups:
        valid = torch.ones_like(g.token_index, dtype=torch.bool) if g.valid is None else g.valid
        tokens = g.token_index[valid]
        request = torch.arange(g.token_index.shape[0])[:, None].expand_as(g.token_index)[valid]
        tables[tokens, :g.block_tables.shape[1]] = g.block_tables[request]
        ctx_lens[tokens] = g.q_positions[valid] + 1
    nodes = [node for g in groups for node in g.tree_nodes]
    if not nodes:
        return tables, ctx_lens, None, None
    tree_start, tree_bits = ctx_lens.clone(), torch.zeros(num_tokens, dtype=torch.long)
    token, start, bits = zip(*nodes)
    tree_start[list(token)] = torch.tensor(start)
    tree_bits[list(token)] = torch.tensor(bits)
    return tables, ctx_lens, tree_start, tree_bits
