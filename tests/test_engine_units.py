"""Unit tests of the engine's parts: BlockPool (allocation, reference counts, chained prefix hashes
and their verification, LRU eviction of cached blocks), the Scheduler (token budget, chunked
prefill next to running decodes, max_num_seqs, priorities, preemption), abort, and the incremental
detokenizer."""
from __future__ import annotations

import pytest

from engine_helpers import LONG_TEXT, abort_all, assert_all_blocks_free, merge_outputs
from kvflow import SamplingParams
from kvflow.config import SchedulerConfig
from kvflow.core.detokenizer import IncrementalDetokenizer
from kvflow.core.kv_cache import BlockPool
from kvflow.core.request import Request, RequestStatus
from kvflow.core.scheduler import ModelRunnerOutput, SampledTokens, Scheduler


def make_request(rid, tokens, arrival=0.0, priority=0, **params):
    return Request(rid, list(tokens), SamplingParams(**{"max_tokens": None, **params}), arrival, priority=priority)


# ---------------- BlockPool ----------------
def test_allocate_slots_trim_free_and_ref_counts():
    pool = BlockPool(num_blocks=8, block_size=4)
    assert pool.num_free_blocks == 8 and pool.usage == 0.0
    a = make_request("a", range(10))
    assert pool.allocate_slots(a, 10)
    assert len(a.block_ids) == len(set(a.block_ids)) == 3 and pool.num_free_blocks == 5
    assert all(pool.blocks[i].ref_count == 1 for i in a.block_ids)
    assert not pool.allocate_slots(a, 40) and len(a.block_ids) == 3 and pool.num_free_blocks == 5  # all or nothing
    assert pool.allocate_slots(a, 14) and len(a.block_ids) == 4  # growth appends
    pool.trim(a)  # 10 tokens need 3 blocks: the fourth goes back
    assert len(a.block_ids) == 3 and pool.num_free_blocks == 5
    pool.cache_full_blocks(a, 10)
    b = make_request("b", [*range(8), 99, 98])
    hits = pool.find_cached_prefix(b)
    assert pool.allocate_slots(b, 10, hits)  # a second owner of a's first two blocks
    assert b.block_ids[:2] == a.block_ids[:2] and pool.blocks[a.block_ids[0]].ref_count == 2
    first = a.block_ids[0]
    pool.free(a)
    assert pool.blocks[first].ref_count == 1 and pool.num_free_blocks == 5 and a.block_ids == []
    pool.free(b)
    assert pool.num_free_blocks == 8 and all(blk.ref_count == 0 for blk in pool.blocks)
    b.block_ids = [first]
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free(b)
    assert pool.blocks_needed(0) == 0 and pool.blocks_needed(1) == 1 and pool.blocks_needed(8) == 2
    assert pool.blocks_needed(9) == 3


def _computed(pool, rid, tokens):
    """A request whose tokens all have KV in freshly allocated blocks, published to the cache."""
    req = make_request(rid, tokens)
    assert pool.allocate_slots(req, len(tokens))
    req.num_computed_tokens = len(tokens)
    pool.cache_full_blocks(req, len(tokens))
    return req


def test_prefix_hits_are_chained_and_leave_one_token():
    pool = BlockPool(num_blocks=16, block_size=4)
    a = _computed(pool, "a", range(10))  # blocks: [0..3] [4..7] [8, 9]
    assert len(pool.cached) == 2  # only full, computed blocks are published
    hits = pool.find_cached_prefix(make_request("b", [*range(8), 50, 51]))
    assert [b.block_id for b in hits] == a.block_ids[:2]
    # A prompt exactly 8 tokens long may reuse only the first block: one token must be computed.
    assert [b.block_id for b in pool.find_cached_prefix(make_request("c", range(8)))] == a.block_ids[:1]
    # Same second block after a different first block: the chain breaks at block 0.
    assert pool.find_cached_prefix(make_request("d", [9, 9, 9, 9, 4, 5, 6, 7, 0])) == []
    # Diverging inside block 1: block 0 only.
    assert len(pool.find_cached_prefix(make_request("e", [0, 1, 2, 3, 4, 5, 99, 7, 8, 9]))) == 1
    # Requests that ask for prompt logprobs compute every position: no lookup.
    assert pool.find_cached_prefix(make_request("f", range(10), prompt_logprobs=1)) == []
    pool.free(a)
    assert pool.num_free_blocks == 16


def test_hash_hit_is_verified_against_tokens():
    """A hash match whose stored tokens differ (a collision) is not a hit."""
    pool = BlockPool(num_blocks=8, block_size=4)
    a = _computed(pool, "a", range(9))
    pool.blocks[a.block_ids[1]].token_ids = (70, 71, 72, 73)  # as if another chunk had this hash
    hits = pool.find_cached_prefix(make_request("b", range(9)))
    assert [b.block_id for b in hits] == a.block_ids[:1]
    pool.free(a)


