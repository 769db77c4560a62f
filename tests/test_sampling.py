"""Sampling parameters do what they say: seeds reproduce (alone and inside a batch), different
seeds differ, top_k=1 / tiny top_p / min_p=1 equal greedy, stop strings spanning several tokens are
caught and not emitted, stop_token_ids, max_tokens, min_tokens, ignore_eos, logprobs, penalties,
logit_bias and n."""
from __future__ import annotations

import pytest

from engine_helpers import EOS_ID, assert_all_blocks_free
from kvflow import SamplingParams

STORY = "Once upon a time"
LOOP = "I love you. I love you. I love you. I love you."  # greedy repeats it forever


def greedy(llm, prompt, max_tokens=24, **kw):
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw))
    return out.outputs[0]


@pytest.fixture(scope="module")
def story(make_llm):
    """Greedy continuation of STORY (32 tokens): token ids and text."""
    return greedy(make_llm(), STORY, max_tokens=32)


# ---------------- seeds ----------------
def test_seed_reproducible_alone_and_in_batch(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    first = llm.generate(STORY, params).outputs[0]
    again = llm.generate(STORY, params).outputs[0]
    assert first.token_ids == again.token_ids and first.text == again.text
    assert len(first.token_ids) == 16

    # Inside a batch, next to unseeded and differently seeded requests, and at a different row.
    others = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True) for n in (5, 20, 9)]
    prompts = ["The capital of France is", "def add(a, b):", STORY, "Hello"]
    batch_params = [others[0], others[1], params, SamplingParams(temperature=1.0, seed=99, max_tokens=7)]
    outs = llm.generate(prompts, batch_params)
    assert outs[2].outputs[0].token_ids == first.token_ids
    assert outs[2].outputs[0].cumulative_logprob == pytest.approx(first.cumulative_logprob, abs=1e-3)
    assert [len(o.outputs[0].token_ids) for o in outs[:2]] == [5, 20]
    assert_all_blocks_free(llm)


def test_different_seeds_differ(llm):
    outs = llm.generate([STORY] * 4, [SamplingParams(temperature=1.0, seed=s, max_tokens=16, ignore_eos=True)
                                      for s in (1, 2, 3, 4)])
    distinct = {tuple(o.outputs[0].token_ids) for o in outs}
    assert len(distinct) >= 3, "four seeds gave (nearly) the same sample"
    assert_all_blocks_free(llm)


def test_filters_that_keep_one_token_equal_greedy(llm, story):
    """top_k=1 (the greedy path), and the sampling path with a tiny top_p or min_p=1, whose
    filters leave only the most likely token, all reproduce greedy decoding."""
    for params in (SamplingParams(temperature=1.0, top_k=1, max_tokens=32),
                   SamplingParams(temperature=1.0, top_p=1e-6, seed=3, max_tokens=32),
                   SamplingParams(temperature=0.7, min_p=1.0, max_tokens=32),
                   SamplingParams(temperature=1.5, top_k=1, top_p=0.5, seed=5, max_tokens=32)):
        out = llm.generate(STORY, params).outputs[0]
        assert out.token_ids == story.token_ids, f"{params} differs from greedy"
    assert_all_blocks_free(llm)


# ---------------- stopping ----------------
def _char_offsets(tokenizer, ids):
    return [len(tokenizer.decode(ids[:j])) for j in range(len(ids) + 1)]


