"""SmoothQuant-style per-input-channel smoothing for the int8 (W8A8) weights.

Per-token int8 activations lose most of int8's accuracy on this model family: a few input channels
of the RMSNorm outputs (and of SiLU(gate) * up) are tens of times larger than the rest, so one scale
per token leaves the other channels a handful of levels. Measured on SmolLM2-135M (fake-quant probes,
4,096 ShareGPT tokens): activation rounding alone cost +4.2% perplexity, weight rounding alone +0.6%.

Smoothing divides input channel j of a linear layer by s_j and multiplies the weight's column j by
s_j, so x @ W.T is unchanged before rounding, with s_j = max|x_j| ^ ALPHA / max|W[:, j]| ^ (1 - ALPHA)
(SmoothQuant, Xiao et al. 2023): the activation outliers move partly into the weights, which have
one scale per output channel and take them better. The division costs nothing at run time: it is
folded into what produces the activation.
- q|k|v input: the input RMSNorm's weight; gate|up input: the post-attention RMSNorm's weight;
- down_proj input SiLU(gate) * up: the up_proj rows (SiLU(g) * (u / s) = (SiLU(g) * u) / s).
o_proj (measured +0.00%) is left alone, and the LM head keeps bfloat16 activations (W8A16; see
layers/quantized_linear.py): its A8 cost +0.44% and smoothing barely helped it.

The scales come from one forward pass over CALIBRATION_TEXT (built in, fixed) of the model loaded
with unsmoothed int8 weights and run W8A16, and are cached per model file under
$KVFLOW_CACHE/smoothing; the weights are then quantized once more, from the file, with the scales
applied (no double rounding). KVFLOW_INT8_SMOOTHING=0 turns it off.

Since then the activations are two int8 terms per token (layers/quantized_linear.py), which leaves
mostly the weights' rounding; smoothing still helps (all layers W8A8, 8,192 ShareGPT tokens: +0.34%
perplexity with it, +0.54% without).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from kvflow.cache import cache_dir, file_key

logger = logging.getLogger(__name__)

ALPHA = 0.5  # measured best of 0.3-0.7 on the probes (0.4: +1.20%, 0.5: +1.21% with an A16 head, 0.7: +2.61%)
_VERSION = "1"
_MIN = 1e-5

CALIBRATION_TEXT = """\
The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined a screw \
press with movable metal type and an oil-based ink. Books, which had been copied by hand for centuries, could \
now be produced in hundreds of copies, and within fifty years presses were running in more than two hundred \
European cities.

User: Can you write a Python function that returns the n-th Fibonacci number?
Assistant: Sure. Here is an iterative version that runs in linear time:

def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

For n = 10 it returns 55. A recursive version is shorter but takes exponential time unless you memoize it.

Q: What is 17 * 23? A: 17 * 23 = 391. Q: And 391 / 7? A: about 55.86.

Dear Ms. Alvarez, thank you for your letter of 3 March. I am pleased to confirm your reservation for two \
nights (14-16 April) in a double room with breakfast; the total is EUR 238.00, payable on arrival.

{"name": "widget", "id": 4021, "tags": ["blue", "small"], "price": 9.99, "in_stock": true}

Photosynthesis converts light energy into chemical energy: chlorophyll absorbs red and blue light, water is \
split into oxygen, protons and electrons, and the energy is stored as ATP and NADPH, which the Calvin cycle \
uses to fix carbon dioxide into sugars. Les feuilles vertes sont partout; 春天来了，花都开了。

1. Preheat the oven to 180 C. 2. Mix the flour, sugar and eggs. 3. Bake for 25 minutes, until golden.
"""


@dataclass
class Smoothing:
    """Per layer i: the divisor of each input channel (float32). head: None (the LM head is A16)."""
    qkv: list[torch.Tensor]  # [hidden]
    gate_up: list[torch.Tensor]  # [hidden]
    down: list[torch.Tensor]  # [intermediate]

    def weight_transform(self, name: str):
        """The function applied to the float weight `name` (Hugging Face name) before it is quantized
        to int8, or None: columns times s of the layer it feeds; up_proj rows divided by down's s."""
        m = re.search(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.weight$", name)
        if m is None:
            return None
        i, proj = int(m.group(1)), m.group(3)
        if proj in ("q", "k", "v"):
            cols, rows = self.qkv[i], None
        elif proj == "gate":
            cols, rows = self.gate_up[i], None
        elif proj == "up":
            cols, rows = self.gate_up[i], self.down[i]
        elif proj == "down":
            cols, rows = self.down[i], None
        else:
            return None

        def apply(w: torch.Tensor, row_start: int = 0) -> torch.Tensor:
            w = w.to(torch.promote_types(w.dtype, torch.float32))  # (float64 stays: the tests' exact check)
            w = w * cols.to(w.dtype)[None, :]
            if rows is not None:
                w = w / rows[row_start:row_start + w.shape[0], None].to(w.dtype)
            return w
        return apply

    def fold_into(self, model: torch.nn.Module) -> None:
        """Divide the activations by s where they are made: the norms' weights (up_proj's rows are
        already divided in its quantized weight)."""
        for i, layer in enumerate(model.layers):
            for norm, s in ((layer.input_layernorm, self.qkv[i]), (layer.post_attention_layernorm, self.gate_up[i])):
                norm.weight.data = (norm.weight.data.float() / s).to(norm.weight.dtype)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{kind}.{i}": t for kind in ("qkv", "gate_up", "down")
                for i, t in enumerate(getattr(self, kind))}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Smoothing:
        n = sum(1 for k in state if k.startswith("qkv."))
        return cls(*[[state[f"{kind}.{i}"].float() for i in range(n)] for kind in ("qkv", "gate_up", "down")])


