"""How long one engine step takes, as a function of the batch's shape.

    t = a + b * prefill_tokens + c * decode_rows + d * context_tokens

prefill_tokens: prompt tokens computed this step (chunks included); decode_rows: requests decoding
one token; context_tokens: KV positions the step attends over (for every row, the tokens before it
plus its new ones). A linear model is what the roofline says a step costs once the batch is big
enough: weight reads (a), matmul work per new token (b, c), attention over the cache (d). The
coefficients come from `kvflow sim calibrate` (least squares over measured kvflow steps); a fit
measured on this machine with the bundled model ships as the default.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvflow.errors import ConfigError

DEFAULT_FIT = Path(__file__).with_name("default_fit.json")
TERMS = ("a", "b", "c", "d")


@dataclass
class StepTimeModel:
    a: float  # seconds per step
    b: float  # seconds per prefill token
    c: float  # seconds per decode row
    d: float  # seconds per context token
    source: str = ""  # what was measured (model, machine), for reports
    # Front end <-> instance latencies of a real cluster (sim/serving_fit.py measures them while
    # serving): a request reaches its instance's engine thread dispatch_delay after the client sends
    # it; a token reaches the client output_delay after the step that made it. 0 for a bare engine.
    dispatch_delay: float = 0.0
    output_delay: float = 0.0
    samples: list[dict] = field(default_factory=list)  # the measured points the fit came from

    def step_time(self, prefill_tokens: int, decode_rows: int, context_tokens: int) -> float:
        return self.a + self.b * prefill_tokens + self.c * decode_rows + self.d * context_tokens

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path | None = None) -> "StepTimeModel":
        path = Path(path) if path is not None else DEFAULT_FIT
        try:
            data = json.loads(path.read_text())
            model = cls(**{k: float(data[k]) for k in TERMS}, source=str(data.get("source", "")),
                        samples=list(data.get("samples", [])),
                        dispatch_delay=float(data.get("dispatch_delay", 0.0)),
                        output_delay=float(data.get("output_delay", 0.0)))
        except FileNotFoundError:
            raise ConfigError(f"step-time fit {path} does not exist (make one with `kvflow sim calibrate`)") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"step-time fit {path} is not a fit written by `kvflow sim calibrate`: {e}") from None
        if model.a <= 0 or min(model.b, model.c, model.d, model.dispatch_delay, model.output_delay) < 0:
            raise ConfigError(f"step-time fit {path}: need a > 0 and b, c, d >= 0, got {model.a}, {model.b}, "
                              f"{model.c}, {model.d}")
        return model


def fit(samples: list[dict], source: str = "", relative: bool = True) -> StepTimeModel:
    """Least squares over samples {prefill_tokens, decode_rows, context_tokens, seconds}, with the
    coefficients kept non-negative (a negative cost per token would be noise, not physics).
    relative: minimise relative errors (a calibration grid spans 2 ms to 2 s steps); False: absolute
    ones (serving steps, where what matters is that their sum, the simulated time, comes out right)."""
    import numpy as np

    if len(samples) < len(TERMS):
        raise ConfigError(f"need at least {len(TERMS)} measured steps to fit, got {len(samples)}")
    x = np.array([[1.0, s["prefill_tokens"], s["decode_rows"], s["context_tokens"]] for s in samples])
    y = np.array([s["seconds"] for s in samples])
    # Relative error matters (a 2 ms step off by 1 ms is as bad as a 200 ms one off by 100 ms).
    w = 1.0 / np.maximum(y, 1e-6) if relative else np.ones_like(y)
    xw, yw = x * w[:, None], y * w
    active = list(range(len(TERMS)))
    while True:  # drop the most negative term and refit: a small non-negative least squares
        coef = np.zeros(len(TERMS))
        coef[active] = np.linalg.lstsq(xw[:, active], yw, rcond=None)[0]
        if coef.min() >= 0 or len(active) == 1:
            break
        active.remove(int(np.argmin(coef)))
    coef = np.maximum(coef, 0.0)
    return StepTimeModel(*[float(v) for v in coef], source=source, samples=samples)
