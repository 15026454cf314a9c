import math

import numpy as np
import pytest
from scipy import integrate
from scipy import stats as scipy_stats

from vlmjax.eval.stats import (auroc, beta_posterior_comparison, bootstrap_auroc, bootstrap_ci, bootstrap_differences,
                               cohens_h, mcnemar, paired_permutation_test, pearson, point_biserial,
                               power_two_proportions)


def _paired(only_a, only_b, both=10, neither=5):
    a = [True] * only_a + [False] * only_b + [True] * both + [False] * neither
    b = [False] * only_a + [True] * only_b + [True] * both + [False] * neither
    return a, b


def test_mcnemar_exact_for_few_discordant_pairs():
    result = mcnemar(*_paired(3, 9))
    assert (result.only_a_correct, result.only_b_correct, result.method) == (3, 9, "exact")
    assert result.p_value == pytest.approx(scipy_stats.binomtest(3, 12, 0.5).pvalue)
    assert result.p_value == pytest.approx(2 * sum(math.comb(12, k) for k in range(4)) / 2**12)


def test_mcnemar_chi_square_with_continuity_correction():
    result = mcnemar(*_paired(30, 15))
    assert result.method == "chi2"
    assert result.statistic == pytest.approx((15 - 1) ** 2 / 45)
    assert result.p_value == pytest.approx(0.03688, abs=1e-4)  # chi2(1) survival at 4.356


def test_mcnemar_edge_cases():
    assert mcnemar([True, False], [True, False]).p_value == 1.0
    assert mcnemar(*_paired(6, 6)).p_value == pytest.approx(1.0)
    with pytest.raises(ValueError, match="equal length"):
        mcnemar([True], [True, False])


def test_bootstrap_ci_is_seeded_and_matches_the_normal_approximation():
    data = np.random.default_rng(1).normal(2.0, 1.0, size=400)
    interval = bootstrap_ci(data, seed=7)
    assert interval == bootstrap_ci(data, seed=7)
    assert interval != bootstrap_ci(data, seed=8)
    assert interval.estimate == pytest.approx(data.mean())
    assert interval.low < interval.estimate < interval.high
    half_width = 1.96 * data.std() / math.sqrt(len(data))
    assert interval.high - interval.low == pytest.approx(2 * half_width, rel=0.1)


def test_bootstrap_resamples_paired_arrays_together():
    correct_a = np.random.default_rng(2).random(300) < 0.8
    correct_b = correct_a.copy()  # identical systems: every resampled difference is exactly 0
    interval = bootstrap_ci((correct_a, correct_b), lambda a, b: a.mean() - b.mean(), n_resamples=500)
    assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="equal length"):
        bootstrap_ci((correct_a, correct_b[:10]), lambda a, b: 0.0)


def test_cohens_h_and_power():
    assert cohens_h(0.75, 0.5) == pytest.approx(math.pi / 6)
    assert cohens_h(0.5, 0.75) == pytest.approx(-math.pi / 6)
    assert cohens_h(0.3, 0.3) == 0.0
    # the textbook case: h = 0.2 needs about 393 per group for 80% power
    assert power_two_proportions(0.2, 393) == pytest.approx(0.80, abs=0.005)
    assert power_two_proportions(-0.2, 393) == power_two_proportions(0.2, 393)
    assert power_two_proportions(0.0, 100) == pytest.approx(0.025, abs=1e-3)


def test_beta_posterior_comparison_against_numerical_integration():
    k1, n1, k2, n2 = 422, 500, 418, 500
    result = beta_posterior_comparison(k1, n1, k2, n2, seed=3)
    first, second = scipy_stats.beta(1 + k1, 1 + n1 - k1), scipy_stats.beta(1 + k2, 1 + n2 - k2)
    exact, _ = integrate.quad(lambda x: first.pdf(x) * second.cdf(x), 0, 1)
    assert result.prob_first_greater == pytest.approx(exact, abs=0.006)
    assert result.difference.estimate == pytest.approx(first.mean() - second.mean(), abs=5e-4)
    sd = math.sqrt(first.var() + second.var())
    assert result.difference.low == pytest.approx(result.difference.estimate - 1.96 * sd, abs=3e-3)
    assert result.difference.high == pytest.approx(result.difference.estimate + 1.96 * sd, abs=3e-3)
    assert result == beta_posterior_comparison(k1, n1, k2, n2, seed=3)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        beta_posterior_comparison(5, 4, 1, 4)


def test_point_biserial_matches_pearson():
    rng = np.random.default_rng(4)
    correct = rng.random(200) < 0.6
    score = correct * 0.5 + rng.normal(size=200)
    r, p = point_biserial(correct, score)
    expected = scipy_stats.pearsonr(correct.astype(float), score)
    assert r == pytest.approx(expected.statistic) and p == pytest.approx(expected.pvalue)
    assert r > 0 and p < 0.05