def test_stop_string_spanning_tokens(llm, tokenizer, story):
    """A stop string that starts inside one token and ends inside a token two further on is caught:
    the text ends right before it, it is never emitted (not even while streaming), and
    finish_reason/stop_reason say why."""
    text, ids = story.text, story.token_ids
    assert text == tokenizer.decode(ids)
    off = _char_offsets(tokenizer, ids)
    for i in range(2, len(ids) - 3):
        a, b = off[i] + 1, off[i + 2] + 1
        if off[i + 1] - off[i] >= 2 and off[i + 3] - off[i + 2] >= 2 and text.find(text[a:b]) == a:
            break
    else:
        pytest.fail("no suitable stop string in the greedy text")
    stop = text[a:b]
    assert len(stop) >= 3

    out = greedy(llm, STORY, max_tokens=32, stop=[stop, "never appears \u2603"])
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:a] and stop not in out.text
    assert out.token_ids == ids[:i + 3]  # up to the token that completed the stop string

    kept = greedy(llm, STORY, max_tokens=32, stop=stop, include_stop_str_in_output=True)
    assert kept.text == text[:a] + stop and kept.stop_reason == stop

    # Streaming: no partial output ever shows the stop string or text past it.
    engine = llm.engine
    engine.add_request("stream-stop", STORY, SamplingParams(temperature=0.0, max_tokens=32, stop=stop))
    seen = [""]
    while engine.has_unfinished_requests():
        for o in engine.step():  # deltas: what a streaming client would show is their sum
            seen.append(seen[-1] + (o.outputs[0].text if o.outputs else ""))
    assert seen[-1] == text[:a]
    for partial in seen:
        assert stop not in partial and text[:a].startswith(partial), partial
    assert_all_blocks_free(llm)


def test_stop_token_ids(llm, story):
    ids = story.token_ids
    j = next(j for j in range(3, len(ids)) if ids[j] not in ids[:j] and ids[j] != EOS_ID)
    out = greedy(llm, STORY, max_tokens=32, stop_token_ids=[ids[j]])
    assert out.finish_reason == "stop" and out.stop_reason == ids[j]
    assert out.token_ids == ids[:j + 1]
    assert_all_blocks_free(llm)


def test_max_tokens_gives_length(llm, story):
    out = greedy(llm, STORY, max_tokens=5)
    assert out.token_ids == story.token_ids[:5] and out.finish_reason == "length" and out.stop_reason is None


@pytest.fixture(scope="module")
def short_answer(make_llm):
    """A chat prompt whose greedy answer ends with EOS after a few tokens."""
    llm = make_llm()
    ids = llm.apply_chat_template([{"role": "user", "content": "What is 2+2? Answer with a number only."}])
    out = greedy(llm, ids, max_tokens=24)
    assert out.finish_reason == "stop" and out.token_ids[-1] == EOS_ID and out.stop_reason is None
    assert EOS_ID not in out.token_ids[:-1]
    return ids, out.token_ids


def test_eos_stops_and_ignore_eos_continues(llm, short_answer):
    ids, answer = short_answer
    n = len(answer)
    out = greedy(llm, ids, max_tokens=n + 4, ignore_eos=True)
    assert out.finish_reason == "length" and len(out.token_ids) == n + 4
    assert out.token_ids[:n] == answer  # EOS is generated, just not obeyed
    # With ignore_eos, min_tokens has no EOS to hold back: the same tokens.
    both = greedy(llm, ids, max_tokens=n + 4, min_tokens=n + 2, ignore_eos=True)
    assert both.token_ids == out.token_ids and both.finish_reason == "length"


def test_min_tokens_bans_eos_and_stop_tokens(llm, short_answer):
    ids, answer = short_answer
    n = len(answer)
    out = greedy(llm, ids, max_tokens=n + 6, min_tokens=n + 3)
    assert len(out.token_ids) >= n + 3
    assert EOS_ID not in out.token_ids[:n + 3]
    assert out.token_ids[:n - 1] == answer[:n - 1]  # unchanged until EOS would have come

    # stop_token_ids are also held back until min_tokens.
    out = greedy(llm, ids, max_tokens=n + 6, min_tokens=3, stop_token_ids=[answer[1]])
    assert len(out.token_ids) >= 3 and out.token_ids[1] != answer[1]
    assert_all_blocks_free(llm)


def test_max_model_len_ends_generation(make_llm, tokenizer):
    llm = make_llm(max_model_len=40, kv_cache_memory_gb=0.05)
    ids = tokenizer.encode(STORY)
    out = llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)).outputs[0]
    assert out.finish_reason == "length"
    assert len(ids) + len(out.token_ids) == 40
    assert_all_blocks_free(llm)


