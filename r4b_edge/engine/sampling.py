"""Token sampling on numpy logits: greedy, temperature, top-k, top-p, seeded.

Built for R-4B's vocabulary (151,936) the way fast engines do it: candidates
are filtered before anything is sorted or exponentiated, the full vocabulary
is touched only by a few vectorised float32 passes (max, one compare), and
the draw is an inverse CDF over the few candidates.

- top-k (with or without top-p): the k largest logits are found among the
  tokens within a margin of the maximum (grown until at least k are in it),
  so only that head is partitioned; top-p then runs over the k survivors.
- top-p alone: the head ``x >= max - T * nucleus_nats`` is exponentiated and
  sorted; the rest's mass is bounded within ~6% without any exp (`_rest_mass`:
  a float32 multiply-add and an int cast give the chord of 2**u between
  integers), and the nucleus boundary is computed for the smallest and the
  largest total mass those bounds allow. When both agree the nucleus is exact.
  When the nucleus surely reaches past the head into the bulk, a draw (not
  `candidates`) needs the bulk only if it lands there: the head is drawn with
  probability H / N_hi (H its mass, N_hi a bound on the nucleus mass, so at
  most the head's true share), in proportion to its weights; otherwise the exact
  nucleus is built and drawn from what is left (head w / N - w / N_hi, bulk
  w / N), which adds up to the same distribution. Otherwise (the rest's
  uncertainty straddles a cumulative sum of the head) the whole vocabulary is
  exponentiated and summed once.
- temperature alone: exact rejection sampling. The proposal is the head's
  true weights plus a flat envelope ``exp(-tail_nats)`` over every tail token
  (each tail weight is below it); a tail proposal is accepted with
  probability ``w / envelope``. With the default margin the envelope's mass is
  at most ~0.02 of the maximum's weight, so a draw almost never repeats.

Every path draws from the same distribution as the textbook sampler
(softmax of logits / T, top-k mask, then the smallest top-p prefix of the
sorted probabilities, ties broken by lower token id); tests check it with a
chi-square test against a plain float64 reference. One seeded
`numpy.random.Generator` per reply makes the draws reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..errors import GenerationOptionError

DEFAULT_TAIL_NATS = 17.0  # head margin in units of T: exp(-17) * 151,936 = 0.006 of the max's weight
DEFAULT_NUCLEUS_NATS = 10.0  # top-p alone: the head exponentiated exactly (the rest is bounded)
_CHORD = 1.0615  # >= max over f in [0, 1) of (1 + f) / 2**f = 1.061476 (at f = 1/ln 2 - 1)


@dataclass(frozen=True)
class SamplingParams:
    """temperature <= 0 means greedy; top_k 0 and top_p 1.0 disable the filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise GenerationOptionError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise GenerationOptionError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GenerationOptionError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise GenerationOptionError(f"seed must be a non-negative integer, got {self.seed!r}")
        return self


def logsumexp(logits: np.ndarray) -> np.ndarray | float:
    """log(sum(exp(logits))) over the last axis, computed once per row in
    float32 passes with a float64 sum (no float64 copy of the row).
    ``logits[..., i] - logsumexp(logits)`` is token i's log-probability."""
    x = np.asarray(logits)
    m = x.max(axis=-1, keepdims=True)
    s = np.exp(x - m).sum(axis=-1, dtype=np.float64)
    out = np.log(s) + m[..., 0].astype(np.float64)
    return float(out) if out.ndim == 0 else out


