"""OutputProcessor: turns the requests a step advanced into delta RequestOutputs (vLLM v1's output
processor). It owns the user-facing side of a request: the parent that groups its n samples, and
how much of each sample's text and tokens has been sent already, so each output carries only what
is new (no per-step copies of whole token lists)."""
from __future__ import annotations

from dataclasses import dataclass, field

from kvflow.core.request import Request
from kvflow.outputs import CompletionOutput, Logprob, RequestOutput


@dataclass
class ParentRequest:
    """A user request: its n samples are n child Requests sharing the prompt."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    sent_tokens: list[int] = field(default_factory=list)  # per child: output tokens already sent
    sent_text: list[int] = field(default_factory=list)  # per child: characters already sent
    sent_finished: list[bool] = field(default_factory=list)
    sent_prompt_logprobs: bool = False

    def __post_init__(self) -> None:
        n = len(self.children)
        self.sent_tokens, self.sent_text = self.sent_tokens or [0] * n, self.sent_text or [0] * n
        self.sent_finished = self.sent_finished or [False] * n

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentRequest] = {}

    def add(self, parent: ParentRequest) -> None:
        self.parents[parent.request_id] = parent

    def pop(self, request_id: str) -> ParentRequest | None:
        return self.parents.pop(request_id, None)

    def make_outputs(self, touched: list[Request]) -> list[RequestOutput]:
        """One delta per parent with a touched child, in order of first touch; finished parents are forgotten."""
        parents = {r.parent_id: self.parents[r.parent_id] for r in touched if r.parent_id in self.parents}
        outputs = [self._delta(p) for p in parents.values()]
        for request_id, parent in parents.items():
            if parent.finished:
                del self.parents[request_id]
        return outputs

    def _delta(self, parent: ParentRequest) -> RequestOutput:
        completions = []
        for i, c in enumerate(parent.children):
            text = c.detokenizer.visible_text(c.is_finished)
            new_tokens = c.output_token_ids[parent.sent_tokens[i]:]
            if not new_tokens and len(text) == parent.sent_text[i] and c.is_finished == parent.sent_finished[i]:
                continue  # nothing new for this sample
            logprobs = None if c.logprobs is None else self._with_text(c.logprobs[parent.sent_tokens[i]:])
            completions.append(CompletionOutput(c.index, text[parent.sent_text[i]:], list(new_tokens),
                                                c.cumulative_logprob, logprobs, c.finish_reason, c.stop_reason))
            parent.sent_tokens[i], parent.sent_text[i], parent.sent_finished[i] = c.num_output_tokens, len(text), c.is_finished
        lead = parent.children[0]
        prompt_logprobs = None
        if lead.prompt_logprobs is not None and not parent.sent_prompt_logprobs:
            prompt_logprobs, parent.sent_prompt_logprobs = self._with_text(lead.prompt_logprobs), True
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, completions, parent.finished,
                             prompt_logprobs=prompt_logprobs, num_cached_tokens=lead.num_cached_tokens,
                             metrics=lead.metrics, metrics_by_sample=[c.metrics for c in parent.children])

    def _with_text(self, entries: list[Logprob | None]) -> list[Logprob | None]:
        """Fill in each entry's decoded token (the core leaves texts to the tokenizer's owner)."""
        for entry in entries:
            for token_id, lp in (entry or {}).items():
                if lp.decoded_token is None:
                    lp.decoded_token = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return list(entries)
