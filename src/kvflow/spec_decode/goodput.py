"""How many draft tokens each request verifies this step, by expected goodput (SmartSpec).

goodput = expected tokens generated this step / predicted step time. Every draft node a request
could verify has a value: the probability that it ends up on the accepted path (a^d for the d-th
token of a chain with per-token acceptance a; a learned reach rate for a tree node). Nodes are
added best value first, across all requests, and each prefix of that order is priced by the
step-time model with the *marginal* cost of its extra tokens in this step's batch (the batch's other
tokens are paid for anyway). The best prefix wins, but only when its goodput beats no speculation by
more than the model's own prediction error: on a compute-bound batch, where an extra token costs
its full share, that is never, and speculation never loses.

The step-time model is right before it has seen a shape: `seed_shapes` times a few batches at
start-up (tokens in the step x context), and every real step refines it."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from kvflow.model.fused_decode import MAX_ROWS as FUSED_MAX_ROWS


@dataclass
class StepShape:
    """What a step's time depends on, in this engine's kernels' terms."""
    tokens: int  # tokens in the forward pass (linear layers)
    rows: int  # rows sampled (lm head + sampler)
    kv_reads: int = 0  # keys each request reads, summed over requests (memory-bound attention)
    attn_pairs: int = 0  # query x key pairs, with the chunk group's padding (compute-bound attention)


# Knots at the powers of two, and on both sides of the C step's row limit (model/fused_decode.py): a
# step of one token more than it takes runs layer by layer, at a cost well above the line through them.
# Between TILE_ROWS and that limit a knot every TILE_ROWS tokens, and a step is priced at the knot at
# or above it, not on the line: matmuls run in tiles of 16 rows (AMX; oneDNN's blocks alike), so 65
# tokens cost what 80 do (64 decodes took 78 ms, with 10 draft tokens more 100-107 ms, where the line
# from 64 to 128 said 90: drafts in batches of 64 were priced under their cost).
TILE_ROWS = 16
KNOTS = tuple(sorted({1 << i for i in range(15)} | set(range(TILE_ROWS, FUSED_MAX_ROWS + 1, TILE_ROWS))
                     | {FUSED_MAX_ROWS + 1}))
MAX_MARGIN = 0.3
_MAX_PULL = 0.25  # of the knot's value, per observed step


