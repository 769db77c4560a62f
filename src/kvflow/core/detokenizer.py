"""Incremental detokenization and stop strings.

Text is decoded over a short window of recent tokens (prefix_offset..read_offset) so each step costs
O(1) in the output length, and a token that ends inside a multi-byte character waits until the
character is complete: the emitted text never holds broken UTF-8.
"""
from __future__ import annotations

# Decoding starts this many tokens back, so tokenizers that merge spaces with neighbours decode right.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool,
                 stop: list[str], include_stop: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop
        self.max_stop_len = max((len(s) for s in stop), default=0)
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add_token(self, token_id: int) -> str | None:
        """Append one token; returns the stop string if the text now contains one (text is cut there)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        if not self.text:  # a prompt may end inside a multi-byte character: the output that completes it shows it
            prefix = prefix.rstrip("\ufffd")
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None  # nothing new, or an unfinished UTF-8 sequence: wait for more tokens
        new_text = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if len(self.ids) > 64:  # keep the window short
            drop = self.prefix_offset
            self.ids = self.ids[drop:]
            self.prefix_offset, self.read_offset = 0, self.read_offset - drop
        before = len(self.text)
        self.text += new_text
        return self._check_stop(before)

    def _check_stop(self, before: int) -> str | None:
        if not self.stop:
            return None
        search_from = max(0, before - self.max_stop_len + 1)
        found = [(self.text.find(s, search_from), s) for s in self.stop]
        found = [(i, s) for i, s in found if i >= 0]
        if not found:
            return None
        i, s = min(found)
        self.text = self.text[:i + len(s)] if self.include_stop else self.text[:i]
        return s

    def visible_text(self, finished: bool) -> str:
        """Text safe to show while streaming: a tail that could still become a stop string is held back."""
        if finished or not self.stop:
            return self.text
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return self.text[:len(self.text) - hold]

    _STATE = ("skip_special_tokens", "stop", "include_stop", "max_stop_len", "ids", "prefix_offset",
              "read_offset", "text")

    def export_state(self) -> dict:
        return {name: getattr(self, name) for name in self._STATE}

    @classmethod
    def from_state(cls, state: dict, tokenizer) -> IncrementalDetokenizer:
        detok = cls.__new__(cls)
        detok.tokenizer = tokenizer
        for name in cls._STATE:
            setattr(detok, name, state[name])
        return detok

    def _decode(self, ids: list[int]) -> str:
        # A fast tokenizer's Rust decoder directly: transformers' decode() wraps the same call in
        # argument handling that costs more than the decode itself, twice per token per request.
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if backend is not None and hasattr(backend, "decode"):
            return backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)
