"""User mistakes raise errors that name the problem; in a batch only the bad request fails, the
others finish with correct output, and no KV block leaks."""
from __future__ import annotations

import json
import math
import os

import pytest

from engine_helpers import MODEL_PATH, assert_all_blocks_free
from kvflow import LLM, SamplingParams
from kvflow.errors import ConfigError, InvalidRequestError, KvflowError, ModelLoadError, ModelNotFoundError

GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


# ---------------- sampling parameters ----------------
@pytest.mark.parametrize("kwargs, names", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(n=0), "n must"),
    (dict(n=1.5), "n must"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=10, max_tokens=5), "min_tokens"),
    (dict(stop=5), "stop"),
    (dict(stop=[1]), "stop"),
    (dict(stop=["ok", None]), "stop"),
    (dict(stop=""), "stop"),
    (dict(stop_token_ids=["a"]), "stop_token_ids"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(seed=1.5), "seed"),
    (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=1000), "logprobs"),
    (dict(prompt_logprobs=1000), "prompt_logprobs"),
    (dict(logit_bias=[1, 2]), "logit_bias"),
    (dict(logit_bias={"x": 1.0}), "logit_bias"),
])
def test_invalid_sampling_params(kwargs, names):
    with pytest.raises(InvalidRequestError, match=names):
        SamplingParams(**kwargs)


def test_valid_edge_values_accepted():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, min_p=0.0, n=1, max_tokens=1, min_tokens=1,
                   stop=["x"], stop_token_ids=[], logprobs=0, prompt_logprobs=20)
    SamplingParams(max_tokens=None, stop="a", presence_penalty=-2.0, frequency_penalty=2.0)


# ---------------- prompts ----------------
def test_prompt_over_max_model_len(llm):
    limit = llm.engine.config.scheduler.max_model_len
    with pytest.raises(InvalidRequestError, match="max_model_len") as e:
        llm.generate([100] * limit, GREEDY)
    assert str(limit) in str(e.value)
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        llm.generate("hello " * (limit + 10), GREEDY)
    assert_all_blocks_free(llm)


