"""The engine computes what the model computes: teacher-forced logprobs and greedy outputs of the
bundled model equal transformers' (float32) alone, in a batch of 32 mixed-length requests, with
prefix caching on and off, with token budgets of 16/64/512, and under preemption. Prefix-cache hits
are counted, siblings share prompt blocks, and every KV block is free once requests finish."""
from __future__ import annotations

import random

import pytest
import torch

from engine_helpers import (EOS_ID, LONG_TEXT, PARAGRAPHS, assert_all_blocks_free, expected_text, merge_outputs,
                            greedy_mismatch, hf_greedy, hf_logprobs)
from kvflow import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=64)
LOGPROB_ATOL = 1e-3


def check_greedy(hf_model, tokenizer, cases, outputs, what: str, max_tokens: int = GREEDY.max_tokens) -> None:
    """Every output equals its transformers reference (its first max_tokens tokens) up to EOS, and
    says why it finished."""
    assert len(outputs) == len(cases)
    problems = []
    for case, out in zip(cases, outputs):
        assert out.error is None, f"[{case['label']}] unexpected error: {out.error}"
        assert out.finished and len(out.outputs) == 1
        comp = out.outputs[0]
        assert out.prompt_token_ids == case["prompt_ids"], f"[{case['label']}] prompt tokenized differently"
        want = case["want"][:max_tokens]
        msg = greedy_mismatch(hf_model, tokenizer, case["label"], case["prompt_ids"], comp.token_ids, want)
        if msg:
            problems.append(msg)
            continue
        if comp.token_ids == want:  # (a tie may end the comparison early; then skip these)
            if comp.token_ids[-1] == EOS_ID:
                assert comp.finish_reason == "stop", f"[{case['label']}] ended at EOS but finish_reason={comp.finish_reason}"
            else:
                assert len(comp.token_ids) == max_tokens and comp.finish_reason == "length", (
                    f"[{case['label']}] {len(comp.token_ids)} tokens, finish_reason={comp.finish_reason}")
            if not tokenizer.decode(case["prompt_ids"]).endswith("\ufffd"):
                # (Skipped when the prompt ends inside a multi-byte character: whether the character
                # its first output token completes belongs to the output text is a convention.)
                text = expected_text(tokenizer, case["prompt_ids"], comp.token_ids)
                if comp.text != text:
                    problems.append(f"[{case['label']}] text {comp.text!r} != decoded tokens {text!r}")
    assert not problems, (f"{what}: {len(problems)} of {len(cases)} prompts differ from transformers:\n"
                          + "\n".join(problems))


