"""`kvflow bench perplexity` on a tiny text: the same windows for every variant, float32 agrees
with itself exactly, a quantized KV cache stays close, and the JSON holds every figure."""
from __future__ import annotations

import json
import math

from engine_helpers import PARAGRAPHS
from kvflow.bench.perplexity import windows
from kvflow.entrypoints.cli import main


def test_windows_score_each_token_once():
    starts = windows(100, 40, 20)
    assert starts == [0, 20, 40, 60]
    scored = [p for s in starts for p in range(s + 40 - 20, s + 40)]
    assert scored == list(range(20, 100))


def test_bench_perplexity_cli(make_llm, tmp_path, capsys):
    text = tmp_path / "tiny.txt"
    text.write_text("\n\n".join(PARAGRAPHS[:3]))
    out = tmp_path / "ppl.json"
    rc = main(["bench", "perplexity", "--dataset", str(text), "--num-tokens", "192", "--context", "64",
               "--stride", "32", "--kv-cache-dtype", "auto", "int8", "--kv-cache-memory-gb", "0.01",
               "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["num_tokens"] == 192 and res["num_windows"] == 5 and res["cpu"]
    auto, int8 = res["variants"]
    assert auto["kv_cache_dtype"] == "auto" and int8["kv_cache_dtype"] == "int8"
    for v in (auto, int8):
        assert v["num_scored_tokens"] == 5 * 32
        assert 1.0 < v["perplexity"] < 200 and math.isclose(v["perplexity"], math.exp(v["mean_nll"]))
    # float32 with its own-dtype cache is the reference itself
    assert auto["top1_agreement"] == 1.0 and auto["mean_abs_logprob_diff"] == 0.0
    assert int8["top1_agreement"] > 0.9 and abs(int8["perplexity_vs_float32"]) < 0.05
    assert int8["num_kv_blocks"] > auto["num_kv_blocks"] * 3
    assert "int8" in capsys.readouterr().out


def test_bench_perplexity_rejects_bad_options(capsys):
    assert main(["bench", "perplexity", "--context", "64", "--stride", "64"]) == 2
    assert "stride" in capsys.readouterr().err


def test_token_id_file_is_read_as_is(tmp_path):
    """A .ids file (llama-tokenize --ids prints "[1, 2, 3]") is scored on exactly those tokens, so
    kvflow and llama-perplexity can be compared on one tokenization."""
    from kvflow.bench.perplexity import load_tokens
    path = tmp_path / "text.ids"
    path.write_text("[5, 17, 2,\n9, 1000]\n")
    assert load_tokens(None, str(path), 4) == [5, 17, 2, 9]
