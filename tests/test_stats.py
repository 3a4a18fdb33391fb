"""orchestrator.stats against scipy's own tests and hand computations from the t distribution, on fixed data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from orchestrator.stats import binomial_se, compare, minimum_detectable_effect

A = [94.2, 95.0, 93.6, 92.5, 96.1]
B = [90.1, 93.3, 88.0, 91.7]


def test_welch_matches_scipy_and_the_t_interval_by_hand() -> None:
    c = compare(A, B)
    reference = scipy_stats.ttest_ind(A, B, equal_var=False)
    assert c.test == "welch" and (c.n_a, c.n_b) == (5, 4)
    assert c.p_value == pytest.approx(reference.pvalue, rel=1e-12)
    # By hand: se from the two sample variances, Welch-Satterthwaite degrees of freedom, t quantile.
    va, vb = np.var(A, ddof=1) / len(A), np.var(B, ddof=1) / len(B)
    df = (va + vb) ** 2 / (va**2 / (len(A) - 1) + vb**2 / (len(B) - 1))
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    delta = np.mean(A) - np.mean(B)
    assert c.delta == pytest.approx(delta)
    assert (c.ci_low, c.ci_high) == (pytest.approx(delta - half), pytest.approx(delta + half))
    assert c.df == pytest.approx(df) and c.se == pytest.approx(math.sqrt(va + vb))


def test_paired_matches_ttest_rel_and_the_t_interval_by_hand() -> None:
    a, b = [17.2, 21.5, 14.6, 12.1, 19.8], [17.5, 21.7, 15.6, 13.1, 20.9]
    c = compare(a, b, paired=True)
    assert c.test == "paired t" and (c.n_a, c.n_b) == (5, 5)
    assert c.p_value == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue, rel=1e-12)
    d = np.subtract(a, b)
    half = scipy_stats.t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / math.sqrt(len(d))
    assert (c.ci_low, c.ci_high) == (pytest.approx(d.mean() - half), pytest.approx(d.mean() + half))
    assert c.df == len(d) - 1


def test_a_consistent_small_effect_is_significant_paired_and_not_unpaired() -> None:
    # Seeds differ by several points; within a seed the second arm is ~1 point lower every time (BN* vs BN).
    base = [17.2, 21.5, 14.6, 12.1, 19.8]
    shifted = [v - s for v, s in zip(base, [0.6, 1.4, 0.8, 1.2, 1.0], strict=True)]
    paired, unpaired = compare(shifted, base, paired=True), compare(shifted, base)
    assert paired.significant and paired.verdict(-1) == "reproduced"
    assert not unpaired.significant and unpaired.verdict(-1).startswith("inconclusive")


def test_n_below_two_and_empty_arms_give_no_test_and_no_nan() -> None:
    for a, b in (([80.0], [60.0, 62.0, 64.0]), ([60.0, 62.0], [70.0]), ([], [1.0, 2.0])):
        c = compare(a, b)
        assert c.test == "n<2" and c.p_value is None and c.ci_low is None and c.mde is None
        assert c.verdict(+1) == c.verdict(None) == "n too small"
    with pytest.raises(ValueError, match="equal lengths"):
        compare([1.0, 2.0], [1.0], paired=True)


def test_zero_variance_is_labelled_not_nan() -> None:
    identical = compare([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    assert identical.test == "no variance" and identical.p_value is None
    assert identical.verdict(+1) == "no difference (identical in every seed)"
    constant_shift = compare([5.0, 6.0, 7.0], [4.0, 5.0, 6.0], paired=True)  # every pair differs by exactly 1
    assert constant_shift.test == "no variance" and constant_shift.verdict(+1) == "untestable (no variance)"
    # One arm constant, the other not: Welch is defined (its df come from the varying arm).
    one_sided = compare([0.0, 0.0, 0.0], [14.0, 21.0, 15.0, 19.0, 21.0])
    assert one_sided.test == "welch" and one_sided.df == pytest.approx(4.0)
    assert one_sided.p_value == pytest.approx(
        scipy_stats.ttest_ind([0.0, 0.0, 0.0], [14.0, 21.0, 15.0, 19.0, 21.0], equal_var=False).pvalue
    )


def test_verdicts() -> None:
    up = compare([10.0, 11.0, 12.0], [1.0, 2.0, 3.0])
    assert up.significant
    assert up.verdict(+1) == "reproduced" and up.verdict(-1) == "contradicted" and up.verdict(None) == "significant"
    flat = compare([1.0, 3.0, 2.0], [2.0, 1.0, 3.0])
    assert not flat.significant and flat.mde is not None
    assert flat.verdict(+1) == f"inconclusive (effects below {flat.mde:.1f} points undetectable)"
    assert flat.verdict(None) == f"no significant difference (effects below {flat.mde:.1f} points undetectable)"


def test_mde_gives_80_percent_power_by_simulation() -> None:
    # Independent check of the noncentral-t solution: paired t-tests on simulated data with the true effect set
    # to the MDE reject in about 80 % of trials.
    n, sd = 5, 1.0
    mde = minimum_detectable_effect(sd / math.sqrt(n), n - 1)
    rng = np.random.default_rng(0)
    trials = rng.normal(mde, sd, size=(20000, n))
    t = trials.mean(axis=1) / (trials.std(axis=1, ddof=1) / math.sqrt(n))
    power = np.mean(np.abs(t) > scipy_stats.t.ppf(0.975, n - 1))
    assert power == pytest.approx(0.80, abs=0.015)
    # Many degrees of freedom: the normal approximation (z_0.975 + z_0.8) x se; few: larger.
    assert minimum_detectable_effect(1.0, 10_000) == pytest.approx(1.960 + 0.8416, abs=2e-3)
    assert minimum_detectable_effect(1.0, 2) > minimum_detectable_effect(1.0, 4) > 2.81
    c = compare(A, B)
    assert c.power(c.mde or 0.0) == pytest.approx(0.80, abs=1e-6)


def test_binomial_se_agresti_coull() -> None:
    assert binomial_se(0.5, 100) == pytest.approx(math.sqrt(0.5 * 0.5 / 104))
    x, n = 90, 359
    shrunk = (x + 2) / (n + 4)
    assert binomial_se(x / n, n) == pytest.approx(math.sqrt(shrunk * (1 - shrunk) / (n + 4)))
    assert binomial_se(0.0, 359) > 0 and binomial_se(1.0, 359) > 0  # not the normal approximation's zero
    with pytest.raises(ValueError):
        binomial_se(0.5, 0)