def test_prefix_caching_disabled():
    pool = BlockPool(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = _computed(pool, "a", range(9))
    assert not pool.cached and pool.find_cached_prefix(make_request("b", range(9))) == []
    pool.free(a)


def test_freed_cached_blocks_stay_findable_and_are_evicted_lru_tail_first():
    pool = BlockPool(num_blocks=4, block_size=4)
    a = _computed(pool, "a", range(9))  # 3 blocks, the first two cached
    first, second, _ = a.block_ids
    pool.free(a)  # freed tail first: the head of the prompt is evicted last
    assert pool.num_free_blocks == 4 and len(pool.cached) == 2
    prompt = make_request("b", range(9))
    assert [b.block_id for b in pool.find_cached_prefix(prompt)] == [first, second]

    # Reusing free cached blocks takes them out of the free queue; the allocation cannot evict them,
    # and a failed allocation gives the hits back.
    hits = pool.find_cached_prefix(prompt)
    assert not pool.allocate_slots(prompt, 5 * 4, hits)
    assert pool.num_free_blocks == 4 and prompt.block_ids == []

    # Allocation takes never-used blocks, then the tail of the freed prompt, then its head.
    assert pool.allocate_slots(make_request("x", range(8)), 8)  # the never-used block and the uncached tail
    assert len(pool.cached) == 2
    assert pool.allocate_slots(make_request("y", range(4)), 4)  # evicts the second block of the prompt
    assert len(pool.cached) == 1 and pool.blocks[second].block_hash is None
    assert [b.block_id for b in pool.find_cached_prefix(prompt)] == [first]
    assert pool.allocate_slots(make_request("z", range(4)), 4)
    assert not pool.cached and pool.find_cached_prefix(prompt) == []


def test_prefix_stats():
    pool = BlockPool(num_blocks=4, block_size=4)
    pool.record_lookup(10, 8)
    pool.record_lookup(10, 0)
    assert (pool.stats.queries, pool.stats.hits) == (20, 8) and pool.stats.hit_rate == pytest.approx(0.4)


# ---------------- Scheduler (without a model) ----------------
def _advance(sched, out):
    """What the engine does after a forward pass: the model "samples" token 7 for each request that
    reached the end of its tokens, and the scheduler applies it."""
    sampled = {s.request.request_id: SampledTokens([7], [0.0]) for s in out.scheduled if s.samples}
    return sched.update_from_output(out, ModelRunnerOutput(sampled))


def test_scheduler_chunks_prompts_within_the_budget():
    pool = BlockPool(num_blocks=64, block_size=16)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=8, max_model_len=512), pool)
    long, short = make_request("long", range(100), 0.0), make_request("short", range(200, 210), 1.0)
    sched.add(long)
    sched.add(short)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("long", 32)]
    assert len(long.block_ids) == 2 and short.status == RequestStatus.WAITING
    _advance(sched, out)
    steps = 1
    while long.num_computed_tokens < 100:
        out = sched.schedule()
        assert out.num_tokens <= 32
        _advance(sched, out)
        steps += 1
    assert steps == 4  # 32 + 32 + 32 + 4
    # The short prompt was admitted into the leftover budget of the last chunk, and now both decode.
    assert short.num_computed_tokens == 10 and long.num_output_tokens == 1 and short.num_output_tokens == 1
    out = sched.schedule()
    assert sorted((s.request.request_id, s.num_new_tokens) for s in out.scheduled) == [("long", 1), ("short", 1)]
    for r in (long, short):
        sched.finish(r, "abort")
    assert pool.num_free_blocks == pool.num_blocks


def test_scheduler_max_num_seqs_and_priority():
    pool = BlockPool(num_blocks=64, block_size=16)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=2, max_model_len=512), pool)
    reqs = [make_request("late-urgent", range(5), arrival=3.0, priority=-1),
            make_request("a", range(5), arrival=1.0), make_request("b", range(5), arrival=2.0)]
    for r in reqs:
        sched.add(r)
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["late-urgent", "a"]
    assert [r.request_id for r in sched.waiting] == ["b"]
    for r in reqs:
        sched.finish(r, "abort")
    assert pool.num_free_blocks == pool.num_blocks and not sched.running and not sched.waiting


