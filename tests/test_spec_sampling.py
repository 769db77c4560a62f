"""Speculative sampling preserves the target distribution.

1. `rejection_sample` (drafts drawn from q, Leviathan et al.'s rule) on fixed p and q over a small
   vocabulary: the first output token follows p[0], the token after an accepted draft follows p[1],
   the bonus token after K accepted drafts follows p[K] (chi-square goodness of fit). Naive rules
   (always accept; resample from p instead of the residual) fail the same test, so it has power.
2. End to end with temperature 1: the engine verifies a fixed, deterministic draft for the second
   token of 400 seeded requests; the joint distribution of the first two tokens, and the third
   token's distribution given the first two (the bonus row after an accepted draft, a fresh draw
   after a rejected one), match the model's own probabilities, computed exactly from its logprobs.
   The same check passes without speculation (so the expected tables are right). Since accepted
   tokens are the target's own draws, a wrong rule shows in the rows after a draft: e.g. keeping
   the bonus row after a rejected draft gives a third token conditioned on the wrong second one.

scipy is not needed: the statistic is computed here and compared with the Wilson-Hilferty
approximation of the chi-square quantile at alpha = 0.001. Every draw is seeded, so each test
gives the same answer on every run."""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from kvflow import SamplingParams
from kvflow.spec_decode.verifier import rejection_sample

Z_999 = 3.090232  # standard normal quantile at 0.999


def chi2_critical(df: int, z: float = Z_999) -> float:
    """Wilson-Hilferty: the chi-square quantile whose normal-score is z (within ~1% for df >= 2)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def chi2_stat(observed: dict, expected: dict, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom; cells expected below min_expected are pooled."""
    obs_extra = sum(v for k, v in observed.items() if k not in expected)
    assert obs_extra == 0, f"outcomes with zero probability were observed: {[k for k in observed if k not in expected]}"
    cells, pool_o, pool_e = [], 0.0, 0.0
    for k, e in expected.items():
        if e < min_expected:
            pool_o += observed.get(k, 0)
            pool_e += e
        else:
            cells.append((observed.get(k, 0), e))
    if pool_e > 0:
        cells.append((pool_o, pool_e))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    return stat, len(cells) - 1


def assert_fits(observed: Counter, probs: dict, what: str) -> None:
    n = sum(observed.values())
    assert n > 0, what
    expected = {k: n * p for k, p in probs.items() if p > 0}
    stat, df = chi2_stat(observed, expected)
    assert df >= 1, what
    crit = chi2_critical(df)
    assert stat < crit, (f"{what}: chi-square {stat:.1f} > {crit:.1f} (df {df}, n {n}); "
                         f"observed {dict(sorted(observed.items()))}, expected {dict(sorted((k, round(v, 1)) for k, v in expected.items()))}")


def assert_conditionals_fit(groups: dict, probs: dict, what: str, min_n: int = 10) -> None:
    """Each group's outcomes against its own distribution; the statistics and degrees of freedom
    of all groups with at least min_n samples are summed into one test."""
    total, dfs, used = 0.0, 0, 0
    for key, observed in groups.items():
        n = sum(observed.values())
        if n < min_n:
            continue
        expected = {k: n * p for k, p in probs[key].items() if p > 0}
        stat, df = chi2_stat(observed, expected)
        if df >= 1:
            total, dfs, used = total + stat, dfs + df, used + 1
    assert dfs >= 1, f"{what}: no group with {min_n} samples"
    crit = chi2_critical(dfs)
    assert total < crit, f"{what}: chi-square {total:.1f} > {crit:.1f} (df {dfs} over {used} groups)"


def test_chi2_critical_values():
    # Table values at alpha = 0.001: df 1 -> 10.83 (WH is worst there), 4 -> 18.47, 8 -> 26.12, 20 -> 45.31.
    for df, table in ((4, 18.47), (8, 26.12), (20, 45.31)):
        assert abs(chi2_critical(df) - table) / table < 0.02


# ---------------- rejection_sample ----------------
V = 6
P = torch.tensor([[0.30, 0.25, 0.20, 0.15, 0.10, 0.00],
                  [0.05, 0.05, 0.10, 0.20, 0.25, 0.35],
                  [0.50, 0.10, 0.10, 0.10, 0.10, 0.10]], dtype=torch.float64)
Q = torch.tensor([[0.10, 0.40, 0.05, 0.05, 0.10, 0.30],  # mass where p has none (token 5)
                  [0.30, 0.00, 0.20, 0.20, 0.20, 0.10]], dtype=torch.float64)  # none where p has some


