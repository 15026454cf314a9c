"""The visual-heads study (seed 003): its new computations against independent references (hand-worked statistics,
NumPy on HF's own attentions, hidden states and unembedding), and the study end to end on tiny LLaVAs, with a
second model (a's "variant") for the head-score correlation, whose records resume only with its own weights."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

import vlmjax
from experiments import common, report, visual_heads
from vlmjax import fingerprint, load_processor
from vlmjax.data.shapes import generate_dataset
from vlmjax.errors import VlmJaxError
from vlmjax.eval.batches import padded_batches
from vlmjax.eval.stats import correlation_interval
from vlmjax.testing.tiny import make_tiny_llava
from vlmjax.verify import load_hf_model, run_hf

FILES = {"pope_test_random": 3, "count_test": 3}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two tiny LLaVAs of one grid (2 layers x 4 heads; seeds 0 and 1), b with a training report naming a's weights
    as its starting point (as `python -m vlmjax.train --init-from` writes it), one shapes-world data set."""
    root = tmp_path_factory.mktemp("heads")
    for name, seed in (("a", 0), ("b", 1)):
        make_tiny_llava(root / name, seed=seed, text_layers=2)
    origin = fingerprint.of_model(vlmjax.load(str(root / "a"), progress=False))["weights"]
    (root / "b" / "training_report.json").write_text(json.dumps({"config": {"init_from": str(root / "a")},
                                                                 "init_from_weights": origin}))
    generate_dataset(str(root / "data"), 10, 1234, image_size=64, progress=False)
    return root


def config(tiny, out, **extra):
    base = json.loads(visual_heads.CONFIG.read_text())
    base.update(model=str(tiny / "a"), data=str(tiny / "data"), out=str(out), n_images=10, batch_size=3,
                question_files=FILES, random_seeds=[0, 1], top_k_of_320=[20, 50], **extra)
    return base


@pytest.fixture(scope="module")
def study(tiny):
    """The study run once, model b as compare_model: (summary, output directory)."""
    out = tiny / "study"
    return visual_heads.run(config(tiny, out, compare_model=str(tiny / "b"))), out


def test_compare_to_random_against_hand_worked_values():
    plain = np.array([1, 1, 1, 1, 0, 1], bool)
    top = np.array([0, 0, 1, 0, 0, 1], bool)
    random = np.array([[1, 1], [1, 0], [1, 1], [1, 1], [0, 0], [0, 1]], bool)
    row = common.compare_to_random(plain, top, random)
    assert row["top_accuracy"] == pytest.approx(2 / 6) and row["top_drop"] == pytest.approx(5 / 6 - 2 / 6)
    np.testing.assert_allclose(row["random_accuracies"], [4 / 6, 4 / 6])
    assert row["random_std_accuracy"] == 0.0 and row["random_mean_drop"] == pytest.approx(5 / 6 - 4 / 6)
    # McNemar top vs plain: 3 questions right only without masking, none the other way: exact p = 2 * 0.5^3
    assert row["top_mcnemar_p"] == pytest.approx(0.25)
    # permutation test over all 2^6 sign flips of the per-question differences top - mean(random)
    d = top - random.mean(1)
    flips = [abs(np.mean(np.array(s) * d)) >= abs(d.mean()) - 1e-12 for s in itertools.product((1, -1), repeat=6)]
    assert row["top_vs_random_p"] == pytest.approx(np.mean(flips))
    assert row["top_minus_random"]["estimate"] == pytest.approx(d.mean())
    assert row["top_minus_random"]["low"] <= d.mean() <= row["top_minus_random"]["high"]


def test_correlation_interval_is_fishers():
    interval = correlation_interval(0.5, 28)  # atanh(0.5) = 0.5493, se = 1 / 5
    assert (interval.low, interval.high) == pytest.approx((math.tanh(0.549306 - 1.959964 * 0.2),
                                                           math.tanh(0.549306 + 1.959964 * 0.2)), abs=1e-5)
    assert np.isnan(correlation_interval(float("nan"), 50).low) and np.isnan(correlation_interval(0.3, 3).high)
    # the paper's R_pb = 0.001 on 3,090 samples gives its reported [-0.034, 0.036]
    paper = correlation_interval(0.001, 3090)
    assert (round(paper.low, 3), round(paper.high, 3)) == (-0.034, 0.036)


