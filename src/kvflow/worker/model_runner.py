"""ModelRunner: loads the model, sizes and owns the KV tensors, and turns a SchedulerOutput into
one forward pass over a flat batch of tokens, then samples (nano-vllm's ModelRunner).

Batch layout: decodes (one new token each) first, then multi-token chunks (prompt chunks, or a last
token plus speculative tokens), so the attention layer sees two groups. Positions, slot_mapping and
block tables are built with vectorised ops from one (start, length) pair per request.

What comes back is plain Python (ModelRunnerOutput): the core that applies it never touches torch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kvflow.config import EngineConfig, ModelConfig, parse_dtype, parse_quantization
from kvflow.core.request import Request
from kvflow.core.scheduler import ModelRunnerOutput, SampledTokens, ScheduledRequest, SchedulerOutput
from kvflow.core.spec_tree import ancestors, depths, path_tokens
from kvflow.errors import ConfigError
from kvflow.layers import kernel_choice, kv_quant, op_select
from kvflow.layers.attention import AttentionGroup, AttentionMetadata, resolve_backend
from kvflow.layers.kv_quant import LayerKVCache
from kvflow.layers.sampler import SamplerOutput, SamplingRow, sample
from kvflow.model.fused_decode import MAX_ROWS
from kvflow.model.loader import load_model
from kvflow.outputs import Logprob, TokenLogprob
from kvflow.structured.bitmask import grammar_bitmask
from kvflow.worker.cuda_graphs import DecodeGraphs

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    last_token: torch.Tensor  # [R] flat index of each item's last token


def build_batch(items: list[tuple[list[int], int, list[int]]], block_size: int, device: torch.device,
                trees: list[list[int] | None] | None = None) -> Batch:
    """items: (token ids, start position, block ids) per request, single-token ones first.
    trees: per item, None or the parent indices of a draft tree that ends its chunk (core/spec_tree.py):
    those tokens keep their own KV slots but take the rotary position of their depth and attend only
    to their ancestors."""
    bs = block_size
    lens_t = torch.tensor([len(t) for t, _, _ in items])
    starts_t = torch.tensor([s for _, s, _ in items])
    num_reqs = len(items)
    req_of_token = torch.repeat_interleave(torch.arange(num_reqs), lens_t)
    first_token = torch.cumsum(lens_t, 0) - lens_t
    positions = starts_t[req_of_token] + torch.arange(int(lens_t.sum())) - first_token[req_of_token]
    ctx_lens = starts_t + lens_t
    max_blocks = int((ctx_lens.max() + bs - 1) // bs)
    tables = torch.zeros(num_reqs, max_blocks, dtype=torch.long)
    for i, (_, _, block_ids) in enumerate(items):
        ids = block_ids[:max_blocks]
        tables[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    slot_mapping = tables[req_of_token, positions // bs] * bs + positions % bs

    num_single = int((lens_t == 1).sum())
    groups = []
    if num_single:
        ctx = int(ctx_lens[:num_single].max())
        # contiguous: the C decode kernel walks rows with the table's own width as the stride
        decode = _group(torch.arange(num_single)[:, None], None, tables[:num_single, :(ctx + bs - 1) // bs].contiguous(),
                        positions[:num_single, None], bs, device)
        decode.ctx_lens = ctx_lens[:num_single].to(device)
        groups.append(decode)
    if num_single < num_reqs:
        # Chunks that start at position 0 (no cached prefix) attend causally over their own keys;
        # the others (later chunks, prefix-cache hits, speculative tokens) read the cache with a mask.
        # When the fresh ones come first (the runner orders them so) each group's chunks stay back
        # to back in the flat batch, as the triton chunk kernel needs; otherwise one group holds all.
        multi = torch.arange(num_single, num_reqs)
        fresh = starts_t[num_single:] == 0
        split = bool(fresh.any()) and not bool(fresh.all()) and bool((fresh[:-1] >= fresh[1:]).all())
        for rows, is_fresh in ([(multi[fresh], True), (multi[~fresh], False)] if split
                               else [(multi, bool(fresh.all()))]):
            groups.append(_chunk_group(rows, lens_t, first_token, ctx_lens, tables, positions, bs, device, is_fresh))
    rope_positions = positions
    if trees is not None and any(t for t in trees):
        rope_positions = _apply_trees(trees, groups, positions, first_token, lens_t)
    all_ids = [t for ids, _, _ in items for t in ids]
    return Batch(torch.tensor(all_ids, dtype=torch.long, device=device), rope_positions.to(device),
                 AttentionMetadata(slot_mapping.to(device), groups), first_token + lens_t - 1)


def _chunk_group(rows, lens_t, first_token, ctx_lens, tables, positions, bs: int, device,
                 causal_fresh: bool) -> AttentionGroup:
    """Multi-token items `rows`, padded to the longest (padding repeats the chunk's first token)."""
    m_lens, m_first = lens_t[rows], first_token[rows]
    offs = torch.arange(int(m_lens.max()))[None, :]
    valid = offs < m_lens[:, None]
    index = torch.where(valid, m_first[:, None] + offs, m_first[:, None])
    ctx = int(ctx_lens[rows].max())
    group = _group(index, valid, tables[rows, :(ctx + bs - 1) // bs], positions[index], bs, device)
    group.causal_fresh = causal_fresh
    # varlen layout (the triton backend): the rows' chunks back to back in the flat batch
    starts = torch.cat([m_first, m_first[-1:] + m_lens[-1:]])
    group.query_start_loc, group.query_starts = starts.to(device), starts.tolist()
    if bool(valid.all()) and bool((m_first[1:] == m_first[:-1] + m_lens[:-1]).all()):  # equal, back to back
        group.flat_rows = (group.query_starts[0], group.query_starts[-1])
    group.seq_lens, group.max_query_len = ctx_lens[rows].to(device), int(m_lens.max())
    return group


def _apply_trees(trees, groups, positions, first_token, lens_t) -> torch.Tensor:
    """Draft trees: each node's rotary position is its root's plus its depth, and in the chunk
    group's mask a node sees the keys of its ancestors (and itself) instead of every earlier slot."""
    rope = positions.clone()
    chunk = groups[-1]  # drafts follow a cached prefix: never in the fresh-prompt group
    mask, first_rows = chunk.attn_mask(), chunk.token_index[:, 0].tolist()
    for i, parents in enumerate(trees):
        if not parents:
            continue
        b = first_rows.index(int(first_token[i]))  # this item's row in the group
        n = len(parents)
        first = int(first_token[i] + lens_t[i]) - n  # flat index of node 0
        root_pos = int(positions[first]) - 1
        rope[first:first + n] = root_pos + torch.tensor(depths(parents))
        anc = torch.zeros(n, n, dtype=torch.bool)
        for j, path in enumerate(ancestors(parents)):
            anc[j, path] = True
            chunk.tree_nodes.append((first + j, root_pos + 1, sum(1 << k for k in path)))
        q0 = int(lens_t[i]) - n  # the nodes' rows in this item's chunk
        mask[b, 0, q0:q0 + n, root_pos + 1:root_pos + 1 + n] = anc.to(mask.device)
        chunk.tree = True
    return rope


def _group(index, valid, tables, q_positions, block_size: int, device) -> AttentionGroup:
    """The mask is built on the device when first needed (attn_mask): an 8k-token chunk's is 64 MB."""
    return AttentionGroup(index.to(device), None if valid is None else valid.to(device), tables.to(device),
                          q_positions=q_positions.to(device), block_size=block_size)


def allocate_kv_caches(model_cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device) -> list[LayerKVCache]:
    """One LayerKVCache per layer: [2 (k, v), num_blocks, block_size, kv_heads, head_dim] values in
    `dtype` (the KV cache's storage dtype), plus per (token, head) scales when that dtype is int8."""
    return [LayerKVCache.allocate(num_blocks, block_size, model_cfg.num_kv_heads, model_cfg.head_dim, dtype, device)
            for _ in range(model_cfg.num_layers)]


def bytes_per_block(model_cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """dtype: the KV cache's storage dtype (int8 adds a float32 scale per token and head)."""
    per = kv_quant.bytes_per_token_head(model_cfg.head_dim, dtype)
    return 2 * model_cfg.num_layers * block_size * model_cfg.num_kv_heads * per


class ModelRunner:
    """`model` overrides config.model (a draft model); `num_blocks` makes the pool match another
    runner's block ids (a draft model's KV follows the target's block tables)."""

    def __init__(self, config: EngineConfig, model: str | None = None, num_blocks: int | None = None):
        self.dtype = parse_dtype(config.dtype)
        self.device = torch.device(config.device)
        self.block_size = config.cache.block_size
        quant = parse_quantization(config.quantization)
        extra = {"quantization": quant} if quant != "none" else {}
        loaded = load_model(model or config.model, self.dtype, config.device,
                            max_positions=config.scheduler.max_model_len, load_format=config.load_format, **extra)
        kernel_choice.calibrate(loaded.model, recalibrate=config.recalibrate)
        if config.recalibrate:
            op_select.forget_saved()
        self.model = loaded.model
        self.model_config = loaded.config
        self.tokenizer, self.eos_token_ids, self.model_path = loaded.tokenizer, loaded.eos_token_ids, loaded.path
        self.attention_backend = config.attention_backend
        self.kv_cache_dtype = kv_quant.storage_dtype(config.cache.kv_cache_dtype, self.dtype)
        triton = resolve_backend(config.attention_backend, self.device) == "triton"
        if triton and self.kv_cache_dtype != self.dtype:
            raise ConfigError(f"the triton attention backend reads a KV cache in the compute dtype ({config.dtype}); "
                              f"kv_cache_dtype {config.cache.kv_cache_dtype!r} needs attention_backend 'cpu' or 'torch'")
        self.num_blocks = num_blocks or self._num_blocks(config)
        use_graphs = model is None and self.device.type == "cuda" and not config.enforce_eager and triton
        # With CUDA graphs, one block past the pool's takes the padding rows' keys and values.
        self.kv_caches = allocate_kv_caches(self.model_config, self.num_blocks + use_graphs, self.block_size,
                                            self.kv_cache_dtype, self.device)
        self.model.warm_up_op_choices(max_rows=512)
        if self.model.enable_fused_decode():  # small steps of int8 / int4 / bf16 models in one C call
            self._time_fused_steps()
        self.graphs: DecodeGraphs | None = None
        if use_graphs:
            self.graphs = DecodeGraphs(self.model, self.kv_caches, self.block_size, config.scheduler.max_num_seqs,
                                       self.model_config.max_position_embeddings, self.num_blocks, self.device)
            self.graphs.capture()

    @torch.inference_mode()
    def _time_fused_steps(self) -> None:
        """Choose between the C step and the layer-by-layer path for every step size now, at start-up,
        rather than inside the first request of each size (at 64-128 tokens that timing is a second or
        more). Each size class is timed on a batch of decodes at a context of up to 128 tokens (all
        reading the same blocks, which no request holds yet); choices this machine already made
        (op_select keeps them on disk) are not timed again."""
        fused = self.model.fused_decode
        cache_dtype = self.kv_caches[0][0].dtype
        sizes = [1 << i for i in range(MAX_ROWS.bit_length()) if not fused.choices_known(1 << i, cache_dtype)]
        context = min(128, self.num_blocks * self.block_size, self.model_config.max_position_embeddings) - 1
        if sizes:
            logger.info("timing the C decode step against the layer-by-layer path for steps of %s tokens "
                        "(once on this machine)", "/".join(map(str, sizes)))
        for rows in sizes:
            self.synthetic_step([list(range(context // self.block_size + 1))] * rows, 1, context, 1)

    @torch.inference_mode()
    def synthetic_step(self, tables: list[list[int]], n: int, start: int, rows: int) -> torch.Tensor:
        """The logits of the last `rows` of n made-up tokens at positions start.. for each of
        len(tables) requests, request i's KV written into the blocks tables[i] (requests may share
        blocks): a step of that shape for timing and start-up choices, outside the scheduler."""
        tokens = [(7 * i + 11) % self.model_config.vocab_size for i in range(n)]
        copies = len(tables)
        batch = build_batch([(tokens, start, block_ids) for block_ids in tables], self.block_size, self.device)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
        return self.model.compute_logits(hidden.view(copies, n, -1)[:, -rows:].reshape(copies * rows, -1))

    def _num_blocks(self, config: EngineConfig) -> int:
        if config.cache.num_gpu_blocks is not None:
            return config.cache.num_gpu_blocks
        per_block = bytes_per_block(self.model_config, self.block_size, self.kv_cache_dtype)
        return max(2, int(config.cache.kv_cache_memory_gb * (1 << 30)) // per_block)

    # ---- one step ----
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        # single tokens first, then prompt chunks with no cached prefix, then the rest (stable)
        items = sorted(sched.scheduled, key=lambda s: (s.num_new_tokens > 1, s.start > 0))
        graphed = (self.graphs is not None and self.graphs.can_run(len(items))
                   and all(s.num_new_tokens == 1 for s in items))
        batch = None if graphed else self._build_batch(items)
        last_token = list(range(len(items))) if graphed else batch.last_token.tolist()
        sampled = [(i, s) for i, s in enumerate(items) if s.samples]
        rows, sampling_rows = self.prepare_sample(sampled, last_token)
        prompt_rows = self._prompt_logprob_rows(items, last_token, rows)
        keep = torch.tensor(rows, dtype=torch.long, device=self.device)
        if graphed:
            hidden = self.graphs.run([s.token_ids[0] for s in items], [s.start for s in items],
                                     [s.request.block_ids for s in items])[keep]
        else:  # the last layer computes only the rows that get logits (a prompt chunk needs one)
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta, keep_rows=keep)
        logits = self.model.compute_logits(hidden)
        n = len(sampling_rows)
        out = ModelRunnerOutput(sample_logits=logits[:n] if n else None)
        if n:
            bitmask = grammar_bitmask([s for _, s in sampled], logits.shape[1])
            self._collect_sampled(out, [s for _, s in sampled], sample(logits[:n], sampling_rows, bitmask))
        offset = n
        for req, count in prompt_rows:
            out.prompt_logprobs[req.request_id] = _prompt_entries(req, logits[offset:offset + count])
            offset += count
        return out

    def _build_batch(self, items: list[ScheduledRequest]) -> Batch:
        trees = [s.spec_parents for s in items] if any(s.spec_parents for s in items) else None
        batch = build_batch([(s.token_ids, s.start, s.request.block_ids) for s in items], self.block_size, self.device,
                            trees)
        batch.meta.backend = self.attention_backend
        return batch

    @staticmethod
    def prepare_sample(sampled: list[tuple[int, ScheduledRequest]], last_token: list[int]) -> tuple[list[int], list[SamplingRow]]:
        """The hidden-state rows to sample and what the sampler needs to know about each: a
        request verifying K drafts owns K + 1 rows, row j seeing the history plus the first j drafts."""
        rows: list[int] = []
        sampling_rows: list[SamplingRow] = []
        for i, s in sampled:
            k = len(s.spec_token_ids)
            last = last_token[i]
            rows.extend(range(last - k, last + 1))
            if s.spec_parents is None:
                sampling_rows.extend(_sampling_row(s.request, s.spec_token_ids[:j]) for j in range(k + 1))
            else:  # a tree: row 1 + i sees the path to node i
                paths = [[]] + path_tokens(s.spec_token_ids, s.spec_parents)
                sampling_rows.extend(_sampling_row(s.request, p) for p in paths)
        return rows, sampling_rows

    @staticmethod
    def _collect_sampled(out: ModelRunnerOutput, sampled: list[ScheduledRequest], so: SamplerOutput) -> None:
        row = 0
        for s in sampled:
            n_rows = len(s.spec_token_ids) + 1
            n_top = s.request.params.logprobs
            entries = None if n_top is None else [_sample_entry(so, r, n_top) for r in range(row, row + n_rows)]
            out.sampled[s.request.request_id] = SampledTokens(so.token_ids[row:row + n_rows],
                                                              so.logprobs[row:row + n_rows], entries)
            row += n_rows

    @staticmethod
    def _prompt_logprob_rows(items: list[ScheduledRequest], last_token: list[int], rows: list[int]) -> list[tuple[Request, int]]:
        """Append the rows whose logits score prompt tokens (position p scores token p + 1)."""
        out = []
        for i, s in enumerate(items):
            req = s.request
            if req.prompt_logprobs is None:
                continue
            first = last_token[i] - (s.num_new_tokens - 1)
            lo = max(s.start, len(req.prompt_logprobs) - 1)  # skip tokens already scored (recompute)
            hi = min(s.start + s.num_new_tokens, req.num_prompt_tokens - 1)
            if hi > lo:
                rows.extend(range(first + lo - s.start, first + hi - s.start))
                out.append((req, hi - lo))
        return out

    def copy_kv_slots(self, moves: list[tuple[int, int]]) -> None:
        """Copy the KV of cache slot a to slot b for each (a, b): an accepted tree path moved down
        to contiguous positions (StepUpdate.kv_moves). Reads all sources before writing."""
        src = torch.tensor([a for a, _ in moves], dtype=torch.long, device=self.device)
        dst = torch.tensor([b for _, b in moves], dtype=torch.long, device=self.device)
        for cache in self.kv_caches:
            for t in (cache.data, cache.scale):  # int8 caches move their scales with the values
                if t is not None:
                    flat = t.view(2, -1, *t.shape[3:])
                    flat[:, dst] = flat[:, src]

    # ---- KV hand-over (live migration, prefill/decode split) ----
    def read_kv(self, block_ids: list[int], num_tokens: int) -> list[torch.Tensor]:
        """The KV of a request's first `num_tokens` positions, on CPU and per token (so the receiving
        instance may use another block size): [layers, 2, num_tokens, kv_heads, head_dim] in the
        cache's storage dtype, then, for int8 caches, the scales [layers, 2, num_tokens, kv_heads]."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        parts = [[c.data for c in self.kv_caches]]
        if self.kv_caches[0].scale is not None:
            parts.append([c.scale for c in self.kv_caches])
        return [torch.stack([t[:, index].flatten(1, 2)[:, :num_tokens] for t in tensors]).cpu() for tensors in parts]

    def write_kv(self, block_ids: list[int], kv: list[torch.Tensor]) -> None:
        """Write read_kv's output into these blocks (enough of them for its tokens)."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        targets = [[c.data for c in self.kv_caches]] + ([[c.scale for c in self.kv_caches]] if len(kv) > 1 else [])
        for tensors, data in zip(targets, kv):
            num_tokens = data.shape[2]
            for cache, layer in zip(tensors, data):
                flat = cache[:, index].flatten(1, 2)
                flat[:, :num_tokens] = layer.to(device=self.device, dtype=cache.dtype)
                cache[:, index] = flat.view(2, len(block_ids), self.block_size, *flat.shape[2:])


def _sampling_row(req: Request, drafts: list[int]) -> SamplingRow:
    position = req.num_output_tokens + len(drafts)
    history, outputs = req.all_token_ids, req.output_token_ids
    if drafts and req.params.needs_penalties:
        history, outputs = history + list(drafts), outputs + list(drafts)
    # A grammar decides when the output may end (its bitmask allows EOS only where the grammar is
    # complete), so min_tokens' EOS ban does not apply to structured requests.
    return SamplingRow(req.params, req.seed, position, req.eos_token_ids, history, outputs,
                       position < req.params.min_tokens and req.grammar is None)


def _sample_entry(so: SamplerOutput, row: int, n_top: int) -> Logprob:
    """The sampled token's logprob and rank, plus the top-n_top alternatives (texts come later)."""
    token = so.token_ids[row]
    entry = {token: TokenLogprob(so.logprobs[row], so.sampled_ranks[row])}
    if n_top:
        ids, lps = so.top_ids[row, :n_top].tolist(), so.top_logprobs[row, :n_top].tolist()
        for rank, (tid, lp) in enumerate(zip(ids, lps), 1):
            entry.setdefault(tid, TokenLogprob(lp, rank))
    return entry


def _prompt_entries(req: Request, logits: torch.Tensor) -> list[Logprob]:
    """Logprob entries of the next prompt tokens, scored by these rows' logits."""
    lps = torch.log_softmax(logits, dim=-1)
    n_top = req.params.prompt_logprobs
    first = len(req.prompt_logprobs)
    targets = torch.tensor(req.prompt_token_ids[first:first + lps.shape[0]], device=lps.device)
    chosen = lps.gather(1, targets[:, None]).squeeze(1)
    ranks = ((lps > chosen[:, None]).sum(dim=1) + 1).tolist()
    top_lp, top_ids = lps.topk(n_top, dim=-1) if n_top else (None, None)
    entries = []
    for i, tid in enumerate(targets.tolist()):
        entry = {tid: TokenLogprob(float(chosen[i]), ranks[i])}
        if n_top:
            for rank, (t, lp) in enumerate(zip(top_ids[i].tolist(), top_lp[i].tolist()), 1):
                entry.setdefault(t, TokenLogprob(lp, rank))
        entries.append(entry)
    return entries