def test_prompt_at_the_limit_runs(make_llm):
    llm = make_llm(max_model_len=40, kv_cache_memory_gb=0.05)
    out = llm.generate([100] * 39, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        llm.generate([100] * 40, GREEDY)
    assert_all_blocks_free(llm)


def test_empty_prompt(llm):
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate("", GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.engine.add_request("empty-ids", [], GREEDY)
    out = llm.generate([[]], GREEDY)
    assert len(out) == 1 and "empty" in out[0].error
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("prompt, names", [
    ([5, 49152], "vocabulary"),
    ([5, -1], "vocabulary"),
    ([5, 2.5], "token ids"),
    ([5, True], "token ids"),
    (123, "prompt"),
])
def test_bad_prompt_values(llm, prompt, names):
    with pytest.raises(InvalidRequestError, match=names):
        llm.generate(prompt, GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_request_id_reuse_and_param_count(llm):
    engine = llm.engine
    engine.add_request("dup", "hello", SamplingParams(max_tokens=2))
    try:
        with pytest.raises(InvalidRequestError, match="already in use"):
            engine.add_request("dup", "hello again", SamplingParams(max_tokens=2))
    finally:
        assert engine.abort("dup")
    assert not engine.abort("dup")  # already gone
    with pytest.raises(InvalidRequestError, match="sampling params"):
        llm.generate(["a", "b"], [SamplingParams()])
    assert_all_blocks_free(llm)


def test_batch_only_bad_requests_fail(llm, hf_model, tokenizer, greedy_cases):
    """Bad prompts in a batch come back with `error` set; the good ones finish with transformers'
    greedy output; nothing leaks."""
    from engine_helpers import greedy_mismatch

    good = [greedy_cases[0], greedy_cases[9], greedy_cases[2]]
    limit = llm.engine.config.scheduler.max_model_len
    prompts = [good[0]["prompt_ids"], "", [1] * (limit + 1), good[1]["prompt_ids"], [3, 10 ** 6], [],
               good[2]["prompt_ids"]]
    outs = llm.generate(prompts, GREEDY)
    assert len(outs) == len(prompts)
    errors = {i: o.error for i, o in enumerate(outs) if o.error}
    assert sorted(errors) == [1, 2, 4, 5], errors
    assert "empty" in errors[1] and "max_model_len" in errors[2]
    assert "vocabulary" in errors[4] and "empty" in errors[5]
    for i in errors:
        assert outs[i].finished and outs[i].outputs == []
    for case, out in zip(good, [outs[0], outs[3], outs[6]]):
        msg = greedy_mismatch(hf_model, tokenizer, case["label"], case["prompt_ids"], out.outputs[0].token_ids,
                              case["want"])
        assert msg is None, msg
    assert_all_blocks_free(llm)


def test_request_larger_than_the_kv_pool(make_llm):
    """A pool that cannot hold a max_model_len sequence is either refused up front (ConfigError
    naming the limit) or lowers max_model_len; either way a request that can never fit the pool
    fails alone with a message naming the limit: the others finish, nothing is left stuck in the
    engine (never a RuntimeError that strands every request)."""
    try:
        llm = make_llm(num_gpu_blocks=4, max_model_len=2048)
    except ConfigError as e:
        assert "num_gpu_blocks" in str(e) or "max_model_len" in str(e)
        return
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    try:
        outs = llm.generate(["hi there", "word " * 100], params)
    finally:
        from engine_helpers import abort_all
        stuck = llm.engine.has_unfinished_requests()
        abort_all(llm)
    assert not stuck, "a request that can never fit the KV pool stays stuck in the engine"
    assert outs[0].error is None and len(outs[0].outputs[0].token_ids) == 4
    assert outs[1].error and any(w in outs[1].error for w in ("KV", "blocks", "max_model_len"))
    assert_all_blocks_free(llm)


# ---------------- engine options and model files ----------------
@pytest.mark.parametrize("options, names", [
    (dict(block_size=0), "block_size"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
    (dict(num_gpu_blocks=1), "num_gpu_blocks"),
    (dict(kv_cache_memory_gb=0), "kv_cache_memory_gb"),
    (dict(max_model_len=1), "max_model_len"),
    (dict(dtype="int3"), "dtype"),
    (dict(no_such_option=1), "unknown option"),
])
def test_invalid_engine_options(options, names):
    with pytest.raises(ConfigError, match=names):
        LLM(model="smollm2-135m", **options)


def test_missing_model(tmp_path):
    for name in (str(tmp_path / "nowhere" / "model.gguf"), "no-such-model-alias"):
        with pytest.raises(ModelNotFoundError, match="not found") as e:
            LLM(model=name)
        assert name in str(e.value)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        LLM(model=str(tmp_path / "empty_dir"))


@pytest.mark.skipif(MODEL_PATH is None or not os.path.exists(MODEL_PATH), reason="bundled model not installed")
@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated_header", "truncated_half"])
def test_corrupt_gguf(tmp_path, kind):
    path = tmp_path / f"{kind}.gguf"
    if kind == "garbage":
        path.write_bytes(os.urandom(1 << 14))
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        size = os.path.getsize(MODEL_PATH)
        with open(MODEL_PATH, "rb") as f:
            path.write_bytes(f.read(3000 if kind == "truncated_header" else size // 2))
    with pytest.raises(ModelLoadError) as e:
        LLM(model=str(path))
    assert str(path) in str(e.value) and "GGUF" in str(e.value)


def test_bad_hf_folder(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="JSON"):
        LLM(model=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(KvflowError):
        LLM(model=str(tmp_path))
    from safetensors.torch import save_file
    import torch
    save_file({"x": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="not supported"):
        LLM(model=str(tmp_path))
