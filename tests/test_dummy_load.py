"""load_format="dummy" (vLLM's --load-format dummy): random weights in the shapes of a config.json, so
a model can be run and benchmarked with no weights on disk; and the shipped Llama-3.1-8B config."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from kvflow.model.loader import CONFIGS_DIR


@pytest.fixture
def tiny_config_folder(tmp_path):
    config = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
              "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(CONFIGS_DIR / "llama-3.1-8b" / f, tmp_path / f)
    return tmp_path


def test_dummy_weights_from_config_only(tiny_config_folder):
    from kvflow.model.loader import load_model

    a = load_model(str(tiny_config_folder), torch.bfloat16, "cpu", load_format="dummy", seed=3)
    b = load_model(str(tiny_config_folder), torch.bfloat16, "cpu", load_format="dummy", seed=3)
    assert a.config.num_layers == 2 and a.config.head_dim == 16 and a.config.rope_scaling["rope_type"] == "llama3"
    params = dict(a.model.named_parameters())
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params.values())
    qkv = params["layers.0.self_attn.qkv_proj.weight"]
    assert qkv.shape == (64 + 2 * 32, 64) and 0 < qkv.abs().max() <= 1e-3
    assert bool((params["layers.1.input_layernorm.weight"] == 1).all())
    assert a.model.lm_head.weight is a.model.embed_tokens.weight  # tied, as the config says
    for name, p in b.model.named_parameters():  # same seed, same weights
        assert torch.equal(p, params[name]), name


def test_dummy_engine_generates(tiny_config_folder):
    from kvflow import LLM, SamplingParams

    llm = LLM(model=str(tiny_config_folder), load_format="dummy", dtype="float32", num_gpu_blocks=16)
    out = llm.generate([5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 4 and all(0 <= t < 300 for t in out.outputs[0].token_ids)


def test_dummy_needs_a_config_and_auto_needs_weights(tiny_config_folder, tmp_path_factory):
    from kvflow.errors import ModelNotFoundError
    from kvflow.model.loader import load_model

    with pytest.raises(ModelNotFoundError, match="load_format='dummy'"):
        load_model(str(tiny_config_folder), torch.float32, "cpu")  # no safetensors: says how to run it
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(str(empty), torch.float32, "cpu", load_format="dummy")


def test_engine_options_are_validated():
    from kvflow.config import EngineConfig
    from kvflow.errors import ConfigError

    with pytest.raises(ConfigError, match="load_format must be one of auto, dummy"):
        EngineConfig(load_format="random").validate()
    with pytest.raises(ConfigError, match="attention_backend must be one of auto, torch, cpu, triton"):
        EngineConfig(attention_backend="flash").validate()


def test_shipped_llama_31_8b_config():
    """`--model llama-3.1-8b` names the shipped folder; its shape is Llama 3.1 8B's."""
    from kvflow.model.loader import _read_hf_config, resolve_model

    path = resolve_model("llama-3.1-8b")
    assert path == CONFIGS_DIR / "llama-3.1-8b"
    cfg = _read_hf_config(path)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4096, 32, 32, 8, 128)
    assert cfg.vocab_size == 128256 and cfg.rope_scaling["rope_type"] == "llama3"
    total = cfg.num_params + cfg.vocab_size * cfg.hidden_size  # + the input embedding
    assert 8.0e9 < total < 8.1e9  # 8.03B
