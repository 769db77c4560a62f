"""Cold starts: the model, once loaded, is kept on disk in a load-ready form.

Reading the bundled GGUF file means parsing its metadata (the vocabulary is tens of thousands of
strings), building the tokenizer from it, and dequantizing and converting every tensor: seconds.
After the first load an instance saves what came out (the weights in the compute dtype, already
fused as the model holds them, in a safetensors file the next start maps from the page cache; the
tokenizer as tokenizer.json; the model config) under $KVFLOW_CACHE/weights (default
~/.cache/kvflow/weights), keyed by the model file, its size and mtime, the dtype and the context
length. The next instance of the same model loads that instead.

Only plain weights on CPU are cached (not quantization="int8"/"int4", not load_format="dummy")."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from kvflow import __version__
from kvflow.config import ModelConfig

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("KVFLOW_CACHE", Path.home() / ".cache" / "kvflow")) / "weights"


def install() -> None:
    """Route this process's model loads (the model runner's) through the cache."""
    import kvflow.worker.model_runner as model_runner
    if getattr(model_runner.load_model, "weight_cache", False):
        return
    real = model_runner.load_model

    def load(model, dtype, device, max_positions=None, load_format="auto", seed=0, quantization="none"):
        if load_format != "auto" or quantization not in (None, "none") or str(device) != "cpu":
            return real(model, dtype, device, max_positions, load_format, seed, quantization)
        return cached_load(real, model, dtype, device, max_positions)

    load.weight_cache = True
    model_runner.load_model = load


def cached_load(real, model: str, dtype: torch.dtype, device: str, max_positions: int | None):
    from kvflow.model.loader import _model_path
    path = _model_path(model)
    folder = cache_root() / _key(path, dtype, max_positions)
    if (folder / "done").exists():
        try:
            return _read(folder, path, dtype)
        except Exception as e:  # noqa: BLE001 - a damaged cache entry: load the model itself, rewrite it
            logger.warning("weight cache %s unreadable (%s); loading %s", folder, e, path)
    loaded = real(model, dtype, device, max_positions)
    try:
        _write(folder, loaded)
    except Exception as e:  # noqa: BLE001 - no cache is slower, not wrong
        logger.warning("cannot write the weight cache %s: %s", folder, e)
    return loaded


def _key(path: Path, dtype: torch.dtype, max_positions: int | None) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    ident = [__version__, str(dtype), str(max_positions)]
    ident += [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join(ident).encode()).hexdigest()[:20]


def _write(folder: Path, loaded) -> None:
    from safetensors.torch import save_file
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tensors, aliases, seen = {}, {}, {}
    for name, t in loaded.model.state_dict().items():
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise ValueError(f"{name} is not a plain tensor")  # e.g. kept quantized
        if t.data_ptr() in seen:  # tied weights: stored once
            aliases[name] = seen[t.data_ptr()]
            continue
        seen[t.data_ptr()] = name
        tensors[name] = t.detach().contiguous()
    save_file(tensors, str(tmp / "model.safetensors"))
    loaded.tokenizer.save_pretrained(str(tmp))
    meta = {"config": dataclasses.asdict(loaded.config), "aliases": aliases, "eos": list(loaded.eos_token_ids)}
    (tmp / "meta.json").write_text(json.dumps(meta))
    (tmp / "done").write_text("")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    logger.info("weights cached in %s", folder)


def _read(folder: Path, path: Path, dtype: torch.dtype):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from kvflow.model.llama import LlamaForCausalLM
    from kvflow.model.loader import LoadedModel

    meta = json.loads((folder / "meta.json").read_text())
    config = ModelConfig(**meta["config"])
    state = load_file(str(folder / "model.safetensors"))
    for name, source in meta["aliases"].items():
        state[name] = state[source]
    with torch.device("meta"):
        net = LlamaForCausalLM(config)
    missing, unexpected = net.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not m.startswith("rotary.")]
    if missing or unexpected:
        raise ValueError(f"cached weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return LoadedModel(config, net.eval(), tokenizer, tuple(meta["eos"]), path)
