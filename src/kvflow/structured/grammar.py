"""StructuredOutputsParams -> an xgrammar grammar, compiled once per distinct spec.

Two stages, as in vLLM v1. Parsing (a JSON schema, regex or EBNF text into a Grammar) is cheap and
runs on the caller's thread, so a bad spec raises InvalidRequestError at add_request (a 400 on the
server) and never reaches a step. Compiling (the token masks of every grammar state against the
vocabulary) costs tens of milliseconds to seconds, so it runs on a small thread pool; the request
waits in the scheduler's queue until its grammar is ready, and nobody else waits for it. Compiled
grammars are kept in an LRU keyed by the spec, so n > 1 samples and repeated schemas compile once.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from kvflow.errors import InvalidRequestError
from kvflow.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# A JSON grammar allows whitespace between elements; a small model may then emit newlines for ever.
# Capping each run keeps pretty-printed output valid while bounding the pathology.
MAX_WHITESPACE = 32
_WHAT = {"json": "JSON schema", "regex": "regex", "choice": "choice list", "grammar": "EBNF grammar",
         "json_object": "JSON object"}
# xgrammar's messages start with "[time] /path/file.cc:123: " (and sometimes "Check failed: ... is false: ").
_NOISE = re.compile(r"^\s*\[[\d:]+\]\s*\S+:\d+:\s*(Check failed:.*? is false:\s*)?")


def parse(spec: StructuredOutputsParams, field: str | None = None):
    """The spec as an xgrammar Grammar; InvalidRequestError naming what is wrong with it (and
    `field`, the request field it came from; structured_outputs.<kind> by default)."""
    import xgrammar as xgr

    kind = spec.kind
    try:
        if kind in ("json", "json_object"):
            text = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
            if kind == "json_object":
                text = '{"type": "object"}'
            # disable_any_whitespace: compact JSON, no space after "," or ":" either
            layout = (dict(any_whitespace=False, separators=(",", ":")) if spec.disable_any_whitespace
                      else dict(any_whitespace=True, max_whitespace_cnt=MAX_WHITESPACE))
            return xgr.Grammar.from_json_schema(text, strict_mode=kind == "json", **layout)
        if kind == "regex":
            return xgr.Grammar.from_regex(spec.regex)
        if kind == "choice":  # EBNF string literals take JSON's escapes
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice))
        return xgr.Grammar.from_ebnf(spec.grammar)
    except (RuntimeError, ValueError, TypeError) as e:
        raise InvalidRequestError(f"invalid {_WHAT[kind]} in {field or 'structured_outputs.' + kind}: {_clean(e)}") from None


def _clean(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return _NOISE.sub("", first)


class GrammarCompiler:
    """Compiles grammars off the caller's thread; `submit` returns a Future of the CompiledGrammar.

    The xgrammar compiler (which needs the tokenizer's vocabulary, a fraction of a second to read)
    is built on the first compile, on a worker thread: engines that never see a structured request
    never pay for it."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...], cache_size: int = 256,
                 max_workers: int = 2):
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, list(stop_token_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, Future] = OrderedDict()  # touched by the engine thread only
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="kvflow-grammar")
        self._compiler = None
        self._lock = threading.Lock()
        self.num_compiled = 0

    def submit(self, spec: StructuredOutputsParams) -> Future:
        key = spec.key()
        fut = self._cache.get(key)
        if fut is not None:
            self._cache.move_to_end(key)
            return fut
        grammar = parse(spec)  # raises InvalidRequestError here, on the caller's thread
        fut = self._pool.submit(self._compile, grammar)
        self._cache[key] = fut
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return fut

    def _compile(self, grammar):
        compiler = self._xgr_compiler()
        compiled = compiler.compile_grammar(grammar)
        self.num_compiled += 1
        return compiled

    def _xgr_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
