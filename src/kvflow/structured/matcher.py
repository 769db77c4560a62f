"""RequestGrammar: where one request stands in its grammar (an xgrammar GrammarMatcher).

The scheduler advances it on every token it appends (Scheduler.update_from_output, the one place
a request's progress changes), so preemption and recompute never touch it: the matcher state lives
with the request's output tokens, not with its KV. Speculative drafts are checked against it before
they are scheduled (`valid_prefix`), and the runner fills one bitmask row per verified position by
accepting the drafts tentatively and rolling them back (`fill_rows`)."""
from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, wait


class RequestGrammar:
    def __init__(self, compiled: Future, replay: list[int] | None = None):
        self._compiled = compiled
        self._matcher = None
        self._replay = list(replay or [])  # tokens already generated elsewhere (an imported request)

    @property
    def ready(self) -> bool:
        """Compiled (or failed): the request may be scheduled, or must be failed."""
        return self._compiled.done()

    @property
    def error(self) -> str | None:
        if not self._compiled.done() or self._compiled.exception() is None:
            return None
        e = self._compiled.exception()
        return f"{type(e).__name__}: {e}"

    @property
    def matcher(self):
        if self._matcher is None:
            import xgrammar as xgr
            self._matcher = xgr.GrammarMatcher(self._compiled.result())
            for token in self._replay:
                self._matcher.accept_token(token)
            self._replay = []
        return self._matcher

    def accept(self, token: int) -> bool:
        """Advance past a generated token; False if the grammar does not allow it."""
        return self.matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        """The grammar accepted its stop token: nothing more may follow."""
        return self.matcher.is_terminated()

    def valid_prefix(self, drafts: list[int]) -> list[int]:
        """The leading drafts the grammar allows from here (the matcher is left where it was)."""
        m = self.matcher
        n = 0
        while n < len(drafts) and not m.is_terminated() and m.accept_token(drafts[n]):
            n += 1
        if n:
            m.rollback(n)
        return drafts[:n]

    def fill_rows(self, bitmask, first_row: int, drafts: list[int]) -> None:
        """Row first_row + j: the tokens allowed after the first j drafts (drafts are a valid prefix)."""
        m = self.matcher
        accepted = 0
        for j in range(len(drafts) + 1):
            if m.is_terminated():  # after an accepted stop token: the row is never used, leave it open
                break
            m.fill_next_token_bitmask(bitmask, first_row + j)
            if j < len(drafts):
                ok = m.accept_token(drafts[j])
                assert ok, "drafts must be checked with valid_prefix before they are scheduled"
                accepted += 1
        if accepted:
            m.rollback(accepted)


def wait_any(grammars: list[RequestGrammar], timeout: float) -> None:
    """Block until one of these grammars is compiled (or the timeout passes)."""
    wait([g._compiled for g in grammars], timeout=timeout, return_when=FIRST_COMPLETED)
