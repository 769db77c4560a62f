"""Structured output offline, on a tiny random-weight model: the hard case, where the bitmask alone
must make every output valid. JSON schema / regex / choice / EBNF outputs always parse and match,
with n > 1, stop strings, preemption and speculative decoding (lossless against no speculation);
only structured rows get a bitmask; bad specs are clear errors that harm no other request; a slow
compilation keeps only its own request waiting."""
from __future__ import annotations

import json
import random
import re
import threading

import pytest
import torch

import server_helpers
from engine_helpers import assert_all_blocks_free
from kvflow import LLM, SamplingParams, StructuredOutputsParams
from kvflow.errors import InvalidRequestError

jsonschema = pytest.importorskip("jsonschema")
xgr = pytest.importorskip("xgrammar")

SCHEMA = {"type": "object",
          # (a pattern, not maxLength: xgrammar 0.2.8 lets control characters into length-bounded strings)
          "properties": {"name": {"type": "string", "pattern": "^[a-z ]{1,6}$"},
                         "ok": {"type": "boolean"},
                         "size": {"type": "integer", "minimum": 0, "maximum": 999},
                         "tag": {"enum": ["red", "green", "blue"]},
                         "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                   "maxItems": 3}},
          "required": ["name", "ok", "size", "tag", "items"]}
REGEX = r"[a-z]{2,4}-[0-9]{2,3}(\.[a-z]{1,2})?"
CHOICES = ["yes", "no way", "maybe \"so\""]
GRAMMAR = 'root ::= "(" expr ")"\nexpr ::= num | num "+" expr\nnum ::= [0-9] | [1-9] [0-9]'
PROMPTS = ["hello", "The quick brown fox", "def fibonacci(n):", "Paged attention splits"]
OPTIONS = dict(dtype="float32", max_model_len=512, block_size=16, max_num_seqs=32, max_num_batched_tokens=256)


def spec(kind: str) -> StructuredOutputsParams:
    # A random model would fill every gap with whitespace: compact JSON keeps outputs short.
    return {"json": StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
            "regex": StructuredOutputsParams(regex=REGEX),
            "choice": StructuredOutputsParams(choice=CHOICES),
            "grammar": StructuredOutputsParams(grammar=GRAMMAR)}[kind]


def check_valid(kind: str, text: str) -> None:
    if kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES, text
    else:
        assert re.fullmatch(r"\((0|[1-9][0-9]?)(\+(0|[1-9][0-9]?))*\)", text), text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(server_helpers.build_tiny_model(tmp_path_factory.mktemp("tiny-structured"), max_positions=512))


@pytest.fixture(scope="module")
def llms(model_dir):
    made: dict = {}

    def get(name: str) -> LLM:
        if name not in made:
            extra = {"base": dict(num_gpu_blocks=256),
                     "small": dict(num_gpu_blocks=14),  # 16 sequences of ~80 tokens: preemptions
                     "spec": dict(num_gpu_blocks=256,
                                  speculative_config={"method": "ngram", "num_speculative_tokens": 4})}[name]
            made[name] = LLM(model=model_dir, **OPTIONS, **extra)
        return made[name]

    yield get
    for llm in made.values():
        assert_all_blocks_free(llm)


def texts(outs) -> list[tuple[str, str]]:
    return [(c.text, c.finish_reason) for o in outs for c in o.outputs]


@pytest.mark.parametrize("kind", ["json", "regex", "choice", "grammar"])
def test_random_model_outputs_always_valid(llms, kind):
    """Temperature 1 over a random model, n = 2: every output is valid, ended by the grammar."""
    llm = llms("base")
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=96, structured_outputs=spec(kind))
    outs = llm.generate(PROMPTS, params)
    for text, reason in texts(outs):
        assert reason == "stop", (kind, text, reason)
        check_valid(kind, text)
    assert len({t for t, _ in texts(outs)}) > 1  # the samples differ: the mask shapes, the model still picks
    assert_all_blocks_free(llm)