# ---------------- logprobs ----------------
@pytest.mark.parametrize("n_top", [0, 3])
def test_logprobs(llm, n_top):
    for params in (SamplingParams(temperature=0.0, max_tokens=8, logprobs=n_top),
                   SamplingParams(temperature=1.0, seed=11, max_tokens=8, logprobs=n_top, ignore_eos=True)):
        out = llm.generate(STORY, params).outputs[0]
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 8
        total = 0.0
        for tok, entry in zip(out.token_ids, out.logprobs):
            assert tok in entry
            assert n_top <= len(entry) <= n_top + 1
            chosen = entry[tok]
            assert chosen.logprob <= 0 and chosen.rank >= 1
            total += chosen.logprob
            top = sorted((e for t, e in entry.items() if t != tok or e.rank <= n_top), key=lambda e: e.rank)
            if n_top:
                assert [e.rank for e in top][:n_top] == list(range(1, n_top + 1))
                lps = [e.logprob for e in top]
                assert lps == sorted(lps, reverse=True)
                assert chosen.logprob <= top[0].logprob + 1e-6
            if params.temperature == 0.0:
                assert chosen.rank == 1
        assert out.cumulative_logprob == pytest.approx(total, abs=1e-4)
    assert_all_blocks_free(llm)


def test_no_logprobs_by_default(llm):
    out = llm.generate(STORY, SamplingParams(temperature=0.0, max_tokens=3))
    assert out.outputs[0].logprobs is None and out.prompt_logprobs is None
    assert out.outputs[0].cumulative_logprob < 0


# ---------------- penalties and logit_bias ----------------
def _repeats(prompt_ids, out, include_prompt=False):
    """Output tokens that already appeared earlier in the output (or in the prompt)."""
    return sum(1 for i, t in enumerate(out) if t in out[:i] or (include_prompt and t in prompt_ids))


def test_penalties_reduce_repetition(llm, tokenizer):
    prompt_ids = tokenizer.encode(LOOP)
    base = greedy(llm, LOOP, max_tokens=24).token_ids
    assert _repeats(prompt_ids, base) >= 16, "the baseline should loop"
    for kw in (dict(presence_penalty=1.5), dict(frequency_penalty=1.5)):
        out = greedy(llm, LOOP, max_tokens=24, **kw).token_ids
        assert _repeats(prompt_ids, out) < _repeats(prompt_ids, base) // 2, kw
    out = greedy(llm, LOOP, max_tokens=24, repetition_penalty=1.5).token_ids
    assert _repeats(prompt_ids, out, True) < _repeats(prompt_ids, base, True) // 2
    assert_all_blocks_free(llm)


def test_negative_frequency_penalty_increases_repetition(llm, story):
    base = story.token_ids[:24]
    out = greedy(llm, STORY, max_tokens=24, frequency_penalty=-2.0).token_ids
    assert len(set(out)) < len(set(base))


def test_logit_bias(llm, tokenizer, story):
    forced = tokenizer.encode(" banana")[-1]
    for params in (SamplingParams(temperature=0.0, max_tokens=6, logit_bias={forced: 100.0}),
                   SamplingParams(temperature=1.0, seed=2, max_tokens=6, logit_bias={forced: 100.0})):
        assert llm.generate(STORY, params).outputs[0].token_ids == [forced] * 6

    # A large negative bias on the greedy first token makes the runner-up win.
    first = greedy(llm, STORY, max_tokens=1, logprobs=2)
    runner_up = next(t for t, e in first.logprobs[0].items() if e.rank == 2)
    banned = greedy(llm, STORY, max_tokens=1, logit_bias={story.token_ids[0]: -100.0})
    assert banned.token_ids == [runner_up]
    assert_all_blocks_free(llm)


# ---------------- n ----------------
def test_n_completions(llm, story):
    params = SamplingParams(n=3, temperature=1.0, seed=21, max_tokens=10, ignore_eos=True)
    out = llm.generate(STORY, params)
    assert out.finished and len(out.outputs) == 3
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) >= 2
    again = llm.generate(STORY, params)
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]

    same = llm.generate(STORY, SamplingParams(n=3, temperature=0.0, max_tokens=8))
    assert all(c.token_ids == story.token_ids[:8] for c in same.outputs)
    assert_all_blocks_free(llm)
