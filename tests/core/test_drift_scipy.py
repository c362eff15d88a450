"""Drift statistics of the C++ core (sluice._core) against numpy/scipy.

Agreement required (csrc/include/sluice/drift.h documents the same bounds):

* Exact statistics, on the same bins (the profile's edges, np.searchsorted
  side="right"): bin counts identical; PSI, KL(R||C), Jensen-Shannon distance
  (base 2), Hellinger, TVD, out-of-range share and, for categorical features,
  the chi-square homogeneity statistic and p-value
  (scipy.stats.chi2_contingency(correction=False)) within a relative 1e-9.
* Coarse edges: bit-identical to np.quantile (linear) of the finite reference,
  de-duplicated.
* Sketched statistics, against the exact two-sample values:
    ks_d <= D_scipy <= ks_d + ks_d_bound            (ks_d_bound ~ 1/G = 0.001)
    |W1 - scipy.stats.wasserstein_distance| <= wasserstein_bound
  and the KS p-value of scipy's ks_2samp lies between our p at ks_d and at
  ks_d + ks_d_bound, widened by KS_P_TOL = 0.04 (the distance between our
  asymptotic p and scipy's at the same D, for n >= 1000 reference rows, m >= 2).
* Detection power (default verdict: PSI >= 0.2 AND BH-adjusted KS p < 0.05,
  verdicts only from 10 rows per bin): a 0.5-sigma mean shift is flagged within
  DETECT_ROWS = 150 rows in >= 95 % of streams (median 100: the smallest window
  with a verdict); identical distributions are flagged in <= 5 % of trials
  (observed < 1 % for one check, ~2 % of streams checked every 10 rows for 2000 rows).

Runs in a few seconds; no tritonclient import.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from scipy import special, stats
from scipy.spatial import distance
from sluice import _core

BINS = 10
G = 1000  # sketch points (default)
EPS = 1e-4
REL = 1e-9
KS_P_TOL = 0.04
DETECT_ROWS = 150

Array = np.ndarray[Any, Any]


# ---- numpy reference implementations ---------------------------------------


def np_distances(ref_counts: Array, cur_counts: Array) -> dict[str, float]:
    r = ref_counts / ref_counts.sum()
    c = cur_counts / cur_counts.sum()
    re = np.where(r > 0, r, EPS)
    ce = np.where(c > 0, c, EPS)
    return {
        "psi": float(np.sum((ce - re) * np.log(ce / re))),
        "kl": float(np.sum(re * np.log(re / ce))),
        "js": float(distance.jensenshannon(r, c, base=2)),
        "hellinger": float(np.sqrt(0.5 * np.sum((np.sqrt(r) - np.sqrt(c)) ** 2))),
        "tvd": float(0.5 * np.sum(np.abs(r - c))),
    }


def np_bins(edges: Array, x: Array) -> Array:
    return np.bincount(np.searchsorted(edges, x, side="right"), minlength=len(edges) + 1)


def close(a: float, b: float, rel: float = REL, abs_: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def run(ref: Array, cur: Array, kinds: list[_core.FeatureKind] | None = None) -> Any:
    profile = _core.DriftProfile.build(np.ascontiguousarray(ref.reshape(len(ref), -1)), kinds)
    window = _core.DriftWindow(profile)
    window.update(np.ascontiguousarray(cur.reshape(len(cur), -1)))
    return profile, window, window.statistics().features[0]


# ---- numeric cases ----------------------------------------------------------


@dataclass
class Case:
    ref: Array
    cur: Array


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


N_REF = 50_000
N_CUR = 20_000

NUMERIC_CASES: dict[str, Callable[[], Case]] = {
    "identical": lambda: Case(_rng(1).normal(size=N_REF), _rng(2).normal(size=N_CUR)),
    "shift_0.1sigma": lambda: Case(_rng(3).normal(size=N_REF), _rng(4).normal(0.1, 1, N_CUR)),
    "shift_0.5sigma": lambda: Case(_rng(5).normal(size=N_REF), _rng(6).normal(0.5, 1, N_CUR)),
    "variance_x1.5": lambda: Case(_rng(7).normal(size=N_REF), _rng(8).normal(0, 1.5, N_CUR)),
    "cauchy": lambda: Case(_rng(9).standard_cauchy(N_REF), _rng(10).standard_cauchy(N_CUR) + 0.5),
    "bimodal_vs_unimodal": lambda: Case(
        np.concatenate([_rng(11).normal(-2, 1, N_REF // 2), _rng(12).normal(2, 1, N_REF // 2)]),
        _rng(13).normal(0, 2.2, N_CUR),
    ),
    "constant_reference": lambda: Case(np.full(N_REF, 3.0), _rng(14).normal(3, 1, N_CUR)),
    "constant_both": lambda: Case(np.full(N_REF, 3.0), np.full(N_CUR, 3.0)),
    "outside_range": lambda: Case(_rng(15).normal(size=N_REF), 3 * _rng(16).normal(size=N_CUR)),
    "nan_and_inf": lambda: Case(
        np.where(_rng(17).random(N_REF) < 0.01, np.nan, _rng(18).normal(size=N_REF)),
        np.concatenate(
            [
                _rng(19).normal(0.2, 1, N_CUR),
                np.full(500, np.nan),
                np.full(20, np.inf),
                np.full(7, -np.inf),
            ]
        ),
    ),
    "tiny_window_5": lambda: Case(_rng(20).normal(size=N_REF), _rng(21).normal(0.5, 1, 5)),
    "tiny_window_30": lambda: Case(_rng(22).normal(size=N_REF), _rng(23).normal(0.5, 1, 30)),
    "integers_with_ties": lambda: Case(
        _rng(24).poisson(4, N_REF).astype(np.float64), _rng(25).poisson(4.5, N_CUR).astype(np.int64)
    ),
    "float32": lambda: Case(
        _rng(26).normal(size=N_REF).astype(np.float32),
        _rng(27).normal(0.3, 1.2, N_CUR).astype(np.float32),
    ),
    "exponential_skew": lambda: Case(
        _rng(28).exponential(size=N_REF), _rng(29).gamma(1.3, size=N_CUR)
    ),
}


@pytest.mark.parametrize("name", list(NUMERIC_CASES))
def test_numeric_against_numpy_and_scipy(name: str) -> None:
    case = NUMERIC_CASES[name]()
    profile, window, f = run(case.ref, case.cur)
    p = profile.numeric(0)
    rf = case.ref.astype(np.float64)
    rf = rf[np.isfinite(rf)]
    cf = case.cur.astype(np.float64)
    cf = cf[np.isfinite(cf)]
    n, m = len(rf), len(cf)

    # Reference profile: type-7 deciles, de-duplicated, bit for bit; exact counts.
    edges = np.unique(np.quantile(rf, np.arange(1, BINS) / BINS))
    np.testing.assert_array_equal(p.edges, edges)
    np.testing.assert_array_equal(p.counts, np_bins(edges, rf))
    assert p.n == n
    assert p.nonfinite == len(case.ref) - n
    assert p.min == rf.min()
    assert p.max == rf.max()
    assert close(p.mean, float(np.mean(rf)), abs_=1e-12)
    assert close(p.stddev, float(np.std(rf)), abs_=1e-12)
    assert p.sketch_edges[0] == rf.min()
    assert p.sketch_edges[-1] == np.nextafter(rf.max(), np.inf)
    assert np.all(np.isin(p.edges, p.sketch_edges))
    np.testing.assert_array_equal(p.sketch_counts, np_bins(p.sketch_edges, rf))

    # Window counts and the exact statistics on the same bins.
    coarse, fine, _, nonfinite = window.counts(0)
    cur_counts = np_bins(edges, cf)
    np.testing.assert_array_equal(coarse, cur_counts)
    np.testing.assert_array_equal(fine, np_bins(p.sketch_edges, cf))
    assert nonfinite == f.nonfinite == len(case.cur) - m
    assert f.n == n
    assert f.m == m
    expect = np_distances(p.counts.astype(np.float64), cur_counts.astype(np.float64))
    for key, value in expect.items():
        assert close(getattr(f, key), value), (key, getattr(f, key), value)
    oor = float(np.mean((cf < rf.min()) | (cf > rf.max())))
    assert close(f.out_of_range_share, oor)
    assert close(f.nonfinite_rate, (len(case.cur) - m) / len(case.cur))
    assert close(f.mean, float(np.mean(cf)), abs_=1e-9)
    assert close(f.stddev, float(np.std(cf)), rel=1e-7, abs_=1e-9)
    assert f.min == cf.min()
    assert f.max == cf.max()

    # KS: our D is a lower bound within ks_d_bound of scipy's exact D.
    ks = stats.ks_2samp(rf, cf)
    assert f.ks_d - 1e-12 <= ks.statistic <= f.ks_d + f.ks_d_bound + 1e-12
    assert f.ks_d_bound <= p.sketch_counts.max() / n + 1e-12
    if len(np.unique(rf)) == n:  # continuous reference: bound ~ 1/G
        assert f.ks_d_bound <= 1.0 / G + 2.0 / n
    # KS p: scipy's p within our p at the two ends of the D interval, +- KS_P_TOL.
    if m >= 2:
        p_hi = f.ks_p
        p_lo = _core.drift_ks_p_value(min(1.0, f.ks_d + f.ks_d_bound), n, m)
        assert p_lo - KS_P_TOL <= ks.pvalue <= p_hi + KS_P_TOL, (p_lo, ks.pvalue, p_hi)

    # Wasserstein-1: within the reported bound; normed by max(std_R, 0.001).
    w1 = stats.wasserstein_distance(rf, cf)
    assert abs(f.wasserstein - w1) <= f.wasserstein_bound + 1e-9 * max(1.0, w1), (
        f.wasserstein,
        w1,
        f.wasserstein_bound,
    )
    assert close(f.wasserstein_normed, f.wasserstein / max(float(np.std(rf)), 1e-3), rel=1e-12)


def test_sketch_accuracy_on_smooth_laws() -> None:
    """Typical (not worst-case) errors of the sketched statistics, n=5e4, m=2e4."""
    for name in ("identical", "shift_0.1sigma", "shift_0.5sigma", "variance_x1.5", "float32"):
        case = NUMERIC_CASES[name]()
        _, _, f = run(case.ref, case.cur)
        rf, cf = case.ref.astype(np.float64), case.cur.astype(np.float64)
        w1 = stats.wasserstein_distance(rf, cf)
        assert abs(f.wasserstein - w1) <= 2e-4, (name, f.wasserstein, w1)
        assert f.wasserstein_bound <= 5e-3, name
        assert stats.ks_2samp(rf, cf).statistic - f.ks_d <= 1e-3, name


def test_heavy_tails_error_is_within_the_bound() -> None:
    """Cauchy: W1 hinges on single extreme values; those that land in the widest
    (outermost) reference bins set the error. Over seeds the median relative error
    is ~1 % (30 seeds: p90 7.5 %, max 33 %), always within the reported bound."""
    errors = []
    for seed in range(8):
        rng = _rng(1000 + seed)
        ref, cur = rng.standard_cauchy(50_000), rng.standard_cauchy(20_000) + 0.5
        _, _, f = run(ref, cur)
        w1 = stats.wasserstein_distance(ref, cur)
        assert abs(f.wasserstein - w1) <= f.wasserstein_bound
        errors.append(abs(f.wasserstein - w1) / w1)
    assert np.median(errors) <= 0.05


def test_empty_window_is_nan_not_zero() -> None:
    profile = _core.DriftProfile.build(_rng(30).normal(size=(1000, 1)))
    window = _core.DriftWindow(profile)
    window.update(np.array([[np.nan], [np.inf]]))
    report = window.statistics()
    f = report.features[0]
    for key in ("psi", "kl", "js", "hellinger", "tvd", "ks_d", "ks_p", "wasserstein", "mean"):
        assert math.isnan(getattr(f, key)), key
    assert f.nonfinite == 2
    assert f.verdict == _core.Verdict.INSUFFICIENT_DATA
    assert report.dataset == _core.Verdict.INSUFFICIENT_DATA
    assert math.isnan(report.drift_share)


def test_tiny_windows_get_no_binned_verdict() -> None:
    profile = _core.DriftProfile.build(_rng(31).normal(size=(5000, 1)))
    for rows in (5, 30, 99):
        window = _core.DriftWindow(profile)
        window.update(_rng(32).normal(3, 1, size=(rows, 1)))
        f = window.statistics().features[0]
        assert f.psi > 0.2
        assert f.verdict == _core.Verdict.INSUFFICIENT_DATA
    options = _core.VerdictOptions()
    options.rule = _core.DriftRule.P_VALUE
    window = _core.DriftWindow(profile)
    window.update(_rng(33).normal(3, 1, size=(30, 1)))
    assert window.statistics(options).features[0].verdict == _core.Verdict.DRIFT


# ---- categorical cases --------------------------------------------------------


def _categorical_check(ref: Array, cur: Array) -> None:
    profile, window, f = run(ref, cur, [_core.FeatureKind.CATEGORICAL])
    cp = profile.categorical(0)
    codes, ref_counts = np.unique(ref, return_counts=True)
    np.testing.assert_array_equal(cp.codes, codes)
    np.testing.assert_array_equal(cp.counts, ref_counts)
    slot = np.searchsorted(codes, cur)
    known = (slot < len(codes)) & (codes[np.minimum(slot, len(codes) - 1)] == cur)
    cur_counts = np.bincount(np.where(known, slot, len(codes)), minlength=len(codes) + 1)
    np.testing.assert_array_equal(window.counts(0)[0], cur_counts)
    ref_full = np.append(ref_counts, 0)
    expect = np_distances(ref_full.astype(np.float64), cur_counts.astype(np.float64))
    for key, value in expect.items():
        assert close(getattr(f, key), value), (key, getattr(f, key), value)
    # Chi-square over the union of categories (the unseen bucket == the new
    # categories when there is at most one), empty columns dropped.
    table = np.vstack([ref_full, cur_counts])
    table = table[:, table.sum(axis=0) > 0]
    chi = stats.chi2_contingency(table, correction=False)
    assert close(f.chi2, float(chi.statistic))
    assert close(f.chi2_p, float(chi.pvalue), abs_=1e-300)
    assert f.chi2_dof == chi.dof
    assert close(f.unseen_share, float(np.mean(~known)))


def test_categorical_new_category() -> None:
    rng = _rng(40)
    ref = rng.choice(5, size=20_000, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    cur = rng.choice(6, size=3_000, p=[0.35, 0.3, 0.15, 0.1, 0.05, 0.05])
    _categorical_check(ref.astype(np.int64), cur.astype(np.int64))


def test_categorical_identical_law() -> None:
    rng = _rng(41)
    probs = np.array([0.5, 0.2, 0.2, 0.1])
    _categorical_check(rng.choice(4, 10_000, p=probs) + 100, rng.choice(4, 2_000, p=probs) + 100)


@pytest.mark.parametrize("shifted", [False, True])
def test_categorical_1000_categories(shifted: bool) -> None:
    rng = _rng(42)
    k = np.arange(1, 1001)
    probs = (1.0 / k) / np.sum(1.0 / k)
    ref = rng.choice(1000, size=100_000, p=probs) * 7 - 300  # sparse-ish codes
    cur_probs = probs[::-1] if shifted else probs
    cur = rng.choice(1000, size=20_000, p=cur_probs) * 7 - 300
    _categorical_check(ref.astype(np.int64), cur.astype(np.int64))


def test_categorical_codes_from_floats() -> None:
    ref = np.array([1.0, 2.0, 2.0, np.nan, 3.0])
    cur = np.array([2.0, 2.5, np.nan, np.nan, 4.0, 1.0])
    profile, _, f = run(ref, cur, [_core.FeatureKind.CATEGORICAL])
    assert profile.categorical(0).missing == 1
    assert f.nonfinite == 2
    assert f.m == 4
    assert close(f.unseen_share, 0.5)  # 2.5 (not integral) and 4.0 (new)
    with pytest.raises(_core.StatusError):
        _core.DriftProfile.build(np.array([[1.5]]), [_core.FeatureKind.CATEGORICAL])


# ---- the math helpers ------------------------------------------------------------


def test_incomplete_gamma_and_chi2_sf_against_scipy() -> None:
    rng = _rng(50)
    for a in (0.05, 0.5, 1.0, 2.5, 10.0, 99.5, 500.0, 5000.0):
        for x in np.concatenate([[1e-8, a * 0.5, a, a + 1, a * 1.5], rng.uniform(0, 3 * a, 8)]):
            p, q = _core.drift_gamma_p(a, x), _core.drift_gamma_q(a, x)
            sp, sq = special.gammainc(a, x), special.gammaincc(a, x)
            assert close(p, sp, rel=1e-9, abs_=1e-300), (a, x, p, sp)
            assert close(q, sq, rel=1e-9, abs_=1e-300), (a, x, q, sq)
    for dof in (1, 2, 3, 9, 99, 999):
        for stat in (0.01, dof * 0.5, float(dof), dof * 2.0 + 10):
            assert close(_core.drift_chi2_sf(stat, dof), stats.chi2.sf(stat, dof), abs_=1e-300)


def test_kolmogorov_against_scipy() -> None:
    for lam in np.linspace(0.05, 4, 80):
        assert close(_core.drift_kolmogorov_sf(lam), stats.kstwobign.sf(lam), rel=1e-10)


def test_ks_p_value_approximation_vs_scipy_auto() -> None:
    """At the same D, our p vs ks_2samp's (exact or kstwo), reference >= 1000 rows."""
    rng = _rng(51)
    worst = 0.0
    for n in (1_000, 20_000):
        ref = rng.normal(size=n)
        for m in (2, 3, 5, 10, 30, 100, 1_000, 5_000):
            for _ in range(15):
                cur = rng.normal(rng.uniform(0, 1.2), 1, size=m)
                ks = stats.ks_2samp(ref, cur)
                ours = _core.drift_ks_p_value(ks.statistic, n, m)
                worst = max(worst, abs(ours - ks.pvalue))
                if m >= 100:
                    assert abs(ours - ks.pvalue) <= 0.015, (n, m, ours, ks.pvalue)
    assert worst <= KS_P_TOL