def test_scheduler_preempts_newest_and_frees_its_blocks():
    pool = BlockPool(num_blocks=3, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=12), pool)
    old, new = make_request("old", range(4), 0.0), make_request("new", range(10, 18), 1.0)
    sched.add(old)
    sched.add(new)
    _advance(sched, sched.schedule())  # old: 1 block, new: 2 blocks; each sampled one token
    assert pool.num_free_blocks == 0
    out = sched.schedule()  # old needs a second block for its 5th token: new must go
    assert out.num_preempted == 1 and sched.num_preemptions == 1
    assert new.status == RequestStatus.WAITING and new.block_ids == [] and new.num_computed_tokens == 0
    assert new.output_token_ids == [7]  # its output so far is kept, to be recomputed
    assert [s.request.request_id for s in out.scheduled] == ["old"] and sched.waiting[0] is new
    for r in (old, new):
        sched.finish(r, "abort")
    assert pool.num_free_blocks == pool.num_blocks


# ---------------- the engine, step by step ----------------
@pytest.fixture
def budget64(make_llm):
    llm = make_llm(max_num_batched_tokens=64, kv_cache_memory_gb=0.5)
    yield llm
    abort_all(llm)


def test_long_prompt_is_chunked_while_decodes_keep_running(budget64, tokenizer, monkeypatch):
    engine = budget64.engine
    budget = engine.scheduler.config.max_num_batched_tokens
    steps = []
    real_schedule = engine.scheduler.schedule

    def recording_schedule():
        out = real_schedule()
        steps.append([(s.request.request_id, s.start, s.num_new_tokens) for s in out.scheduled])
        return out

    monkeypatch.setattr(engine.scheduler, "schedule", recording_schedule)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    for i, prompt in enumerate(["The sky is", "def f(x):", "Paris is the capital of"]):
        engine.add_request(f"short{i}", prompt, params)
    outputs = []
    while any(r.num_output_tokens == 0 for r in engine.scheduler.running + engine.scheduler.waiting):
        outputs += engine.step()
    long_ids = tokenizer.encode("[chunking test] " + LONG_TEXT)  # not in the prefix cache yet
    engine.add_request("long", long_ids, SamplingParams(temperature=0.0, max_tokens=2))
    first = len(steps)
    while engine.has_unfinished_requests():
        outputs += engine.step()

    for step in steps:
        assert sum(n for _, _, n in step) <= budget, step
    chunks = [(i, start, n) for i, step in enumerate(steps[first:]) for rid, start, n in step
              if rid == "long" and n > 1]
    assert len(chunks) >= -(-len(long_ids) // budget)  # the prompt did not fit one step
    assert chunks[0][1] == 0
    for (_, s0, n0), (_, s1, _) in zip(chunks, chunks[1:]):
        assert s1 == s0 + n0  # contiguous chunks
    assert chunks[-1][1] + chunks[-1][2] == len(long_ids)
    for i, _, _ in chunks:  # every decode kept running beside the prompt chunks
        others = {rid: n for rid, _, n in steps[first + i] if rid != "long"}
        assert others == {"short0": 1, "short1": 1, "short2": 1}, others
    done = merge_outputs(outputs)
    assert all(len(done[f"short{i}"].outputs[0].token_ids) == 24 for i in range(3))
    assert len(done["long"].outputs[0].token_ids) == 2
    assert_all_blocks_free(budget64)


def test_max_num_seqs_caps_running_requests(budget64, monkeypatch):
    engine = budget64.engine
    monkeypatch.setattr(engine.scheduler.config, "max_num_seqs", 2)
    for i in range(4):
        engine.add_request(f"cap{i}", f"Item number {i}:", SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
        assert len(engine.scheduler.running) <= 2
    assert sorted(finished) == [f"cap{i}" for i in range(4)]
    assert_all_blocks_free(budget64)


def test_abort_frees_blocks(budget64, tokenizer):
    engine = budget64.engine
    pool = engine.block_pool
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    engine.add_request("run1", "Tell me about the sea.", params)
    engine.add_request("run2", "Tell me about the mountains.", SamplingParams(n=2, temperature=1.0, seed=0, max_tokens=50))
    engine.add_request("wait", tokenizer.encode("[abort test] " + LONG_TEXT), params)  # far more than one 64-token step
    for _ in range(3):
        engine.step()
    assert pool.num_free_blocks < pool.num_blocks
    held = lambda rid: {b for c in engine.parents[rid].children for b in c.block_ids}  # noqa: E731
    before, blocks = pool.num_free_blocks, held("run1")
    assert blocks and engine.abort("run1")
    assert pool.num_free_blocks == before + len(blocks)
    assert not engine.abort("run1") and not engine.abort("no-such-request")
    assert engine.abort("run2")  # both samples go
    assert engine.abort("wait")
    assert not engine.has_unfinished_requests() and engine.step() == []
    assert_all_blocks_free(budget64)


# ---------------- incremental detokenizer ----------------
def _detok_text(tokenizer, prompt_ids, output_ids, stop=(), include_stop=False):
    d = IncrementalDetokenizer(tokenizer, prompt_ids, True, list(stop), include_stop)
    found = None
    for t in output_ids:
        found = d.add_token(t)
        if found:
            break
    return d, found


def test_detokenizer_matches_full_decode(tokenizer):
    text = "Héllo wörld! 你好，世界。🍕🌮 ok\n\tdone"
    ids = tokenizer.encode(text)
    for cut in (1, 3, len(ids) // 2):
        d, _ = _detok_text(tokenizer, ids[:cut], ids[cut:])
        full, before = tokenizer.decode(ids), tokenizer.decode(ids[:cut])
        if not before.endswith("\ufffd"):
            assert d.text == full[len(before):]


def test_detokenizer_stop_string_is_held_back(tokenizer):
    ids = tokenizer.encode("alpha beta gamma delta")
    d = IncrementalDetokenizer(tokenizer, ids[:1], True, ["gamma d"], False)
    shown = []
    found = None
    for t in ids[1:]:
        found = d.add_token(t)
        shown.append(d.visible_text(found is not None))
        if found:
            break
    assert found == "gamma d" and d.text == " beta "
    assert all("gamma d" not in s and " beta ".startswith(s) for s in shown)


def test_detokenizer_character_straddling_the_prompt_is_emitted(tokenizer):
    """A prompt given as token ids may end inside a multi-byte character; the output tokens that
    complete it must produce that character (prompt text + output text = decoded text)."""
    ids = tokenizer.encode("I like 🍔🍔🍔")
    full = tokenizer.decode(ids)
    for cut in range(1, len(ids)):
        before = tokenizer.decode(ids[:cut])
        if not before.endswith("\ufffd"):
            continue
        d, _ = _detok_text(tokenizer, ids[:cut], ids[cut:])
        assert before.rstrip("\ufffd") + d.text == full, (
            f"prompt cut after token {cut}: output text {d.text!r} loses the character completed by the output")


# ---------------- paged attention: CPU decode kernel vs the plain-torch path ----------------
def test_decode_kernel_equals_torch_path_next_to_longer_prefill(monkeypatch):
    """Decodes that share a step with a prompt chunk of longer context: the decode group's block
    table is then a column slice of the step's table. The C decode kernel and the plain-torch path
    must give the same attention output."""
    import torch

    from kvflow.layers import attention, cpu_kernels
    from kvflow.worker.model_runner import build_batch

    Hq, Hk, D, BS, NB = 4, 2, 16, 4, 32
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(NB, BS, Hk, D, generator=gen), torch.randn(NB, BS, Hk, D, generator=gen)
    # (token ids, start position, block ids): two decodes, then a 3-token chunk at position 20.
    items = [([1], 5, [0, 1]), ([1], 6, [2, 3]), ([1, 1, 1], 20, list(range(4, 10)))]
    batch = build_batch(items, BS, torch.device("cpu"))
    T = 5
    q, k, v = (torch.randn(T, h, D, generator=gen) for h in (Hq, Hk, Hk))
    if not cpu_kernels.can_run_decode(q, k_cache):
        pytest.skip("the CPU decode kernel is not available here (no C compiler)")
    with_kernel = attention.paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), batch.meta, D ** -0.5)
    monkeypatch.setattr(cpu_kernels, "can_run_decode", lambda *a: False)
    plain = attention.paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), batch.meta, D ** -0.5)
    err = (with_kernel - plain).abs().amax(dim=(1, 2))
    assert float(err.max()) < 1e-5, f"kernel vs torch, max error per token: {err.tolist()}"


