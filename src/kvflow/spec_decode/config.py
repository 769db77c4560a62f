"""SpeculativeConfig, parsed from a dict or the CLI's JSON string (vLLM's `--speculative-config`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields

from kvflow.core.spec_tree import MAX_TREE_NODES
from kvflow.errors import ConfigError

METHODS = ("ngram", "recycle", "lookahead", "draft")
TREE_METHODS = ("recycle", "lookahead")  # draft a tree by default


@dataclass
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int | str = 4  # or "auto": chosen per step by expected goodput
    # the upper end of the range "auto" chooses from (draft tokens, or tree nodes); default 6, trees 48
    max_speculative_tokens: int | None = None
    prompt_lookup_max: int = 4  # ngram: longest suffix to match
    prompt_lookup_min: int = 1
    recycle_topk: int = 8  # recycle: candidates kept per token (49152 x 8 int32 = 1.5 MB)
    draft_model: str | None = None  # draft: a model path or alias with the target's tokenizer
    layer_skip: int | None = None  # draft: use the target's first N layers and its head instead
    tree: bool | None = None  # recycle: draft a tree from the static template (default) or one path
    lookahead_ngram: int = 5  # lookahead: n-gram length in the pool (the key token + n - 1 drafts)
    lookahead_branches: int = 8  # lookahead: n-grams kept per key token, and trie branches per step

    @classmethod
    def parse(cls, value: "SpeculativeConfig | dict | str | None") -> "SpeculativeConfig | None":
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"speculative_config must be a dict or JSON object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"speculative_config has unknown keys {unknown}; known: {sorted(known)}")
        if "method" not in value:
            raise ConfigError(f"speculative_config needs a 'method', one of {list(METHODS)}")
        cfg = cls(**value)
        cfg.validate()
        return cfg

    @property
    def auto(self) -> bool:
        return self.num_speculative_tokens == "auto"

    @property
    def uses_tree(self) -> bool:
        return self.method == "lookahead" or (self.method == "recycle" and self.tree is not False)

    @property
    def max_tokens(self) -> int:
        if not self.auto:
            return int(self.num_speculative_tokens)
        if self.max_speculative_tokens is not None:
            return self.max_speculative_tokens
        return 48 if self.uses_tree else 6

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown speculative method {self.method!r}; choose one of {list(METHODS)}")
        k = self.num_speculative_tokens
        if k != "auto" and not (isinstance(k, int) and not isinstance(k, bool) and k >= 0):
            raise ConfigError(f"num_speculative_tokens must be an integer >= 0 or 'auto', got {k!r}")
        if self.max_speculative_tokens is not None and (
                not isinstance(self.max_speculative_tokens, int) or self.max_speculative_tokens < 1):
            raise ConfigError(f"max_speculative_tokens must be >= 1, got {self.max_speculative_tokens!r}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ConfigError(f"need 1 <= prompt_lookup_min ({self.prompt_lookup_min}) <= prompt_lookup_max ({self.prompt_lookup_max})")
        if not 1 <= self.recycle_topk <= 32:
            raise ConfigError(f"recycle_topk must be in [1, 32], got {self.recycle_topk}")
        if not 2 <= self.lookahead_ngram <= 16:
            raise ConfigError(f"lookahead_ngram must be in [2, 16], got {self.lookahead_ngram}")
        if not 1 <= self.lookahead_branches <= 64:
            raise ConfigError(f"lookahead_branches must be in [1, 64], got {self.lookahead_branches}")
        if self.uses_tree and self.max_tokens > MAX_TREE_NODES:
            raise ConfigError(f"a draft tree has at most {MAX_TREE_NODES} nodes; {self.method!r} asks for "
                              f"{self.max_tokens} (num_speculative_tokens / max_speculative_tokens)")
        if self.tree and self.method not in TREE_METHODS:
            raise ConfigError(f"tree drafts come from {list(TREE_METHODS)}, not {self.method!r}")
        if self.method == "draft" and (self.draft_model is None) == (self.layer_skip is None):
            raise ConfigError("method 'draft' needs exactly one of 'draft_model' (a path) or 'layer_skip' (a layer count)")
        if self.layer_skip is not None and (not isinstance(self.layer_skip, int) or self.layer_skip < 1):
            raise ConfigError(f"layer_skip must be a layer count >= 1, got {self.layer_skip!r}")