def test_multiple_testing_corrections() -> None:
    p = [0.01, 0.04, 0.03, 0.2, 0.5, 0.001]
    bh = _core.drift_adjust_p_values(p, _core.Correction.BENJAMINI_HOCHBERG)
    np.testing.assert_allclose(bh, stats.false_discovery_control(p), rtol=1e-12)
    bonf = _core.drift_adjust_p_values(p, _core.Correction.BONFERRONI)
    np.testing.assert_allclose(bonf, np.minimum(1, np.array(p) * len(p)), rtol=1e-12)
    assert _core.drift_adjust_p_values(p, _core.Correction.NONE) == p


def test_compare_counts_and_chi2_helpers() -> None:
    ref = np.array([10, 30, 60, 0])
    cur = np.array([20, 20, 50, 10])
    psi, kl, js, hel, tvd = _core.drift_compare_counts(ref, cur)
    expect = np_distances(ref.astype(np.float64), cur.astype(np.float64))
    assert [psi, kl, js, hel, tvd] == pytest.approx(
        [expect[k] for k in ("psi", "kl", "js", "hellinger", "tvd")], rel=REL
    )
    stat, pv, dof = _core.drift_chi2_homogeneity(ref, cur)
    chi = stats.chi2_contingency(np.vstack([ref, cur]), correction=False)
    assert (stat, pv, dof) == pytest.approx((chi.statistic, chi.pvalue, chi.dof), rel=REL)