# ---------------- teacher-forced logprobs ----------------
@pytest.mark.parametrize("budget", [512, 64], ids=["chunk512", "chunk64"])
def test_prompt_and_sample_logprobs_match_transformers(make_llm, hf_model, tokenizer, budget):
    """Prompt logprobs over a prompt longer than one chunk and many blocks, and the logprobs of the
    generated tokens, equal transformers' log_softmax on the same tokens."""
    llm = make_llm(**BATCH_CONFIGS["default" if budget == 512 else "budget64"])
    ids = tokenizer.encode(LONG_TEXT)
    block_size = llm.engine.block_pool.block_size
    assert len(ids) > 512 and len(ids) > 8 * block_size, len(ids)
    params = SamplingParams(temperature=0.0, max_tokens=8, prompt_logprobs=5, logprobs=5, ignore_eos=True)
    out = llm.generate(ids, params)
    assert_all_blocks_free(llm)
    gen = out.outputs[0].token_ids
    assert len(gen) == 8
    ref = hf_logprobs(hf_model, ids + gen)  # row p scores token p + 1

    # Prompt: position 0 has nothing before it; position p > 0 is scored by row p - 1.
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(ids) and plp[0] is None
    got = torch.tensor([plp[p][ids[p]].logprob for p in range(1, len(ids))])
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    err = (got - want).abs()
    assert err.max() < LOGPROB_ATOL, (
        f"prompt logprob differs by {err.max():.2e} at prompt position {int(err.argmax()) + 1} of {len(ids)}")
    for p in (1, len(ids) // 2, len(ids) - 1):  # the top-5 alternatives too
        top_lp, top_ids = ref[p - 1].topk(5)
        for rank, (t, lp) in enumerate(zip(top_ids.tolist(), top_lp.tolist()), 1):
            assert t in plp[p], f"position {p}: transformers' rank-{rank} token {t} missing from prompt_logprobs"
            assert abs(plp[p][t].logprob - lp) < LOGPROB_ATOL
        assert plp[p][ids[p]].rank == int((ref[p - 1] > ref[p - 1][ids[p]]).sum()) + 1

    # Generated tokens: greedy picks transformers' argmax, and its logprob is transformers' logprob.
    comp = out.outputs[0]
    assert comp.logprobs is not None and len(comp.logprobs) == len(gen)
    for i, t in enumerate(gen):
        row = ref[len(ids) - 1 + i]
        assert row[t] >= row.max() - 1e-3, f"generated token {i} is not transformers' argmax"
        assert abs(comp.logprobs[i][t].logprob - float(row[t])) < LOGPROB_ATOL
    assert abs(comp.cumulative_logprob - sum(float(ref[len(ids) - 1 + i][t]) for i, t in enumerate(gen))) < 1e-2


# ---------------- greedy decoding ----------------
def test_greedy_alone_matches_transformers(make_llm, hf_model, tokenizer, greedy_cases):
    """Four of the base prompts (code, CJK, emoji, chat), each run on its own (text prompts given as
    text, so the engine tokenizes them; the chat one as token ids), continue exactly as
    transformers does. (On the engine without a prefix cache, so every prompt token is computed
    here.) The first 24 tokens: the batch tests below check all 64 of every prompt."""
    llm = make_llm(**BATCH_CONFIGS["no_prefix_cache"])
    bases = [c for c in greedy_cases[:8] if c["label"] in ("code", "cjk", "emoji", "chat")]
    assert len(bases) == 4
    outputs = []
    for case in bases:
        outputs.append(llm.generate(case["prompt"], SamplingParams(temperature=0.0, max_tokens=24)))
        assert_all_blocks_free(llm)
    check_greedy(hf_model, tokenizer, bases, outputs, "alone", max_tokens=24)


@pytest.mark.parametrize("label", ["chat", "emoji"])
def test_references_equal_transformers_generate(hf_model, greedy_cases, label):
    """The references are transformers' greedy continuations: checked here against generate()
    itself for two prompts (one ends at EOS, one runs to max_tokens through multi-byte text)."""
    case = next(c for c in greedy_cases if c["label"] == label)
    assert hf_greedy(hf_model, case["prompt_ids"], GREEDY.max_tokens) == case["want"]


def _small_pool(cases) -> int:
    """A pool that fits the largest request alone but nowhere near all of them at once."""
    need = max(-(-(len(c["prompt_ids"]) + GREEDY.max_tokens) // 16) for c in cases)
    return max(24, need + 2)


SMALL_KV = dict(kv_cache_memory_gb=0.5)
BATCH_CONFIGS = {
    "default": {},
    "no_prefix_cache": dict(enable_prefix_caching=False, **SMALL_KV),
    "budget16": dict(max_num_batched_tokens=16, **SMALL_KV),
    "budget64": dict(max_num_batched_tokens=64, **SMALL_KV),
    "preemption": "small_pool",
}


# (requests, tokens each): all 32 cases to 64 tokens once; the other shapes of a step on fewer
BATCH_SIZES = {"default": (32, 64), "no_prefix_cache": (16, 32), "budget16": (8, 32), "budget64": (16, 32),
               "preemption": (6, 40)}


@pytest.mark.parametrize("config", list(BATCH_CONFIGS))
def test_greedy_batch_matches_transformers(make_llm, hf_model, tokenizer, greedy_cases, config):
    """32 mixed-length requests in one generate() call: every output still equals transformers'.
    (Fewer, shorter ones where the point is the step's shape: no prefix cache, a 16- or 64-token
    budget, or a pool that forces preemption.)"""
    options = BATCH_CONFIGS[config]
    num_requests, max_tokens = BATCH_SIZES[config]
    cases = list(greedy_cases)
    random.Random(0).shuffle(cases)  # long and short prompts interleaved
    assert len(cases) == 32
    cases = cases[:num_requests]
    if options == "small_pool":
        options = dict(num_gpu_blocks=_small_pool(cases))
    llm = make_llm(**options)
    engine = llm.engine
    preemptions, hits = engine.scheduler.num_preemptions, engine.block_pool.stats.hits

    outputs = llm.generate([c["prompt"] for c in cases], SamplingParams(temperature=0.0, max_tokens=max_tokens))

    assert_all_blocks_free(llm)
    check_greedy(hf_model, tokenizer, cases, outputs, config, max_tokens=max_tokens)
    if config == "preemption":
        assert engine.scheduler.num_preemptions > preemptions, "the small pool never forced a preemption"
        assert sum(o.metrics.num_preemptions for o in outputs) == engine.scheduler.num_preemptions - preemptions
    if config == "no_prefix_cache":
        assert engine.block_pool.stats.hits == hits == 0 and not engine.block_pool.cached
        assert all(o.num_cached_tokens == 0 for o in outputs)


# ---------------- prefix caching ----------------
def test_prefix_cache_hits_are_counted_and_exact(llm, tokenizer):
    """The same long prompt twice: the second run is served from the cache (every full block but
    the one holding the last prompt token), counts the hit, and produces the same tokens. A prompt
    sharing only its first 100 tokens reuses exactly the full blocks inside those 100."""
    pool = llm.engine.block_pool
    bs = pool.block_size
    ids = tokenizer.encode("[prefix cache test] " + PARAGRAPHS[3] + "\n\n" + PARAGRAPHS[4])
    params = SamplingParams(temperature=0.0, max_tokens=12)

    q0, h0 = pool.stats.queries, pool.stats.hits
    first = llm.generate(ids, params)
    assert first.num_cached_tokens == 0
    assert pool.stats.queries == q0 + len(ids) and pool.stats.hits == h0
    assert_all_blocks_free(llm)  # cached blocks are free (ref count 0) yet still findable
    assert len(pool.cached) >= (len(ids) - 1) // bs

    second = llm.generate(ids, params)
    expected_hit = bs * ((len(ids) - 1) // bs)
    assert expected_hit > 0
    assert second.num_cached_tokens == expected_hit
    assert pool.stats.hits == h0 + expected_hit and pool.stats.queries == q0 + 2 * len(ids)
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert_all_blocks_free(llm)

    other = ids[:100] + tokenizer.encode(" Something else entirely: the weather was cold and grey.")
    third = llm.generate(other, params)
    assert third.num_cached_tokens == bs * (100 // bs)
    assert pool.stats.hits == h0 + expected_hit + bs * (100 // bs)
    assert_all_blocks_free(llm)

    # The cache serves the same continuation as an engine without one.
    uncached = llm  # same engine, but prompt_logprobs turns lookups off for this request
    fresh = uncached.generate(ids, SamplingParams(temperature=0.0, max_tokens=12, prompt_logprobs=0))
    assert fresh.num_cached_tokens == 0
    assert fresh.outputs[0].token_ids == first.outputs[0].token_ids


def test_n2_siblings_share_prompt_blocks(llm, tokenizer):
    """With n=2 the second sample waits for the first to compute the prompt, then points at the
    same physical blocks (ref count 2) instead of computing them again."""
    engine = llm.engine
    pool = engine.block_pool
    bs = pool.block_size
    ids = tokenizer.encode("[sibling test] " + PARAGRAPHS[0])
    full = (len(ids) - 1) // bs
    assert full >= 3
    hits = pool.stats.hits
    engine.add_request("siblings", ids, SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=6))
    a, b = engine.parents["siblings"].children
    outputs = []
    for _ in range(50):
        outputs += engine.step()
        if a.num_computed_tokens >= len(ids) and b.num_computed_tokens >= len(ids):
            break
    assert a.block_ids[:full] == b.block_ids[:full], "siblings did not share their prompt blocks"
    assert all(pool.blocks[i].ref_count == 2 for i in a.block_ids[:full])
    assert b.num_cached_tokens == full * bs
    assert pool.stats.hits == hits + full * bs
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert len([o for o in outputs if o.request_id == "siblings" and o.finished]) == 1
    final = merge_outputs(outputs)["siblings"]
    assert final.finished and [c.index for c in final.outputs] == [0, 1]
    assert all(len(c.token_ids) == 6 or c.finish_reason == "stop" for c in final.outputs)
    assert_all_blocks_free(llm)


def test_chat_equals_generate_on_template(llm, tokenizer):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name three colours."}]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    via_chat = llm.chat(messages, params)
    ids = llm.apply_chat_template(messages)
    assert via_chat.prompt_token_ids == ids
    assert tokenizer.decode(ids).rstrip().endswith("assistant")
    assert via_chat.outputs[0].token_ids == llm.generate(ids, params).outputs[0].token_ids
    assert_all_blocks_free(llm)