def _run(sampler, n: int = 12000, seed: int = 0) -> tuple[Counter, Counter, Counter, Counter]:
    g = torch.Generator().manual_seed(seed)
    first, second, bonus, lengths = Counter(), Counter(), Counter(), Counter()
    for _ in range(n):
        drafts = torch.stack([torch.multinomial(Q[i], 1, generator=g)[0] for i in range(Q.shape[0])])
        out = sampler(P, Q, drafts, g)
        assert 1 <= len(out) <= Q.shape[0] + 1
        assert out[:-1] == drafts[:len(out) - 1].tolist(), "every token but the last must be an accepted draft"
        lengths[len(out)] += 1
        first[out[0]] += 1
        if len(out) >= 2:
            second[out[1]] += 1
        if len(out) == 3:
            bonus[out[2]] += 1
    return first, second, bonus, lengths


def _dist(row: torch.Tensor) -> dict:
    return {i: float(p) for i, p in enumerate(row.tolist())}


def test_rejection_sample_preserves_target_distribution():
    first, second, bonus, lengths = _run(rejection_sample)
    assert_fits(first, _dist(P[0]), "first token")
    assert_fits(second, _dist(P[1]), "token after an accepted draft")
    assert_fits(bonus, _dist(P[2]), "bonus token after every draft was accepted")
    # Acceptance of the first draft: sum_x min(p, q).
    n = sum(lengths.values())
    beta = float(torch.minimum(P[0], Q[0]).sum())
    accepted = (lengths[2] + lengths[3]) / n
    assert abs(accepted - beta) < 4 * math.sqrt(beta * (1 - beta) / n), (accepted, beta)


def test_rejection_sample_identical_p_q_accepts_everything():
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]], dtype=torch.float64)
    for _ in range(200):
        d = torch.stack([torch.multinomial(p[i], 1, generator=g)[0] for i in range(2)])
        out = rejection_sample(p, p[:2], d, g)
        assert len(out) == 3 and out[:2] == d.tolist()


def _always_accept(p, q, drafts, g):
    return drafts.tolist() + [int(torch.multinomial(p[len(drafts)], 1, generator=g))]


def _resample_from_p(p, q, drafts, g):
    out = []
    for i, d in enumerate(drafts.tolist()):
        if torch.rand((), generator=g) < (p[i, d] / q[i, d]).clamp(max=1.0):
            out.append(d)
            continue
        out.append(int(torch.multinomial(p[i], 1, generator=g)))
        return out
    out.append(int(torch.multinomial(p[len(out)], 1, generator=g)))
    return out


@pytest.mark.parametrize("wrong", [_always_accept, _resample_from_p], ids=["always_accept", "resample_from_p"])
def test_the_test_rejects_wrong_samplers(wrong):
    first, _, _, _ = _run(wrong, n=4000)
    with pytest.raises(AssertionError, match="chi-square|zero probability"):
        assert_fits(first, _dist(P[0]), "first token")


# ---------------- end to end, temperature 1 ----------------
PROMPT = "My favourite colour is"
N_SEEDS = 400
TOP_K = 3


class FixedDraft:
    """Proposes the same token for the second output position of every request."""

    def __init__(self, token: int):
        self.token = token

    def propose(self, requests, k: int) -> list[list[int]]:
        return [[self.token] * k if r.num_output_tokens == 1 else [] for r in requests]


def _topk_probs(llm, ids: list[int]) -> dict[int, float]:
    """The sampling distribution at temperature 1, top_k 3, after `ids`, from raw logprobs."""
    out = llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=1, logprobs=TOP_K))
    entry = out.outputs[0].logprobs[0]
    top = sorted(entry.items(), key=lambda kv: kv[1].rank)[:TOP_K]
    z = sum(math.exp(v.logprob) for _, v in top)
    return {t: math.exp(v.logprob) / z for t, v in top}


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    """Engines on the tiny random-weight model, one per set of options: the distributions are the
    point, not the weights, and 400 seeded requests per check cost a fraction of the real model."""
    from kvflow import LLM
    engines: dict = {}

    def get(**options):
        key = json.dumps(options, sort_keys=True)
        if key not in engines:
            engines[key] = LLM(model=tiny_model_dir, dtype="float32", num_gpu_blocks=128, **options)
        return engines[key]
    return get


@pytest.fixture(scope="module")
def expected(tiny_llm):
    """Exact probabilities of (t1, t2), and of t3 given each (t1, t2)."""
    llm = tiny_llm()
    ids = llm.get_tokenizer().encode(PROMPT)
    p1 = _topk_probs(llm, ids)
    joint, cond, p3 = {}, {}, {}
    for t1, a in p1.items():
        cond[t1] = _topk_probs(llm, ids + [t1])
        for t2, b in cond[t1].items():
            joint[(t1, t2)] = a * b
            p3[(t1, t2)] = _topk_probs(llm, ids + [t1, t2])
    mode = max(p1, key=p1.get)
    draft = max(cond[mode], key=cond[mode].get)  # accepted about p(draft) of the time, rejected otherwise
    return dict(ids=ids, joint=joint, mode=mode, draft=draft, p3=p3, p1=p1)


