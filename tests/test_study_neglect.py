"""The neglect-zone study's protocol (methods §1, §6): the comparison statistics against hand-worked values and scipy,
the yes-logit threshold against shifted logits, VCD's first-token scores with the plausibility cut, VCD noise on
Qwen2-VL's packed patches, the study end to end on a tiny Qwen2-VL (its VCD scores against HF's logits contrasted in
NumPy) with its new fields, and the report's rules."""

import json
import math

import jax
import numpy as np
import pytest
from scipy import integrate
from scipy import stats as scipy_stats
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import vlmjax
from experiments import common, neglect_zone as nz, report
from vlmjax import interventions as iv
from vlmjax import load_processor
from vlmjax.data.shapes import generate_dataset
from vlmjax.errors import VlmJaxError
from vlmjax.eval.batches import padded_batches
from vlmjax.eval.pope import yes_probability
from vlmjax.eval.run import answer_token_ids
from vlmjax.eval.stats import n_for_power, power_two_proportions
from vlmjax.testing.tiny_qwen2_vl import make_tiny_qwen2_vl
from vlmjax.verify import load_hf_model, run_hf

POPE = {"pope_test_random": 2, "pope_test_popular": 2, "pope_test_adversarial": 2}


def test_n80_inverts_the_power_formula():
    # h = 0.007 (the paper's accuracy effect): 2 ((1.96 + 0.841621) / 0.007)^2 = 320370.6 -> 320371 per group.
    assert n_for_power(0.007) == 320371 == n_for_power(-0.007)
    for h in (0.049, 0.3, 1.1):
        n = n_for_power(h)
        assert power_two_proportions(h, n) >= 0.8 > power_two_proportions(h, n - 1)
    assert n_for_power(0.0) == math.inf
    with pytest.raises(ValueError, match="power"):
        n_for_power(0.1, power=1.0)


def test_versus_against_hand_counts_and_the_exact_posterior():
    baseline = np.array([1] * 30 + [0] * 20, bool)
    other = baseline.copy()
    other[:3] = False  # 3 right only at baseline
    other[30:42] = True  # 12 right only under the condition
    v = nz.versus(baseline, other, seed=0)
    assert (v["n"], v["baseline"], v["value"]) == (50, 0.6, 0.78)
    assert (v["mcnemar"]["only_a_correct"], v["mcnemar"]["only_b_correct"]) == (3, 12)
    # 15 discordant pairs < 25: the exact test, 2 * P(Binom(15, 1/2) <= 3)
    assert v["mcnemar"]["method"] == "exact"
    assert v["mcnemar"]["p_value"] == pytest.approx(2 * sum(math.comb(15, k) for k in range(4)) / 2 ** 15)
    h = 2 * math.asin(math.sqrt(0.78)) - 2 * math.asin(math.sqrt(0.6))
    assert v["cohens_h"] == pytest.approx(h)
    assert v["power"] == pytest.approx(scipy_stats.norm.cdf(h * math.sqrt(25) - 1.96))
    assert v["n_for_80_power"] == math.ceil(2 * ((1.96 + scipy_stats.norm.ppf(0.8)) / h) ** 2)
    # P(p_other > p_base) under Beta(1 + 39, 1 + 11) and Beta(1 + 30, 1 + 20): integral of f_other * F_base
    exact, _ = integrate.quad(lambda x: scipy_stats.beta.pdf(x, 40, 12) * scipy_stats.beta.cdf(x, 31, 21), 0, 1)
    assert v["p_greater"] == pytest.approx(exact, abs=0.005)
    assert v["difference"]["low"] < 0.18 < v["difference"]["high"]


def test_threshold_shift_equals_subtracting_c_from_every_yes_spelling():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3, size=(40, 12))
    yes, no = [2, 5], [7]
    p_yes = yes_probability(logits, yes, no)
    for c in (0.0, 1.0, 2.5, 6.0):
        shifted = logits.copy()
        shifted[:, yes] -= c
        np.testing.assert_allclose(nz.shifted_p_yes(p_yes, c), yes_probability(shifted, yes, no), rtol=1e-9)
    np.testing.assert_array_equal(nz.shifted_p_yes([1.0, 0.0], 6.0), [1.0, 0.0])  # certain answers stay certain


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    """(directory holding model/ and data/, the HF model): a tiny Qwen2-VL, whose packed patches VCD must handle."""
    root = tmp_path_factory.mktemp("neglect")
    hf_model, _ = make_tiny_qwen2_vl(root / "model", text_layers=4)
    generate_dataset(str(root / "data"), 10, 1234, image_size=64, progress=False)
    return root, hf_model


