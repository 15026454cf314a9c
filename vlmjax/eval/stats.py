"""Statistics the studies use (docs/methods.md §6): McNemar, bootstrap CIs (of a statistic, of per-question
differences, of AUROC), Cohen's h, power and the sample size for a power (N80), Beta posteriors, point-biserial
and Pearson correlation and their Fisher-z interval, a paired sign-flip permutation test. All randomness comes from
a seeded ``numpy.random.Generator``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import stats as scipy_stats

EXACT_MCNEMAR_BELOW = 25


@dataclass(frozen=True)
class McNemarResult:
    only_a_correct: int  # b: A right, B wrong
    only_b_correct: int  # c: A wrong, B right
    statistic: float  # chi-square statistic, or min(b, c) for the exact test
    p_value: float
    method: str  # "exact" or "chi2"


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool],
            exact_below: int = EXACT_MCNEMAR_BELOW) -> McNemarResult:
    """Two-sided McNemar test that two systems scored on the same items have the same accuracy.

    With b + c discordant pairs: if b + c < ``exact_below`` (25, the usual rule of thumb) the exact test,
    ``p = min(1, 2 * BinomCDF(min(b, c); b + c, 1/2))``; otherwise the chi-square test with continuity correction,
    ``(|b - c| - 1)^2 / (b + c)`` on 1 degree of freedom. No discordant pairs gives p = 1.
    """
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired correctness vectors must be 1-D and equal length, got {a.shape} and {b.shape}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = only_a + only_b
    if discordant == 0:
        return McNemarResult(only_a, only_b, 0.0, 1.0, "exact")
    if discordant < exact_below:
        p_value = min(1.0, 2.0 * scipy_stats.binom.cdf(min(only_a, only_b), discordant, 0.5))
        return McNemarResult(only_a, only_b, float(min(only_a, only_b)), float(p_value), "exact")
    statistic = (abs(only_a - only_b) - 1.0) ** 2 / discordant
    return McNemarResult(only_a, only_b, statistic, float(scipy_stats.chi2.sf(statistic, df=1)), "chi2")


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    level: float


def bootstrap_ci(samples: Sequence | tuple[Sequence, ...], statistic: Callable = np.mean, *,
                 n_resamples: int = 10_000, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of ``statistic``.

    ``samples`` is one array, or a tuple of equal-length arrays that are resampled together (paired items), in which
    case ``statistic`` receives one resampled array per element, e.g. ``lambda a, b: a.mean() - b.mean()``.
    """
    arrays = tuple(np.asarray(s) for s in samples) if isinstance(samples, tuple) else (np.asarray(samples),)
    n = len(arrays[0])
    if n == 0 or any(len(a) != n for a in arrays):
        raise ValueError("bootstrap needs non-empty arrays of equal length")
    rng = np.random.default_rng(seed)
    estimates = np.empty(n_resamples)
    for i in range(n_resamples):
        index = rng.integers(0, n, size=n)
        estimates[i] = statistic(*(a[index] for a in arrays))
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(estimates, [tail, 100.0 - tail])
    return Interval(float(statistic(*arrays)), float(low), float(high), level)


def cohens_h(p1: float, p2: float) -> float:
    """Effect size between two proportions: ``2 asin sqrt(p1) - 2 asin sqrt(p2)``."""
    return 2.0 * math.asin(math.sqrt(p1)) - 2.0 * math.asin(math.sqrt(p2))


def power_two_proportions(h: float, n_per_group: float, z_alpha: float = 1.96) -> float:
    """Approximate power of a two-sided 5% test between two proportions: ``Phi(|h| sqrt(n/2) - 1.96)``.

    ``|h|`` because the sign of h only says which proportion is larger; n is the sample size of each group.
    """
    return float(scipy_stats.norm.cdf(abs(h) * math.sqrt(n_per_group / 2.0) - z_alpha))


def n_for_power(h: float, power: float = 0.8, z_alpha: float = 1.96) -> float:
    """The sample size per group at which ``power_two_proportions`` reaches ``power`` (e.g. N80):
    ``2 ((1.96 + z_power) / |h|)^2``, rounded up; inf for h = 0 (no effect is ever detected)."""
    if not 0 < power < 1:
        raise ValueError(f"power must lie in (0, 1), got {power}")
    if h == 0:
        return math.inf
    return float(math.ceil(2.0 * ((z_alpha + scipy_stats.norm.ppf(power)) / abs(h)) ** 2))


@dataclass(frozen=True)
class BetaComparison:
    prob_first_greater: float  # P(p1 > p2 | data)
    difference: Interval  # posterior mean and credible interval of p1 - p2


def beta_posterior_comparison(k1: int, n1: int, k2: int, n2: int, *, n_draws: int = 100_000,
                              level: float = 0.95, seed: int = 0) -> BetaComparison:
    """Compare two success rates with uniform priors: draws from Beta(1+k, 1+n-k) for each, by Monte Carlo."""
    for k, n in ((k1, n1), (k2, n2)):
        if not 0 <= k <= n:
            raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    rng = np.random.default_rng(seed)
    p1 = rng.beta(1 + k1, 1 + n1 - k1, size=n_draws)
    p2 = rng.beta(1 + k2, 1 + n2 - k2, size=n_draws)
    difference = p1 - p2
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(difference, [tail, 100.0 - tail])
    return BetaComparison(float(np.mean(p1 > p2)), Interval(float(difference.mean()), float(low), float(high), level))