def _sample(llm, ids) -> list[list[int]]:
    params = [SamplingParams(temperature=1.0, top_k=TOP_K, seed=s, max_tokens=3, ignore_eos=True)
              for s in range(N_SEEDS)]
    outs = llm.generate([ids] * N_SEEDS, params)
    return [list(o.outputs[0].token_ids) for o in outs]


def _check(samples, exp, what: str) -> None:
    assert all(len(s) == 3 for s in samples)
    assert_fits(Counter((s[0], s[1]) for s in samples), exp["joint"], f"{what}: (t1, t2)")
    groups: dict = {}
    for s in samples:
        groups.setdefault((s[0], s[1]), Counter())[s[2]] += 1
    assert_conditionals_fit(groups, exp["p3"], f"{what}: t3 given (t1, t2)")


def test_engine_sampling_without_speculation_matches_exact_probabilities(tiny_llm, expected):
    """The reference check itself: plain sampling fits the exact table."""
    llm = tiny_llm()
    assert max(expected["p1"].values()) < 0.95, f"{PROMPT!r} is nearly deterministic: {expected['p1']}"
    _check(_sample(llm, expected["ids"]), expected, "no speculation")


def test_engine_speculative_sampling_preserves_distribution(tiny_llm, expected, monkeypatch):
    """The second token of every request is verified against one fixed draft; its distribution
    (and the bonus token's after an accepted draft) is the model's, not pulled toward the draft."""
    llm = tiny_llm(speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    spec = llm.engine.speculator
    monkeypatch.setattr(spec, "proposer", FixedDraft(expected["draft"]))
    d0, a0 = spec.stats.num_drafts, spec.stats.num_accepted
    samples = _sample(llm, expected["ids"])
    drafted, accepted = spec.stats.num_drafts - d0, spec.stats.num_accepted - a0
    assert drafted >= N_SEEDS * 0.9, f"only {drafted} drafts were verified"
    assert 0 < accepted < drafted
    _check(samples, expected, "ngram speculation with a fixed draft")
    # The draft is accepted exactly when the target's own draw equals it.
    p_draft = sum(expected["joint"].get((t1, expected["draft"]), 0.0) for t1 in expected["p1"])
    rate = accepted / drafted
    assert abs(rate - p_draft) < 4 * math.sqrt(p_draft * (1 - p_draft) / drafted) + 0.02, (rate, p_draft)


class FixedTree:
    """For the second output position: a tree of the two likeliest second tokens as siblings,
    each with a child (the mode's likeliest third token), verified in one pass."""

    def __init__(self, first: int, second: int, third: int):
        self.tokens = [first, second, third, third]

    def propose(self, requests, k: int):
        from kvflow.core.spec_tree import DraftTree
        from kvflow.spec_decode.acceptance import TreeProposal
        empty = TreeProposal(DraftTree([], []), [], [])
        a, b, c, _ = self.tokens
        tree = TreeProposal(DraftTree([a, b, c, c], [-1, -1, 0, 1]), [0, 1, 2, 3], [0.5] * 4)
        return [tree if r.num_output_tokens == 1 else empty for r in requests]


def test_engine_tree_verification_preserves_distribution(tiny_llm, expected, monkeypatch):
    """Sampled verification of a tree (the target's draw at each node decides which child, if any,
    is followed): the joint of (t1, t2) and t3 given (t1, t2) are the model's."""
    llm = tiny_llm(speculative_config={"method": "recycle", "num_speculative_tokens": 4})
    spec = llm.engine.speculator
    mode = expected["mode"]
    seconds = sorted(expected["joint"], key=lambda k: -expected["joint"][k])
    second = [t2 for t1, t2 in seconds if t1 == mode][:2]
    third = max(expected["p3"][(mode, second[0])], key=expected["p3"][(mode, second[0])].get)
    monkeypatch.setattr(spec, "proposer", FixedTree(second[0], second[1], third))
    d0, a0, t0 = spec.stats.num_drafts, spec.stats.num_accepted, spec.stats.num_trees
    samples = _sample(llm, expected["ids"])
    assert spec.stats.num_trees - t0 >= N_SEEDS * 0.9
    assert 0 < spec.stats.num_accepted - a0 < spec.stats.num_drafts - d0
    _check(samples, expected, "tree verification")