def test_vcd_scores_give_cut_answers_no_probability_and_a_tie_when_all_are_cut(tiny_qwen):
    processor = load_processor(str(tiny_qwen[0] / "model"))
    yes_no = common.StudyQuestion(1, "", "", "no", "pope", "random", ("yes", "no"), False, False)
    colour = common.StudyQuestion(2, "", "", "red", "attribute", "attribute", ("red", "blue"), False, False)
    scorer = common.AnswerScorer(processor.tokenizer, [yes_no, colour])
    ids = scorer.ids
    logits = np.random.default_rng(1).normal(size=(4, len(processor.tokenizer)))
    logits[0, ids["no"]] = -np.inf  # "no" cut: p_yes = 1
    logits[1, ids["yes"] + ids["no"]] = -np.inf  # both cut: a tie, read as "yes" (wrong: the answer is "no")
    logits[3, ids["red"] + ids["blue"]] = -np.inf  # every candidate cut: equally likely
    chunk = [yes_no, yes_no, yes_no, colour]
    scores, all_cut = nz.vcd_scores(scorer, logits, chunk)
    np.testing.assert_array_equal(all_cut, [False, True, False, True])
    assert scores["p_yes"][0] == 1.0 and scores["p_yes"][1] == 0.5 and not scores["correct"][1]
    plain = yes_probability(logits[2], ids["yes"], ids["no"])
    assert scores["p_yes"][2] == pytest.approx(plain) and scores["p_answer"][3] == 0.5


def test_vcd_noise_on_packed_patches_is_noise_on_the_image_before_patching(tiny_qwen):
    """The HF processor's packed layout holds a still image's frame twice (channel-major, then the temporal copy):
    vcd_noise gives both copies the same noise, so its output is the packing of a noised image."""
    processor = load_processor(str(tiny_qwen[0] / "model"))
    v = tiny_qwen[1].config.vision_config
    image = (np.random.default_rng(0).random((56, 84, 3)) * 255).astype("uint8")
    packed = np.asarray(processor.image_processor(images=[image], return_tensors="np")["pixel_values"])
    frames = lambda x: np.asarray(x).reshape(len(x), v.in_channels, v.temporal_patch_size, -1)
    np.testing.assert_array_equal(frames(packed)[:, :, 0], frames(packed)[:, :, 1])  # the layout vcd_noise assumes
    noised = np.asarray(iv.vcd_noise(packed, jax.random.key(0), 500, (v.in_channels, v.temporal_patch_size)))
    betas = 1 / (1 + np.exp(-np.linspace(-6, 6, 1000))) * (5e-3 - 1e-5) + 1e-5
    alpha_bar = np.cumprod(1 - betas)[500]
    eps = frames((noised - np.sqrt(alpha_bar) * packed) / np.sqrt(1 - alpha_bar))
    np.testing.assert_allclose(eps[:, :, 0], eps[:, :, 1], atol=1e-4)
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05
    with pytest.raises(VlmJaxError, match="packed_layout"):
        iv.vcd_noise(packed, jax.random.key(0))


def test_bias_keys_are_chosen_by_name():
    assert nz.bias_columns("visual") is None and nz.bias_columns("first_576_columns") == 576
    with pytest.raises(VlmJaxError, match="first_576_columns"):
        nz.bias_columns("first_576")


def test_study_reports_heads_bands_vcd_thresholds_and_comparisons(tiny_qwen, tmp_path):
    """End to end on a tiny Qwen2-VL with the original code's column bias: every new field, sane; VCD's p(yes)
    (generate's contrastive decoding on packed patches) against HF's logits on the real and the study's noised
    images, contrasted in NumPy."""
    root, hf = tiny_qwen
    config = json.loads(nz.CONFIG.read_text())
    config.update(model=str(root / "model"), data=str(root / "data"), out=str(tmp_path), n_images=10, batch_size=6,
                  question_files=POPE, gradient_questions=3, biases=[0.0, 2.0], bias_keys="first_576_columns")
    s = nz.run(config)
    heads = np.array(s["visual_fraction_per_head"])
    assert heads.shape == (4, hf.config.text_config.num_attention_heads) and ((heads > 0) & (heads < 1)).all()
    zone = s["bands"]["zone"]
    assert zone["layers"] == s["zone"] and zone["visual_fraction"] == pytest.approx(
        np.mean(np.array(s["visual_fraction"])[s["zone"]]))
    assert s["tokens"]["bias_keys"].startswith("first_576_columns: key columns 0..575")
    shifts = s["yes_logit_threshold"]
    assert [t["shift"] for t in shifts] == list(range(7)) and "vs_baseline" not in shifts[0]
    assert all(b["yes_ratio"] <= a["yes_ratio"] for a, b in zip(shifts, shifts[1:]))  # a larger c: fewer "yes"
    assert shifts[0]["yes_ratio"] == s["viar"][0]["yes_ratio"]
    for row in (s["viar"][1], s["vcd"], shifts[3]):
        for stat in row["vs_baseline"].values():
            assert stat["n"] == 6 and 0 <= stat["mcnemar"]["p_value"] <= 1 and 0 <= stat["p_greater"] <= 1
    assert s["threshold_matching_viar"]["accuracy"]["value"] == s["viar"][1]["accuracy_yes_no"]
    assert s["gradient_zone_fall"] is None or s["gradient_zone_fall"]["low"] <= s["gradient_zone_fall"]["high"]
    assert (tmp_path / "neglect_heads.png").is_file()
    tags = EventAccumulator(str(tmp_path / "tensorboard")).Reload().Tags()["scalars"]
    assert {"heads/visual_fraction_max", "bands/visual_fraction", "vcd/yes_ratio", "threshold/yes_ratio"} <= set(tags)

    processor = load_processor(config["model"])
    questions = common.read_study_set(root / "data", POPE, config["seed"])
    chunk, real, inputs = next(padded_batches(processor, questions, config["batch_size"]))
    noisy = nz.contrast_images(vlmjax.load(config["model"], progress=False), inputs, chunk, config)
    hf = load_hf_model(config["model"])  # eager attention, as verification runs it
    l_real, l_noisy = (run_hf(hf, dict(inputs, pixel_values=p))["logits"][:, -1]
                       for p in (inputs["pixel_values"], noisy))
    contrast = np.where(l_real < np.log(0.1) + l_real.max(-1, keepdims=True), -np.inf, 2 * l_real - l_noisy)
    yes, no = answer_token_ids(processor.tokenizer, "yes"), answer_token_ids(processor.tokenizer, "no")
    records = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "records.jsonl").open()}
    checked = 0
    for b, q in enumerate(chunk[:real]):
        if np.isfinite(contrast[b, yes + no]).all():
            checked += 1
            assert records[q.question_id]["vcd"]["p_yes"] == pytest.approx(yes_probability(contrast[b], yes, no),
                                                                          abs=1e-4)
    assert checked


