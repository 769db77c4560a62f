"""Speculative decoding is lossless: with every proposer (prompt lookup, Token Recycling's and
Lookahead's draft trees, a draft model, layer-skip self-speculation, and K chosen by goodput), greedy outputs equal the engine's own
non-speculative outputs token for token, alone, in batches of up to 32 with prefix caching, and under
preemption; stop strings, EOS, max_tokens, logprobs, penalties and min_tokens behave as without
speculation; rejected drafts leave no KV behind; metrics add up; bad configurations fail at start-up.

The workload is input-grounded (prompts that make the model copy a passage), so drafts really get
accepted. Where a test must be sure that a stop string or EOS lands *inside* an accepted run, an
oracle proposer drafts the reference continuation itself (perfect, or corrupted at random places so
runs are cut short and rolled back).

References come from the same engine without speculation. A first difference where the reference
model scores both tokens within TIE_TOLERANCE is a float tie (verification runs the drafts as one
chunk, a plain decode one token at a time); the comparison ends there and passes."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import random
import re

import pytest
import torch

from engine_helpers import BASE_PROMPTS, EOS_ID, MODEL, PARAGRAPHS, render_prompt
from kvflow import SamplingParams
from kvflow.errors import ConfigError, KvflowError
from kvflow.spec_decode.config import SpeculativeConfig
from kvflow.spec_decode.goodput import Candidate, StepLayout, StepTimeModel, chain_values, choose_counts
from kvflow.core.scheduler import accepted_prefix

MAX_TOKENS = 24
TIE_TOLERANCE = 2e-4  # kvflow vs kvflow: only the batch shape differs
POOL = 384  # KV blocks of the ordinary engines (32 requests x ~9 blocks fit)

METHODS = {
    "ngram": {"method": "ngram", "num_speculative_tokens": 4},
    # Token Recycling's template tree (4 nodes already branch at the first level) and Lookahead's
    # n-gram trie (8 nodes: the pool branches less often): verified as trees.
    "recycle": {"method": "recycle", "num_speculative_tokens": 4},
    "lookahead": {"method": "lookahead", "num_speculative_tokens": 8},
    # The target as its own draft: greedy acceptance should be ~100%.
    "draft_self": {"method": "draft", "draft_model": MODEL, "num_speculative_tokens": 3},
    "layer_skip": {"method": "draft", "layer_skip": 24, "num_speculative_tokens": 2},
    "ngram_auto": {"method": "ngram", "num_speculative_tokens": "auto"},
}


# ---------------- engines ----------------
@pytest.fixture(scope="module")
def ref_llm(make_llm):
    return make_llm(num_gpu_blocks=POOL)


@pytest.fixture(scope="module")
def spec_llm(make_llm):
    """spec_llm(method, **options): an engine with that speculative config, made once per options.
    A separate draft model is built by a second ModelRunner, which reuses the session's loaded
    copy of the weights (conftest), with its own KV tensors exactly as a separate model."""
    def get(method: str, **options):
        opts = {"num_gpu_blocks": POOL, **options}
        spec = json.dumps(METHODS[method])  # a string: the CLI's form, and hashable for make_llm
        llm = make_llm(speculative_config=spec, **opts)
        assert llm.engine.speculator is not None
        return llm
    return get


# ---------------- the workload ----------------
def _sentences(text: str, n: int, skip: int = 0) -> str:
    return " ".join(re.split(r"(?<=[.!?]) ", text)[skip:skip + n])


CODE = ('def moving_average(values, window):\n    """Average of each run of `window` values."""\n'
        '    out = []\n    total = sum(values[:window])\n    out.append(total / window)\n'
        '    for i in range(window, len(values)):\n        total += values[i] - values[i - window]\n'
        '        out.append(total / window)\n    return out\n')
RECORDS = ('{"id": 1, "name": "Alice", "city": "Paris", "role": "engineer"}\n'
           '{"id": 2, "name": "Bob", "city": "Berlin", "role": "designer"}\n'
           '{"id": 3, "name": "Carol", "city": "Madrid", "role": "manager"}\n')


def _chat(llm, text: str) -> list[int]:
    return llm.apply_chat_template([{"role": "user", "content": text}])


@dataclasses.dataclass
class Case:
    label: str
    ids: list[int]
    params: SamplingParams
    passage: str = ""


def _params(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": MAX_TOKENS, **kw})


def _stop_from(passage: str, word: int) -> str:
    """Two words of the passage: the stop string lands where the model copies them."""
    words = passage.split()
    return " ".join(words[word:word + 2])


def grounded_cases(llm) -> list[Case]:
    """16 prompts the model answers by copying, with the sampling options spread over them."""
    tok = llm.get_tokenizer()
    cases = []
    for i, p in enumerate(PARAGRAPHS[:6]):
        passage = _sentences(p, 2)
        cases.append(Case(f"chat-repeat-{i}", _chat(llm, "Repeat exactly the following text:\n\n" + passage),
                          _params(), passage))
    for i, p in enumerate(PARAGRAPHS[:6]):
        passage = _sentences(p, 2, skip=1)
        cases.append(Case(f"copy-{i}", tok.encode(passage + "\n\n" + " ".join(passage.split()[:6])),
                          _params(), passage))
    cases.append(Case("chat-code", _chat(llm, "Copy this Python function exactly:\n\n" + CODE), _params(), CODE))
    cases.append(Case("copy-code", tok.encode(CODE + "\n\n# The same function, again:\n" + CODE.split("\n")[0] + "\n"),
                      _params(), CODE))
    cases.append(Case("copy-json", tok.encode(RECORDS + RECORDS.split("\n")[0][:20]), _params(), RECORDS))
    cases.append(Case("chat-short", _chat(llm, "Repeat exactly: The cat sat on the mat."), _params(),
                      "The cat sat on the mat."))
    by = {c.label: c for c in cases}
    # Stop strings from the passage (they land mid-copy), odd max_tokens, logprobs, penalties, min_tokens.
    for label, word in (("chat-repeat-0", 8), ("chat-repeat-1", 11), ("copy-0", 10), ("copy-1", 6)):
        by[label].params = _params(stop=[_stop_from(by[label].passage, word)])
    by["copy-2"].params = _params(stop=[_stop_from(by["copy-2"].passage, 9)], include_stop_str_in_output=True)
    by["chat-repeat-2"].params = _params(max_tokens=7)
    by["copy-3"].params = _params(max_tokens=11)
    by["copy-code"].params = _params(max_tokens=13)
    by["chat-repeat-3"].params = _params(logprobs=2)
    by["copy-4"].params = _params(logprobs=2, stop=["\n\n"])
    by["chat-repeat-4"].params = _params(repetition_penalty=1.3)
    by["copy-5"].params = _params(frequency_penalty=0.5, presence_penalty=0.2)
    by["chat-short"].params = _params(min_tokens=12)
    by["copy-json"].params = _params(stop=['"city"'])
    assert len(cases) == 16
    return cases


def batch_cases(llm, grounded: list[Case]) -> list[Case]:
    """The 16 grounded cases, the 8 varied base prompts, 4 exact repeats (prefix-cache hits inside
    the batch) and 4 prompts sharing a passage with a grounded one under another instruction."""
    out = list(grounded)
    for label, prompt in BASE_PROMPTS:
        out.append(Case(f"base-{label}", render_prompt(llm, prompt), _params()))
    for c in (grounded[0], grounded[6], grounded[12], grounded[13]):
        out.append(Case(c.label + "-again", list(c.ids), _params(), c.passage))
    for i in range(4):
        passage = _sentences(PARAGRAPHS[i], 2)
        out.append(Case(f"chat-summary-{i}", _chat(llm, "Repeat exactly the following text:\n\n" + passage
                                                        + "\n\nThen summarise it in one sentence."), _params(), passage))
    assert len(out) == 32
    return out


@pytest.fixture(scope="module")
def workload(ref_llm):
    """The cases and the non-speculative reference output of each (one batch run)."""
    grounded = grounded_cases(ref_llm)
    cases = batch_cases(ref_llm, grounded)
    outs = ref_llm.generate([c.ids for c in cases], [c.params for c in cases])
    refs = {c.label: o.outputs[0] for c, o in zip(cases, outs)}
    return dict(grounded=grounded, batch=cases, refs=refs)


# ---------------- comparison ----------------
def _plain(p: SamplingParams) -> bool:
    """Greedy on the raw logits: a raw-logprob tie check applies."""
    return not (p.needs_penalties or p.logit_bias or p.min_tokens)


def _is_tie(ref_llm, prompt_ids: list[int], prefix: list[int], a: int, b: int) -> tuple[bool, float]:
    out = ref_llm.generate(prompt_ids + prefix, SamplingParams(temperature=0.0, max_tokens=1, logprobs=20))
    entry = out.outputs[0].logprobs[0]
    if a not in entry or b not in entry:
        return False, float("inf")
    gap = abs(entry[a].logprob - entry[b].logprob)
    return gap <= TIE_TOLERANCE, gap


def compare(ref_llm, case: Case, want, got) -> str | None:
    """None when `got` (speculative) is the reference `want`; else what differs."""
    tok = ref_llm.get_tokenizer()
    w, g = list(want.token_ids), list(got.token_ids)
    if w != g:
        i = next((j for j, (x, y) in enumerate(zip(w, g)) if x != y), min(len(w), len(g)))
        if i < min(len(w), len(g)) and _plain(case.params):
            tie, gap = _is_tie(ref_llm, case.ids, w[:i], w[i], g[i])
            if tie:
                return None
            detail = f"spec token {g[i]} {tok.decode([g[i]])!r} vs {w[i]} {tok.decode([w[i]])!r} (logprob gap {gap:.2e})"
        else:
            detail = f"spec gave {len(g)} tokens, reference {len(w)}"
        return (f"[{case.label}] first difference at output index {i}: {detail}\n"
                f"    spec: {tok.decode(g)!r}\n    ref:  {tok.decode(w)!r}")
    for field in ("text", "finish_reason", "stop_reason"):
        if getattr(want, field) != getattr(got, field):
            return f"[{case.label}] {field}: spec {getattr(got, field)!r} vs reference {getattr(want, field)!r}"
    if abs(want.cumulative_logprob - got.cumulative_logprob) > 1e-3:
        return f"[{case.label}] cumulative_logprob {got.cumulative_logprob} vs {want.cumulative_logprob}"
    if case.params.logprobs is not None:
        if got.logprobs is None or len(got.logprobs) != len(want.logprobs):
            return f"[{case.label}] logprobs missing or of the wrong length"
        for pos, (we, ge) in enumerate(zip(want.logprobs, got.logprobs)):
            if list(we) != list(ge):  # sampled token first, then the top-N in rank order
                return f"[{case.label}] logprob entries at {pos}: spec {list(ge)} vs {list(we)}"
            for t in we:
                if abs(we[t].logprob - ge[t].logprob) > 1e-3 or we[t].rank != ge[t].rank:
                    return (f"[{case.label}] logprob of token {t} at {pos}: spec {ge[t]} vs {we[t]}")
    return None


def check_all(ref_llm, cases: list[Case], refs: dict, outs, what: str) -> None:
    problems = []
    for case, out in zip(cases, outs):
        assert out.error is None and out.finished, f"[{case.label}] {out.error}"
        msg = compare(ref_llm, case, refs[case.label], out.outputs[0])
        if msg:
            problems.append(msg)
    assert not problems, f"{what}: {len(problems)} of {len(cases)} outputs differ from non-speculative:\n" + "\n".join(problems)


# ---------------- recording what speculation did ----------------
class Recorder:
    """Collects the engine's Request objects (they leave the engine when finished) and every
    verification: (request, output length before it, drafts verified, drafts accepted)."""

    def __init__(self, llm, monkeypatch):
        eng = llm.engine
        self.engine = eng
        self.requests = []
        self.steps = []
        self.preempted = []  # (request, its output length when preempted)
        self.stats0 = dataclasses.replace(eng.speculator.stats, k_histogram=dict(eng.speculator.stats.k_histogram))
        real_add, real_record, real_preempt = eng.scheduler.add, eng.speculator.record_verification, eng.scheduler._preempt

        def add(req):
            self.requests.append(req)
            real_add(req)

        def record(req, num_drafts, num_accepted):
            self.steps.append((req, req.num_output_tokens, num_drafts, num_accepted))
            real_record(req, num_drafts, num_accepted)

        def preempt(req):
            self.preempted.append((req, req.num_output_tokens))
            real_preempt(req)

        monkeypatch.setattr(eng.scheduler, "add", add)
        monkeypatch.setattr(eng.speculator, "record_verification", record)
        monkeypatch.setattr(eng.scheduler, "_preempt", preempt)

    @property
    def drafted(self) -> int:
        return self.engine.speculator.stats.num_drafts - self.stats0.num_drafts

    @property
    def accepted(self) -> int:
        return self.engine.speculator.stats.num_accepted - self.stats0.num_accepted

    @property
    def acceptance(self) -> float:
        return self.accepted / max(1, self.drafted)

    @property
    def plain_acceptance(self) -> float:
        """Acceptance over requests sampling from the raw logits (a proposer that ignores
        penalties and min_tokens rightly gets drafts rejected on the others)."""
        reqs = [r for r in self.requests if _plain(r.params)]
        return sum(r.num_accepted_tokens for r in reqs) / max(1, sum(r.num_draft_tokens for r in reqs))

    def check_metrics(self) -> None:
        """Accepted <= drafted per verification, per request and in aggregate, and they add up."""
        for req, _, n, a in self.steps:
            assert 0 <= a <= n, f"[{req.request_id}] accepted {a} of {n} drafts"
        for req in self.requests:
            assert req.is_finished, req.request_id
            assert 0 <= req.num_accepted_tokens <= req.num_draft_tokens, (
                f"[{req.request_id}] accepted {req.num_accepted_tokens} > drafted {req.num_draft_tokens}")
        assert sum(r.num_draft_tokens for r in self.requests) == self.drafted == sum(n for _, _, n, _ in self.steps)
        assert sum(r.num_accepted_tokens for r in self.requests) == self.accepted == sum(a for _, _, _, a in self.steps)
        stats = self.engine.speculator.stats
        assert 0 <= stats.num_accepted <= stats.num_drafts
        assert 0.0 <= stats.acceptance_rate <= 1.0
        assert sum(stats.k_histogram.values()) == stats.num_steps
        assert stats.sum_k == sum(k * c for k, c in stats.k_histogram.items())
        d = stats.as_dict()
        assert d["draft_tokens"] == stats.num_drafts and d["accepted_tokens"] == stats.num_accepted

    def cut_runs(self) -> dict[str, tuple[int, int, int]]:
        """Per finished request, its last verification: (drafts, accepted, tokens kept). A request
        whose stop landed inside an accepted run kept fewer than accepted + 1 tokens."""
        last = {}
        for req, before, n, a in self.steps:
            last[req.request_id] = (req, before, n, a)
        return {rid: (n, a, req.num_output_tokens - before) for rid, (req, before, n, a) in last.items()}


def assert_blocks_free(llm) -> None:
    pool = llm.engine.block_pool
    assert pool.num_free_blocks == pool.num_blocks, f"{pool.num_blocks - pool.num_free_blocks} KV blocks not freed"
    assert all(b.ref_count == 0 for b in pool.blocks)


# ---------------- configuration errors ----------------
@pytest.mark.parametrize("value, needle", [
    ({"method": "medusa"}, "unknown speculative method"),
    ({"method": "ngram", "num_speculative_tokens": -1}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2.5}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": "many"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens"),
    ({"num_speculative_tokens": 3}, "method"),
    ({"method": "ngram", "lookahead": 3}, "unknown keys"),
    ({"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ({"method": "recycle", "recycle_topk": 0}, "recycle_topk"),
    ({"method": "draft"}, "draft_model"),
    ({"method": "draft", "draft_model": "x", "layer_skip": 4}, "exactly one"),
    ({"method": "draft", "layer_skip": 0}, "layer_skip"),
    ({"method": "ngram", "num_speculative_tokens": "auto", "max_speculative_tokens": 0}, "max_speculative_tokens"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "dict or JSON object"),
])
def test_config_parse_errors(value, needle):
    with pytest.raises(ConfigError, match=needle):
        SpeculativeConfig.parse(value)


def test_config_parse_accepts_dict_json_and_auto():
    a = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 5})
    b = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 5}')
    assert a == b and a.max_tokens == 5 and not a.auto
    c = SpeculativeConfig.parse({"method": "recycle", "num_speculative_tokens": "auto", "max_speculative_tokens": 3})
    assert c.auto and c.max_tokens == 3
    assert SpeculativeConfig.parse(None) is None and SpeculativeConfig.parse(a) is a


def _tiny_llama(path, vocab_size: int, tokenizer, max_positions: int = 2048):
    """A 2-layer random Llama in Hugging Face format (config.json, safetensors, tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny_drafts(ref_llm, tmp_path_factory):
    """Tiny random draft models: one with the target's tokenizer, one with a smaller vocabulary,
    one whose tokenizer numbers two tokens the other way round (same size), one with a short context."""
    tok = ref_llm.get_tokenizer()
    vocab = ref_llm.engine.model_config.vocab_size
    root = tmp_path_factory.mktemp("drafts")
    out = {"same": _tiny_llama(root / "same", vocab, tok),
           "small_vocab": _tiny_llama(root / "small_vocab", 1000, tok),
           "short_context": _tiny_llama(root / "short_context", vocab, tok, max_positions=64)}
    swapped = _tiny_llama(root / "swapped", vocab, tok)
    tj = root / "swapped" / "tokenizer.json"
    data = json.loads(tj.read_text())
    v = data["model"]["vocab"]
    a, b = "hello", "world"
    assert a in v and b in v
    v[a], v[b] = v[b], v[a]
    tj.write_text(json.dumps(data))
    out["swapped"] = swapped
    return out


@pytest.mark.parametrize("which", ["unknown_method", "negative_k", "missing_draft_model", "layer_skip_all",
                                   "layer_skip_over", "small_vocab", "swapped_tokenizer", "short_context",
                                   "tree_too_big"])
def test_bad_configs_fail_at_startup(make_llm, ref_llm, tiny_drafts, which):
    """Every bad configuration raises ConfigError when the LLM is built, naming the problem."""
    layers = ref_llm.engine.model_config.num_layers
    spec, needle = {
        "unknown_method": ({"method": "eagle"}, "unknown speculative method"),
        "negative_k": ({"method": "ngram", "num_speculative_tokens": -2}, "num_speculative_tokens"),
        "missing_draft_model": ({"method": "draft", "num_speculative_tokens": 2}, "draft_model"),
        "layer_skip_all": ({"method": "draft", "layer_skip": layers}, "layer_skip"),
        "layer_skip_over": ({"method": "draft", "layer_skip": layers + 5}, "layer_skip"),
        "small_vocab": ({"method": "draft", "draft_model": tiny_drafts["small_vocab"]}, "vocabulary"),
        "swapped_tokenizer": ({"method": "draft", "draft_model": tiny_drafts["swapped"]}, "tokenizer|vocabulary"),
        # A draft whose context is shorter than the engine's max_model_len would index past its
        # rotary table mid-generation: refuse it at start-up (or clamp max_model_len).
        "short_context": ({"method": "draft", "draft_model": tiny_drafts["short_context"]}, "max_model_len|context|position"),
        # a node's ancestors are one 64-bit word in the attention kernels (a 66-node tree had crashed a bf16 step)
        "tree_too_big": ({"method": "recycle", "num_speculative_tokens": 100}, "at most 64 nodes"),
    }[which]
    with pytest.raises(ConfigError, match=needle):
        make_llm(num_gpu_blocks=32, max_model_len=256, speculative_config=json.dumps(spec))


def test_missing_draft_model_path_is_a_clear_error(make_llm, tmp_path):
    with pytest.raises(KvflowError, match="not found"):
        make_llm(num_gpu_blocks=32, speculative_config=json.dumps(
            {"method": "draft", "draft_model": str(tmp_path / "no-such-model")}))


def test_k_zero_means_no_speculation(make_llm):
    llm = make_llm(num_gpu_blocks=32, speculative_config=json.dumps({"method": "ngram", "num_speculative_tokens": 0}))
    assert llm.engine.speculator is None


def test_tiny_random_draft_model_is_lossless(make_llm, ref_llm, workload, tiny_drafts, monkeypatch):
    """A separate draft model with other shapes (2 layers, 2 KV heads of 16): its drafts are
    nearly always wrong, and the output is still exactly the target's."""
    llm = make_llm(num_gpu_blocks=POOL, speculative_config=json.dumps(
        {"method": "draft", "draft_model": tiny_drafts["same"], "num_speculative_tokens": 3}))
    rec = Recorder(llm, monkeypatch)
    cases = workload["grounded"][:8]
    outs = llm.generate([c.ids for c in cases], [c.params for c in cases])
    check_all(ref_llm, cases, workload["refs"], outs, "tiny random draft")
    rec.check_metrics()
    assert rec.drafted > 0
    assert_blocks_free(llm)


# ---------------- greedy equality per method ----------------
ALONE = ("chat-repeat-0", "chat-repeat-2", "copy-4", "chat-code")


@pytest.mark.parametrize("method", ["ngram", "recycle", "lookahead", "layer_skip"])  # draft_self: preemption
def test_greedy_alone(spec_llm, ref_llm, workload, method, monkeypatch):
    """Four input-grounded prompts (a stop string, max_tokens, logprobs with a stop, code; two of them
    for layer_skip, whose draft costs a forward pass per token), each alone, equal the
    non-speculative output. The batch and preemption tests run the others."""
    llm = spec_llm(method)
    rec = Recorder(llm, monkeypatch)
    by_label = {c.label: c for c in workload["grounded"]}
    cases = [by_label[label] for label in (ALONE[::2] if method == "layer_skip" else ALONE)]
    outs = []
    for c in cases:
        outs.append(llm.generate(c.ids, c.params))
        assert_blocks_free(llm)
    check_all(ref_llm, cases, workload["refs"], outs, f"{method}, alone")
    rec.check_metrics()
    assert rec.drafted > 0
    if method == "ngram":
        assert rec.accepted > 0.3 * rec.drafted, f"{method}: acceptance {rec.acceptance:.2f} on copying prompts"


# Draft models (draft_self, layer_skip) run a second ModelRunner: alone above and under preemption
# below cover them (a full-size draft doubles the cost of every step).
@pytest.mark.parametrize("method", ["ngram", "recycle", "lookahead", "ngram_auto"])
def test_greedy_batch_with_prefix_cache(spec_llm, ref_llm, workload, method, monkeypatch):
    """32 requests in one call for ngram, every other one of them for the others (repeats and shared
    passages hit the prefix cache), then prompts that extend finished requests by their own output:
    their cache hits cover blocks of generated, verified tokens, and their continuations are still
    the reference."""
    llm = spec_llm(method)
    assert llm.engine.block_pool.enable_prefix_caching
    rec = Recorder(llm, monkeypatch)
    cases, refs = workload["batch"], workload["refs"]
    cases = cases if method == "ngram" else cases[::2]  # (keeps two repeats and what they repeat)
    outs = llm.generate([c.ids for c in cases], [c.params for c in cases])
    check_all(ref_llm, cases, refs, outs, f"{method}, batch of {len(cases)}")
    assert sum(o.num_cached_tokens for o in outs) > 0, "repeated prompts in the batch hit no cached block"
    assert_blocks_free(llm)

    # Extensions: prompt + the first 16 generated tokens of a finished request.
    ext_cases, ext_refs = [], {}
    for c in cases:
        r = refs[c.label]
        if c.label.endswith("-again") and len(r.token_ids) == MAX_TOKENS and EOS_ID not in r.token_ids:
            label = c.label + "-ext"
            ext_cases.append(Case(label, c.ids + list(r.token_ids[:16]), _params(max_tokens=MAX_TOKENS - 16)))
            ext_refs[label] = r.token_ids[16:]
    assert ext_cases
    ext = llm.generate([c.ids for c in ext_cases], [c.params for c in ext_cases])
    problems = []
    for c, o in zip(ext_cases, ext):
        got, want = list(o.outputs[0].token_ids), list(ext_refs[c.label])
        if got != want:
            i = next((j for j, (x, y) in enumerate(zip(want, got)) if x != y), min(len(want), len(got)))
            if i < min(len(got), len(want)) and _is_tie(ref_llm, c.ids, want[:i], want[i], got[i])[0]:
                continue
            problems.append(f"[{c.label}] {got} != {want}")
    assert not problems, "continuations over cached generated blocks differ:\n" + "\n".join(problems)
    prompt_lens = {c.label + "-ext": len(c.ids) for c in cases}
    assert any(o.num_cached_tokens > prompt_lens[c.label] for c, o in zip(ext_cases, ext)), (
        "no extension hit a cached block holding generated tokens")
    rec.check_metrics()
    if method == "ngram_auto":  # goodput may rightly choose no drafts for 32 requests on a CPU
        hist = llm.engine.speculator.stats.k_histogram
        assert set(hist) <= set(range(0, 7)), hist
    else:
        assert rec.drafted > 0
    if method in ("recycle", "lookahead"):
        assert llm.engine.speculator.stats.num_trees > rec.stats0.num_trees, "no draft tree was verified"


@pytest.mark.parametrize("method", ["ngram", "recycle", "draft_self"])  # recycle covers trees here
def test_greedy_under_preemption(spec_llm, ref_llm, workload, method, monkeypatch):
    """Eight grounded prompts at once on a pool that holds two of them (4-token blocks, so every
    few tokens a request needs another): requests are preempted after they started decoding and
    are recomputed, drafts and all, and every output is still the reference."""
    llm = spec_llm(method, num_gpu_blocks=40, block_size=4, max_model_len=160)
    rec = Recorder(llm, monkeypatch)
    cases = workload["grounded"][1::2]  # (stops, logprobs, max_tokens, penalties, min_tokens)
    outs = llm.generate([c.ids for c in cases], [c.params for c in cases])
    mid = [(req, n) for req, n in rec.preempted if n >= 2]
    assert mid, f"no request was preempted after it had started decoding: {[(r.request_id, n) for r, n in rec.preempted]}"
    check_all(ref_llm, cases, workload["refs"], outs, f"{method}, under preemption")
    rec.check_metrics()
    assert_blocks_free(llm)
    if method == "draft_self":
        # The draft's own KV lives in the request's blocks: after a preemption the request has new
        # blocks, so the draft must recompute its prefix too, or it drafts from garbage.
        victims = {id(req) for req, _ in mid}
        reqs = [r for r in rec.requests if id(r) in victims and _plain(r.params)]
        assert reqs, "no plain greedy request was preempted mid-decode"
        acc = sum(r.num_accepted_tokens for r in reqs) / max(1, sum(r.num_draft_tokens for r in reqs))
        assert acc > 0.9, (
            f"draft model = target: acceptance {acc:.2f} on the requests preempted mid-decode "
            f"(~1.0 otherwise): the draft kept using KV it no longer has after the preemption")


# ---------------- an oracle proposer: runs land where the test wants ----------------
class OracleProposer:
    """Drafts the known continuation of each prompt; with `corrupt` > 0, each draft token is
    replaced by a wrong one with that probability (seeded), so runs are cut short."""

    def __init__(self, continuations: dict[tuple, list[int]], vocab: int, corrupt: float = 0.0, seed: int = 0):
        self.continuations = continuations
        self.vocab = vocab
        self.corrupt = corrupt
        self.rng = random.Random(seed)

    def propose(self, requests, k: int) -> list[list[int]]:
        out = []
        for r in requests:
            cont = self.continuations.get(tuple(r.prompt_token_ids))
            n = r.num_output_tokens
            if cont is None or list(r.output_token_ids) != cont[:n]:
                out.append([])
                continue
            d = list(cont[n:n + k])
            for j in range(len(d)):
                if self.rng.random() < self.corrupt:
                    d[j] = (d[j] + 1 + self.rng.randrange(self.vocab - 1)) % self.vocab
            out.append(d)
        return out


def _unstopped(p: SamplingParams) -> SamplingParams:
    """The same sampling, run past every stop: the oracle's continuation."""
    return dataclasses.replace(p, stop=None, include_stop_str_in_output=False, ignore_eos=True,
                               max_tokens=40, min_tokens=0, logprobs=None)


@pytest.fixture(scope="module")
def oracle_workload(ref_llm, workload):
    cases = workload["grounded"]
    conts = ref_llm.generate([c.ids for c in cases], [_unstopped(c.params) for c in cases])
    return {tuple(c.ids): list(o.outputs[0].token_ids) for c, o in zip(cases, conts)}


@pytest.mark.parametrize("corrupt", [0.0, 0.3], ids=["perfect", "corrupted"])
def test_oracle_drafts_stop_eos_max_tokens_logprobs_penalties(spec_llm, ref_llm, workload, oracle_workload,
                                                                corrupt, monkeypatch):
    """With drafts that are the continuation itself, stop strings and EOS land inside accepted runs
    (the accepted drafts after them are dropped), max_tokens ends exactly, logprobs, penalties and
    min_tokens (its EOS draft must be rejected) are as without speculation. Corrupted drafts cut
    runs short at random places: rejected drafts are rolled back and the output is unchanged."""
    llm = spec_llm("ngram")
    vocab = llm.engine.model_config.vocab_size
    monkeypatch.setattr(llm.engine.speculator, "proposer", OracleProposer(oracle_workload, vocab, corrupt, seed=1))
    rec = Recorder(llm, monkeypatch)
    cases = workload["grounded"]
    outs = llm.generate([c.ids for c in cases], [c.params for c in cases])
    check_all(ref_llm, cases, workload["refs"], outs, f"oracle drafts ({'corrupted' if corrupt else 'perfect'})")
    rec.check_metrics()
    assert_blocks_free(llm)
    by_id = {r.request_id: r for r in rec.requests}
    cut = rec.cut_runs()
    if corrupt == 0.0:
        assert rec.acceptance > 0.9, f"perfect drafts, acceptance {rec.acceptance:.2f}"
        stopped_inside = [rid for rid, (n, a, kept) in cut.items()
                          if by_id[rid].finish_reason == "stop" and kept <= a]
        assert len(stopped_inside) >= 3, (
            f"stop strings / EOS landed inside an accepted run for only {stopped_inside}: {cut}")
        for c, o in zip(cases, outs):
            comp = o.outputs[0]
            if c.params.min_tokens:
                assert len(comp.token_ids) >= c.params.min_tokens
                assert EOS_ID not in comp.token_ids[:c.params.min_tokens - 1]
            if comp.finish_reason == "length" and c.params.max_tokens < MAX_TOKENS:
                assert len(comp.token_ids) == c.params.max_tokens
    else:
        assert 0.1 < rec.acceptance < 0.95, f"corrupted drafts, acceptance {rec.acceptance:.2f}"


def test_stats_count_drafts_but_stop_discards_them(spec_llm, ref_llm, workload, oracle_workload, monkeypatch):
    """num_accepted counts verified drafts equal to the target's tokens, and a finished request's
    output never holds more than what was accepted plus one bonus token per step."""
    llm = spec_llm("ngram")
    vocab = llm.engine.model_config.vocab_size
    monkeypatch.setattr(llm.engine.speculator, "proposer", OracleProposer(oracle_workload, vocab))
    rec = Recorder(llm, monkeypatch)
    cases = [c for c in workload["grounded"] if c.params.stop]
    llm.generate([c.ids for c in cases], [c.params for c in cases])
    rec.check_metrics()
    for req in rec.requests:
        steps = [s for s in rec.steps if s[0] is req]
        # one token per prefill-finishing step (no drafts) plus accepted + 1 per verification at most
        assert req.num_output_tokens <= sum(a + 1 for _, _, _, a in steps) + 1


# ---------------- seeded sampling ----------------
def test_seeded_sampling_reproducible_with_speculation(spec_llm):
    """A seeded request's output does not depend on what the engine ran before (the sampler's
    promise). With Token Recycling the drafts depend on a table every request updates, so if the
    sampler's random stream advanced per verified row, the same seeded request would change."""
    llm = spec_llm("recycle")
    p = SamplingParams(temperature=0.8, seed=123, max_tokens=MAX_TOKENS)
    prompt = "Ten tips for learning a new language:\n1."
    first = llm.generate(prompt, p).outputs[0].token_ids
    llm.generate(["The history of computing is", "def quicksort(arr):"], SamplingParams(temperature=0.0, max_tokens=16))
    again = llm.generate(prompt, p).outputs[0].token_ids
    assert first == again, "a seeded request gave different tokens the second time (speculation changed its random stream)"


# ---------------- goodput-chosen K ----------------
def _model(f, per_row=0.0, per_kv=0.0, per_pair=0.0) -> StepTimeModel:
    """A synthetic step-time model: f(tokens) given at the knots."""
    from kvflow.spec_decode.goodput import KNOTS
    m = StepTimeModel(per_row=per_row, per_kv=per_kv, per_pair=per_pair)
    m.f = [f(x) for x in KNOTS]
    m.error_ema = 0.0
    return m


def _decodes(n: int, ctx: int = 100) -> StepLayout:
    lay = StepLayout()
    for _ in range(n):
        lay.add_decode(ctx + 1)
    return lay


def test_choose_counts_memory_bound_takes_drafts_compute_bound_takes_none():
    flat = _model(lambda n: 0.05)  # extra tokens are free
    linear = _model(lambda n: 0.002 * n)  # every token costs its full share
    cands = [Candidate(chain_values(0.6, 6), 100) for _ in range(32)]
    assert choose_counts(cands, _decodes(32), flat).counts == [6] * 32
    assert choose_counts(cands, _decodes(32), linear).counts == [0] * 32, "compute-bound: K must be 0"
    # even perfect-looking drafts do not pay when each extra token costs its full share plus a row
    sure = [Candidate([0.99] * 6, 100) for _ in range(8)]
    assert sum(choose_counts(sure, _decodes(8), _model(lambda n: 0.002 * n, per_row=1e-4)).counts) == 0
    assert choose_counts([Candidate([0.5] * 6, 10)], _decodes(1), StepTimeModel()).counts == [6], (
        "nothing measured: try the full length once")


def test_choose_counts_uses_marginal_cost_per_request():
    """A step with a big prompt chunk already pays for the batch: a few drafts cost little there
    (marginal), though the average cost per token is high; and the good request gets the drafts."""
    # a fixed cost of 50 ms up to 256 tokens, then linear: drafts are cheap up to the knee
    knee = _model(lambda n: 0.05 if n <= 256 else 0.05 + 0.001 * (n - 256))
    lay = _decodes(2)
    lay.add_chunk(200, 200, 1)
    good, bad = Candidate(chain_values(0.9, 6), 100), Candidate(chain_values(0.05, 6), 100)
    c = choose_counts([good, bad], lay, knee)
    assert c.counts[0] == 6 and c.counts[1] <= 1
    # past the knee every token costs its full share: nothing
    lay = _decodes(2)
    lay.add_chunk(400, 400, 1)
    assert choose_counts([good, bad], lay, _model(lambda n: 0.001 * n)).counts == [0, 0]


def test_choose_counts_margin_beats_the_models_own_error():
    """A gain smaller than the model's error is not taken."""
    m = _model(lambda n: 0.05 + 0.004 * (n - 1))  # one extra token: +8%
    cands = [Candidate([0.1], 100)]  # +10% expected tokens: a 1.8% better goodput
    assert choose_counts(cands, _decodes(1), m, margin=0.0).counts == [1]
    assert choose_counts(cands, _decodes(1), m, margin=0.05).counts == [0]
    m.error_ema = 0.2
    assert m.margin == pytest.approx(0.3)
    assert choose_counts([Candidate([0.9] * 4, 100)], _decodes(1), m).counts == [4]


def test_choose_counts_prices_no_node_that_cannot_pay(monkeypatch):
    """Nodes worth less than the base goodput times the least a token can cost are never priced, and
    leaving them out changes no choice (the same counts as pricing every node)."""
    import random
    rng = random.Random(0)
    laws = [lambda n: 0.01 + 0.0004 * n, lambda n: 0.02 if n <= 64 else 0.02 + 0.0008 * (n - 64),
            lambda n: 0.005 + 0.001 * n ** 0.7]
    priced = unpruned = 0
    for law in laws:
        for _ in range(20):
            n = rng.choice([1, 4, 16, 64])
            cands = [Candidate(chain_values(rng.random(), rng.randint(1, 8)), rng.randint(10, 400)) for _ in range(n)]
            m = _model(law, per_row=rng.choice([0.0, 1e-4]))
            calls = []
            real = m.predict
            monkeypatch.setattr(m, "predict", lambda s: calls.append(1) or real(s))
            pruned = choose_counts(cands, _decodes(n), m, margin=0.02).counts
            priced += len(calls)
            monkeypatch.setattr(m, "min_token_cost", lambda tokens: 0.0)  # price every node
            calls.clear()
            assert choose_counts(cands, _decodes(n), m, margin=0.02).counts == pruned
            unpruned += len(calls)
    assert priced < unpruned / 2, (priced, unpruned)


def test_step_time_model_seed_fit_and_refine():
    """Fitted from timed shapes of a known cost law, it predicts unseen shapes; real steps refine it
    and its error is reported."""
    from kvflow.spec_decode.profile import SHAPES, shape_of

    def law(s):  # 20 ms + 1 ms/token above 8, 0.3 ms per row, 2 us per key read, 0.1 us per pair
        return 0.02 + 0.001 * max(0, s.tokens - 8) + 3e-4 * s.rows + 2e-6 * s.kv_reads + 1e-7 * s.attn_pairs
    m = StepTimeModel()
    m.fit_seed([(shape_of(n, c if c < 100 else 512, r), law(shape_of(n, c if c < 100 else 512, r))) for n, c, r in SHAPES])
    for shape in (shape_of(1, 300, 1), shape_of(32, 40, 32), shape_of(64, 16, 64)):
        assert m.predict(shape) == pytest.approx(law(shape), rel=0.1), shape
    # between 16 tokens and the C step's limit a step costs what the next 16-token tile does
    assert m.predict(shape_of(17, 40, 17)) == pytest.approx(m.predict(shape_of(32, 40, 17)), rel=0.02)
    assert m.relative_error is None
    big = shape_of(200, 16, 200)
    for _ in range(30):
        m.observe(big, 1.5 * law(big))
    assert m.predict(big) == pytest.approx(1.5 * law(big), rel=0.05)
    assert m.relative_error > 0


def test_step_time_model_follows_the_machine_where_no_step_landed():
    """Seeded while the machine ran 1.5x slower, then only single-token steps (drafts did not look
    worth it): the sizes no step reached keep the seed's shape at the new speed, so a draft is priced
    against what a one-token step costs now (a stale 4-token price had kept "auto" from drafting)."""
    from kvflow.spec_decode.profile import SHAPES, shape_of

    def law(s):
        return 0.02 + 5e-4 * s.tokens + 1e-4 * s.rows + 1e-6 * s.kv_reads
    m = StepTimeModel()
    m.fit_seed([(shape_of(n, c if c < 100 else 512, r), 1.5 * law(shape_of(n, c if c < 100 else 512, r)))
                for n, c, r in SHAPES])
    one, four, prompt = shape_of(1, 200, 1), shape_of(4, 200, 4), shape_of(300, 0, 1)
    m.observe(prompt, 3 * law(prompt))  # a prompt step far away, slow (first-time costs): not a trend
    for _ in range(40):
        m.observe(one, law(one))
    assert m.predict(one) == pytest.approx(law(one), rel=0.02)
    assert m.predict(four) == pytest.approx(law(four), rel=0.05)


def test_step_time_model_shrugs_off_one_hiccup():
    """A step that a hiccup of the machine made 3x slower moves the curve where it landed by a few
    percent, not 40%, and the margin stays near the usual error: the drafts priced there stay tried."""
    from kvflow.spec_decode.profile import SHAPES, shape_of

    def law(s):
        return 0.015 + 2e-4 * s.tokens + 1e-4 * s.rows + 1e-6 * s.kv_reads
    m = StepTimeModel()
    shapes = [shape_of(n, c if c < 100 else 512, r) for n, c, r in SHAPES]
    m.fit_seed([(s, law(s)) for s in shapes])
    tree = shape_of(9, 200, 9)
    before = m.predict(tree)
    m.observe(tree, 3 * law(tree))
    assert before < m.predict(tree) <= 1.06 * before
    assert m.margin < 0.12
    for _ in range(30):  # a real change of speed still gets through
        m.observe(tree, 1.3 * law(tree))
    assert m.predict(tree) == pytest.approx(1.3 * law(tree), rel=0.05)


def test_step_time_seed_prices_batches_of_decodes_by_their_own_timing():
    """One request's few hundred keys stay in the CPU's cache; a batch's keys come from memory. With
    batches of decodes timed in the seed (each request in its own blocks), a 64-decode step at a
    context never timed is priced at the memory rate, not at the one-request rate."""
    from kvflow.spec_decode.goodput import StepLayout
    from kvflow.spec_decode.profile import DECODE_BATCHES, SHAPES, shape_of

    def law(s):  # keys read at 0.5 us each while they fit in 8k keys' worth of cache, 3 us beyond
        per_key = 5e-7 if s.kv_reads <= 8192 else 3e-6
        return 0.01 + 5e-4 * s.tokens + 1e-4 * s.rows + per_key * s.kv_reads + 1e-8 * s.attn_pairs

    def decodes(n, ctx):
        lay = StepLayout()
        for _ in range(n):
            lay.add_decode(ctx, 1)
        return lay.shape()
    samples = [(shape_of(n, c if c < 100 else 512, r), law(shape_of(n, c if c < 100 else 512, r))) for n, c, r in SHAPES]
    without = StepTimeModel()
    without.fit_seed(samples)
    m = StepTimeModel()
    m.fit_seed(samples + [(decodes(b, 513), law(decodes(b, 513))) for b in DECODE_BATCHES])
    batch = decodes(64, 300)
    assert m.predict(batch) == pytest.approx(law(batch), rel=0.15)
    assert without.predict(batch) < 0.7 * law(batch)  # what the one-request seed said
    single = shape_of(1, 300, 1)
    assert m.predict(single) == pytest.approx(law(single), rel=0.25)


def test_a_request_that_stopped_drafting_is_tried_again():
    """A request whose first trees all missed is worth little for a while; the steps it then spends
    without drafts fade that evidence, so its nodes climb back to the slots' own rates (before, only
    verifications moved it, and a request that stopped drafting never drafted again)."""
    from kvflow.core.spec_tree import DraftTree
    from kvflow.spec_decode.acceptance import AcceptanceModel, TreeProposal
    model = AcceptanceModel()
    prop = TreeProposal(DraftTree([5, 6, 7], [-1, 0, 0]), [0, 1, 2], [0.5, 0.2, 0.1])
    for i in range(40):  # other requests: slot 0 reaches the path half the time
        model.record_tree(f"other{i}", prop, [0] if i % 2 else [])
    for _ in range(6):
        model.record_tree("unlucky", prop, [])
    fresh = model.tree_values("new", prop)[1][0]
    low = model.tree_values("unlucky", prop)[1][0]
    assert low < 0.6 * fresh
    for _ in range(40):
        model.fade("unlucky")
    assert model.tree_values("unlucky", prop)[1][0] == pytest.approx(fresh, rel=0.15)


def test_accepted_prefix():
    assert accepted_prefix([], [5]) == 0
    assert accepted_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert accepted_prefix([1, 9, 3], [1, 2, 3, 4]) == 1
    assert accepted_prefix([7], [1, 2]) == 0


# ---------------- command line ----------------
def test_cli_generate_and_bench_with_speculative_config(ref_llm, spec_llm, monkeypatch, tmp_path):
    """`--speculative-config` reaches LLM(...) in generate and bench throughput; the benchmark
    prints and saves the speculation stats; a bad config is a one-line error (exit 2)."""
    from kvflow.entrypoints import cli

    seen = {}

    def fake_llm(model, dtype="float32", device="cpu", seed=0, speculative_config=None, **options):
        seen["spec"] = speculative_config
        return spec_llm("ngram") if speculative_config else ref_llm

    import kvflow.llm
    monkeypatch.setattr(kvflow.llm, "LLM", fake_llm)
    spec = json.dumps(METHODS["ngram"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["generate", "--speculative-config", spec, "--temperature", "0", "--max-tokens", "8",
                       "--json", "Repeat: one two three four. Repeat: one two"])
    assert rc == 0 and json.loads(seen["spec"]) == METHODS["ngram"]
    assert json.loads(out.getvalue().splitlines()[0])["token_ids"]

    path = tmp_path / "bench.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["bench", "throughput", "--dataset", "random", "--num-prompts", "2", "--input-len", "16",
                       "--output-len", "6", "--matmul-seconds", "0", "--no-warmup", "--disable-tqdm",
                       "--speculative-config", spec, "--json", str(path)])
    assert rc == 0
    res = json.loads(path.read_text())
    assert res["speculative_config"] == METHODS["ngram"]
    assert {"draft_tokens", "accepted_tokens", "acceptance_rate", "mean_k", "k_histogram"} <= set(res["spec_decode"])
    assert "acceptance" in out.getvalue().lower()

    monkeypatch.undo()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["generate", "--speculative-config", "{bad json", "hello"])
    assert rc == 2
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert len(lines) == 1 and "speculative" in lines[0], err.getvalue()