def test_point_biserial_matches_scipy_pointbiserialr():
    correct = [1, 0, 1, 1, 0, 0, 1, 0]
    score = [2.0, 1.0, 3.5, 2.5, 0.5, 1.5, 1.0, 2.0]
    r, p = point_biserial(correct, score)
    expected = scipy_stats.pointbiserialr(correct, score)
    assert (r, p) == pytest.approx((expected.statistic, expected.pvalue))
    # hand-worked: r = (M1 - M0) / s_n * sqrt(p q), s_n the population standard deviation
    m1, m0, s_n = np.mean([2.0, 3.5, 2.5, 1.0]), np.mean([1.0, 0.5, 1.5, 2.0]), np.std(score)
    assert r == pytest.approx((m1 - m0) / s_n * math.sqrt(0.5 * 0.5))


def test_pearson_hand_worked():
    r, p = pearson([1, 2, 3, 4, 5], [2, 4, 5, 4, 5])
    assert r == pytest.approx(6 / math.sqrt(10 * 6))  # sum dx dy / sqrt(sum dx^2 sum dy^2)
    t = r * math.sqrt(3) / math.sqrt(1 - r * r)
    assert p == pytest.approx(2 * scipy_stats.t.sf(t, df=3))
    with pytest.raises(ValueError, match="equal length"):
        pearson([1, 2, 3], [1, 2])


def test_bootstrap_differences_per_condition():
    rng = np.random.default_rng(5)
    baseline = rng.random(200) < 0.8
    masked = np.stack([baseline, rng.random(200) < 0.5, baseline & (rng.random(200) < 0.9)])
    intervals = bootstrap_differences(baseline, masked, n_resamples=2000, seed=3)
    assert (intervals[0].estimate, intervals[0].low, intervals[0].high) == (0.0, 0.0, 0.0)  # no change at all
    for condition, interval in zip(masked, intervals):
        alone = bootstrap_ci((baseline.astype(float), condition.astype(float)), lambda a, b: (a - b).mean(),
                             n_resamples=2000, seed=3)
        as_tuple = lambda i: (i.estimate, i.low, i.high)
        assert as_tuple(interval) == pytest.approx(as_tuple(alone))
    assert intervals[1].low > 0 and intervals[2].low > 0  # real drops: intervals exclude 0
    with pytest.raises(ValueError, match="conditions"):
        bootstrap_differences(baseline, masked[:, :10])


def test_auroc_and_its_bootstrap_interval():
    assert auroc([False, False, True, True], [0.1, 0.4, 0.35, 0.8]) == 0.75  # 3 of 4 pairs ordered
    assert auroc([False, True, True], [0.5, 0.5, 0.9]) == 0.75  # a tie counts one half
    rng = np.random.default_rng(6)
    labels = rng.random(300) < 0.4
    scores = labels * 0.8 + rng.normal(size=300)
    u = scipy_stats.mannwhitneyu(scores[labels], scores[~labels]).statistic
    assert auroc(labels, scores) == pytest.approx(u / (labels.sum() * (~labels).sum()))
    interval = bootstrap_auroc(labels, scores, n_resamples=500, seed=1)
    assert interval == bootstrap_auroc(labels, scores, n_resamples=500, seed=1)
    assert interval.low < interval.estimate < interval.high
    # the Hanley-McNeil standard error gives about the same width
    a, n1, n0 = interval.estimate, labels.sum(), (~labels).sum()
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt((a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0))
    assert interval.high - interval.low == pytest.approx(2 * 1.96 * se, rel=0.2)
    with pytest.raises(ValueError, match="both classes"):
        auroc([True, True], [0.1, 0.2])


def test_paired_permutation_test():
    assert paired_permutation_test([2, 3, 4], [1, 1, 1]) == pytest.approx((2.0, 0.25))  # only all-+ / all-- as extreme
    assert paired_permutation_test([1, 2], [1, 2]) == (0.0, 1.0)
    rng = np.random.default_rng(7)
    a, b = rng.normal(0.5, 1, size=12), rng.normal(0, 1, size=12)
    mean, p = paired_permutation_test(a, b)
    reference = scipy_stats.permutation_test((a, b), lambda x, y: np.mean(x - y), permutation_type="samples",
                                             n_resamples=np.inf)
    assert mean == pytest.approx(np.mean(a - b)) and p == pytest.approx(reference.pvalue)
    a, b = rng.normal(0.3, 1, size=60), rng.normal(0, 1, size=60)
    _, p = paired_permutation_test(a, b, n_resamples=20000, seed=2)
    t_p = scipy_stats.ttest_rel(a, b).pvalue  # large n: the permutation p approaches the paired t-test's
    assert p == pytest.approx(t_p, abs=0.02)