def test_report_rules_decide_from_the_new_statistics():
    def stat(base, value, p):
        return {"n": 500, "baseline": base, "value": value, "cohens_h": 0.05, "power": 0.1, "n_for_80_power": 6000,
                "p_greater": 0.9, "difference": {"estimate": value - base, "low": -0.01, "high": 0.05, "level": 0.95},
                "mcnemar": {"statistic": 5.0, "p_value": p, "method": "chi2", "only_a_correct": 1,
                            "only_b_correct": 9}}

    viar = {"bias": 2.0, "accuracy": 0.81, "yes_ratio": 0.5,
            "vs_baseline": {"accuracy": stat(0.8, 0.81, 0.4), "yes_ratio": stat(0.4, 0.5, 0.001)}}
    s = {"viar": [{"bias": 0.0, "accuracy": 0.8, "yes_ratio": 0.4}, viar], "viar_bias": 2.0,
         "vcd": {"alpha": 1.0, "beta": 0.1, "noise_step": 500,
                 "vs_baseline": {"accuracy": stat(0.8, 0.75, 0.01), "yes_ratio": stat(0.4, 0.6, 0.001)}},
         "threshold_matching_viar": {"shift": -1.0, "yes_ratio_gap": 0.01, "accuracy": stat(0.81, 0.81, 1.0)},
         "gradient_zone_fall": {"estimate": 4.0, "low": 3.0, "high": 5.0, "level": 0.95}, "gradient_questions": 8,
         "zone": [2, 3]}
    for judge in (report.viar_yes_ratio, report.viar_accuracy, report.vcd_shift, report.threshold_equivalence,
                  report.gradient_fall):
        assert judge(s).verdict == report.REPRODUCED, judge
    statistic = report.viar_accuracy(s).statistic
    assert "(1 vs 9 discordant; chi2 = 5, p = 0.4)" in statistic and "N80 = 6e+03" in statistic
    assert "P(greater) = 90.0%" in statistic
    viar["yes_ratio"] = 0.3  # significant, but away from 50%
    assert report.viar_yes_ratio(s).verdict == report.NOT_REPRODUCED
    viar["vs_baseline"]["accuracy"]["mcnemar"]["p_value"] = 0.01
    assert report.viar_accuracy(s).verdict == report.NOT_REPRODUCED
    s["vcd"]["vs_baseline"]["accuracy"]["value"] = 0.85  # VCD helps here: not the paper's over-correction
    assert report.vcd_shift(s).verdict == report.NOT_REPRODUCED
    s["threshold_matching_viar"]["yes_ratio_gap"] = 0.05
    assert report.threshold_equivalence(s).verdict == report.NOT_APPLICABLE
    assert report.viar_yes_ratio({**s, "viar_bias": 5.0}).verdict == report.NOT_APPLICABLE
    assert report.gradient_fall({**s, "gradient_zone_fall": None}).verdict == report.NOT_APPLICABLE
    undefined = {"neglect_depth_correlation": {"r": math.nan, "p": math.nan},
                 "per_layer_correlation": [{"r": math.nan, "p": math.nan}] * 32}  # every answer right: no r
    assert report.depth_overall(undefined).verdict == report.NOT_APPLICABLE
    assert report.depth_transition(undefined).verdict == report.NOT_APPLICABLE
