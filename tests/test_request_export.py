"""A request's state and KV move to another engine mid-decode and continue exactly: the base of
live migration and prefill/decode split."""
from __future__ import annotations

import torch

from engine_helpers import assert_all_blocks_free, merge_outputs
from kvflow import SamplingParams


def _run(engine, outputs):
    while engine.has_unfinished_requests():
        outputs += engine.step()


def _steps(engine, n, outputs):
    for _ in range(n):
        outputs += engine.step()


def test_export_mid_decode_import_elsewhere_same_greedy_tokens(make_llm):
    src, dst = make_llm(), make_llm(block_size=8)  # another block size: KV travels per token
    prompt = "Paged memory is one of those abstractions. A process sees one long range of addresses"
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    want = src.generate(prompt, params)

    outputs = []
    src.engine.add_request("moving", prompt, params)
    _steps(src.engine, 6, outputs)  # prompt done, a few tokens decoded
    before = merge_outputs(outputs)["moving"]
    assert 0 < len(before.outputs[0].token_ids) < 24
    exported = src.engine.export_request("moving")
    assert exported.kv[0][0].shape[2] == exported.children[0]["num_computed_tokens"]
    assert not src.engine.has_unfinished_requests()
    assert_all_blocks_free(src)

    dst.engine.import_request(exported)
    _run(dst.engine, outputs)
    got = merge_outputs(outputs)["moving"]
    assert got.finished and got.outputs[0].token_ids == want.outputs[0].token_ids
    assert got.outputs[0].text == want.outputs[0].text
    assert len(got.outputs[0].logprobs) == 24
    assert abs(got.outputs[0].cumulative_logprob - want.outputs[0].cumulative_logprob) < 1e-3
    assert_all_blocks_free(dst)


def test_export_of_a_waiting_request_and_kv_round_trip(make_llm):
    llm = make_llm()
    eng = llm.engine
    eng.add_request("queued", "Hello there", SamplingParams(max_tokens=4, temperature=0.0))
    exported = eng.export_request("queued")  # never scheduled: no KV to carry
    assert exported.kv == [None]
    eng.import_request(exported)
    outs = []
    _run(eng, outs)
    assert len(merge_outputs(outs)["queued"].outputs[0].token_ids) == 4

    runner = eng.runner
    blocks = [3, 1]  # not contiguous
    data = torch.randn(len(runner.kv_caches), 2, 20, *runner.kv_caches[0].data.shape[3:])
    runner.write_kv(blocks, [data])
    assert torch.equal(runner.read_kv(blocks, 20)[0], data.to(runner.kv_caches[0].dtype))
    assert_all_blocks_free(llm)