# ---- detection power and false alarms --------------------------------------------


def _first_alarm(
    profile: _core.DriftProfile,
    rng: np.random.Generator,
    shift: float,
    options: _core.VerdictOptions,
    max_rows: int,
    step: int = 10,
) -> int:
    """Rows streamed (checked every `step`) until the feature is flagged; max_rows+1 if never."""
    window = _core.DriftWindow(profile)
    rows = 0
    while rows < max_rows:
        window.update(rng.normal(shift, 1, size=(step, 1)))
        rows += step
        if window.statistics(options).features[0].verdict == _core.Verdict.DRIFT:
            return rows
    return max_rows + 1


def test_detects_a_half_sigma_shift_within_n_rows() -> None:
    profile = _core.DriftProfile.build(_rng(60).normal(size=(20_000, 1)))
    rng = _rng(61)
    options = _core.VerdictOptions()  # the defaults
    found = np.array([_first_alarm(profile, rng, 0.5, options, 1_000) for _ in range(200)])
    assert np.median(found) == 100  # the smallest window with a binned verdict (10 x 10 bins)
    assert np.mean(found <= DETECT_ROWS) >= 0.95


def test_false_alarms_on_identical_distributions() -> None:
    profile = _core.DriftProfile.build(_rng(62).normal(size=(20_000, 1)))
    rng = _rng(63)
    default = _core.VerdictOptions()
    p_only = _core.VerdictOptions()
    p_only.rule = _core.DriftRule.P_VALUE
    trials = 600
    for m in (100, 500):
        alarms = {"default": 0, "p_only": 0}
        for _ in range(trials):
            window = _core.DriftWindow(profile)
            window.update(rng.normal(size=(m, 1)))
            alarms["default"] += window.statistics(default).features[0].verdict == (
                _core.Verdict.DRIFT
            )
            alarms["p_only"] += window.statistics(p_only).features[0].verdict == (
                _core.Verdict.DRIFT
            )
        assert alarms["default"] / trials <= 0.05
        # KS alone is calibrated at alpha (binomial noise: 3 standard errors).
        assert alarms["p_only"] / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    # A stream checked every 10 rows for 2000 rows: the default rule stays quiet.
    streams = [_first_alarm(profile, rng, 0.0, default, 2_000) for _ in range(100)]
    assert np.mean(np.array(streams) <= 2_000) <= 0.05


