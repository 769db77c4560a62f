"""BlockPool: the paged KV cache's bookkeeping (the tensors live in the ModelRunner).

Blocks hold `block_size` tokens. A full block whose tokens have been computed gets a chained hash
(parent hash, its tokens), so a later request with the same prefix reuses it. Blocks with ref count 0
stay cached in an LRU free queue until a new allocation evicts them.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kvflow.core.request import Request


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = ()  # kept to verify a hash hit: hashes can collide


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens served from the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order: oldest first. Uncached ones are evicted as readily as cached ones.
        self.free_queue: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[int, Block] = {}  # block hash -> block
        # Per request: the chained hashes of its full blocks computed so far.
        self.request_hashes: dict[str, list[int]] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ----
    def find_cached_prefix(self, request: Request) -> list[Block]:
        """Cached blocks covering the longest computed prefix of the request's tokens. At least one
        token is always left to compute, so the step that finishes the prompt has logits to sample."""
        if not self.enable_prefix_caching or request.params.prompt_logprobs is not None:
            return []
        tokens = request.all_token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        hits: list[Block] = []
        parent = None
        for i in range(max_blocks):
            chunk = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            h = hash((parent, chunk))
            block = self.cached.get(h)
            if block is None or block.token_ids != chunk:
                break
            hits.append(block)
            parent = h
        return hits

    def record_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.stats.queries += num_prompt_tokens
        self.stats.hits += num_hit_tokens

    def cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks that are full and computed. Only computed tokens are ever cached."""
        if not self.enable_prefix_caching:
            return
        hashes = self.request_hashes.setdefault(request.request_id, [])
        tokens = request.all_token_ids
        num_full = min(min(num_computed_tokens, len(tokens)) // self.block_size, len(request.block_ids))
        for i in range(len(hashes), num_full):
            chunk = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            h = hash((hashes[-1] if hashes else None, chunk))
            hashes.append(h)
            block = self.blocks[request.block_ids[i]]
            if block.block_hash is None and h not in self.cached:
                block.block_hash, block.token_ids = h, chunk
                self.cached[h] = block

    # ---- allocation ----
    def allocate_slots(self, request: Request, num_tokens: int, prefix_hits: list[Block] = ()) -> bool:
        """Make the request own blocks for its first `num_tokens` positions, all or nothing. The
        one way blocks are taken: admission (with its prefix-cache hits), decode growth and
        speculative drafts. A request's block_ids change nowhere else but in `trim` and `free`."""
        if prefix_hits:
            assert not request.block_ids, "prefix hits are for a request that owns no blocks yet"
            self._touch(prefix_hits)  # before allocating, so the allocation cannot evict them
        have = len(prefix_hits) or len(request.block_ids)
        fresh = self._allocate(self.blocks_needed(num_tokens) - have)
        if fresh is None:
            self._release([b.block_id for b in reversed(prefix_hits)])
            return False
        if prefix_hits:
            request.block_ids = [b.block_id for b in prefix_hits]
        request.block_ids.extend(fresh)
        return True

    def trim(self, request: Request) -> None:
        """Give back blocks past the request's tokens (those only rejected drafts needed)."""
        keep = self.blocks_needed(request.num_tokens)
        if len(request.block_ids) > keep:
            self._release(request.block_ids[keep:][::-1])
            del request.block_ids[keep:]

    def free(self, request: Request) -> None:
        self._release(request.block_ids[::-1])
        request.block_ids = []
        self.request_hashes.pop(request.request_id, None)

    def _touch(self, blocks: list[Block]) -> None:
        """Take a reference on cached blocks (a prefix hit), pulling free ones out of the free queue."""
        for b in blocks:
            if b.ref_count == 0:
                del self.free_queue[b.block_id]
            b.ref_count += 1

    def _allocate(self, num: int) -> list[int] | None:
        """`num` fresh blocks, evicting least recently freed cached blocks; None if the pool is short."""
        if num > len(self.free_queue):
            return None
        out = []
        for _ in range(max(0, num)):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash, block.token_ids = None, ()
            block.ref_count = 1
            out.append(block.block_id)
        return out

    def _release(self, block_ids: list[int]) -> None:
        """Drop one reference on each block. Pass them tail first: blocks are evicted in the order
        they were freed, and a prompt's head is what later requests are most likely to reuse."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_queue[block_id] = block