def test_bitmask_rows_only_where_needed(llms, monkeypatch):
    """In a batch of free and structured requests only the structured rows get a bitmask, and the
    free requests' greedy outputs are those they get alone."""
    import kvflow.worker.model_runner as mr
    llm = llms("base")
    seen: list[tuple[int, list[int]]] = []
    real = mr.grammar_bitmask

    def record(sampled, vocab):
        out = real(sampled, vocab)
        seen.append((len(sampled), [] if out is None else out[1]))
        ids = [s.request.request_id for s in sampled]
        for row in ([] if out is None else out[1]):
            assert ids[row].startswith("gen-") and sampled[row].request.grammar is not None
        return out

    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = texts(llm.generate(PROMPTS, free))
    monkeypatch.setattr(mr, "grammar_bitmask", record)
    mixed = llm.generate(PROMPTS + PROMPTS[:2], [free] * len(PROMPTS) + [
        SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=spec("regex")),
        SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=spec("choice"))])
    assert texts(mixed[:len(PROMPTS)]) == alone
    check_valid("regex", mixed[-2].outputs[0].text)
    check_valid("choice", mixed[-1].outputs[0].text)
    assert max(len(rows) for _, rows in seen) == 2 and any(n > 2 for n, _ in seen)


def test_apply_bitmask_matches_xgrammar():
    """The sampler masks the named rows only, with xgrammar's packing, on a copy."""
    from kvflow.layers.sampler import apply_bitmask
    torch.manual_seed(0)
    logits = torch.randn(5, 100)
    bits = torch.randint(-2**31, 2**31 - 1, (5, 4), dtype=torch.int32)
    got = apply_bitmask(logits, bits, [0, 2, 3])
    allowed = ((bits[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten(1)[:, :100].bool()
    for r in range(5):
        want = logits[r].masked_fill(~allowed[r], -float("inf")) if r in (0, 2, 3) else logits[r]
        assert torch.equal(got[r], want), r
    assert not torch.isinf(logits).any()  # the caller's logits stay raw

    from kvflow.layers.sampler import SamplingRow, sample
    greedy, hot = SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)
    rows = [SamplingRow(p, None, 0, (), [1], [], False) for p in (greedy, greedy, hot, greedy)]
    logits = torch.zeros(4, 64)
    logits[:, 5], logits[:, 9] = 10.0, 5.0  # token 5 is every row's argmax
    bits = torch.full((4, 2), -1, dtype=torch.int32)
    bits[0, 0] = bits[2, 0] = 1 << 9  # rows 0 and 2: only token 9; row 1: all allowed; row 3: no mask
    out = sample(logits, rows, (bits, [0, 1, 2]))
    assert out.token_ids == [9, 5, 9, 5]


def test_stop_string_ignore_eos_and_length(llms):
    """A stop string may end the output inside the structure; with ignore_eos the grammar's end
    still ends it; a schema that cannot finish within max_tokens ends with "length"."""
    llm = llms("base")
    long_schema = {"type": "object", "properties": {"a": {"type": "string", "minLength": 50}}, "required": ["a"]}
    outs = llm.generate(PROMPTS[:3], [
        SamplingParams(temperature=0.0, max_tokens=60, stop=['"ok"'], structured_outputs=spec("json")),
        SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True, structured_outputs=spec("choice")),
        SamplingParams(temperature=0.0, max_tokens=5, structured_outputs=StructuredOutputsParams(json=long_schema))])
    stopped, choice, cut = (o.outputs[0] for o in outs)
    assert stopped.finish_reason == "stop" and stopped.stop_reason == '"ok"' and '"ok"' not in stopped.text
    assert stopped.text.startswith('{"name":"')
    assert choice.finish_reason == "stop" and choice.text in CHOICES
    assert cut.finish_reason == "length" and len(cut.token_ids) == 5


def test_preemption_keeps_matchers(llms):
    """Seeded samples are independent of the batch: in a pool too small for them all (requests are
    preempted and recomputed) the outputs equal those of a roomy pool, and stay valid."""
    params = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=64, structured_outputs=spec("json"))
    prompts = [p * 3 for p in PROMPTS] * 2
    small = llms("small")
    before = small.engine.scheduler.num_preemptions
    got = texts(small.generate(prompts, params))
    assert small.engine.scheduler.num_preemptions > before
    assert got == texts(llms("base").generate(prompts, params))
    for text, reason in got:
        if reason == "stop":
            check_valid("json", text)