def point_biserial(binary: Sequence, values: Sequence) -> tuple[float, float]:
    """Point-biserial correlation of a 0/1 variable (e.g. correctness) with a continuous one, and its p-value."""
    result = scipy_stats.pointbiserialr(np.asarray(binary, dtype=float), np.asarray(values, dtype=float))
    return float(result.statistic), float(result.pvalue)


def pearson(x: Sequence, y: Sequence) -> tuple[float, float]:
    """Pearson correlation of two continuous variables (e.g. head scores of two models) and its two-sided p-value
    (t-test on n - 2 degrees of freedom)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
        raise ValueError(f"pearson needs two 1-D arrays of equal length >= 3, got {x.shape} and {y.shape}")
    result = scipy_stats.pearsonr(x, y)
    return float(result.statistic), float(result.pvalue)


def correlation_interval(r: float, n: int, level: float = 0.95) -> Interval:
    """Confidence interval of a correlation coefficient (Pearson, point-biserial) from n pairs by the Fisher z
    transform: ``tanh(atanh(r) -+ z_{(1+level)/2} / sqrt(n - 3))``. NaN bounds for NaN r or n < 4."""
    if not np.isfinite(r) or n < 4:
        return Interval(float(r), float("nan"), float("nan"), level)
    z, half = math.atanh(min(max(r, -1 + 1e-15), 1 - 1e-15)), scipy_stats.norm.ppf((1 + level) / 2) / math.sqrt(n - 3)
    return Interval(float(r), math.tanh(z - half), math.tanh(z + half), level)


def bootstrap_differences(reference: Sequence, conditions: Sequence, *, n_resamples: int = 10_000,
                          level: float = 0.95, seed: int = 0) -> list[Interval]:
    """Percentile bootstrap intervals of ``mean(reference - condition)`` for each row of ``conditions`` [K, Q], the
    questions resampled together (the same draws for every row, so the intervals are comparable): e.g. each
    layer's accuracy drop under masking from per-question correctness. Row k's interval equals
    ``bootstrap_ci((reference, conditions[k]), lambda a, b: (a - b).mean())`` with the same seed."""
    reference = np.asarray(reference, dtype=float)
    conditions = np.atleast_2d(np.asarray(conditions, dtype=float))
    if reference.ndim != 1 or conditions.shape[1:] != reference.shape or len(reference) == 0:
        raise ValueError(f"need reference [Q] and conditions [K, Q], got {reference.shape} and {conditions.shape}")
    differences = reference[None] - conditions
    index = np.random.default_rng(seed).integers(0, len(reference), size=(n_resamples, len(reference)))
    estimates = np.stack([d[index].mean(axis=1) for d in differences])  # [K, n_resamples]
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(estimates, [tail, 100.0 - tail], axis=1)
    return [Interval(float(d.mean()), float(lo), float(hi), level) for d, lo, hi in zip(differences, low, high)]


def auroc(labels: Sequence, scores: Sequence) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels``: P(score of a positive > score of a negative),
    ties counting one half (the Mann-Whitney U / (n_pos n_neg))."""
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=float)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D and equal length, got {labels.shape} and {scores.shape}")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes, got {n_pos} positive and {n_neg} negative")
    ranks = scipy_stats.rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_auroc(labels: Sequence, scores: Sequence, *, n_resamples: int = 2_000, level: float = 0.95,
                    seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the AUROC, positives and negatives resampled separately (stratified), so
    every resample keeps both classes at their observed counts."""
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=float)
    estimate = auroc(labels, scores)
    positives, negatives = scores[labels], scores[~labels]
    rng = np.random.default_rng(seed)
    resampled_labels = np.r_[np.ones(len(positives), bool), np.zeros(len(negatives), bool)]
    estimates = np.array([auroc(resampled_labels, np.r_[rng.choice(positives, len(positives)),
                                                        rng.choice(negatives, len(negatives))])
                          for _ in range(n_resamples)])
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(estimates, [tail, 100.0 - tail])
    return Interval(estimate, float(low), float(high), level)


EXACT_PERMUTATIONS_UP_TO = 16


def paired_permutation_test(a: Sequence, b: Sequence, *, n_resamples: int = 10_000,
                            seed: int = 0) -> tuple[float, float]:
    """(mean difference, two-sided p) of the paired sign-flip permutation test that matched measurements ``a`` and
    ``b`` (e.g. accuracy with top-k vs random-k units masked, per seed or per question) have the same mean.

    Under the null each difference is as likely negated; p = P(|mean of flipped differences| >= |observed|), over
    all 2^n flips when n <= 16, else over ``n_resamples`` random flips with the observed one counted
    (``(1 + hits) / (1 + n_resamples)``). For paired 0/1 correctness, ``mcnemar`` is the usual choice."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired samples must be 1-D, non-empty and equal length, got {a.shape} and {b.shape}")
    differences = a - b
    observed = differences.mean()
    tolerance = 1e-12 * max(1.0, abs(observed))
    exact = len(differences) <= EXACT_PERMUTATIONS_UP_TO
    signs = (np.array(list(itertools.product((1.0, -1.0), repeat=len(differences)))) if exact
             else np.random.default_rng(seed).choice((1.0, -1.0), size=(n_resamples, len(differences))))
    hits = int(np.sum(np.abs(signs @ differences / len(differences)) >= abs(observed) - tolerance))
    return float(observed), hits / len(signs) if exact else (1 + hits) / (1 + n_resamples)