def test_file_key_follows_contents_not_path(tmp_path, monkeypatch):
    """Caches derived from a model file (converted weights, tokenizers, smoothing) are keyed by its
    contents: a copy elsewhere (a fresh virtualenv) hits, an edit of the same size misses."""
    import os
    import shutil

    from kvflow.cache import file_key
    monkeypatch.setenv("KVFLOW_CACHE", str(tmp_path / "cache"))
    a = tmp_path / "a" / "model.gguf"
    a.parent.mkdir()
    a.write_bytes(bytes(range(256)) * 64)
    b = tmp_path / "b" / "model.gguf"
    b.parent.mkdir()
    shutil.copyfile(a, b)
    os.utime(b, ns=(1, 1))
    assert file_key(a) == file_key(b) and file_key(a, "v2") != file_key(a)
    a.write_bytes(bytes(range(255, -1, -1)) * 64)
    os.utime(a, ns=(2, 2))
    assert file_key(a) != file_key(b)
    # a model folder: by its files' contents
    (b.parent / "config.json").write_text("{}")
    before = file_key(b.parent)
    shutil.copytree(b.parent, tmp_path / "c")
    assert file_key(tmp_path / "c") == before
    (b.parent / "config.json").write_text('{"x": 1}')
    assert file_key(b.parent) != before
