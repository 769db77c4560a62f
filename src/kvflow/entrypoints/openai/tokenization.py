"""Tokenizer work off the event loop.

Encoding an 8 MB prompt takes seconds; on the event loop it would stall every other request (even
/health). So encoding, chat templating and decoding of anything but small inputs run on a few
worker threads, each with its own copy of the tokenizer (Hugging Face tokenizers are not safe to
share between threads). The Rust encoder releases the GIL, so the loop keeps serving meanwhile.

Two bounds keep a flood of big inputs from queueing unbounded work: at most `max_pending` jobs wait
for a worker (more get QueueFullError: 503 with Retry-After), and `min_tokens` gives a lower bound
on a text's token count from its length alone, so a prompt that cannot fit the context is refused
before any of it is tokenized.
"""
from __future__ import annotations

import asyncio
import copy
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from kvflow.errors import QueueFullError

logger = logging.getLogger(__name__)

INLINE_CHARS = 4096  # smaller inputs are tokenized on the event loop: a thread hop would cost more


class TokenizerPool:
    def __init__(self, tokenizer, max_workers: int = 2, max_pending: int = 64):
        self._proto = tokenizer
        self.inline = _copy(tokenizer)  # the event loop's own copy, for small inputs
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="kvflow-tokenize")
        self._max_pending = max_pending
        self._pending = 0
        self.max_token_chars = _max_token_chars(tokenizer)

    def min_tokens(self, num_chars: int) -> int:
        """A lower bound on the tokens of any text of `num_chars` characters: no token covers more
        than max_token_chars of them."""
        return num_chars // self.max_token_chars

    async def run(self, fn: Callable[..., Any], *args, size: int = 0) -> Any:
        """fn(tokenizer, *args): inline when `size` (characters or ids) is small, else on a worker."""
        if size <= INLINE_CHARS:
            return fn(self.inline, *args)
        if self._pending >= self._max_pending:
            raise QueueFullError(f"the server is busy tokenizing {self._pending} large inputs; retry later")
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, self._call, fn, args)
        finally:
            self._pending -= 1

    def _call(self, fn: Callable[..., Any], args: tuple) -> Any:
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            tok = self._local.tokenizer = _copy(self._proto)
        return fn(tok, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _copy(tokenizer):
    try:
        return copy.deepcopy(tokenizer)
    except Exception as e:  # noqa: BLE001 - fall back to sharing (fast tokenizers' encode mostly copes)
        logger.warning("cannot copy the tokenizer (%s); sharing one copy between threads", e)
        return tokenizer


def _max_token_chars(tokenizer) -> int:
    """The most characters of input one token can stand for. A vocabulary entry's spelling is never
    shorter than the text it covers (byte-level BPE writes one character per byte; SentencePiece's
    '▁' and '<0x41>' are longer than what they stand for); a normalizer might shrink text, so then
    allow four times as much."""
    try:
        longest = max(len(t) for t in tokenizer.get_vocab())
    except Exception:  # noqa: BLE001 - no vocabulary to read: a generous bound
        return 256
    backend = getattr(tokenizer, "backend_tokenizer", None)
    shrinks = backend is None or backend.normalizer is not None
    return max(1, longest) * (4 if shrinks else 1)