class _Oracle:
    """Drafts the known continuation, each token replaced by a random one with probability
    `corrupt` (most of which the grammar rejects before they are scheduled)."""

    def __init__(self, conts: dict[tuple, list[int]], vocab: int, corrupt: float):
        self.conts, self.vocab, self.corrupt, self.rng = conts, vocab, corrupt, random.Random(0)
        self.proposed = 0

    def propose(self, requests, k: int) -> list[list[int]]:
        out = []
        for r in requests:
            cont = self.conts.get(tuple(r.prompt_token_ids), [])
            n = r.num_output_tokens
            d = [t if self.rng.random() >= self.corrupt else self.rng.randrange(self.vocab)
                 for t in cont[n:n + k]] if cont[:n] == r.output_token_ids else []
            self.proposed += len(d)
            out.append(d)
        return out


@pytest.mark.parametrize("corrupt", [0.0, 0.4])
def test_speculative_decoding_stays_lossless(llms, monkeypatch, corrupt):
    """Each verified position gets its own bitmask (the matcher advanced over the drafts before it,
    then rolled back); drafts the grammar rejects are cut before they are scheduled. Greedy output
    equals no speculation; with perfect drafts most are accepted."""
    base, spec_llm = llms("base"), llms("spec")
    params = [SamplingParams(temperature=0.0, max_tokens=64, structured_outputs=spec(k))
              for k in ("json", "regex", "grammar", "json")]
    want = base.generate(PROMPTS, params)
    conts = {tuple(o.prompt_token_ids): o.outputs[0].token_ids for o in want}
    oracle = _Oracle(conts, spec_llm.engine.model_config.vocab_size, corrupt)
    monkeypatch.setattr(spec_llm.engine.speculator, "proposer", oracle)
    verified = []
    real = spec_llm.engine.scheduler.update_from_output

    def update(sched, out):
        result = real(sched, out)
        verified.extend((n, a) for _, n, a in result.verified)
        return result

    monkeypatch.setattr(spec_llm.engine.scheduler, "update_from_output", update)
    got = spec_llm.generate(PROMPTS, params)
    assert texts(got) == texts(want)
    drafts, accepted = sum(n for n, _ in verified), sum(a for _, a in verified)
    assert drafts > 0
    if corrupt == 0.0:
        assert accepted / drafts > 0.9
    else:  # corrupted drafts were cut by the grammar or rejected by the target
        assert drafts < oracle.proposed or accepted < drafts


def test_bad_specs_raise_and_harm_nobody(llms):
    llm = llms("base")
    bad = [(dict(json={"type": "nonsense"}), "JSON schema.*nonsense"), (dict(json="{not json"), "JSON schema"),
           (dict(regex="a(b"), "regex.*parenthesis"), (dict(grammar="root ::= foo"), "EBNF grammar.*foo")]
    for kw, pattern in bad:
        with pytest.raises(InvalidRequestError, match=pattern):
            llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(**kw)))
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(json=SCHEMA, regex="a")
    outs = llm.generate(["x", "y"], [SamplingParams(structured_outputs=StructuredOutputsParams(regex="a(b")),
                                     SamplingParams(max_tokens=30, structured_outputs=spec("choice"))])
    assert outs[0].error and "parenthesis" in outs[0].error
    assert outs[1].outputs[0].text in CHOICES
    assert_all_blocks_free(llm)


