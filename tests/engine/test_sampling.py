"""The sampler against a plain float64 reference: the same distribution (chi-square,
fixed seeds), the same support, the same greedy tokens, reproducible draws."""
from __future__ import annotations

import math

import numpy as np
import pytest

from r4b_edge.engine.sampling import (
    Sampler, SamplingParams, log_softmax, logsumexp, token_logprobs, _nucleus_of, _rest_mass,
)
from r4b_edge.errors import GenerationOptionError


def reference_probs(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The textbook sampler: softmax(logits / T), top-k mask (ties at the k-th kept), then the
    smallest prefix of the sorted probabilities (ties by lower id) whose mass reaches top_p."""
    x = logits.astype(np.float64) / temperature
    n = len(x)
    if top_k and top_k < n:
        kth = np.sort(x)[n - top_k]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.lexsort((np.arange(n), -p))
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, top_p)) + 1]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return p


def chi2_sf(x: float, dof: int) -> float:
    """P(chi-square with `dof` degrees of freedom > x): the regularised upper incomplete gamma
    Q(dof/2, x/2) (series below a + 1, continued fraction above; Numerical Recipes 6.2)."""
    a, y = dof / 2.0, x / 2.0
    if y <= 0:
        return 1.0
    lg = math.lgamma(a)
    if y < a + 1.0:
        term = total = 1.0 / a
        ap = a
        for _ in range(10000):
            ap += 1.0
            term *= y / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return 1.0 - total * math.exp(-y + a * math.log(y) - lg)
    b = y + 1.0 - a
    c, d = 1.0 / 1e-300, 1.0 / b
    h = d
    for i in range(1, 10000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1.0 / d
        h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return math.exp(-y + a * math.log(y) - lg) * h


def test_chi2_sf_matches_known_values():
    # scipy.stats.chi2.sf(x, k) (scipy 1.17.1) for these (x, k)
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(18.307038053275146, 10) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(10.0, 30) == pytest.approx(0.9997737463238232, rel=1e-9)
    assert chi2_sf(100.0, 30) == pytest.approx(1.8568023365102314e-09, rel=1e-6)
    assert chi2_sf(50.0, 5) == pytest.approx(1.3857973367009573e-09, rel=1e-6)
    assert chi2_sf(300.0, 250) == pytest.approx(0.016518273157868715, rel=1e-6)


def gof_pvalue(draws: np.ndarray, p: np.ndarray) -> float:
    """Chi-square goodness of fit of `draws` to `p` over its support (tokens with expected
    count < 5 pooled into one bin; draws outside the support are checked separately)."""
    n = len(draws)
    counts = np.bincount(draws, minlength=len(p)).astype(np.float64)[p > 0]
    exp_ = p[p > 0] * n
    big = exp_ >= 5
    pool = (~big).any()
    obs = list(counts[big]) + ([counts[~big].sum()] if pool else [])
    ex = list(exp_[big]) + ([exp_[~big].sum()] if pool else [])
    obs, ex = np.array(obs), np.array(ex)
    if len(ex) < 2:
        return 1.0
    stat = float(((obs - ex) ** 2 / ex).sum())
    return chi2_sf(stat, len(ex) - 1)


def _logit_sets(V: int = 60) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    peaked = rng.normal(0, 2.5, V)
    peaked[[3, 17, 40]] = [9.0, 8.2, 7.5]
    return {
        "peaked": peaked.astype(np.float32),
        "flat": rng.normal(0, 0.4, V).astype(np.float32),
        "spread": np.linspace(-30, 5, V).astype(np.float32)[rng.permutation(V)],
        "ties": rng.integers(-3, 3, V).astype(np.float32),
        "cliff": np.concatenate([[30.0, 29.5, 29.0], rng.normal(0, 1, V - 3)]).astype(np.float32),
    }


SETTINGS = [
    dict(temperature=0.7),
    dict(temperature=1.5),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=0.7, top_p=0.95),
    dict(temperature=0.6, top_p=0.95, top_k=20),
    dict(temperature=1.0, top_k=1),
]


@pytest.mark.parametrize("tail_nats", [17.0, 3.0, 0.5])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_distribution_matches_reference(setting, tail_nats):
    """6,000 draws per logit set; a correct sampler fails a set with probability 1e-4."""
    n_draws = 6000
    for k, (name, logits) in enumerate(_logit_sets().items()):
        ref = reference_probs(logits, **setting)
        s = Sampler(SamplingParams(seed=1000 + k, **setting), tail_nats=tail_nats)
        draws = np.array([s(logits) for _ in range(n_draws)])
        assert ref[draws].min() > 0, f"{name}: drew a token outside the reference support"
        pv = gof_pvalue(draws, ref)
        assert pv > 1e-4, f"{name} {setting}: chi-square p = {pv:.2e}"
        if setting.get("top_k") or setting.get("top_p", 1.0) < 1.0:  # the filtered set itself, exactly
            ids, w = s.candidates(logits)
            got = np.zeros(len(logits))
            got[ids] = w / w.sum()
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12, err_msg=name)


def test_every_code_path_is_exercised():
    """The settings above reach the head-only, rest-bound, exact-tail, dense and rejection paths."""
    sets = _logit_sets()
    seen = {"dense": 0, "exact_tail": 0, "rest_bound": 0, "head_only_top_p": 0}
    for logits in sets.values():
        for nats in (17.0, 3.0, 0.5):
            s = Sampler(SamplingParams(temperature=1.0, seed=0), tail_nats=nats)
            for _ in range(50):
                s(logits)
            seen["dense"] += s.dense_draws
            s = Sampler(SamplingParams(temperature=1.0, top_p=0.9, seed=0), tail_nats=nats)
            for _ in range(50):
                s(logits)
            seen["exact_tail"] += s.exact_tail_sums
            seen["rest_bound"] += s.rest_bound_draws
            seen["head_only_top_p"] += 50 - s.exact_tail_sums - s.rest_bound_draws
    assert all(v > 0 for v in seen.values()), seen


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_top_p_past_the_head_draws_the_head_or_the_residual_in_proportion(temperature):
    """A nucleus that surely reaches past the head (5 head tokens hold about half the mass,
    300 bulk tokens the rest, top-p 0.9): about half the draws are settled inside the head
    without building the nucleus, the others come from the residual of the exact nucleus. The
    draws follow the reference distribution, bulk tokens one by one included."""
    rng = np.random.default_rng(5)
    x = np.concatenate([[0.0, -0.2, -0.5, -0.8, -1.2], rng.normal(-4.6, 0.5, 300)]).astype(np.float32)
    x = x[rng.permutation(len(x))] * np.float32(temperature)
    setting = dict(temperature=temperature, top_p=0.9)
    ref = reference_probs(x, **setting)
    s = Sampler(SamplingParams(seed=21, **setting), tail_nats=1.5)
    draws = np.array([s(x) for _ in range(30000)])
    assert 0.3 < s.head_branch_draws / len(draws) < 0.7 and s.exact_tail_sums > 0.3 * len(draws)
    assert ref[draws].min() > 0
    assert gof_pvalue(draws, ref) > 1e-4
    head = x >= x.max() - np.float32(1.5 * temperature)  # the head's share: a sharper test than the chi-square's
    share, want = float(np.mean(head[draws])), float(ref[head].sum())
    assert abs(share - want) < 4.5 * math.sqrt(want * (1 - want) / len(draws)), (share, want)
    ids, w = s.candidates(x)  # the nucleus itself is unchanged
    assert set(ids.tolist()) == set(np.flatnonzero(ref).tolist())


def test_rejection_path_draws_tail_tokens():
    """Small head margin: tail tokens are proposed, accepted, and come out in proportion."""
    logits = np.array([0.0] + [-3.0] * 20, dtype=np.float32)
    s = Sampler(SamplingParams(temperature=1.0, seed=3), tail_nats=1.0)
    draws = np.array([s(logits) for _ in range(20000)])
    assert s.dense_draws == 0
    assert gof_pvalue(draws, reference_probs(logits, 1.0)) > 1e-4


@pytest.mark.parametrize("setting", [dict(temperature=0.7, top_p=0.95), dict(temperature=1.0, top_p=0.9),
                                     dict(temperature=0.6, top_p=0.95, top_k=20), dict(temperature=0.7, top_k=20)])
@pytest.mark.parametrize("gap", [22.0, 12.0, 3.0])
def test_real_vocab_filtered_set_equals_reference(setting, gap):
    """At R-4B's vocabulary (151,936): peaked (gap 22), mixed (12) and flat (3) logits."""
    V = 151936
    rng = np.random.default_rng(int(gap))
    x = rng.normal(0, 2.5, V).astype(np.float32)
    top = rng.choice(V, 32, replace=False)
    x[top] = gap - np.sort(rng.exponential(1.5, 32)).astype(np.float32)
    ref = reference_probs(x, **setting)
    ids, w = Sampler(SamplingParams(seed=0, **setting)).candidates(x)
    assert set(ids.tolist()) == set(np.flatnonzero(ref).tolist())
    np.testing.assert_allclose(w / w.sum(), ref[ids], rtol=1e-5)


@pytest.mark.parametrize("setting", [dict(temperature=1.0, top_p=0.95), dict(temperature=0.7, top_p=0.95)])
def test_real_vocab_rows_of_every_path_equal_reference(setting):
    """Rows like the host-overhead bench's (a N(0, 2.5) bulk under 32 head tokens): the head
    settled by the free bound, by `_rest_mass`, or not (the boundary near a cumulative sum,
    or deep in the bulk: the dense path and its threshold ladder). Each filtered set is the
    reference's exactly, and the paths are all taken."""
    V = 151936
    rng = np.random.default_rng(11)
    s = Sampler(SamplingParams(seed=0, **setting))
    for gap in (26.0, 23.0, 21.0, 20.0, 19.0, 18.0, 17.0, 16.5, 16.0, 14.0):
        x = rng.normal(0, 2.5, V).astype(np.float32)
        top = rng.choice(V, 32, replace=False)
        x[top] = gap - np.cumsum(rng.exponential(1.2, 32)).astype(np.float32)
        x[:4] = -np.inf
        ref = reference_probs(x, **setting)
        ids, w = s.candidates(x)
        assert set(ids.tolist()) == set(np.flatnonzero(ref).tolist()), gap
        np.testing.assert_allclose(w / w.sum(), ref[ids], rtol=1e-5)
    if setting["temperature"] == 1.0:
        assert s.rest_bound_draws > 0 and s.exact_tail_sums > 0 and s.rest_bound_draws + s.exact_tail_sums < 10


def test_rest_mass_gives_up_where_float32_cannot_place_the_logits():
    """Logits of 1e7 at temperature 0.01: no bound (the nucleus then comes from the dense path)."""
    x = np.array([1e7, 1e7 - 0.02, 1e7 - 1.0, 0.0], dtype=np.float32)
    n = len(x)
    assert _rest_mass(x, 1e7, 0.01, np.array([0]), np.empty(n, np.float32), np.zeros(n, np.float32)) == (
        0.0, math.inf)
    s = Sampler(SamplingParams(temperature=0.01, top_p=0.9, seed=0), tail_nats=0.5)
    ids, w = s.candidates(x)
    ref = reference_probs(x, 0.01, top_p=0.9)
    assert set(ids.tolist()) == set(np.flatnonzero(ref).tolist()) and s.exact_tail_sums == 1


def test_nucleus_of_equals_sorted_nucleus():
    """The value-sorted nucleus is the argsorted one, ties at the boundary taken by lower id."""
    rng = np.random.default_rng(5)
    w = np.exp(rng.normal(0, 3, 5000)).astype(np.float32)
    w[:40] = w[40]  # ties at one value
    ids = np.sort(rng.choice(100000, 5000, replace=False))
    order = np.lexsort((ids, -w.astype(np.float64)))
    cum = np.cumsum(w[order].astype(np.float64))
    for p in (0.1, 0.5, 0.9, 0.99, 1.0, float(cum[np.flatnonzero(np.isin(order, np.arange(41)))[3]] / cum[-1])):
        target = p * float(cum[-1])
        got, gw = _nucleus_of(ids, w, target)
        k = min(int(np.searchsorted(cum, target)) + 1, len(w))
        assert set(got.tolist()) == set(ids[order[:k]].tolist()), p
        np.testing.assert_array_equal(gw, w[np.searchsorted(ids, got)].astype(np.float64))


@pytest.mark.parametrize("seed", range(12))
def test_rest_mass_bounds_the_exact_mass(seed):
    """`_rest_mass` brackets the float64 mass of every token outside the head, within ~7%:
    any vocabulary size, offset, spread and temperature, -inf and far-below-the-max logits."""
    rng = np.random.default_rng(seed)
    for n in (50, 4096, 151936):
        x = rng.normal(float(rng.choice([0.0, 30.0, -500.0, 1000.0])), float(rng.choice([0.5, 2.5, 10.0, 100.0])),
                       n).astype(np.float32)
        x[rng.integers(0, n, 3)] = -np.inf
        t = float(rng.choice([0.05, 0.3, 0.7, 1.0, 2.0]))
        m = float(x.max())
        head = np.flatnonzero(x >= np.float32(m - 3 * t))
        lo, hi = _rest_mass(x, m, t, head, np.empty(n, np.float32), np.zeros(n, np.float32))
        rest = np.ones(n, bool)
        rest[head] = False
        exact = float(np.exp((x[rest].astype(np.float64) - m) / t).sum())
        assert lo <= exact <= hi, (n, t, lo, exact, hi)
        if exact > 1e-30:
            assert hi <= 1.08 * exact and lo >= exact / 1.08


def test_greedy_is_argmax_whatever_the_filters():
    rng = np.random.default_rng(0)
    for params in (SamplingParams(), SamplingParams(0.0, 0.5, 3, seed=1)):
        s = Sampler(params)
        for _ in range(50):
            x = rng.normal(size=151936).astype(np.float32)
            assert s(x) == int(np.argmax(x))


@pytest.mark.parametrize("setting", SETTINGS[:6], ids=str)
def test_seed_reproducible(setting):
    rng = np.random.default_rng(1)
    rows = [rng.normal(0, 3, 4096).astype(np.float32) for _ in range(40)]

    def run(seed):
        s = Sampler(SamplingParams(seed=seed, **setting))
        return [s(r) for r in rows for _ in range(5)]

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_logsumexp_and_logprobs_match_float64():
    rng = np.random.default_rng(2)
    rows = (rng.normal(0, 4, (3, 151936)) + 30).astype(np.float32)
    ref = log_softmax(rows.astype(np.float64))
    lse = logsumexp(rows)
    np.testing.assert_allclose(rows - lse[:, None], ref, atol=1e-4)
    ids = np.array([5, 77, 151935])
    np.testing.assert_allclose(token_logprobs(rows, ids), ref[np.arange(3), ids], atol=1e-4)
    assert isinstance(logsumexp(rows[0]), float)


def test_bad_logits_and_params_raise():
    with pytest.raises(GenerationOptionError, match="maximum is nan"):
        Sampler(SamplingParams(temperature=1.0, seed=0))(np.full(10, np.nan, dtype=np.float32))
    with pytest.raises(GenerationOptionError, match="tail_nats"):
        Sampler(SamplingParams(), tail_nats=0.0)
    with pytest.raises(GenerationOptionError, match="top_p"):
        SamplingParams(temperature=1.0, top_p=0.0).validate()