def token_logprobs(logits: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """Log-probabilities (float64) of ``token_ids[i]`` under ``logits[i]`` (rows [n, vocab])."""
    rows = np.asarray(logits)
    ids = np.asarray(token_ids, dtype=np.int64)
    return rows[np.arange(len(ids)), ids].astype(np.float64) - logsumexp(rows)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis (float64 result)."""
    x = np.asarray(logits)
    return x.astype(np.float64) - np.asarray(logsumexp(x))[..., None]


def _nucleus_len(cum: np.ndarray, target: float) -> int:
    """Smallest prefix of the sorted weights whose cumulative mass reaches `target`."""
    return min(int(np.searchsorted(cum, target, side="left")) + 1, len(cum))


def _finite_max(x: np.ndarray) -> float:
    m = float(x.max())
    if not math.isfinite(m):
        raise GenerationOptionError(f"cannot sample from logits whose maximum is {m} "
                                    f"({int(np.isnan(x).sum())} NaN of {x.size})")
    return m


def _nucleus_of(ids: np.ndarray, w: np.ndarray, target: float) -> tuple[np.ndarray, np.ndarray]:
    """The nucleus among candidates `ids` (ascending) with float32 weights `w`: the smallest
    set of largest weights (ties by lower id) whose mass reaches `target`. Only the values
    are sorted (no argsort): the boundary value b and how many of its ties are needed give
    the set, every weight above b and the first of those equal to b. Returns ids and float64
    weights (the ones above b in id order, then b's ties)."""
    vals = np.sort(w)[::-1]
    k = _nucleus_len(np.cumsum(vals, dtype=np.float64), target)
    b = vals[k - 1]
    above = w > b
    ties = np.flatnonzero(w == b)[: k - int(np.count_nonzero(above))]
    return (np.concatenate([ids[above], ids[ties]]),
            np.concatenate([w[above], w[ties]]).astype(np.float64))


def _rest_mass(x: np.ndarray, m: float, t: float, head: np.ndarray, fbuf: np.ndarray,
               zeros: np.ndarray) -> tuple[float, float]:
    """Bounds (lo, hi) on sum(exp((x - m) / t)) over the tokens not in `head`, without exp:
    z = 2**23 * (u + 127), u = (x - m) / (t ln 2), cast to int32 and read back as float32
    is 2**floor(u) * (1 + frac(u)): the chord of 2**u between integers, which lies between
    2**u and 1.0615 * 2**u (2**u is convex). Five fast vectorised passes (multiply, add,
    clamp, cast in place, float32 sum) instead of exp's one slow one. `fbuf` (float32) and
    `zeros`: buffers of x's size.

    Rounding: the float32 multiply-add moves z by at most `err` (three roundings of values
    <= (|m| + 89 t) s + 2**31 for every token with u >= -128, the scale's own rounding, which
    moves u by <= 127 * 2**-24, and the cast's floor), so each value is off by a factor
    exp(err / 2**23) at most; tokens with u < -126 (float32 denormals or below, clamped to
    0) are each off by less than 2**-126; the float32 sum is off by at most (n - 1) 2**-24 of
    itself whatever the summation order. All three enter the bounds. Where float32 cannot
    hold the scale (|m| / t beyond ~1e6) the bounds are (0, inf)."""
    n = x.shape[-1]
    s = np.float32(min(2.0 ** 23 / (t * math.log(2.0)), 1e38))
    c = 127.0 * 2 ** 23 - m * float(s)
    if not abs(c) < 1e38:
        return 0.0, math.inf
    np.multiply(x, s, out=fbuf)
    np.add(fbuf, np.float32(c), out=fbuf)
    np.maximum(fbuf, zeros, out=fbuf)  # -inf and u < -127 -> 0 (an array operand: the SIMD loop)
    ibuf = fbuf.view(np.int32)
    np.copyto(ibuf, fbuf, casting="unsafe")  # in place; 0 <= z <= 2**30 + err: in range, truncation = floor
    ibuf[head] = 0
    total = float(fbuf.sum())  # the chords; float32, any order: off by <= (n - 1) 2**-24 of it
    g = (n - 1) * 2.0 ** -24 / (1.0 - (n - 1) * 2.0 ** -24)
    err = 2.0 ** -24 * ((abs(m) + 89.0 * t) * float(s) + abs(c) + 2.0 ** 31) + 64.0 + 2.0  # in units of z
    if not err < 2.0 ** 20:  # |m| / t beyond ~1e6: float32 cannot place u; no bound
        return 0.0, math.inf
    f = math.exp(err / 2 ** 23)  # >= 1 + |du|: the chord's slope is at most its value
    tiny = n * 2.0 ** -126
    return max(0.0, total * (1.0 - g) / (f * _CHORD) - tiny), total * (1.0 + g) * f + tiny


def _sorted_prefix(ids: np.ndarray, w: np.ndarray, total: float, lo: float,
                   hi: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The smallest prefix of `ids` sorted by decreasing weight `w` (ties by id) whose mass
    reaches `lo`, if it is also the one that reaches `hi` (the total mass is only known to lie
    in an interval) and lies within `ids` (hi <= total); else None. Sorts the largest weights
    64, 512, ... at a time, so a small nucleus in a large head costs one partition."""
    if hi > total:
        return None
    size = 64
    while True:
        if size >= len(w):
            sel = np.arange(len(w))
        else:  # the `size` largest, plus any tied with the smallest of them
            kth = np.partition(w, len(w) - size)[len(w) - size]
            sel = np.flatnonzero(w >= kth)
        sel = sel[np.lexsort((ids[sel], -w[sel]))]
        cum = np.cumsum(w[sel], dtype=np.float64)
        if cum[-1] >= hi or len(sel) == len(w):
            break
        size *= 8
    k = _nucleus_len(cum, lo)
    if k != _nucleus_len(cum, hi):
        return None
    return ids[sel[:k]], w[sel[:k]].astype(np.float64)


class PastHead(NamedTuple):
    """A top-p nucleus that surely reaches past the head: the head's ids, float32 weights and
    mass, the weight every other token is below, and an upper bound on the others' mass."""

    head: np.ndarray
    w: np.ndarray
    mass: float
    w_thr: float
    rest_hi: float


class Sampler:
    """Draws token ids from logits with one seeded generator per reply."""

    def __init__(self, params: SamplingParams, tail_nats: float = DEFAULT_TAIL_NATS,
                 nucleus_nats: float = DEFAULT_NUCLEUS_NATS):
        self.params = params.validate()
        self.rng = np.random.default_rng(params.seed)
        for name, v in (("tail_nats", tail_nats), ("nucleus_nats", nucleus_nats)):
            if not v > 0:
                raise GenerationOptionError(f"{name} must be > 0, got {v}")
        self.tail_nats = float(tail_nats)
        self.nucleus_nats = float(nucleus_nats)
        self.rest_bound_draws = 0  # top-p-only draws settled thanks to `_rest_mass`'s bounds
        self._zeros: np.ndarray | None = None
        self.exact_tail_sums = 0  # top-p draws that needed the exact tail mass (benchmarks read it)
        self.dense_draws = 0  # temperature-only draws over the whole vocabulary (flat logits)
        self.head_branch_draws = 0  # top-p draws past the head settled without the bulk (`_draw_top_p`)
        self._buf: np.ndarray | None = None
        self._greedy = self.params.temperature <= 0.0

    @property
    def greedy(self) -> bool:
        return self.params.temperature <= 0.0

    def __call__(self, logits: np.ndarray) -> int:
        if self._greedy:
            return int(logits.argmax()) if isinstance(logits, np.ndarray) else int(np.argmax(logits))
        p = self.params
        x = logits if logits.dtype == np.float32 else np.asarray(logits, dtype=np.float32)
        if p.top_k and p.top_k < x.shape[-1]:
            return self._draw_from(*self.candidates(x))
        if p.top_p < 1.0:
            return self._draw_top_p(x)
        return self._draw_full(x)

    def _draw_from(self, ids: np.ndarray, w: np.ndarray) -> int:
        """Inverse CDF over candidates `ids` with unnormalised weights `w`."""
        cum = np.cumsum(w, dtype=np.float64)
        i = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
        return int(ids[min(i, len(ids) - 1)])

    def _draw_top_p(self, x: np.ndarray) -> int:
        """One top-p draw (no top-k): `_nucleus`'s exact set where its bounds settle it, else,
        when the nucleus surely reaches past the head, the two-branch draw of the module
        docstring, which builds the exact nucleus only when the draw lands outside the head."""
        t = self.params.temperature if self.params.temperature > 0 else 1.0
        top_p = self.params.top_p
        m = _finite_max(x)
        past = self._nucleus(x, m, t, top_p, settle_past_head=False)
        if not isinstance(past, PastHead):
            return self._draw_from(*past)
        head, w, mass, w_thr, rest_hi = past
        n_hi = top_p * (mass + rest_hi) + w_thr  # the nucleus mass N < top_p * total + its last weight
        if self.rng.random() * n_hi < mass:  # probability H / N_hi <= H / N: a head token
            self.head_branch_draws += 1
            return self._draw_from(head, w)
        ids, wn = self._dense_nucleus(x, m, t, top_p, above=(w_thr, mass))
        resid = wn / float(wn.sum())
        pos = np.minimum(np.searchsorted(head, ids), len(head) - 1)  # head is ascending
        in_head = head[pos] == ids
        resid[in_head] = np.maximum(resid[in_head] - wn[in_head] / n_hi, 0.0)
        return self._draw_from(ids, resid)

    # ---- candidates (top-k / top-p) --------------------------------------------------------------
    @staticmethod
    def _head(x: np.ndarray, m: float, margin: float) -> tuple[np.ndarray, float]:
        """Ids of the logits >= m - margin (ascending) and that threshold as compared (float32)."""
        thr = np.float32(m - margin)
        return np.flatnonzero(x >= thr), float(thr)

    def _top_k_ids(self, x: np.ndarray, m: float, k: int) -> np.ndarray:
        """Ids of every logit >= the k-th largest (ties at the k-th kept, as a mask would).
        A first threshold comes from a strided 1/64 sample (its (k//64 + 3)-th largest: about
        64x that many tokens pass it), so one compare pass usually finds a small superset."""
        sub = x[::64]
        j = min(len(sub), k // 64 + 3)
        guess = np.partition(sub, len(sub) - j)[len(sub) - j]
        head = np.flatnonzero(x >= guess)
        if len(head) >= k and len(head) <= max(64 * k, 4096):
            vals = x[head]
            kth = np.partition(vals, len(vals) - k)[len(vals) - k]
            return head[vals >= kth]
        margin = 4.0
        while True:  # widen slowly: one jump too many takes the whole bulk of the vocabulary
            head, _ = self._head(x, m, margin)
            if len(head) >= k or not math.isfinite(margin):
                break
            margin = margin * 2.0 if margin < 1e6 else math.inf
        if len(head) < k:  # -inf logits: fewer than k finite tokens
            head = np.flatnonzero(x > -np.inf)
            if len(head) <= k:
                return head
        vals = x[head]
        kth = np.partition(vals, len(vals) - k)[len(vals) - k]
        return head[vals >= kth]

    def candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The filtered distribution after top-k then top-p: token ids and their
        unnormalised weights (float64). Sorted by decreasing weight (ties by id), except
        for top-p-only logits whose nucleus reaches into the bulk (`_nucleus_of`: above the boundary in id order)."""
        p = self.params
        x = np.asarray(logits, dtype=np.float32)
        t = p.temperature if p.temperature > 0 else 1.0
        m = _finite_max(x)
        if p.top_k and p.top_k < x.shape[-1]:
            ids = self._top_k_ids(x, m, p.top_k)
            w = np.exp((x[ids].astype(np.float64) - m) / t)
            order = np.lexsort((ids, -w))
            ids, w = ids[order], w[order]
            if p.top_p < 1.0:
                cum = np.cumsum(w)
                ids, w = ids[:_nucleus_len(cum, p.top_p * cum[-1])], w[:_nucleus_len(cum, p.top_p * cum[-1])]
            return ids, w
        return self._nucleus(x, m, t, p.top_p)

    def _nucleus(self, x: np.ndarray, m: float, t: float, top_p: float,
                 settle_past_head: bool = True) -> "tuple[np.ndarray, np.ndarray] | PastHead":
        """top-p over the whole vocabulary. The head is exponentiated in float32 and its
        largest weights sorted; every other weight is below the head's threshold. The rest's
        total mass is bounded, first for free (each weight below the threshold's), then
        within ~6% by `_rest_mass`; if the nucleus is the same for every total the bounds
        allow, it is exact. Otherwise (the boundary depends on the rest's mass, or lies in
        it), or when the head is a large part of the vocabulary, the whole vocabulary is
        exponentiated and summed once (`_dense_nucleus`).

        The head is the tokens within `tail_nats` T of the max when a 1/1024 strided sample
        says they are few (~1,000 or fewer; the free bound is then tight), else within
        `nucleus_nats` T. With `settle_past_head` False, a nucleus that surely reaches past the
        head is returned as `PastHead` (for `_draw_top_p`) instead of being built."""
        n = x.shape[-1]
        nats = self.tail_nats
        thr = np.float32(m - t * nats)
        if n >= 4096 and int(np.count_nonzero(x[::1024] >= thr)) > 1:  # a sample on 1/64 of the cache lines
            nats = min(nats, self.nucleus_nats)
        head, thr_f = self._head(x, m, t * nats)
        if len(head) <= n // 8:
            w = self._weights(x[head], m, t)
            total = float(w.sum(dtype=np.float64))
            tail_max = (n - len(head)) * math.exp((thr_f - m) / t)
            got = _sorted_prefix(head, w, total, top_p * total, top_p * (total + tail_max))
            if got is None:
                lo, hi = _rest_mass(x, m, t, head, self._float_buf(x), self._zeros_like(x))
                got = _sorted_prefix(head, w, total, top_p * (total + lo), top_p * (total + hi))
                self.rest_bound_draws += got is not None
                if got is None and top_p * (total + lo) > total:  # the nucleus surely reaches past the head
                    if not settle_past_head and math.isfinite(hi):
                        return PastHead(head, w, total, math.exp((thr_f - m) / t), hi)
                    return self._dense_nucleus(x, m, t, top_p, above=(math.exp((thr_f - m) / t), total))
            if got is not None:
                return got
        return self._dense_nucleus(x, m, t, top_p)

    def _dense_nucleus(self, x: np.ndarray, m: float, t: float, top_p: float,
                       above: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The nucleus from every weight: exponentiate and sum the whole vocabulary, take
        the tokens above a threshold whose mass reaches the target (1e-3 of the max's
        weight, else one a strided sample says is enough, lowered until it is), and find
        the boundary among those (`_sorted_prefix` when they are few, else `_nucleus_of`).
        `above`: (weight, mass) when the nucleus is known to reach below that weight and
        the tokens above it are known to weigh that much: the first threshold is skipped."""
        self.exact_tail_sums += 1
        w_all = self._dense(x, m, t)
        target = top_p * float(w_all.sum(dtype=np.float64))
        ids = w = None
        if above is None:
            tau = 1e-3  # of the max's weight
            ids = np.flatnonzero(w_all >= np.float32(tau))
            w = w_all[ids]
            mass = float(w.sum(dtype=np.float64))
        else:
            tau, mass = above
        if ids is None or mass < target:  # the boundary is lower: a threshold from a 1/16 strided sample
            sample = w_all[::16]
            below = np.sort(sample[sample < np.float32(tau)])[::-1]
            est = mass + 16.0 * np.cumsum(below, dtype=np.float64)
            j = int(np.searchsorted(est, target + 0.25 * (target - mass)))
            tau = float(below[j]) if j < len(below) else 0.0
            while True:  # all tokens >= tau: a prefix of the sorted order, so the nucleus is one of its prefixes
                ids = np.flatnonzero(w_all >= np.float32(tau)) if tau > 0 else np.arange(len(w_all))
                w = w_all[ids]
                mass = float(w.sum(dtype=np.float64))
                if mass >= target or tau <= 0:
                    break
                tau = tau / 4.0 if tau > 1e-30 else 0.0
        if len(ids) <= 512:
            got = _sorted_prefix(ids, w, mass, target, target)
            if got is not None:
                return got
        return _nucleus_of(ids, w, target)

    def _float_buf(self, x: np.ndarray) -> np.ndarray:
        """A float32 buffer of x's shape, reused across tokens."""
        if self._buf is None or self._buf.shape != x.shape:
            self._buf = np.empty(x.shape, dtype=np.float32)
        return self._buf

    def _zeros_like(self, x: np.ndarray) -> np.ndarray:
        """A float32 zeros array of x's shape, kept across tokens."""
        if self._zeros is None or self._zeros.shape != x.shape:
            self._zeros = np.zeros(x.shape, dtype=np.float32)
        return self._zeros

    @staticmethod
    def _weights(xs: np.ndarray, m: float, t: float) -> np.ndarray:
        """exp((xs - m) / t) in float32 (a fresh array; xs is a gathered copy)."""
        xs = np.subtract(xs, np.float32(m), out=xs)
        if t != 1.0:
            np.multiply(xs, np.float32(1.0 / t), out=xs)
        return np.exp(xs, out=xs)

    def _dense(self, x: np.ndarray, m: float, t: float) -> np.ndarray:
        """exp((x - m) / t) over the whole vocabulary, float32, in a buffer reused across tokens."""
        buf = self._float_buf(x)
        np.subtract(x, np.float32(m), out=buf)
        if t != 1.0:
            np.multiply(buf, np.float32(1.0 / t), out=buf)
        return np.exp(buf, out=buf)

    # ---- temperature only: exact rejection sampling ----------------------------------------------
    def _draw_full(self, x: np.ndarray) -> int:
        t = self.params.temperature
        n = x.shape[-1]
        m = _finite_max(x)
        nats = self.tail_nats
        head, thr = self._head(x, m, t * nats)
        if len(head) > n // 8:
            return self._draw_dense(x, m, t)
        cum = np.cumsum(self._weights(x[head], m, t), dtype=np.float64)
        n_tail = n - len(head)
        env = math.exp((thr - m) / t)  # > every tail weight exp((x - m) / t), x < thr
        total = cum[-1] + n_tail * env
        rng = self.rng
        while True:
            u = rng.random() * total
            if u < cum[-1]:
                i = int(np.searchsorted(cum, u, side="right"))
                return int(head[min(i, len(head) - 1)])
            j = int(rng.integers(n))
            while x[j] >= thr:  # a head token: redraw, so j is uniform over the tail
                j = int(rng.integers(n))
            if rng.random() * env < math.exp((float(x[j]) - m) / t):
                return j

    def _draw_dense(self, x: np.ndarray, m: float, t: float, block: int = 1024) -> int:
        """Flat logits (a large head): inverse CDF over the whole vocabulary in two levels
        (block sums, then one block's cumulative sum), float32 weights, float64 sums."""
        self.dense_draws += 1
        w = self._dense(x, m, t)
        n = w.shape[-1]
        nb = n // block
        sums = np.empty(nb + 1, dtype=np.float64)
        sums[:nb] = w[: nb * block].reshape(nb, block).sum(axis=1, dtype=np.float64)
        sums[nb] = w[nb * block:].sum(dtype=np.float64)
        cb = np.cumsum(sums)
        u = self.rng.random() * cb[-1]
        b = min(int(np.searchsorted(cb, u, side="right")), nb)
        while sums[b] <= 0.0:  # rounding put u past the last non-empty block
            b -= 1
        seg = w[b * block: min((b + 1) * block, n)]
        c = np.cumsum(seg, dtype=np.float64)
        i = int(np.searchsorted(c, u - (cb[b - 1] if b else 0.0), side="right"))
        if i >= len(seg):
            i = int(np.flatnonzero(seg > 0)[-1])
        return b * block + i