def test_dataset_drift_share_with_bh_correction() -> None:
    rng = _rng(64)
    ref = rng.normal(size=(10_000, 6))
    cur = rng.normal(size=(5_000, 6))
    cur[:, :3] += 0.6  # half of the features drift
    window = _core.DriftWindow(_core.DriftProfile.build(ref))
    window.update(cur)
    report = window.statistics()
    assert [f.verdict for f in report.features] == [_core.Verdict.DRIFT] * 3 + [
        _core.Verdict.NO_DRIFT
    ] * 3
    assert report.drift_share == 0.5
    assert report.dataset == _core.Verdict.DRIFT
    p_raw = [f.p_value for f in report.features]
    np.testing.assert_allclose(
        [f.p_adjusted for f in report.features], stats.false_discovery_control(p_raw), rtol=1e-12
    )


# ---- windows, dtypes, serialisation ------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
              np.uint32, np.uint64, np.bool_]
)  # fmt: skip
def test_every_dtype_counts_like_float64(dtype: Any) -> None:
    rng = _rng(70)
    ref = rng.integers(0, 100, size=(5_000, 3)).astype(np.float64)
    profile = _core.DriftProfile.build(ref.astype(dtype))
    cur = rng.integers(0, 120, size=(2_000, 3)).astype(dtype)
    window = _core.DriftWindow(profile)
    window.update(cur)
    for j in range(3):
        edges = profile.numeric(j).edges
        np.testing.assert_array_equal(
            window.counts(j)[0], np_bins(edges, cur[:, j].astype(np.float64))
        )


