import math

import numpy as np
import pytest

from vlmjax.eval.pope import (brier_score, expected_calibration_error, format_table, parse_yes_no, pope_metrics,
                              score_pope, yes_probability)


@pytest.mark.parametrize(
    "answer, parsed",
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("No, there is not.", "no"),
        ("Yes. No.", "yes"),  # only the first sentence counts
        ("not sure", "no"),
        ("Yes, no", "no"),  # commas are dropped, then "no" is a word
        ("There is no red circle in the image.", "no"),
        ("Nope", "yes"),  # only the exact words No / not / no
        ("NO", "yes"),
        ("no.", "no"),
        ("No\nthere is", "yes"),  # split on spaces only, as the official script does
        ("I don't know", "yes"),
        (".No", "yes"),  # text before the first '.' is empty
        ("", "yes"),
    ],
)
def test_official_parser(answer, parsed):
    assert parse_yes_no(answer) == parsed


RAW = ["Yes", "No, there is not.", "yes.", "There is no dog", "Yes. No.", "not sure", "I think so", "No"]
LABELS = ["yes", "yes", "no", "no", "yes", "no", "yes", "yes"]


def test_metrics_on_a_hand_computed_example():
    metrics = pope_metrics([parse_yes_no(a) for a in RAW], LABELS)
    # parsed: yes no yes no yes no yes no -> TP 3 (0, 4, 6), FP 1 (2), TN 2 (3, 5), FN 2 (1, 7)
    assert (metrics["tp"], metrics["fp"], metrics["tn"], metrics["fn"]) == (3, 1, 2, 2)
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    assert metrics["precision"] == pytest.approx(3 / 4)
    assert metrics["recall"] == pytest.approx(3 / 5)
    assert metrics["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert metrics["yes_ratio"] == pytest.approx(4 / 8)  # of the predictions; the labels' ratio would be 5/8


def test_undefined_precision_is_nan_not_a_crash():
    metrics = pope_metrics(["no", "no"], ["yes", "no"])
    assert math.isnan(metrics["precision"]) and math.isnan(metrics["f1"]) and metrics["recall"] == 0.0
    with pytest.raises(ValueError, match="not \"yes\" or \"no\""):
        pope_metrics(["maybe"], ["yes"])


def test_yes_probability_sums_several_token_ids():
    logits = np.array([0.0, 1.0, 2.0, 3.0])
    expected = (math.e + math.e**2) / (math.e + math.e**2 + math.e**3)
    assert yes_probability(logits, [1, 2], [3]) == pytest.approx(expected)
    assert yes_probability(logits, [1, 2, 2], [3]) == pytest.approx(expected)  # repeated ids count once
    log_probs = logits - np.log(np.sum(np.exp(logits)))
    assert yes_probability(log_probs, [1, 2], [3]) == pytest.approx(expected)


def test_yes_probability_batches_and_is_stable():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 10)).astype(np.float32) * 50 + 1000
    p_yes = yes_probability(logits, [4, 7], [1])
    assert p_yes.shape == (2, 3) and np.all(np.isfinite(p_yes))
    for index in np.ndindex(2, 3):
        row = logits[index].astype(np.float64)
        weights = np.exp(row - row.max())
        assert p_yes[index] == pytest.approx((weights[4] + weights[7]) / (weights[4] + weights[7] + weights[1]))


def test_yes_probability_rejects_bad_ids():
    with pytest.raises(ValueError, match="both"):
        yes_probability(np.zeros(5), [1, 2], [2])
    with pytest.raises(ValueError, match="out of range"):
        yes_probability(np.zeros(5), [1], [5])
    with pytest.raises(ValueError, match="at least one"):
        yes_probability(np.zeros(5), [], [1])


def test_brier_and_ece_on_hand_computed_values():
    p_yes = [0.9, 0.2, 0.6, 0.5]
    labels = ["yes", "no", "no", "yes"]
    assert brier_score(p_yes, labels) == pytest.approx((0.01 + 0.04 + 0.36 + 0.25) / 4)
    # confidences .9 .8 .6 .5, correct 1 1 0 1 (p = 0.5 predicts yes), each alone in its bin
    assert expected_calibration_error(p_yes, labels) == pytest.approx((0.1 + 0.2 + 0.6 + 0.5) / 4)


def test_ece_bins_are_right_closed():
    # confidence 0.7 shares the bin (0.6, 0.7] with 0.65: |0.5 - 0.675| = 0.175 (it would be 0.475 otherwise)
    assert expected_calibration_error([0.7, 0.65], ["yes", "no"]) == pytest.approx(0.175)
    assert expected_calibration_error([1.0, 0.0], ["yes", "no"]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        brier_score([1.5], ["yes"])


def test_score_pope_per_split_and_overall():
    records = [{"prediction": a, "label": g, "split": "adversarial" if i < 4 else "random", "p_yes": p}
               for i, (a, g, p) in enumerate(zip(RAW, LABELS, [0.9, 0.4, 0.8, 0.1, 0.7, 0.3, 0.6, 0.2]))]
    table = score_pope(records)
    assert list(table) == ["random", "adversarial", "overall"]
    assert table["overall"]["accuracy"] == pytest.approx(5 / 8)
    assert table["adversarial"]["n"] == 4 and table["adversarial"]["accuracy"] == pytest.approx(2 / 4)
    assert table["random"]["accuracy"] == pytest.approx(3 / 4)
    assert table["overall"]["brier"] == pytest.approx(
        brier_score([r["p_yes"] for r in records], [r["label"] for r in records]))
    text = format_table(table)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["split", "n", "acc"] and "ECE" in lines[0]
    assert lines[-1].split()[:3] == ["overall", "8", "62.5"]
    assert "75.0" in lines[1] and lines[1].startswith("random")


def test_score_pope_without_probabilities_and_mixed():
    table = score_pope([{"prediction": "yes", "label": "yes"}, {"prediction": "no", "label": "yes"}])
    assert list(table) == ["all", "overall"] and "brier" not in table["overall"]
    assert "Brier" not in format_table(table)
    with pytest.raises(ValueError, match="1 of 2 records have p_yes"):
        score_pope([{"prediction": "yes", "label": "yes", "p_yes": 0.9}, {"prediction": "no", "label": "yes"}])


def test_candidate_probabilities_generalise_yes_probability_and_the_decision_rule():
    from vlmjax.eval.pope import candidate_probabilities, first_token_correct, says_yes

    logits = np.random.default_rng(0).normal(size=(3, 4, 10))
    three = candidate_probabilities(logits, [[1, 2], [3], [5]])
    np.testing.assert_allclose(three.sum(-1), 1.0)
    np.testing.assert_allclose(candidate_probabilities(logits, [[1, 2], [3]])[..., 0],
                               yes_probability(logits, [1, 2], [3]), rtol=1e-12)
    assert says_yes([0.5, 0.49]).tolist() == [True, False]
    assert first_token_correct([[0.7, 0.2], [0.4, 0.5]], ["yes", "no"]).tolist() == [[True, True], [False, False]]