@dataclass
class StepTimeModel:
    """t = f(tokens) + per_row * rows + per_kv * kv_reads + per_pair * attn_pairs, with f piecewise
    linear over KNOTS (linear past the last; stepped in the tiled range, see KNOTS). Seeded by
    `fit_seed`, refined by `observe` (f moves toward each step's residual at its token count, by a
    clipped pull); `relative_error` is the running mean of
    |predicted - measured| / measured over real steps, taken before each refinement."""
    smoothing: float = 0.2
    f: list[float] | None = None
    per_row: float = 0.0
    per_kv: float = 0.0
    per_pair: float = 0.0
    error_sum: float = 0.0
    num_observed: int = 0
    error_ema: float = 0.05
    # knots a real step has moved; the others keep the seed's shape, scaled as their nearest moved knot
    _observed: list[bool] = field(default_factory=lambda: [False] * len(KNOTS))
    _seed_f: list[float] | None = None

    @property
    def ready(self) -> bool:
        return self.f is not None

    @property
    def relative_error(self) -> float | None:
        return self.error_sum / self.num_observed if self.num_observed else None

    # ---- fitting ----
    def fit_seed(self, samples: list[tuple[StepShape, float]]) -> None:
        """Least-effort fit from timed shapes: pairs that differ in one factor give its unit cost,
        the rest is f at the measured token counts (interpolated and extrapolated between)."""
        def find(pred):
            return [(s, t) for s, t in samples if pred(s)]
        def short(s: StepShape) -> bool:  # at most 64 keys before the step's own tokens
            return s.kv_reads - s.tokens <= 64
        small = {s.tokens: (s, t) for s, t in samples if s.rows == s.tokens and short(s)}
        by_rows = [(s, t) for s, t in samples if s.rows == 1 and s.tokens > 1 and short(s)]
        if by_rows and by_rows[0][0].tokens in small:
            s1, t1 = by_rows[0]
            s0, t0 = small[s1.tokens]
            self.per_row = max(0.0, (t0 - t1) / (s0.rows - s1.rows))
        long = find(lambda s: not short(s))
        deltas = []  # (d_kv, d_pairs, d_t) against the short-context shape with the same tokens
        for s, t in long:
            if s.tokens in small:
                s0, t0 = small[s.tokens]
                deltas.append((s.kv_reads - s0.kv_reads, s.attn_pairs - s0.attn_pairs, t - t0))
        if len(deltas) >= 2:
            (k1, p1, t1), (k2, p2, t2) = sorted(deltas, key=lambda d: d[1] / max(1, d[0]))[:: len(deltas) - 1]
            det = k1 * p2 - k2 * p1
            if det:
                self.per_kv = max(0.0, (t1 * p2 - t2 * p1) / det)
                self.per_pair = max(0.0, (t2 - self.per_kv * k2) / p2) if p2 else 0.0
        elif deltas:
            k, p, t = deltas[0]
            self.per_kv = max(0.0, t / (k + p))
        pts = sorted((s.tokens, t - self._extra(s)) for s, t in small.values())
        self.f = [self._interp(pts, x) for x in KNOTS]
        self._seed_f = list(self.f)

    @staticmethod
    def _interp(pts: list[tuple[int, float]], x: float) -> float:
        xs = [p[0] for p in pts]
        i = bisect.bisect_left(xs, x)
        if i < len(xs) and xs[i] == x:
            return pts[i][1]
        if len(pts) == 1:
            return pts[0][1]
        if i == 0:
            (x0, y0), (x1, y1) = pts[0], pts[1]
        elif i == len(pts):
            (x0, y0), (x1, y1) = pts[-2], pts[-1]
        else:
            (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        slope = max(0.0, (y1 - y0) / (x1 - x0))
        return max(0.05 * y0, y0 + slope * (x - x0))

    def _extra(self, s: StepShape) -> float:
        return self.per_row * s.rows + self.per_kv * s.kv_reads + self.per_pair * s.attn_pairs

    @staticmethod
    def _support(n: float) -> list[tuple[int, float]]:
        """The knots that price a step of n tokens, with their weights: the one at or above n in
        the tiled range, else the two around n (the last two past the end, extrapolating)."""
        if TILE_ROWS < n <= FUSED_MAX_ROWS:
            return [(bisect.bisect_left(KNOTS, n), 1.0)]
        n = max(n, KNOTS[0])
        i = min(max(1, bisect.bisect_right(KNOTS, n)), len(KNOTS) - 1)
        w = (n - KNOTS[i - 1]) / (KNOTS[i] - KNOTS[i - 1])
        return [(i - 1, 1 - w), (i, w)]

    def _f(self, n: float) -> float:
        return sum(w * self.f[j] for j, w in self._support(n))

    def predict(self, s: StepShape) -> float | None:
        if self.f is None:
            return None
        return self._f(s.tokens) + self._extra(s)

    def observe(self, s: StepShape, seconds: float) -> None:
        """Record a real step: update the error, then move f's two nearest knots toward it. A knot no
        real step has reached keeps the seed's ratio to its nearest reached knot (the one below, else
        above): the seed was timed at one moment, and on a VM whose speed drifts, a curve corrected only
        where steps land (one token, when drafts do not pay) would price the untried sizes at the seed's
        speed and never try them. The nearest knot, not all of them: a prompt step far away says
        little about what two tokens cost."""
        if seconds <= 0:
            return
        pred = self.predict(s)
        if pred is None:  # never seeded: start from this one step, flat
            self.f = [seconds] * len(KNOTS)
            return
        err = abs(pred - seconds) / seconds
        self.error_sum += err
        self.num_observed += 1
        # the margin follows the usual error, not a VM hiccup's (one 3x step had held it at its cap)
        self.error_ema = 0.9 * self.error_ema + 0.1 * min(err, MAX_MARGIN)
        resid = max(1e-6, seconds - self._extra(s))
        n = min(s.tokens, KNOTS[-1])
        cur = self._f(n)
        # a step's pull is clipped (Huber): one step that a hiccup of the machine made 3x slower had
        # moved its knots 40%, and the drafts priced there went untried until other steps undid it
        pull = max(-_MAX_PULL * cur, min(_MAX_PULL * cur, resid - cur))
        for j, wj in self._support(n):  # (a knot pulled past zero by its neighbour's share stops short)
            self.f[j] = max(0.05 * cur, self.f[j] + self.smoothing * wj * pull)
            self._observed[j] = self._observed[j] or wj > 0
        self._follow_observed()

    def _follow_observed(self) -> None:
        seen = [j for j, o in enumerate(self._observed) if o]
        if self._seed_f is None or not seen:
            return
        for j in range(len(KNOTS)):
            if not self._observed[j]:
                a = max((k for k in seen if k < j), default=min(seen))
                self.f[j] = self._seed_f[j] * self.f[a] / max(self._seed_f[a], 1e-9)

    def min_token_cost(self, tokens: int) -> float:
        """A lower bound on what one more token costs a step of at least `tokens` tokens, on
        average over a tile (a token in a tile already paid for costs only its row): the smallest
        slope of f from there on, plus its row (its keys only add to that)."""
        f = self.f
        slopes = [(f[i] - f[i - 1]) / (KNOTS[i] - KNOTS[i - 1]) for i in range(1, len(KNOTS)) if KNOTS[i] > tokens]
        return self.per_row + min(slopes or [(f[-1] - f[-2]) / (KNOTS[-1] - KNOTS[-2])])

    @property
    def margin(self) -> float:
        """How much better speculation must look than no speculation before it is tried."""
        return max(0.02, min(MAX_MARGIN, 1.5 * self.error_ema))


# ---------------- choosing the drafts ----------------
@dataclass
class StepLayout:
    """A step as the model runner lays it out: single-token decodes (the decode kernel reads each
    one's keys), and multi-token chunks padded to the longest chunk and context (one attention
    call). Speculating moves a decode into the chunk group and makes it longer."""
    decode_tokens: int = 0
    decode_ctx: int = 0
    chunk_count: int = 0
    chunk_tokens: int = 0
    chunk_max_q: int = 0
    chunk_max_ctx: int = 0
    rows: int = 0
    displaceable: int = 0  # prompt tokens of waiting requests that a draft token would push out of the step

    def add_decode(self, ctx: int, rows: int = 1) -> None:
        self.decode_tokens += 1
        self.decode_ctx += ctx
        self.rows += rows

    def add_chunk(self, n: int, ctx: int, rows: int) -> None:
        self.chunk_count += 1
        self.chunk_tokens += n
        self.chunk_max_q = max(self.chunk_max_q, n)
        self.chunk_max_ctx = max(self.chunk_max_ctx, ctx)
        self.rows += rows

    def shape(self) -> StepShape:
        return StepShape(self.decode_tokens + self.chunk_tokens, self.rows,
                         self.decode_ctx + self.chunk_count * self.chunk_max_ctx,
                         self.decode_ctx + self.chunk_count * self.chunk_max_q * self.chunk_max_ctx)


@dataclass
class Candidate:
    """One decoding request's offer: node values best first (parents before children, so each
    value is at most its parent's), and its context length (tokens before the next one)."""
    values: list[float]
    context: int


@dataclass
class Choice:
    counts: list[int]  # nodes per candidate
    expected_tokens: float
    predicted_s: float | None
    base_goodput: float | None  # expected tokens / s without drafts
    goodput: float | None


def choose_counts(cands: list[Candidate], base: StepLayout, model: StepTimeModel,
                  margin: float | None = None) -> Choice:
    """Per request, how many of its nodes to verify this step. `base` is the step without drafts
    (every candidate's one decode token and any prompt chunks). Nodes are taken best value first
    across requests; each prefix is priced by the step-time model in this batch's layout, so an
    added node costs what it adds to *this* step (its token, row, keys, and the chunk group's
    padding), not the average. The best prefix is kept only if it beats no drafts by the margin.
    Goodput counts prompt tokens as work done, and a draft scheduled into a full token budget pushes
    a waiting prompt's token out of the step (`base.displaceable`): it costs that token, so under a
    queue of prompts drafts never pay (64 grounded prompts read 0.89x of no speculation with drafts
    priced as extra tokens there, 0.94x priced so)."""
    n = len(cands)
    # Useful work without drafts: each decoding request's next token, and every prompt token the
    # step computes (drafts that slow prefill down must pay for that too).
    base_tokens = float(n + base.chunk_tokens)
    t0 = model.predict(base.shape())
    if t0 is None:  # nothing known at all: verify everything once; the step gets measured
        full = [len(c.values) for c in cands]
        return Choice(full, base_tokens + sum(sum(c.values) for c in cands), None, None, None)
    margin = model.margin if margin is None else margin
    g0 = base_tokens / t0
    # A node whose value is below g0 x (the least one more token can cost) lowers the ratio of any
    # prefix it joins, and so do all after it (values only fall): such nodes are never priced. On a
    # batch where drafts do not pay, that is most of them (pricing them had cost 4% of a batch-16 step).
    # In the tiled range a token can cost only its row, in the tile the nodes before it opened: so
    # below the cutoff, the best TILE_ROWS - 1 nodes worth more than a row are still priced.
    cutoff = max(0.005, g0 * model.min_token_cost(base.shape().tokens))
    floor = max(0.005, g0 * model.per_row)
    order = sorted(((v, i) for i, c in enumerate(cands) for v in c.values if v > floor), key=lambda x: -x[0])
    paying = bisect.bisect_left([-v for v, _ in order], -cutoff)  # the nodes above the cutoff come first
    order = order[:paying + TILE_ROWS - 1]
    best_ratio, best_upto, best_t = g0, 0, t0
    lay = StepLayout(**vars(base))
    chosen = [0] * n
    expected = base_tokens
    for step, (v, i) in enumerate(order, 1):
        ctx = cands[i].context
        if chosen[i] == 0:  # leaves the decode group: its root becomes a chunk's first token
            lay.decode_tokens -= 1
            lay.decode_ctx -= ctx + 1
            lay.chunk_count += 1
            lay.chunk_tokens += 1
        chosen[i] += 1
        lay.rows += 1
        if lay.displaceable:  # the token budget is full: the draft takes a waiting prompt token's place
            lay.displaceable -= 1
            expected -= 1.0
        else:
            lay.chunk_tokens += 1
        lay.chunk_max_q = max(lay.chunk_max_q, chosen[i] + 1)
        lay.chunk_max_ctx = max(lay.chunk_max_ctx, ctx + chosen[i] + 1)
        expected += v
        t = model.predict(lay.shape())
        if expected / t > best_ratio:
            best_ratio, best_upto, best_t = expected / t, step, t
    counts = [0] * n
    if best_ratio < g0 * (1 + margin):
        return Choice(counts, base_tokens, t0, g0, g0)
    for _, i in order[:best_upto]:
        counts[i] += 1
    return Choice(counts, best_ratio * best_t, best_t, g0, best_ratio)


def chain_values(acceptance: float, k: int) -> list[float]:
    """Reach probability of each token of a chain whose tokens are accepted with this probability each."""
    return [acceptance ** d for d in range(1, k + 1)]


def expected_tokens(acceptance: float, k: int) -> float:
    """1 (the bonus token) plus the expected accepted drafts out of k."""
    return 1.0 + sum(chain_values(acceptance, k))
