"""The Hugging Face transformers baseline: the same requests through `model.generate`.

The same weights as kvflow's: a GGUF file is dequantized by transformers
(`from_pretrained(dir, gguf_file=name, dtype=...)`), a folder is read as is. Requests run in input
order in batches of `batch_size` (as vLLM's hf backend groups them, no sorting), left-padded with
EOS as the pad token, greedy, each batch for exactly its longest output length
(min_new_tokens = max_new_tokens), so a request with a shorter output rides along: only its own
output tokens count as output.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kvflow.bench.datasets import BenchRequest
from kvflow.config import ModelConfig, parse_dtype
from kvflow.errors import ModelLoadError
from kvflow.model.loader import resolve_model

logger = logging.getLogger(__name__)


def model_files(model: str) -> tuple[Path, str | None]:
    """A kvflow model name → (folder, gguf file name or None for a Hugging Face folder)."""
    path = resolve_model(model)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return path, ggufs[0].name
        return path, None
    return path.parent, path.name


def load_tokenizer(model: str):
    """The model's tokenizer through kvflow's loader, which caches the slow GGUF conversion."""
    from kvflow.model.loader import load_tokenizer as load
    return load(model)[0]


def load_hf_model(model: str, dtype: str, device: str):
    from transformers import AutoModelForCausalLM
    folder, gguf = model_files(model)
    kwargs = {"gguf_file": gguf} if gguf else {}
    if not gguf and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        # a config-only folder (kvflow's --load-format dummy shapes): random weights of the same shape
        from transformers import AutoConfig
        with torch.device(device):
            net = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)), dtype=parse_dtype(dtype, device))
        return net.eval()
    try:
        net = AutoModelForCausalLM.from_pretrained(str(folder), dtype=parse_dtype(dtype, device), **kwargs)
    except Exception as e:  # transformers raises many types for unreadable or unsupported files
        raise ModelLoadError(f"transformers cannot load {folder / (gguf or '')}: {e}") from None
    return net.to(device).eval()


def hf_model_config(net) -> ModelConfig:
    """kvflow's ModelConfig from a transformers config (for the FLOP count)."""
    c = net.config
    text = getattr(c, "get_text_config", lambda: c)()
    heads = text.num_attention_heads
    return ModelConfig(
        architecture=getattr(text, "model_type", "llama"), vocab_size=text.vocab_size,
        hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6), rope_theta=float(getattr(text, "rope_theta", 10000.0) or 10000.0),
        max_position_embeddings=getattr(text, "max_position_embeddings", 2048),
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)))


class HFRunner:
    def __init__(self, model: str, dtype: str = "float32", device: str = "cpu"):
        self.device = torch.device(device)
        self.net = load_hf_model(model, dtype, device)
        self.model_config = hf_model_config(self.net)
        eos = self.net.generation_config.eos_token_id
        if eos is None:
            eos = self.net.config.eos_token_id
        self.pad_id = (eos[0] if isinstance(eos, (list, tuple)) else eos) or 0

    def _batch(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], num_tokens: int) -> torch.Tensor:
        """Greedy, exactly num_tokens new tokens per row; returns only the new tokens."""
        ids, mask = self._batch(prompts)
        out = self.net.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                                pad_token_id=self.pad_id, use_cache=True,
                                temperature=None, top_p=None, top_k=None)
        return out[:, ids.shape[1]:]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, requests: list[BenchRequest], batch_size: int = 64, use_tqdm: bool = True) -> dict:
        """Time all requests; returns elapsed seconds and the output tokens each got."""
        bar = tqdm(total=len(requests), desc="hf generate", unit="req", disable=not use_tqdm)
        generated = []
        self._sync()
        start = time.perf_counter()
        for k in range(0, len(requests), batch_size):
            batch = requests[k:k + batch_size]
            longest = max(r.output_len for r in batch)
            new = self.generate([r.prompt_token_ids for r in batch], longest)
            generated.extend(min(r.output_len, new.shape[1]) for r in batch)
            bar.update(len(batch))
        self._sync()
        elapsed = time.perf_counter() - start
        bar.close()
        return {"elapsed_s": elapsed, "output_tokens": generated}

    def ttft(self, request: BenchRequest) -> float:
        """Time to first token: one generate of max_new_tokens=1 (prompt processing + one sample)."""
        self._sync()
        start = time.perf_counter()
        self.generate([request.prompt_token_ids], 1)
        self._sync()
        return time.perf_counter() - start

    def warmup(self) -> None:
        self.generate([[self.pad_id + 1] * 8], 2)