def enabled() -> bool:
    return os.environ.get("KVFLOW_INT8_SMOOTHING", "1") != "0"


def smoothing_scales(act_absmax: torch.Tensor, w_col_absmax: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """s_j = max|x_j| ^ alpha / max|W[:, j]| ^ (1 - alpha), both floored (dead channels keep s ~ 1)."""
    s = act_absmax.float().clamp_min(_MIN) ** alpha / w_col_absmax.float().clamp_min(_MIN) ** (1 - alpha)
    return s.clamp_min(_MIN)


def _cache_file(path: Path) -> Path:
    return cache_dir("smoothing") / f"{file_key(path, f'{_VERSION}:{ALPHA}')}.pt"


def load_or_calibrate(path: Path, load_unsmoothed) -> Smoothing:
    """The model file's smoothing, from the cache or measured now: `load_unsmoothed()` gives the model
    with plain int8 weights (freed again after the pass)."""
    cached = _cache_file(path)
    if cached.exists():
        try:
            return Smoothing.from_state(torch.load(cached, map_location="cpu", weights_only=True))
        except Exception as e:  # noqa: BLE001 - a damaged entry: measure again
            logger.info("ignoring the smoothing cache %s: %s", cached, e)
    loaded = load_unsmoothed()
    smoothing = calibrate(loaded.model, loaded.tokenizer)
    del loaded
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        torch.save(smoothing.state(), tmp)
        os.replace(tmp, cached)
    except OSError as e:
        logger.info("could not cache the int8 smoothing in %s: %s", cached, e)
    return smoothing


@torch.inference_mode()
def calibrate(model: torch.nn.Module, tokenizer) -> Smoothing:
    """One forward pass over CALIBRATION_TEXT recording max |input| per channel of q|k|v, gate|up and
    down_proj in every layer; the weight column maxima come from the (int8) weights themselves."""
    from kvflow.worker.model_runner import allocate_kv_caches, build_batch
    acts: dict[int, torch.Tensor] = {}
    targets = []
    for layer in model.layers:
        targets += [layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]
    hooks = []
    for lin in targets:
        def hook(mod, args):
            v = args[0].detach().abs().amax(0).float()
            acts[id(mod)] = torch.maximum(acts[id(mod)], v) if id(mod) in acts else v
        hooks.append(lin.register_forward_pre_hook(hook))
    cfg, block_size = model.config, 16
    ids = tokenizer.encode(CALIBRATION_TEXT)[:cfg.max_position_embeddings]
    blocks = (len(ids) + block_size - 1) // block_size
    dtype = model.norm.weight.dtype
    caches = allocate_kv_caches(cfg, blocks, block_size, dtype, model.norm.weight.device)
    batch = build_batch([(ids, 0, list(range(blocks)))], block_size, model.norm.weight.device)
    try:
        model(batch.input_ids, batch.positions, caches, batch.meta)
    finally:
        for h in hooks:
            h.remove()

    def scales(lin) -> torch.Tensor:
        return smoothing_scales(acts[id(lin)], _weight_col_absmax(lin))
    return Smoothing([scales(l.self_attn.qkv_proj) for l in model.layers],
                     [scales(l.mlp.gate_up_proj) for l in model.layers],
                     [scales(l.mlp.down_proj) for l in model.layers])


def _weight_col_absmax(lin) -> torch.Tensor:
    if hasattr(lin, "q"):  # QuantizedLinear int8: |q| * scale
        return (lin.q.abs().float() * lin.scale[:, None]).amax(0)
    return lin.weight.detach().abs().float().amax(0)
