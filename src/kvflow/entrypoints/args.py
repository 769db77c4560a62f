"""The engine options as command-line flags, read from the config dataclasses (config.py), so
`generate`, `chat`, `serve` and every `bench` take the same names, defaults and help, and
`LLM(**options)` takes the same names as keywords. Flags left out keep the engine's defaults."""
from __future__ import annotations

import argparse
import dataclasses

from kvflow.config import ClusterConfig, EngineConfig, option_fields

_MODEL_OPTIONS = ("model", "dtype", "device", "seed")  # always set: the benches compare backends on them


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    engine = parser.add_argument_group("engine (vLLM's names; omitted: engine defaults)")
    for f in option_fields():
        group = model if f.name in _MODEL_OPTIONS else engine
        group.add_argument("--" + f.name.replace("_", "-"), **_argument(f))


def _argument(f: dataclasses.Field) -> dict:
    meta, default = f.metadata, _default(f)
    kw: dict = {"help": f"{meta.get('help', '')} (default {default})"}
    if f.name in _MODEL_OPTIONS:
        kw["default"] = default
    if isinstance(default, bool):
        return {**kw, "action": argparse.BooleanOptionalAction}
    kw["type"] = meta.get("type") or (str if default is None else type(default))
    for key in ("choices", "metavar"):
        if key in meta:
            kw[key] = meta[key]
    return kw


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def engine_options(args: argparse.Namespace) -> dict:
    """The engine options given on the command line, beyond model/dtype/device/seed."""
    options = {f.name: getattr(args, f.name) for f in option_fields()
               if f.name not in _MODEL_OPTIONS and getattr(args, f.name, None) is not None}
    if "speculative_config" in options:  # fail fast, before the model loads
        from kvflow.spec_decode.config import SpeculativeConfig
        SpeculativeConfig.parse(options["speculative_config"])
    return options


def engine_config(args: argparse.Namespace) -> EngineConfig:
    model = {name: getattr(args, name) for name in _MODEL_OPTIONS}
    return EngineConfig.from_options(**model, **engine_options(args))


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    """The ClusterConfig fields as flags (kvflow serve --instances N ...)."""
    group = parser.add_argument_group("cluster (several instances on Ray; omitted: one engine, no Ray)")
    for f in dataclasses.fields(ClusterConfig):
        group.add_argument("--" + f.name.replace("_", "-"), **{**_argument(f), "default": _default(f)})


def cluster_config(args: argparse.Namespace) -> ClusterConfig:
    config = ClusterConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ClusterConfig)})
    config.validate()
    return config