def test_profile_bytes_round_trip() -> None:
    rng = _rng(71)
    data = np.column_stack([rng.normal(size=3_000), rng.integers(0, 4, 3_000)]).astype(np.float32)
    profile = _core.DriftProfile.build(
        data, [_core.FeatureKind.NUMERIC, _core.FeatureKind.CATEGORICAL], ["x", "kind"]
    )
    blob = profile.to_bytes()
    assert blob[:4] == b"SLDP"
    again = _core.DriftProfile.from_bytes(blob)
    assert again.to_bytes() == blob
    assert again.names == ["x", "kind"]
    assert again.kinds == [_core.FeatureKind.NUMERIC, _core.FeatureKind.CATEGORICAL]
    cur = np.column_stack([rng.normal(0.2, 1, 500), rng.integers(0, 5, 500)]).astype(np.float32)
    a, b = _core.DriftWindow(profile), _core.DriftWindow(again)
    a.update(cur)
    b.update(cur)
    assert a.statistics().features[0].psi == b.statistics().features[0].psi
    assert a.statistics().features[1].chi2 == b.statistics().features[1].chi2
    numeric_last = _core.DriftProfile.build(data[:, ::-1].copy(), kinds=None)
    assert _core.DriftProfile.from_bytes(numeric_last.to_bytes()).to_bytes() == (
        numeric_last.to_bytes()
    )
    with pytest.raises(_core.StatusError):
        _core.DriftProfile.from_bytes(blob[:-1])
    corrupt = bytearray(blob)
    corrupt[len(blob) // 2] ^= 0xFF
    with pytest.raises(_core.StatusError):
        _core.DriftProfile.from_bytes(bytes(corrupt))


def test_merge_equals_one_stream_and_threads() -> None:
    rng = _rng(72)
    profile = _core.DriftProfile.build(rng.normal(size=(5_000, 4)))
    batches = [rng.normal(0.1, 1, size=(int(rng.integers(1, 300)), 4)) for _ in range(40)]
    one = _core.DriftWindow(profile)
    parts = [_core.DriftWindow(profile) for _ in range(4)]
    for i, b in enumerate(batches):
        one.update(b)
        parts[i % 4].update(b)
    for part in parts[1:]:
        parts[0].merge(part)
    for j in range(4):
        np.testing.assert_array_equal(one.counts(j)[1], parts[0].counts(j)[1])
    assert one.statistics().features[2].psi == parts[0].statistics().features[2].psi
    # Concurrent updates of one window from several threads (GIL released inside).
    shared = _core.DriftWindow(profile)
    threads = [
        threading.Thread(target=lambda bs=batches[k::4]: [shared.update(b) for b in bs])
        for k in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for j in range(4):
        np.testing.assert_array_equal(one.counts(j)[1], shared.counts(j)[1])


def test_time_panes_expire() -> None:
    profile = _core.DriftProfile.build(_rng(73).normal(size=(1_000, 1)))
    window = _core.DriftWindow(profile, pane_ns=1_000_000, panes=3)
    window.update(np.array([[-5.0]]), now_ns=10)
    window.update(np.array([[0.0]]), now_ns=1_500_000)
    window.update(np.array([[5.0]]), now_ns=2_999_999)
    assert window.rows == 3
    assert window.statistics(now_ns=3_000_000).features[0].min == 0.0
    assert window.rows == 2
    window.advance(10**12)
    assert window.rows == 0


def test_bad_arrays_are_rejected() -> None:
    profile = _core.DriftProfile.build(_rng(74).normal(size=(100, 2)))
    window = _core.DriftWindow(profile)
    with pytest.raises(_core.StatusError):
        window.update(np.zeros((5, 3)))
    with pytest.raises(_core.StatusError):
        window.update(np.zeros((6, 4))[:, ::2])  # not C-contiguous
    with pytest.raises(_core.StatusError):
        window.update(np.zeros((5, 2), dtype=np.float16))
    with pytest.raises(_core.StatusError):
        window.update(np.zeros((5, 2), dtype=">f8"))  # non-native byte order
    with pytest.raises(_core.StatusError):
        _core.DriftProfile.build(np.zeros((5, 2)), bins=1)


def test_python_helpers_store_profiles_and_reports(tmp_path: Any) -> None:
    import json

    from sluice.monitoring import drift_stats

    rng = _rng(75)
    ref = np.column_stack([rng.normal(size=2_000), rng.integers(0, 3, 2_000)])
    profile = drift_stats.build_profile(ref, ["numeric", "categorical"], ["x", "c"])
    assert drift_stats.load_profile(tmp_path) is None
    path = drift_stats.save_profile(profile, tmp_path)
    assert path.name == drift_stats.PROFILE_FILENAME
    loaded = drift_stats.load_profile(tmp_path)
    assert loaded is not None
    assert loaded.to_bytes() == profile.to_bytes()
    window = _core.DriftWindow(loaded)
    window.update(np.column_stack([rng.normal(1, 1, 500), rng.integers(0, 4, 500)]))
    out = drift_stats.report_to_dict(window.statistics(), loaded.names)
    text = json.dumps(out, allow_nan=False)  # NaN became None
    assert out["features"][0]["name"] == "x"
    assert out["features"][0]["verdict"] == "drift"
    assert out["features"][1]["chi2_p"] is not None
    assert out["features"][0]["chi2"] is None
    assert '"dataset"' in text