def test_bench_spec_tiny(make_llm, monkeypatch, tmp_path):
    """`kvflow bench spec` on a tiny configuration: every row is there, speculative rows produce
    the no-speculation tokens, the JSON holds the speculation stats, and the engine is left
    without a speculator."""
    import kvflow.llm
    from kvflow.entrypoints import cli

    llm = make_llm(num_gpu_blocks=64, enable_prefix_caching=False)
    monkeypatch.setattr(kvflow.llm, "LLM", lambda model, **kw: llm)
    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps([
        {"id": str(i), "conversations": [{"from": "human", "value": f"Tell me about topic {i}."},
                                         {"from": "gpt", "value": PARAGRAPHS[i] + " " + PARAGRAPHS[i + 1]}]}
        for i in range(3)]))
    path = tmp_path / "spec.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["bench", "spec", "--dataset-path", str(data), "--workload", "grounded", "--workload", "chat",
                       "--num-prompts", "1", "--batch-size", "2", "--output-len", "6", "--passage-tokens", "48",
                       "--methods", "ngram", "--methods", 'k2={"method": "recycle", "num_speculative_tokens": 2}',
                       "--batch-methods", "ngram", "--no-hf-peer", "--json", str(path)])
    assert rc == 0, out.getvalue()
    res = json.loads(path.read_text())
    for workload in ("grounded", "chat"):
        w = res["workloads"][workload]
        assert list(w["single"]) == ["no-spec", "ngram", "k2"] and list(w["batch"]) == ["no-spec", "ngram"]
        for table in (w["single"], w["batch"]):
            assert table["no-spec"]["ratio"] == pytest.approx(1.0)
            for name, row in table.items():
                assert row["same_tokens"] == row["num_requests"], f"{workload}/{name}: speculation changed greedy tokens"
                if name != "no-spec":
                    assert {"acceptance_rate", "mean_k", "k_histogram"} <= set(row["spec"])
    assert "vs no-spec" in out.getvalue()
    assert llm.engine.speculator is None

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["bench", "spec", "--methods", "medusa", "--no-hf-peer"])
    assert rc == 2 and "unknown method" in err.getvalue()


