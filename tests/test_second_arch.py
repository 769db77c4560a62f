"""Architectures besides the bundled Llama: small Qwen3, Llama and Qwen2 models with random weights,
built by transformers and saved as safetensors with the SmolLM2 tokenizer, load into kvflow from a
Hugging Face folder and give transformers' prompt logprobs and greedy tokens.

Random weights are drawn with a large std (0.2), and norm weights and biases are randomised too,
so that every loaded tensor matters and argmax margins are clear of float noise."""
from __future__ import annotations

import pytest
import torch

from engine_helpers import (PARAGRAPHS, assert_all_blocks_free, greedy_mismatch, hf_greedy_reference,
                            hf_logprobs, save_tiny_model)
from kvflow import LLM, SamplingParams

CASES = {
    # name: (architecture, tie_word_embeddings, head_dim)
    "qwen3-tied": ("qwen3", True, 16),
    "qwen3-untied-wide-heads": ("qwen3", False, 32),  # head_dim * heads != hidden, as in real Qwen3
    "llama-untied": ("llama", False, 16),
    "llama-tied": ("llama", True, 16),
    "qwen2-tied-bias": ("qwen2", True, 16),
}


@pytest.fixture(params=list(CASES), scope="module")
def pair(request, tokenizer, tmp_path_factory):
    """(name, transformers model, kvflow LLM loaded from the saved folder)."""
    arch, tie, head_dim = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    model = save_tiny_model(path, tokenizer, arch, tie, head_dim)
    llm = LLM(model=str(path), dtype="float32", max_num_batched_tokens=48, block_size=16,
              kv_cache_memory_gb=0.01)
    cfg = llm.engine.model_config
    assert cfg.architecture == arch and cfg.tie_word_embeddings == tie and cfg.head_dim == head_dim
    assert cfg.qk_norm == (arch == "qwen3") and cfg.attention_bias == (arch == "qwen2")
    yield request.param, model, llm
    assert_all_blocks_free(llm)


def test_prompt_logprobs_match(pair, tokenizer):
    name, model, llm = pair
    ids = tokenizer.encode(PARAGRAPHS[2])  # ~90 tokens: several blocks, two 48-token chunks
    assert len(ids) > 48
    out = llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=3))
    ref = hf_logprobs(model, ids)
    got = torch.tensor([out.prompt_logprobs[p][ids[p]].logprob for p in range(1, len(ids))])
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    err = (got - want).abs()
    assert err.max() < 1e-4, f"{name}: prompt logprob off by {err.max():.2e} at position {int(err.argmax()) + 1}"
    assert want.std() > 0.5, "the random model is too flat to be a meaningful check"
    for p in (1, len(ids) - 1):
        top_lp, top_ids = ref[p - 1].topk(3)
        for t, lp in zip(top_ids.tolist(), top_lp.tolist()):
            assert abs(out.prompt_logprobs[p][t].logprob - lp) < 1e-4
    assert_all_blocks_free(llm)


def test_greedy_matches(pair, tokenizer):
    name, model, llm = pair
    prompts = ["Hello, my name is", PARAGRAPHS[0], "def add(a, b):\n    return", "東京は日本の首都です。"]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24))
    problems = []
    # transformers' own reading of the folder (for Qwen2 it rebuilds the pre-tokenizer from the model
    # type, so the ids can differ from the SmolLM2 tokenizer that was saved there).
    from transformers import AutoTokenizer
    folder_tokenizer = AutoTokenizer.from_pretrained(str(llm.engine.model_path))
    for prompt, out in zip(prompts, outs):
        ids = folder_tokenizer.encode(prompt)
        assert out.prompt_token_ids == ids
        want = hf_greedy_reference(model, ids, out.outputs[0].token_ids, 24)
        msg = greedy_mismatch(model, tokenizer, f"{name}: {prompt[:20]!r}", ids, out.outputs[0].token_ids, want)
        if msg:
            problems.append(msg)
    assert not problems, "\n".join(problems)
    assert_all_blocks_free(llm)
