"""Draft trees: the tree bookkeeping, the ancestor mask against a reference (every path run as a
plain causal chunk), the accepted path's KV equal to what a plain decode writes (when the path is
not the first branch, so its KV had to move), and a seeded step-time model that predicts.

Greedy equality with trees (alone, batched with prefix caching, under preemption) runs in
test_spec_decode.py with the "recycle" and "lookahead" methods; distribution preservation for
sampled tree verification in test_spec_sampling.py."""
from __future__ import annotations

import json

import torch

from engine_helpers import MODEL  # noqa: F401  (the bundled model's fixtures come from conftest)
from kvflow import SamplingParams
from kvflow.core.request import Request
from kvflow.core.spec_tree import DraftTree, accept_path, ancestors, depths, path_kv_moves
from kvflow.spec_decode.acceptance import TreeProposal
from kvflow.spec_decode.recycle import build_template
from kvflow.worker.model_runner import build_batch

PARENTS = [-1, -1, 0, 0, 1, 2, -1]  # three branches under the root, two levels under the first
TOKENS = [10, 11, 12, 13, 14, 15, 16]


def test_tree_bookkeeping():
    assert depths(PARENTS) == [1, 1, 2, 2, 2, 3, 1]
    assert ancestors(PARENTS)[5] == [0, 2, 5]
    assert DraftTree.chain([4, 5, 6]).parents == [-1, 0, 1] and DraftTree.chain([4, 5]).is_chain
    # targets[0] follows the root, targets[1 + i] node i
    assert accept_path(TOKENS, PARENTS, [10, 13, 9, 9, 9, 9, 9, 9]) == [0, 3]
    assert accept_path(TOKENS, PARENTS, [11, 9, 14, 9, 9, 9, 9, 9]) == [1, 4]
    assert accept_path(TOKENS, PARENTS, [10, 12, 9, 15, 9, 9, 9, 9]) == [0, 2, 5]
    assert accept_path(TOKENS, PARENTS, [99] * 8) == []
    assert path_kv_moves(100, [0, 2, 5]) == [(103, 102), (106, 103)]
    assert path_kv_moves(100, [0, 1]) == []
    parents, ranks, prior = build_template(20, 8)
    assert len(parents) == 20 and all(p < i for i, p in enumerate(parents))
    assert all(prior[i] <= prior[p] for i, p in enumerate(parents) if p >= 0)


def _probe_blocks(llm, num_tokens: int) -> Request:
    probe = Request("probe", [0], SamplingParams(), 0.0)
    assert llm.engine.block_pool.allocate_slots(probe, num_tokens)
    return probe


@torch.inference_mode()
def test_tree_mask_matches_each_path_run_alone(make_llm):
    """One forward pass over prefix + tree gives, at every node, the logits of running the
    prefix + that node's path as a plain causal chunk; rotary positions are root + depth."""
    llm = make_llm(num_gpu_blocks=64)
    runner, bs = llm.engine.runner, llm.engine.runner.block_size
    prefix = llm.get_tokenizer().encode("The quick brown fox jumps over the lazy dog. The quick")
    tree_tokens = [llm.get_tokenizer().encode(w, add_special_tokens=False)[0] for w in
                   (" brown", " red", " fox", " dog", " cat", " jumps", " bear")]
    a = _probe_blocks(llm, len(prefix) + len(tree_tokens) + 1)
    b = _probe_blocks(llm, len(prefix) + len(tree_tokens) + 1)
    try:
        # the history, then one chunk: the root (last prefix token) and the tree
        start = len(prefix) - 1
        for probe in (a, b):
            batch = build_batch([(prefix[:-1], 0, probe.block_ids)], bs, runner.device)
            runner.model(batch.input_ids, batch.positions, runner.kv_caches, batch.meta)
        batch = build_batch([([prefix[-1]] + tree_tokens, start, a.block_ids)], bs, runner.device, [PARENTS])
        assert batch.positions.tolist() == [start] + [start + d for d in depths(PARENTS)]
        chunk = batch.meta.groups[-1]
        assert chunk.tree
        mask = chunk.mask[0, 0]
        for i, path in enumerate(ancestors(PARENTS)):
            row = mask[1 + i, start:start + 1 + len(PARENTS)].tolist()
            assert row == [True] + [j in path for j in range(len(PARENTS))], (i, row)
            assert mask[1 + i, :start].all() and not mask[1 + i, start + 1 + len(PARENTS):].any()
        tree_logits = runner.model.compute_logits(
            runner.model(batch.input_ids, batch.positions, runner.kv_caches, batch.meta))
        for i, path in enumerate(ancestors(PARENTS)):
            ids = [prefix[-1]] + [tree_tokens[j] for j in path]
            ref = build_batch([(ids, start, b.block_ids)], bs, runner.device)
            ref_logits = runner.model.compute_logits(
                runner.model(ref.input_ids, ref.positions, runner.kv_caches, ref.meta))
            torch.testing.assert_close(tree_logits[1 + i], ref_logits[-1], rtol=1e-4, atol=1e-4)
    finally:
        llm.engine.block_pool.free(a)
        llm.engine.block_pool.free(b)


