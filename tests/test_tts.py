"""Test-time compute (kvflow.tts) and the engine's reasoning budget, on a tiny random-weight model:
the strategies pick what they promise, pruning aborts samples and frees their own blocks, the
samples share the prompt's blocks, and `thinking_budget` forces the end of thinking exactly when
the budget is spent, after which the answer gets its own max_tokens."""
from __future__ import annotations

import itertools

import pytest

from engine_helpers import assert_all_blocks_free
from kvflow import LLM, SamplingParams
from kvflow.errors import InvalidRequestError
from kvflow.tts import BestOfN, Pruning, RepeatedSampling, SelfConsistency, generate, pass_at_k
from kvflow.tts.answers import boxed_answer, default_answer, last_number
from kvflow.tts.pass_at_k import log_linear_fit

PROMPT = "Question: how many legs does a spider have? Think step by step, then answer."  # > 1 block


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    llm = LLM(model=tiny_model_dir, dtype="float32", block_size=8, max_num_batched_tokens=256,
              max_num_seqs=32, enable_prefix_caching=True, max_model_len=256)
    yield llm
    assert_all_blocks_free(llm)


def sampled(n=8, max_tokens=12, **kw):
    return SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, seed=7, **kw)


# ---------------- strategies ----------------
def test_self_consistency_picks_the_majority_answer(tiny):
    script = itertools.cycle(["7", "8", "8", None, "9", "8", "7", "6"])  # by sample index
    result = generate(tiny, PROMPT, sampled(), SelfConsistency(extractor=lambda text: next(script)))[0]
    assert result.votes == {"7": 2, "8": 3, "9": 1, "6": 1}
    assert result.answer == "8"
    majority = [s for s in result.samples if s.answer == "8"]
    assert result.chosen == max(majority, key=lambda s: s.mean_logprob).index
    assert_all_blocks_free(tiny)


def test_best_of_n_by_mean_logprob_and_by_a_reward(tiny):
    result = generate(tiny, PROMPT, sampled(), BestOfN())[0]
    means = [s.cumulative_logprob / len(s.token_ids) for s in result.samples]
    assert len(set(means)) > 1, "samples should differ"
    assert result.chosen == max(range(8), key=means.__getitem__)
    by_length = generate(tiny, PROMPT, sampled(max_tokens=12, stop=["e"]), BestOfN(score=len))[0]
    assert by_length.text == max((s.text for s in by_length.samples), key=len)


def test_repeated_sampling_stops_at_the_first_verified_sample(tiny):
    result = generate(tiny, PROMPT, sampled(n=6, max_tokens=40, stop=[" "]), RepeatedSampling(lambda text: True))[0]
    first = min(result.samples, key=lambda s: s.finish_rank if s.finish_rank is not None else 99)
    assert result.chosen == first.index and first.verified
    assert any(s.finish_reason == "abort" for s in result.samples), "the others should have been stopped"
    none = generate(tiny, PROMPT, sampled(n=4), RepeatedSampling(lambda text: False))[0]
    assert none.chosen is None and none.text == "" and all(s.verified is False for s in none.samples)
    assert_all_blocks_free(tiny)


def test_pruning_aborts_samples_and_frees_their_blocks(tiny, monkeypatch):
    engine = tiny.engine
    freed = []
    real_abort = engine.abort_sample

    def abort_sample(request_id, index):
        child = engine.parents[request_id].children[index]
        own = sum(engine.block_pool.blocks[b].ref_count == 1 for b in child.block_ids)
        before = engine.block_pool.num_free_blocks
        assert real_abort(request_id, index)
        freed.append((own, engine.block_pool.num_free_blocks - before))

    monkeypatch.setattr(engine, "abort_sample", abort_sample)
    result = generate(tiny, PROMPT, sampled(n=8, max_tokens=40, ignore_eos=True), BestOfN(),
                      Pruning(margin=0.05, min_tokens=4))[0]
    pruned = [s for s in result.samples if s.pruned]
    assert pruned and len(pruned) == len(freed) < 8
    assert all(s.finish_reason == "abort" and s.num_tokens < 40 for s in pruned)
    assert all(own >= 1 and got == own for own, got in freed), freed  # its own blocks, not the shared prompt's
    assert not result.samples[result.chosen].pruned
    assert_all_blocks_free(tiny)