def test_slow_compile_waits_alone(llms, monkeypatch):
    """While a grammar compiles, its request waits in the queue and the others run to the end;
    the same schema again is compiled once (cached)."""
    llm = llms("base")
    eng = llm.engine
    compiler = eng.grammars
    gate = threading.Event()
    real = compiler._compile

    def slow(grammar):
        gate.wait(30)
        return real(grammar)

    monkeypatch.setattr(compiler, "_compile", slow)
    slow_spec = StructuredOutputsParams(regex="[0-9]{3}")
    eng.add_request("slow", "hello", SamplingParams(max_tokens=10, structured_outputs=slow_spec))
    eng.add_request("slow-again", "hello", SamplingParams(max_tokens=10, structured_outputs=slow_spec))
    eng.add_request("free", "hello", SamplingParams(max_tokens=6, ignore_eos=True))
    finished = set()
    for _ in range(20):
        finished |= {o.request_id for o in eng.step() if o.finished}
    assert finished == {"free"} and {r.request_id for r in eng.scheduler.waiting} == {"slow", "slow-again"}
    gate.set()
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
    for rid in ("slow", "slow-again"):
        assert re.fullmatch("[0-9]{3}", "".join(c.text for o in outs[rid] for c in o.outputs)), outs[rid]
    assert_all_blocks_free(llm)


def test_tool_plans_parse_and_stream():
    """tool_choice checks; "auto" parses Hermes-style <tool_call> blocks from text, and its stream
    sends content until the tag (holding back a tail that may begin it), then the calls at the end."""
    from kvflow.structured.tools import ToolStream, tool_plan
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    with pytest.raises(InvalidRequestError, match="not in tools"):
        tool_plan([weather], {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(InvalidRequestError, match=r"tools\[0\]"):
        tool_plan([{"type": "function"}], "auto")
    assert tool_plan(None, None) is None and tool_plan([weather], None).choice == "auto"

    auto = tool_plan([weather], "auto")
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = auto.parse(text)
    assert content == "Let me look." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})]
    assert auto.parse("just text") == ("just text", [])
    stream = ToolStream(auto)
    sent = [stream.delta(p) for p in ("Let me ", "look.\n<tool", "_call>\n{\"name\": ", text.split("{\"name\": ")[1])]
    assert "".join(d.get("content", "") for d in sent) == "Let me look.\n"
    last, has_calls = stream.finish()
    assert has_calls and last["tool_calls"][0]["function"]["name"] == "get_weather"

    required = tool_plan([weather], "required", parallel_tool_calls=False)
    schema = required.structured_outputs().json
    assert schema["maxItems"] == 1 and schema["items"]["anyOf"][0]["properties"]["name"] == {"enum": ["get_weather"]}
    assert required.parse('[{"name": "get_weather", "arguments": {"city": "Oslo"}}]')[1][0].name == "get_weather"
    assert required.parse('[{"name": "get_wea')[1] == []  # cut by max_tokens: plain text


def test_bench_structured_runs(llms):
    """`kvflow bench structured`'s measurement on the tiny model: both runs do the same token work."""
    from kvflow.bench.structured import format_result, run
    r = run(llms("base"), n=2, max_tokens=12, repeats=1)
    assert r["ended"] + r["cut_by_length"] == 2 and r["valid"] <= r["ended"]
    assert r["output_tokens"] > 0 and "time ratio" in format_result(r)


def test_migrated_request_keeps_its_grammar(llms):
    """A structured request exported mid-way and imported into another engine replays its output
    into a fresh matcher and ends as if it never moved (greedy)."""
    src, dst = llms("base").engine, llms("small").engine
    params = SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=spec("regex"))
    want = llms("base").generate(PROMPTS[1], params).outputs[0].text
    src.add_request("mig", PROMPTS[1], params)
    sent = ""
    for _ in range(3):
        sent += "".join(c.text for o in src.step() for c in o.outputs)
    assert src.parents["mig"].children[0].num_output_tokens == 3  # mid-way: the grammar needs >= 5
    dst.import_request(src.export_request("mig"))
    while dst.has_unfinished_requests():
        sent += "".join(c.text for o in dst.step() for c in o.outputs)
    assert sent == want
    check_valid("regex", sent)
