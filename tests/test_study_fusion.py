"""Seed 001's new pieces: the soft mask under cached decoding against full forwards, and the study end to end on
the built-in model: bootstrap CIs of the layer drops (against `bootstrap_ci`), the stated selection rule, and the
open-ended comparison whose records match the library's own greedy, DoLa and ViCrop paths on the same questions."""

import json

import numpy as np
import pytest

import vlmjax
from experiments import fusion_layers
from vlmjax import interventions as iv
from vlmjax.data.shapes import generate_dataset, generate_scenes
from vlmjax.eval.stats import bootstrap_ci
from vlmjax.eval.vicrop import vicrop_answers
from vlmjax.eval.vqa import evaluate_open_ended, open_ended_questions, vqa_accuracy
from vlmjax.generate import generate


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion")
    generate_dataset(str(root / "data"), 10, 1234, image_size=64, progress=False)
    config = json.loads(fusion_layers.CONFIG.read_text())
    config.update(model="builtin:llava-shapes", data=str(root / "data"), out=str(root / "out"), batch_size=4,
                  question_files={"pope_test_random": 4, "count_test": 2}, fusion_layers=[0], review_layer=2,
                  open_ended_per_kind=2)
    return config, fusion_layers.run(config), root


def test_soft_mask_under_cached_decoding_equals_full_forwards():
    """generate with ScaleVisualStates (applied to the prompt in prefill) = greedy steps of full forwards with the
    same hook, the mask extended with False over the new tokens."""
    model = vlmjax.load("builtin:llava-shapes", progress=False)
    processor = vlmjax.load_processor(model.path)
    images = [image for image, _ in generate_scenes(2, seed=4, image_size=64, progress=False)]
    inputs = dict(processor(images=images, text=["USER: <image> What color is the circle? ASSISTANT:"] * 2,
                            return_tensors="np"))
    _, meta = model.prepare(inputs)
    mask = np.asarray(meta.mask) & (np.cumsum(meta.mask, 1) % 3 == 0)
    hook = lambda m: {"soft": iv.ScaleVisualStates.at_layers(3, [1], m, scale=0.1)}
    tokens = generate(model, inputs, 3, hooks=hook(mask))
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    for step in range(3):
        logits = model(**{**inputs, "input_ids": ids, "attention_mask": attention},
                       hooks=hook(np.pad(mask, ((0, 0), (0, step)))), logits="last")["logits"]
        ids = np.concatenate([ids, np.asarray(logits[:, -1]).argmax(-1)[:, None]], 1)
        attention = np.pad(attention, ((0, 0), (0, 1)), constant_values=1)
    np.testing.assert_array_equal(tokens, ids)
    unmasked = model(**inputs, logits="last")["logits"]
    masked = model(**inputs, hooks=hook(mask), logits="last")["logits"]
    assert np.abs(np.asarray(unmasked) - np.asarray(masked)).max() > 1e-3  # the mask acts on the prompt


def test_layer_drops_have_bootstrap_cis_and_the_rule_is_stated(study):
    config, s, root = study
    records = [json.loads(line) for line in (root / "out" / "records_masking.jsonl").open()]
    correct = np.array([r["correct"] for r in records], float)
    for layer, drop in enumerate(s["drop_at_layer"]):
        expected = bootstrap_ci((correct[:, 0], correct[:, 1 + layer]), lambda a, b: (a - b).mean(), seed=0)
        assert drop["estimate"] == pytest.approx(expected.estimate)
        assert (drop["low"], drop["high"]) == pytest.approx((expected.low, expected.high))
    assert "McNemar" in s["selection_rule"] and len(s["lowers_accuracy_at_layer"]) == 3
    assert s["fusion_layers"] == [0] and s["review_layer"] == 2 and s["refinement"]["post_layer"] == 1


def test_open_ended_comparison_fields(study):
    config, s, root = study
    o = s["open_ended"]
    assert o["kinds"] == ["colour", "count", "shape"] and o["dola_layers"] == [0] and o["vicrop"]["layer"] == 1
    assert o["questions"] == len(open_ended_questions(root / "data", limit=2)) > 0
    assert set(o["systems"]) == {"plain", "method", "dola", "vicrop"} and all(o["systems"].values())
    for name in ("method", "dola", "vicrop"):
        row = o["systems"][name]["minus_plain"]
        assert 0 <= row["permutation_p"] <= 1 and row["difference"]["estimate"] == pytest.approx(
            o["systems"][name]["accuracy"] - o["systems"]["plain"]["accuracy"])
    assert {"minus_dola", "minus_vicrop"} <= set(o["systems"]["method"])
    assert sum(o["pre_integrated_layer_counts"]) == o["questions"] and (root / "out" / "fusion_layers.png").is_file()


@pytest.mark.slow
def test_open_ended_records_match_the_library_paths(study, tmp_path):
    """The study's plain, DoLa and ViCrop answers equal `evaluate_open_ended` (plain, with DoLa options) and
    `vicrop_answers` on the same questions; each accuracy is `vqa_accuracy` of its prediction."""
    config, s, root = study
    o = s["open_ended"]
    records = {r["id"]: r for r in map(json.loads, (root / "out" / "records_open_ended.jsonl").open())}
    model = vlmjax.load("builtin:llava-shapes", progress=False)
    processor = vlmjax.load_processor(model.path)
    questions = open_ended_questions(root / "data", limit=2)
    plain = evaluate_open_ended(model, processor, questions, tmp_path / "plain.jsonl", batch_size=4, progress=False)
    dola = evaluate_open_ended(model, processor, questions, tmp_path / "dola.jsonl", batch_size=4, progress=False,
                               generate_options={"dola_layers": [0]})
    crops = vicrop_answers(model, processor, [q.load_image() for q in questions], [q.question for q in questions],
                           layer=o["vicrop"]["layer"], batch_size=4)
    for p, d, c in zip(plain, dola, crops):
        r = records[p["id"]]
        assert r["predictions"]["plain"] == p["prediction"] and r["predictions"]["dola"] == d["prediction"]
        assert tuple(r["box"]) == c["box"] and r["predictions"]["vicrop"] == c["cropped_answer"]
        assert r["accuracy"] == {k: vqa_accuracy(v, [r["answer"]] * 10) for k, v in r["predictions"].items()}
