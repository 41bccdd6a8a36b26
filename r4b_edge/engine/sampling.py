"""Token sampling on numpy logits: greedy, temperature, top-k, top-p, seeded.

Built for R-4B's vocabulary (151,936) the way fast engines do it: candidates
are filtered before anything is sorted or exponentiated, the full vocabulary
is touched only by a few vectorised float32 passes (max, one compare), and
the draw is an inverse CDF over the few candidates.

- top-k (with or without top-p): the k largest logits are found among the
  tokens within a margin of the maximum (grown until at least k are in it),
  so only that head is partitioned; top-p then runs over the k survivors.
- top-p alone: the head ``x >= max - T * tail_nats`` is exponentiated and
  sorted; the nucleus boundary is computed for the smallest and the largest
  total mass the unexponentiated tail allows. When both agree (they do unless
  the boundary sits within ~1e-6 of a cumulative sum) the nucleus is exact;
  otherwise the tail is summed exactly (one full-vocabulary pass).
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

import numpy as np

from ..errors import GenerationOptionError

DEFAULT_TAIL_NATS = 17.0  # head margin in units of T: exp(-17) * 151,936 = 0.006 of the max's weight


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


def _nucleus_by_buckets(w: np.ndarray, target: float) -> tuple[np.ndarray, np.ndarray]:
    """The nucleus of a flat distribution without sorting it: float32 weights (>= 0) are
    bucketed by their top 16 bits (monotonic in the value), the bucket masses summed from
    the top give the boundary bucket, and only that bucket is sorted. Returns the nucleus
    ids (the boundary bucket's part last, sorted by decreasing weight then id) and weights."""
    keys = w.view(np.int32) >> 16
    mass = np.bincount(keys, weights=w.astype(np.float64))  # float32 weights take a slow path
    from_top = np.cumsum(mass[::-1])
    j = min(int(np.searchsorted(from_top, target, side="left")), len(mass) - 1)
    b = len(mass) - 1 - j
    above = np.flatnonzero(keys > b)
    w_above = w[above].astype(np.float64)
    inb = np.flatnonzero(keys == b)
    w_inb = w[inb].astype(np.float64)
    order = np.lexsort((inb, -w_inb))
    inb, w_inb = inb[order], w_inb[order]
    need = target - float(w_above.sum())
    k = _nucleus_len(np.cumsum(w_inb), need) if need > 0 and len(inb) else 0
    return np.concatenate([above, inb[:k]]), np.concatenate([w_above, w_inb[:k]])


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


class Sampler:
    """Draws token ids from logits with one seeded generator per reply."""

    def __init__(self, params: SamplingParams, tail_nats: float = DEFAULT_TAIL_NATS):
        self.params = params.validate()
        self.rng = np.random.default_rng(params.seed)
        if not tail_nats > 0:
            raise GenerationOptionError(f"tail_nats must be > 0, got {tail_nats}")
        self.tail_nats = float(tail_nats)
        self.exact_tail_sums = 0  # top-p draws that needed the exact tail mass (benchmarks read it)
        self.dense_draws = 0  # temperature-only draws over the whole vocabulary (flat logits)
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
        if p.top_k and p.top_k < x.shape[-1] or p.top_p < 1.0:
            ids, w = self.candidates(x)
            cum = np.cumsum(w)
            i = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
            return int(ids[min(i, len(ids) - 1)])
        return self._draw_full(x)

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
        for very flat top-p-only logits, where only the nucleus' boundary bucket is sorted."""
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

    def _nucleus(self, x: np.ndarray, m: float, t: float, top_p: float) -> tuple[np.ndarray, np.ndarray]:
        """top-p over the whole vocabulary. The head (within `tail_nats` T of the max) is
        exponentiated in float32 and its largest weights sorted; every tail weight is below
        the threshold's. If the nucleus is the same for every total mass the tail allows, it is
        exact. Otherwise (the boundary depends on the tail's mass), or when the head is a large
        part of the vocabulary, the whole vocabulary is exponentiated and summed once."""
        n = x.shape[-1]
        head, thr = self._head(x, m, t * self.tail_nats)
        if len(head) <= n // 8:
            w = self._weights(x[head], m, t)
            total = float(w.sum(dtype=np.float64))
            tail_max = (n - len(head)) * math.exp((thr - m) / t)
            got = _sorted_prefix(head, w, total, top_p * total, top_p * (total + tail_max))
            if got is not None:
                return got
        self.exact_tail_sums += 1
        w_all = self._dense(x, m, t)
        target = top_p * float(w_all.sum(dtype=np.float64))
        ids = np.flatnonzero(w_all >= np.float32(1e-3))  # candidates: weights >= 1e-3 of the max's
        w = w_all[ids]
        mass = float(w.sum(dtype=np.float64))
        if len(ids) > 4096 or mass < target:  # flat: bucket rather than sort
            return _nucleus_by_buckets(w_all, target)
        got = _sorted_prefix(ids, w, mass, target, target)
        return got if got is not None else _nucleus_by_buckets(w_all, target)

    @staticmethod
    def _weights(xs: np.ndarray, m: float, t: float) -> np.ndarray:
        """exp((xs - m) / t) in float32 (a fresh array; xs is a gathered copy)."""
        xs = np.subtract(xs, np.float32(m), out=xs)
        if t != 1.0:
            np.multiply(xs, np.float32(1.0 / t), out=xs)
        return np.exp(xs, out=xs)

    def _dense(self, x: np.ndarray, m: float, t: float) -> np.ndarray:
        """exp((x - m) / t) over the whole vocabulary, float32, in a buffer reused across tokens."""
        buf = self._buf
        if buf is None or buf.shape != x.shape:
            buf = self._buf = np.empty(x.shape, dtype=np.float32)
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