def test_all_samples_share_the_prompt_blocks(tiny):
    engine = tiny.engine
    prompt_ids = tiny.get_tokenizer().encode(PROMPT + " Again.")
    engine.add_request("share", prompt_ids, sampled(n=4, max_tokens=4))
    full = len(prompt_ids) // engine.block_pool.block_size
    while not all(c.num_computed_tokens >= len(prompt_ids) for c in engine.parents["share"].children):
        engine.step()
    children = engine.parents["share"].children
    assert full >= 2 and all(c.block_ids[:full] == children[0].block_ids[:full] for c in children)
    assert all(c.num_cached_tokens == full * engine.block_pool.block_size for c in children[1:])
    engine.abort("share")


def test_bad_pruning_settings_are_named():
    with pytest.raises(InvalidRequestError, match="margin"):
        Pruning(margin=-1)
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        Pruning(min_tokens=0)


# ---------------- thinking budget ----------------
def _greedy(llm, prompt_ids, n):
    return llm.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)).outputs[0].token_ids


def test_thinking_budget_forces_the_end_then_the_answer_gets_its_own_budget(tiny):
    tok = tiny.get_tokenizer()
    prompt = tok.encode(PROMPT)
    end = tok.encode("</think>", add_special_tokens=False)
    budget, answer = 6, 5
    thought = _greedy(tiny, prompt, budget)
    want = thought + end + _greedy(tiny, prompt + thought + end, answer)
    params = SamplingParams(temperature=0, max_tokens=answer, ignore_eos=True, thinking_budget=budget, n=2)
    other = tok.encode("An unrelated prompt that runs in the same batch")
    # small chunks: the forced tokens and the prompts share steps with other work
    outs = tiny.generate([prompt, other], [params, SamplingParams(temperature=0, max_tokens=20)])
    for c in outs[0].outputs:
        assert c.token_ids == want
        assert c.finish_reason == "length"
        assert c.text.count("</think>") == 1
    # budget 0: the answer starts at once
    zero = tiny.generate(prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, thinking_budget=0))
    assert zero.outputs[0].token_ids == end + _greedy(tiny, prompt + end, 3)


def test_a_model_that_closes_its_thinking_itself_is_not_forced(tiny):
    tok = tiny.get_tokenizer()
    prompt = tok.encode(PROMPT)
    greedy = _greedy(tiny, prompt, 12)
    # an end-of-thinking text the model happens to produce at output positions 3..4
    closing = tok.decode(greedy[3:5])
    if tuple(tok.encode(closing, add_special_tokens=False)) != tuple(greedy[3:5]):
        pytest.skip("this random model's tokens do not re-encode to themselves")
    out = tiny.generate(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, thinking_budget=50,
                                               thinking_end=closing))
    assert out.outputs[0].token_ids == greedy[:5 + 4]


def test_thinking_budget_is_checked():
    with pytest.raises(InvalidRequestError, match="thinking_budget"):
        SamplingParams(thinking_budget=-1)
    with pytest.raises(InvalidRequestError, match="thinking_end"):
        SamplingParams(thinking_budget=4, thinking_end="")


# ---------------- small pieces ----------------
def test_pass_at_k_known_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 8) == 1.0
    assert pass_at_k(5, 0, 5) == 0.0
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)
    assert pass_at_k(100, 1, 10) == pytest.approx(0.1)
    a, b = log_linear_fit([1, 2, 4, 8], [0.1, 0.2, 0.3, 0.4])
    assert b == pytest.approx(0.1 / 0.6931471805599453) and a == pytest.approx(0.1)


def test_answer_extractors():
    assert boxed_answer(r"so \boxed{\frac{1}{2}} and \boxed{42}") == "42"
    assert boxed_answer(r"\boxed{x^{2}}") == "x^{2}"
    assert boxed_answer("no box") is None
    assert last_number("between 1,000 and 2.50 apples") == "2.5"
    assert default_answer(r"7 then \boxed{8} then 9") == "8"
    assert default_answer("it is 9") == "9"