def test_lens_summary_by_hand():
    ranks = np.array([[3, 0, 0, 0], [5, 2, 0, 0], [0, 1, 1, 0]])
    lens = visual_heads.lens_summary(ranks)
    np.testing.assert_allclose(lens["top1_fraction"], [1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(lens["mean_rank"], [8 / 3, 1, 1 / 3, 0])
    assert lens["settles_at_layer"] == 2


def test_head_statistics_match_hf(tiny, study):
    """The study's records: image weight, box weight and concentration of every head at the prompt's last token, and
    the logit-lens rank of the model's answer, recomputed in NumPy from HF's eager attentions, hidden states, final
    norm and LM head on the same batches."""
    model = vlmjax.load(str(tiny / "a"), progress=False)
    processor = load_processor(model.path)
    questions = common.read_study_set(tiny / "data", FILES, 1234)
    rows = [json.loads(line) for line in (study[1] / "records_heads.jsonl").open()]
    assert [r["id"] for r in rows] == [q.question_id for q in questions]
    hf = load_hf_model(str(tiny / "a"))
    norm, unembed = hf.model.language_model.norm, hf.lm_head.weight.detach().numpy()
    image_token = model.config.image_token_id
    for start in range(0, len(questions), 3):
        chunk, real, inputs = next(padded_batches(processor, questions[start:start + 3], 3))
        out = run_hf(hf, inputs)
        for b, q in enumerate(chunk[:real]):
            row = rows[start + b]
            visual = inputs["input_ids"][b] == image_token
            patches = np.flatnonzero(visual)
            side = math.isqrt(len(patches))
            rows_, cols_ = np.divmod(np.arange(len(patches)), side)
            for layer, attn in enumerate(out["attentions"]):
                a = attn[b, :, -1]  # [H, N]: the last query's row
                np.testing.assert_allclose(row["image_weight"][layer], a[:, visual].sum(-1), atol=1e-4)
                p = a[:, visual] / a[:, visual].sum(-1, keepdims=True)
                c = 1 + (p * np.log(p + 1e-9)).sum(-1) / np.log(visual.sum())
                np.testing.assert_allclose(row["concentration"][layer], c, atol=1e-4)
                if q.region is not None:  # patch centres (in the 64-pixel image) inside the box
                    x0, y0, x1, y1 = q.region
                    cx, cy = (cols_ + 0.5) * 64 / side, (rows_ + 0.5) * 64 / side
                    inside = patches[(cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)]
                    np.testing.assert_allclose(row["region_weight"][layer], a[:, inside].sum(-1), atol=1e-4)
                else:
                    assert row["region_weight"] is None
            answer = out["logits"][b, -1].argmax()
            assert row["answer_token"] == answer
            for layer in range(len(out["attentions"])):
                h = out["hidden_states"][layer + 1][b, -1]
                logits = out["logits"][b, -1] if layer == len(out["attentions"]) - 1 else \
                    norm(torch.tensor(h)).detach().numpy() @ unembed.T
                assert row["lens_rank"][layer] == int((logits > logits[answer] + 1e-5).sum())
    assert any(r["region_weight"] is not None for r in rows)


def test_study_end_to_end_with_a_second_model(tiny, study):
    summary, out = study
    assert summary["questions"] == 5 and summary["masking_questions"] == 3  # 2 test images: 2 counting questions
    assert summary["region_questions"] == 2
    assert "prompt's last token" in summary["tokens"]["query"]
    assert np.array(summary["region_weight"]).shape == np.array(summary["scores"]).shape
    assert 0 < summary["box_token_fraction"] < 1
    lens = summary["logit_lens"]
    assert set(lens["by_family"]) == {"count", "pope"} and lens["all"]["top1_fraction"][-1] == 1.0
    assert len(summary["top_heads"]) == 8 and all("lens_mean_rank" in t for t in summary["top_heads"])
    for row in summary["masking"]:
        assert len(row["random_accuracies"]) == 2 and 0 < row["top_vs_random_p"] <= 1
    # Pearson of the two models' scores, recomputed from each model's own records
    comparison = summary["model_comparison"]
    other = visual_heads.head_scores([json.loads(line) for line in (out / "records_heads_compare.jsonl").open()])
    np.testing.assert_allclose(comparison["compare_scores"], other, rtol=1e-6)
    r, p = scipy_stats.pearsonr(np.ravel(summary["scores"]), np.ravel(other))
    assert comparison["scores"]["r"] == pytest.approx(r) and comparison["scores"]["p"] == pytest.approx(p)
    assert abs(r) < 0.999  # two differently seeded models
    assert (out / "visual_heads.png").is_file() and list((out / "tensorboard").iterdir())
    assert comparison["variant_of_model"] and comparison["trained_from"] == str(tiny / "a")
    assert report.heads_correlate(summary).verdict in (report.REPRODUCED, report.NOT_REPRODUCED)
    unrelated = {**summary, "model_comparison": {**comparison, "variant_of_model": False}}
    assert "not a fine-tuned variant" in report.heads_correlate(unrelated).evidence
    assert report.heads_across_families(summary).verdict == report.NOT_APPLICABLE
    assert report.lens_settles(summary).verdict != report.NOT_APPLICABLE


def test_comparison_not_run_states_why(tiny, tmp_path):
    model = vlmjax.load(str(tiny / "a"), progress=False)
    _, other_grid = visual_heads.load_compare_model(config(tiny, tmp_path, compare_model="builtin:llava-shapes"),
                                                    model, tmp_path)
    assert "3 layers x 4 heads" in other_grid["not_run"] and not list(tmp_path.iterdir())
    _, alone = visual_heads.load_compare_model(config(tiny, tmp_path, compare_model=None), model, tmp_path)
    assert "no compare_model" in alone["not_run"]
    verdict = report.heads_correlate({"model_comparison": alone})
    assert verdict.verdict == report.NOT_APPLICABLE and "no compare_model" in verdict.evidence


def test_study_writes_the_compare_models_fingerprint(tiny, study):
    stored = json.loads((study[1] / "records_heads_compare.fingerprint.json").read_text())
    assert stored == {"model": fingerprint.of_model(vlmjax.load(str(tiny / "b"), progress=False))}


def test_changed_compare_model_weights_are_refused(tiny, tmp_path):
    """compare_model's records resume only with the weights that wrote them: the same path holding other weights
    (here a's) is refused, naming the weights and the way out."""
    import shutil

    model = vlmjax.load(str(tiny / "a"), progress=False)
    shutil.copytree(tiny / "b", tmp_path / "compare")
    cfg = config(tiny, tmp_path / "out", compare_model=str(tmp_path / "compare"))
    (tmp_path / "out").mkdir()
    other, not_run = visual_heads.load_compare_model(cfg, model, tmp_path / "out")
    assert not_run is None and other.path == tmp_path / "compare"
    (tmp_path / "out" / visual_heads.COMPARE_RECORDS).write_text('{"id": 1}\n')  # a record written by b
    visual_heads.load_compare_model(cfg, model, tmp_path / "out")  # same weights: resumes
    shutil.copy(tiny / "a" / "model.safetensors", tmp_path / "compare" / "model.safetensors")
    with pytest.raises(VlmJaxError, match=r"compare_model records .* different model: model\.weights.*--overwrite"):
        visual_heads.load_compare_model(cfg, model, tmp_path / "out")


def test_the_default_compare_model_is_the_organism_fine_tuned():
    """The study's default second model was trained from the default model's weights (its report's fingerprint of
    them equals the shipped organism's), so the default comparison is the paper's base-vs-variant one."""
    from vlmjax.builtin import resolve

    default = json.loads(visual_heads.CONFIG.read_text())["compare_model"]
    trained = json.loads((resolve(default) / "training_report.json").read_text())
    organism = fingerprint.of_model(vlmjax.load(common.DEFAULT_MODEL, progress=False))
    assert trained["config"]["init_from"] == common.DEFAULT_MODEL and trained["init_from_weights"] == organism["weights"]