class _WrongFirstBranch:
    """A tree whose first branch is always wrong and whose second is the reference continuation,
    so every accepted path sits away from the contiguous slots and its KV must be moved."""

    def __init__(self, continuation: list[int], prompt_len: int, vocab: int):
        self.cont, self.prompt_len, self.vocab = continuation, prompt_len, vocab

    def propose(self, requests, k):
        out = []
        for r in requests:
            n = r.num_tokens - self.prompt_len
            good = self.cont[n:n + 3]
            if len(good) < 3:
                out.append(TreeProposal(DraftTree([], []), [], []))
                continue
            bad = [(t + 1) % self.vocab for t in good]
            tree = DraftTree(bad + good, [-1, 0, 1, -1, 3, 4])
            out.append(TreeProposal(tree, list(range(6)), [0.5] * 6))
        return out


@torch.inference_mode()
def test_accepted_path_kv_equals_plain_decode(make_llm):
    """After tree steps whose accepted path was the second branch, the request's KV for every
    computed position equals a plain prefill of the same tokens, and the output is the reference."""
    ref_llm = make_llm(num_gpu_blocks=64)
    llm = make_llm(num_gpu_blocks=64, speculative_config=json.dumps({"method": "recycle", "num_speculative_tokens": 6}))
    eng = llm.engine
    prompt = llm.get_tokenizer().encode("One, two, three, four, five, six, seven, eight, nine, ten, eleven,")
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    want = list(ref_llm.generate(prompt, params).outputs[0].token_ids)
    real = eng.speculator.proposer
    eng.speculator.proposer = _WrongFirstBranch(want, len(prompt), eng.model_config.vocab_size)
    moves = []
    real_copy = eng.runner.copy_kv_slots
    eng.runner.copy_kv_slots = lambda m: (moves.append(list(m)), real_copy(m))
    probe = None
    try:
        eng.add_request("kv", prompt, params)
        req = eng.scheduler.waiting[0]
        while req.num_output_tokens < 10:
            eng.step()
        assert moves, "no accepted path needed its KV moved"
        n = req.num_computed_tokens
        got = eng.runner.read_kv(req.block_ids, n)
        probe = _probe_blocks(llm, n)
        batch = build_batch([(req.all_token_ids[:n], 0, probe.block_ids)], eng.runner.block_size, eng.runner.device)
        eng.runner.model(batch.input_ids, batch.positions, eng.runner.kv_caches, batch.meta)
        torch.testing.assert_close(got, eng.runner.read_kv(probe.block_ids, n), rtol=1e-4, atol=1e-4)
        while eng.has_unfinished_requests():
            eng.step()
        assert req.output_token_ids == want
        stats = eng.speculator.stats
        assert stats.num_trees > 0 and stats.accepted_per_step > 1.5
    finally:
        eng.speculator.proposer = real
        eng.runner.copy_kv_slots = real_copy
        if probe is not None:
            eng.block_pool.free(probe)
        eng.abort("kv")


def test_seeded_step_time_model_predicts_real_steps(make_llm):
    """With "auto", the engine times a few shapes at start-up; its predictions of the steps that
    follow are within a loose bound (timings never gate tests tightly), and its error is reported."""
    llm = make_llm(num_gpu_blocks=64, speculative_config=json.dumps({"method": "lookahead", "num_speculative_tokens": "auto"}))
    spec = llm.engine.speculator
    assert spec.step_time.ready
    llm.generate(["Tell me a story about a fox.", "List three colours."], SamplingParams(temperature=0.0, max_tokens=12))
    assert spec.stats.step_time_error is not None and spec.stats.step_time_error < 2.0
    assert "step_time_error" in spec.stats.as_dict()
