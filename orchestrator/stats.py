"""How two settings of a study are compared: the one place the report (and anything that decides on more seeds)
computes a difference, its confidence interval, its p-value and the smallest effect the data could have detected.

- Two independent groups of seeds: Welch's t-test (`scipy.stats.ttest_ind(equal_var=False)`), which assumes
  neither equal variances nor equal n; the 95 % confidence interval of the difference is Welch's, on the
  Welch-Satterthwaite degrees of freedom.
- Paired seeds (the same seed and a shared training prefix, e.g. BN and BN* of one seed, or the two MBN branches
  of one network): the paired t-test (`scipy.stats.ttest_rel`) on the per-seed differences.
- Minimum detectable effect (MDE): the smallest true difference the same test, at the observed standard error and
  degrees of freedom, detects with 80 % power at two-sided alpha 0.05, solved exactly from the noncentral t
  distribution (`scipy.stats.nct`), not from the normal approximation. A non-significant result only says that
  effects of about the MDE or larger are unlikely; smaller ones would go unseen.
- n < 2 in either group (or fewer than 2 pairs) gives no test, and neither does zero variance (every seed equal):
  both are labelled, never turned into NaN.

All values are in the caller's units (the report passes accuracy in percentage points).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

from scipy import optimize
from scipy import stats as scipy_stats

ALPHA = 0.05
POWER = 0.80  # the conventional power a study is sized for (Cohen 1988)

Test = Literal["welch", "paired t", "n<2", "no variance"]


@dataclass(frozen=True)
class Comparison:
    """a - b. For a paired comparison n_a == n_b is the number of pairs and the means are over the pairs."""

    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    test: Test
    alpha: float = ALPHA
    ci_low: float | None = None  # (1 - alpha) confidence interval of the difference; None without a test
    ci_high: float | None = None
    p_value: float | None = None
    se: float | None = None  # standard error of the difference
    df: float | None = None  # degrees of freedom of its t distribution
    mde: float | None = None  # minimum detectable effect (80 % power, two-sided alpha)

    @property
    def delta(self) -> float:
        return self.mean_a - self.mean_b

    @property
    def tested(self) -> bool:
        return self.p_value is not None

    @property
    def significant(self) -> bool:
        return self.p_value is not None and self.p_value < self.alpha

    def power(self, effect: float) -> float | None:
        """Power of this comparison's test to detect a true difference `effect` (None without a test)."""
        if self.se is None or self.df is None or not self.tested:
            return None
        return _power(abs(effect) / self.se, self.df, self.alpha)

    def verdict(self, expected_sign: int | None = None) -> str:
        """The comparison judged against a claimed direction (+1: a above b, -1: below, None: no claim):
        'reproduced' (significant, same sign), 'contradicted' (significant, opposite sign) or 'inconclusive
        (effects below X undetectable)' (not significant; X is the MDE). Without a claim: 'significant' or
        'no significant difference (...)'."""
        if self.test == "n<2":
            return "n too small"
        if self.test == "no variance":
            return "no difference (identical in every seed)" if self.delta == 0 else "untestable (no variance)"
        if not self.significant:
            undetectable = f"effects below {self.mde:.1f} points undetectable" if self.mde is not None else ""
            word = "inconclusive" if expected_sign else "no significant difference"
            return f"{word} ({undetectable})" if undetectable else word
        if not expected_sign:
            return "significant"
        return "reproduced" if (self.delta > 0) == (expected_sign > 0) else "contradicted"


def compare(a: Sequence[float], b: Sequence[float], *, paired: bool = False, alpha: float = ALPHA) -> Comparison:
    """a - b with Welch's t-test, or the paired t-test when `paired` (a[i] and b[i] are one pair)."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    if paired and len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, not {len(a)} and {len(b)}")
    mean_a = sum(a) / len(a) if a else math.nan
    mean_b = sum(b) / len(b) if b else math.nan
    base = partial(Comparison, n_a=len(a), n_b=len(b), mean_a=mean_a, mean_b=mean_b, alpha=alpha)
    if len(a) < 2 or len(b) < 2:
        return base(test="n<2")
    if paired:
        diffs = [x - y for x, y in zip(a, b, strict=True)]
        se = _sd(diffs) / math.sqrt(len(diffs))
    else:
        se = math.sqrt(_sd(a) ** 2 / len(a) + _sd(b) ** 2 / len(b))
    if se == 0.0:  # every seed (or every pair's difference) equal: t is undefined, scipy would return NaN
        return base(test="no variance", se=0.0)
    result = scipy_stats.ttest_rel(a, b) if paired else scipy_stats.ttest_ind(a, b, equal_var=False)
    interval = result.confidence_interval(1 - alpha)
    df = float(result.df)
    return base(
        test="paired t" if paired else "welch",
        ci_low=float(interval.low),
        ci_high=float(interval.high),
        p_value=float(result.pvalue),
        se=se,
        df=df,
        mde=minimum_detectable_effect(se, df, alpha),
    )


def minimum_detectable_effect(se: float, df: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The true difference a two-sided t-test with standard error `se` and `df` degrees of freedom detects with
    probability `power`: the noncentrality lambda solving P(|T'| > t_crit) = power for T' ~ nct(df, lambda),
    times se."""
    lower = 0.0
    upper = (scipy_stats.norm.ppf(1 - alpha / 2) + scipy_stats.norm.ppf(power)) * 2
    while _power(upper, df, alpha) < power:  # few degrees of freedom need a larger noncentrality
        lower, upper = upper, upper * 2
    noncentrality = optimize.brentq(lambda nc: _power(nc, df, alpha) - power, lower, upper, xtol=1e-10)
    return float(noncentrality * se)


def _power(noncentrality: float, df: float, alpha: float) -> float:
    critical = scipy_stats.t.ppf(1 - alpha / 2, df)
    distribution = scipy_stats.nct(df, noncentrality)
    # The wrong-sign tail is negligible for a positive noncentrality, and scipy's nct returns NaN for it at large
    # noncentralities and few degrees of freedom: count it as 0 there.
    wrong_sign = float(distribution.cdf(-critical))
    return float(distribution.sf(critical)) + (wrong_sign if math.isfinite(wrong_sign) else 0.0)


def _sd(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def binomial_se(accuracy: float, n_images: int) -> float:
    """Standard error of one cell's accuracy from its finite evaluation subset: the evaluation images are a sample,
    so a cell's accuracy is a binomial proportion. Agresti-Coull ("plus two successes and two failures"):
    sqrt(p~(1 - p~) / (n + 4)) with p~ = (x + 2) / (n + 4), which, unlike the plain normal approximation,
    does not claim zero error at 0 % or 100 %. Same units as `accuracy` (a fraction)."""
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, not {n_images}")
    shrunk = (accuracy * n_images + 2) / (n_images + 4)
    return math.sqrt(shrunk * (1 - shrunk) / (n_images + 4))