def test_bench_spec_rounds_report_medians(monkeypatch):
    """--rounds: rows run in turn (every other round in reverse order); a row reports its median
    tok/s over rounds and the median of its per-round ratios to that round's no-spec row, with every
    round's ratio and its worst token match."""
    from kvflow.bench import spec

    per_round = [(100, 150, [[1]]), (80, 60, [[2]]), (120, 150, [[3]])]  # (no-spec, method) tok/s per round
    current, calls = {}, []
    monkeypatch.setattr(spec, "_set_speculator", lambda llm, config, *args: current.update(config=config))

    def run():
        base, value, outputs = per_round[len(calls) // 2]
        calls.append("no-spec" if current["config"] is None else "m")
        if current["config"] is None:
            return {"tok": base, "spec": None, "_outputs": [[0]]}
        return {"tok": value, "spec": None, "_outputs": outputs if value == 60 else [[0]]}
    rows = spec._run_rows(None, {"m": {"method": "ngram"}}, run, "tok", 3, [], 4, "test")
    assert calls == ["no-spec", "m", "m", "no-spec", "no-spec", "m"]
    assert list(rows) == ["no-spec", "m"]
    assert rows["no-spec"]["tok"] == 100 and rows["m"]["tok"] == 150
    assert rows["m"]["round_ratios"] == pytest.approx([1.5, 0.75, 1.25])
    assert rows["m"]["ratio"] == pytest.approx(1.25) and rows["m"]["same_tokens"] == 0


def test_step_time_seed_is_timed_once_per_machine(tiny_model_dir, monkeypatch, tmp_path):
    """The seed's timings are kept: a second engine in this process, and a process that starts anew
    (its memory dropped), time nothing; `recalibrate` times them again."""
    from kvflow import LLM
    from kvflow.spec_decode import profile

    monkeypatch.setenv("KVFLOW_CACHE", str(tmp_path))
    monkeypatch.setattr(profile, "_remembered", {})
    timed = []
    real = profile.time_shapes
    monkeypatch.setattr(profile, "time_shapes", lambda *a, **k: timed.append(1) or real(*a, **k))
    auto = {"method": "ngram", "num_speculative_tokens": "auto"}
    opts = dict(model=tiny_model_dir, dtype="float32", num_gpu_blocks=64, speculative_config=auto)
    first = LLM(**opts).engine.speculator.step_time
    LLM(**opts)
    monkeypatch.setattr(profile, "_remembered", {})
    again = LLM(**opts).engine.speculator.step_time
    assert len(timed) == 1 and list(tmp_path.glob("calibration/step-times-*.json"))
    assert again.f == first.f and again.per_kv == first.per_kv
    LLM(**opts, recalibrate=True)
    assert len(timed) == 2


def test_auto_seeds_step_time_within_a_short_context_model(tiny_model_dir):
    """Seeding the step-time model probes a long context: on a model with few positions (the tiny
    one has 512) the probes stay inside them instead of failing at start-up."""
    from kvflow import LLM
    llm = LLM(model=tiny_model_dir, dtype="float32", num_gpu_blocks=64,
              speculative_config={"method": "ngram", "num_speculative_tokens": "auto"})
    assert llm.engine.model_config.max_position_embeddings <= 512
    assert llm.engine.speculator.stats.step_time_error is None or llm.engine.speculator.stats.step_time_error >= 0
    out = llm.generate([5, 6, 7, 5, 6, 7, 5, 6], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 8
    assert_blocks_free(llm)


def test_prompt_lookup_index_finds_the_latest_match_as_tokens_grow():
    """The incremental n-gram index proposes what a search of the whole sequence finds: the tokens
    after the latest earlier occurrence of the longest matching suffix (max_n down to min_n)."""
    from kvflow.core.request import Request
    from kvflow.spec_decode.ngram import NgramProposer

    def search(tokens, k, min_n, max_n):
        for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
            starts = [j for j in range(len(tokens) - n) if tokens[j:j + n] == tokens[-n:]]
            if starts:
                return tokens[starts[-1] + n:starts[-1] + n + k]
        return []
    rng = random.Random(0)
    for trial in range(50):
        min_n = rng.randint(1, 3)
        max_n = rng.randint(min_n, 5)
        prop = NgramProposer(min_n, max_n)
        req = Request(f"r{trial}", [rng.randint(0, 5) for _ in range(rng.randint(1, 5))], SamplingParams(), 0.0)
        for _ in range(40):
            k = rng.randint(0, 6)
            want = search(req.all_token_ids, k, min_n, max_n) if len(req.all_token_ids) > min_n else []
            assert prop.propose([req], k) == [want], (req.all_token_ids, k, min_n, max_n)
            for _ in range(rng.randint(1, 3)):
                req.append_token(rng.randint(0, 5))



def test_drafts_never_push_waiting_prompt_tokens_out_of_a_full_step():
    """With the token budget full of a waiting prompt's chunk, a draft takes a prompt token's place:
    however likely it is to be accepted it gains nothing, so none is chosen; with room left, the
    same drafts are."""
    m = _model(lambda n: 0.01 + 1e-5 * n)
    cands = [Candidate([0.9] * 4, 100) for _ in range(4)]
    full = _decodes(4)
    full.add_chunk(508, 508, 0)
    full.displaceable = 508
    assert choose_counts(cands, full, m).counts == [0, 0, 0, 0]
    roomy = _decodes(4)
    roomy.add_chunk(200, 200, 0)
    assert sum(choose_counts(cands, roomy, m).counts) > 0
