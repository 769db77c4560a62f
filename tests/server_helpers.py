"""A kvflow server in a child process, and a tiny random-weight model for tests where the model's
output is not the point (test_server.py, test_server_hostile.py, test_bench_serve.py)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from engine_helpers import MODEL


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m kvflow.entrypoints.openai.server` on a free loopback port."""

    def __init__(self, *extra: str, api_key: str | None = None, options: dict | None = None, model: str = MODEL):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="kvflow-server-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "kvflow.entrypoints.openai.server", "--host", "127.0.0.1",
               "--port", str(self.port), "--model", model, "--log-level", "warning"]
        for key, value in (options or {}).items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                cmd.append(flag if value else "--no-" + flag[2:])
            else:
                cmd += [flag, str(value)]
        if api_key:
            cmd += ["--api-key", api_key]
        cmd += list(extra)
        # One torch thread: on two shared cores it is both faster and steadier (see conftest.py).
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("KVFLOW_TEST_THREADS", "1")}
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        self.log_file.flush()
        with open(self.log_file.name) as f:
            return f.read()

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{self.log()[-3000:]}")

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics: name{labels} -> value."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """Metrics once nothing runs, waits or is in flight (or the last ones seen at the timeout)."""
        deadline = time.time() + timeout
        while True:
            m = self.metrics()
            if (m["kvflow:num_requests_running"] == 0 and m["kvflow:num_requests_waiting"] == 0
                    and m["kvflow:num_requests_in_flight"] == 0) or time.time() > deadline:
                return m
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def close(self) -> None:
        self.kill()
        self.log_file.close()
        os.unlink(self.log_file.name)


def post(server: ServerProcess, path: str, body, headers: dict, **kw) -> httpx.Response:
    """POST a JSON value, or raw bytes sent as JSON (for bodies json= cannot produce)."""
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url + path, content=body, headers={**headers, "Content-Type": "application/json"},
                          timeout=60, **kw)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)


def openai_error(resp: httpx.Response, status: int) -> dict:
    """The response's error object, after checking the status and OpenAI's error shape."""
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    return err


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_CORPUS = ["The quick brown fox jumps over the lazy dog.", "Paged attention splits the KV cache into blocks.",
           "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
           "Servers must survive hostile clients: huge bodies, slow headers, bad bytes."] * 4


def build_tiny_model(path: Path, max_positions: int = 4096) -> Path:
    """A random-weight Llama (2 layers, hidden 32) with a ~400-token byte-level BPE tokenizer and a
    ChatML template, saved as a Hugging Face folder; builds in about a second."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(str(path))
    config = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                                      bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(path), safe_serialization=True)
    return path
