"""The reliability-probes study (seed 004): its new computations against independent references (hand-worked values,
scipy / NumPy), the refusal of a split with too few errors, and the study end to end on a tiny LLaVA."""

import json

import numpy as np
import pytest
from scipy import stats as scipy_stats

from experiments import reliability_probes as rp, report
from vlmjax.data.shapes import generate_dataset
from vlmjax.eval.stats import auroc
from vlmjax.probes import rank_units
from vlmjax.testing.tiny import make_tiny_llava

PROBE = {"l2": 1.0, "bootstrap_seed": 0, "split_seed": 0, "label_shuffles": 19, "min_probe_errors": 3}


def test_refusal_names_the_split_and_the_counts():
    correct = np.array([True] * 40 + [False] * 6)
    with pytest.raises(rp.ProbeRefused, match="test split holds 1 wrong and 8 right answers of 46 questions.*at "
                                              "least 3 of each .min_probe_errors"):
        rp.probe_split(correct, seed=0, minimum=3)
    train, test = rp.probe_split(np.array([True] * 40 + [False] * 20), seed=0, minimum=3)
    assert (~train == test).all() and (~np.r_[[True] * 40, [False] * 20])[test].sum() == 4


def test_probe_ranks_units_by_their_standardised_weight():
    """Unit 0 predicts correctness at a large scale; unit 1 is a near-constant unit that is weakly informative, so
    on raw activations it needs a huge coefficient. |w| on raw units ranks unit 1 first; rank_units ranks unit 0."""
    rng = np.random.default_rng(0)
    correct = rng.random(400) < 0.5
    signal = np.where(correct, 1.0, -1.0)
    features = np.stack([100 * (signal + rng.normal(0, 1, 400)), 1e-4 * (0.3 * signal + rng.normal(0, 1, 400)),
                         rng.normal(0, 1, 400)], axis=1)
    train, test = rp.probe_split(correct, 0, 3)
    probe = rp.probe_layer(features, correct, train, test, PROBE)
    assert np.argmax(np.abs(probe["weights"])) == 1 and rank_units(probe["weights"], features[train])[0] == 0
    scores = np.array(probe["test_scores"])
    assert probe["auroc"] == pytest.approx(auroc(correct[test], scores)) and probe["auroc"] > 0.8
    shuffled = np.array(probe["auroc_shuffled"])
    assert len(shuffled) == 19 and shuffled.mean() < probe["auroc"]
    assert probe["shuffle_p"] == pytest.approx((1 + (shuffled >= probe["auroc"]).sum()) / 20)
    low, high = probe["auroc_ci"]
    assert low <= probe["auroc"] <= high


def test_correlation_and_its_interval_against_scipy():
    correct = np.array([1, 0, 1, 1, 0, 1, 0, 1], bool)
    values = np.array([0.9, 0.2, 0.7, 0.6, 0.5, 0.8, 0.1, 0.4])
    c = rp.correlation(correct, values)
    r, p = scipy_stats.pearsonr(correct.astype(float), values)
    z, half = np.arctanh(r), 1.959964 / np.sqrt(len(values) - 3)
    assert (c["r"], c["p"]) == pytest.approx((r, p)) and (c["low"], c["high"]) == pytest.approx(
        (np.tanh(z - half), np.tanh(z + half)), abs=1e-5)
    assert np.isnan(rp.correlation(correct, np.ones(8))["r"])  # constant agreement: no correlation, not an error


def test_ablation_sets_top_then_random_per_seed():
    order = np.array([7, 3, 9, 0, 1, 2, 4, 5, 6, 8])
    sets = rp.ablation_sets({"residual_dims": order}, {"residual_dims": [2, 5]}, [0, 1, 2])
    assert [(s["count"], s["choice"]) for s in sets] == [(2, "top")] + [(2, "random")] * 3 + [(5, "top")] + \
        [(5, "random")] * 3
    assert sets[0]["indices"] == [7, 3] and sets[4]["indices"] == [7, 3, 9, 0, 1]
    randoms = [tuple(s["indices"]) for s in sets if s["choice"] == "random" and s["count"] == 5]
    assert len(set(randoms)) == 3 and all(len(set(r)) == 5 and max(r) < 10 for r in randoms)


def test_consistency_summary_correlates_agreement_with_correctness():
    records = [{"agreement": a, "majority_correct": m} for a, m in ((1.0, True), (0.6, False), (0.9, True), (0.5, True))]
    labels = np.array([True, False, True, False])
    s = rp.consistency_summary(records, labels, {"consistency_max_new_tokens": 3})
    assert s["agreement_correctness"]["r"] == pytest.approx(np.corrcoef(labels, [1.0, 0.6, 0.9, 0.5])[0, 1])
    assert s["majority_accuracy"] == 0.75 and s["k"] == 10 and s["temperature"] == 0.7 and s["top_p"] == 0.9
    assert "not_run" in rp.consistency_summary([], labels[:0], {})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    make_tiny_llava(root / "model", text_layers=2)
    generate_dataset(str(root / "data"), 10, 1234, image_size=64, progress=False)
    return root


def study_config(tiny, out, **extra):
    config = json.loads(rp.CONFIG.read_text())
    config.update(model=str(tiny / "model"), data=str(tiny / "data"), out=str(out), n_images=10, batch_size=6,
                  question_files={"pope_test_random": 6, "pope_test_adversarial": 6}, random_neuron_seeds=[0, 1],
                  label_shuffles=2, consistency_questions=3, min_probe_errors=1)
    config.update(extra)
    return config


def test_study_end_to_end(tiny, tmp_path):
    summary = rp.run(study_config(tiny, tmp_path))
    assert summary["family"] == "llava" and summary["probe_refused"] is None
    assert 0 <= summary["accuracy_random_patches_removed"] <= 1 and 0 <= summary["top_vs_random_patches_mcnemar_p"] <= 1
    assert all({"r", "p", "low", "high"} <= set(c) for c in summary["clusters_correctness"])
    assert len(summary["probe_shuffle_p"]) == 2 and len(summary["probe_auroc_shuffled_q95"]) == 2
    ablation = summary["ablation"]
    assert "rank_units" in ablation["ranking"] and ablation["layer"] == summary["best_probe_layer"]
    kinds = [(s["units"], s["count"]) for s in ablation["sets"]]
    assert kinds == [("mlp_neurons", 5), ("residual_dims", 5), ("residual_dims", 32)]  # hidden size 64: half is 32
    assert all(len(s["random_accuracies"]) == 2 and 0 < s["top_vs_random_p"] <= 1 for s in ablation["sets"])
    consistency = summary["self_consistency"]
    records = [json.loads(line) for line in (tmp_path / "records_consistency.jsonl").open()]
    assert consistency["questions"] == 3 == len(records) and all(len(r["samples"]) == 10 for r in records)
    assert all(r["agreement"] == max(map(r["samples"].count, r["samples"])) / 10 or r["agreement"] >= 0.1
               for r in records)
    for claim in report.CLAIMS:
        if claim.study == "reliability_probes":
            assert claim.judge(summary).verdict in (report.REPRODUCED, report.NOT_REPRODUCED, report.NOT_APPLICABLE)


def test_too_few_errors_refuse_the_probe_and_its_ablation(tiny, tmp_path):
    summary = rp.run(study_config(tiny, tmp_path, min_probe_errors=50, consistency_questions=0))
    assert "at least 50 of each" in summary["probe_refused"] and summary["ablation"]["not_run"] == summary["probe_refused"]
    assert summary["probe_auroc"] == [] and "not_run" in summary["self_consistency"]
    assert not (tmp_path / "records_ablation.jsonl").exists() and (tmp_path / "reliability_probes.png").is_file()
    verdict = report.probe_auroc(summary)
    assert verdict.verdict == report.NOT_APPLICABLE and "at least 50" in verdict.evidence


@pytest.mark.parametrize("key, value", [("min_probe_errors", 0), ("consistency_questions", -1), ("label_shuffles", -2)])
def test_counts_below_their_least_are_refused_before_any_work(key, value, tmp_path):
    config = {**json.loads(rp.CONFIG.read_text()), key: value, "out": str(tmp_path)}
    with pytest.raises(rp.VlmJaxError, match=f"{key}' must be at least"):
        rp.run(config)
    assert not list(tmp_path.iterdir())
