"""The studies run end to end on a tiny model of every family (LLaVA, LLaVA-NeXT, Qwen2-VL) and on the built-in
Qwen2-VL, write their records, figures and TensorBoard scalars, and resume without repeating; their records match
an independent computation from HF's own attentions and logits on the same inputs."""

import json

import numpy as np
import pytest

import vlmjax
from experiments import common, fusion_layers, neglect_zone, reliability_probes as rp, update_geometry, visual_heads
from vlmjax.eval.batches import padded_batches
from vlmjax.eval.pope import yes_probability
from vlmjax.data.shapes import generate_dataset
from vlmjax.eval.run import answer_token_ids, shapes_image_size
from vlmjax import load_processor
from vlmjax.verify import load_hf_model, run_hf
from vlmjax.testing.tiny import make_tiny_llava
from vlmjax.testing.tiny_instructblip import make_tiny_instructblip
from vlmjax.testing.tiny_llava_next import make_tiny_llava_next
from vlmjax.testing.tiny_paligemma import make_tiny_paligemma
from vlmjax.testing.tiny_qwen2_vl import make_tiny_qwen2_vl
from vlmjax.testing.tiny_qwen2_5_vl import make_tiny_qwen2_5_vl

STUDIES = {"neglect_zone": neglect_zone, "fusion_layers": fusion_layers, "visual_heads": visual_heads,
           "update_geometry": update_geometry, "reliability_probes": rp}
POPE = {"pope_test_random": 2, "pope_test_popular": 2, "pope_test_adversarial": 2}
HARD = {**POPE, "count_test": 2, "attribute_test": 2}  # the built-in vocabulary has every answer word
BUILDERS = {"llava": lambda p: make_tiny_llava(p, variant="gqa", text_layers=4),
            "llava_next": lambda p: make_tiny_llava_next(p, text_layers=4),
            "qwen2_vl": lambda p: make_tiny_qwen2_vl(p, text_layers=4),
            "qwen2_5_vl": lambda p: make_tiny_qwen2_5_vl(p, text_layers=4),
            "paligemma": lambda p: make_tiny_paligemma(p, text_layers=4),
            "instructblip": lambda p: make_tiny_instructblip(p, text_layers=4)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{family: (model path, shared data dir)}: tiny models built once, one generated data set per model."""
    cache = {}

    def get(family):
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            path = "builtin:qwen2-vl-shapes" if family == "builtin" else str(root / "model")
            if family != "builtin":
                BUILDERS[family](root / "model")
            model = vlmjax.load(path, progress=False)
            side = max(64, shapes_image_size(model, load_processor(model.path)))  # the shapes world's smallest side
            generate_dataset(str(root / "data"), 10, 1234, image_size=side, progress=False)
            cache[family] = (path, root / "data")
        return cache[family]

    return get


def config_for(name, family, models, out, **extra):
    path, data = models(family)
    config = json.loads(STUDIES[name].CONFIG.read_text())
    config.update(model=path, data=str(data), out=str(out), n_images=10, batch_size=6,
                  question_files=HARD if family == "builtin" and name in ("neglect_zone", "reliability_probes")
                  else POPE)
    config.update(conditions=["plain", "noise_delta_visual"], noise_repeats=2, gradient_questions=4,
                  random_seeds=[0, 1], random_neuron_seeds=[0, 1], ablate_neurons=3, **extra)
    return config


def check_summary(name, summary, config):
    n = sum(config["question_files"].values())
    assert summary["questions"] == n and summary["model"] == config["model"]
    assert "query" in summary["tokens"]
    if name == "neglect_zone":
        assert all(0 < f < 1 for f in summary["visual_fraction"]) and summary["viar"][0]["bias"] == 0.0
        assert len({round(v["brier"], 9) for v in summary["viar"]}) > 1  # the bias changes p(yes)
    if name == "fusion_layers":
        assert len(summary["accuracy_masked_at_layer"]) == len(summary["mcnemar_p_at_layer"])
        assert len(summary["drop_at_layer"]) == len(summary["mcnemar_p_at_layer"]) and summary["selection_rule"]
        assert summary["open_ended"]["systems"]["plain"] and summary["open_ended"]["systems"]["vicrop"]
    if name == "visual_heads":
        assert all(len(r["random_accuracies"]) == 2 for r in summary["masking"])
    if name == "update_geometry":
        noised = summary["conditions"]["noise_delta_visual"]
        assert noised["repeats"] == 2 and noised["attention_rid"] != summary["conditions"]["plain"]["attention_rid"]
        assert set(summary["table1"]) == {"attention", "ffn"} and summary["rope_baseline"]["resid_mid"]["mean"] > 0
        assert len(summary["accuracy_under_noise"]["noise_delta"]["visual"]["mcnemar_p_per_repeat"]) == 2
    if name == "reliability_probes":  # the tiny sets may hold too few errors for a probe: then it says so
        if summary["probe_refused"] is None:
            assert len(summary["probe_auroc"]) == len(summary["entropy_correctness"])
            assert all(len(s["random_accuracies"]) == 2 for s in summary["ablation"]["sets"])
        else:
            assert "min_probe_errors" in summary["probe_refused"] and "not_run" in summary["ablation"]


# builtin:llava-shapes runs every study in test_report_runs_every_study_and_judges_every_claim too, so its own run
# here (33 s) is in the slow set
@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen2_5_vl", "paligemma", "instructblip",
                                    pytest.param("builtin", marks=pytest.mark.slow)])
def test_every_study_runs_on_every_family(models, family, tmp_path):
    for name, study in STUDIES.items():
        config = config_for(name, family, models, tmp_path / name)
        summary = study.run(config)
        check_summary(name, summary, config)
        assert (tmp_path / name / "summary.json").is_file() and list((tmp_path / name / "tensorboard").iterdir())
        assert list((tmp_path / name).glob("*.png")), name


def test_studies_resume_without_recomputing(models, tmp_path):
    for name, study in STUDIES.items():
        config = config_for(name, "llava", models, tmp_path / name)
        summary = study.run(config)
        check_summary(name, summary, config)
        records = {p.name: p.read_text() for p in (tmp_path / name).glob("records*.jsonl")}
        assert records and all(records.values())
        again = study.run(dict(config))  # everything done: nothing recomputed, the same summary (NaN included)
        assert json.dumps(again, sort_keys=True) == json.dumps(summary, sort_keys=True)
        assert {p.name: p.read_text() for p in (tmp_path / name).glob("records*.jsonl")} == records


def test_bias_zero_is_read_whatever_the_order_and_added_when_missing():
    np.testing.assert_array_equal(neglect_zone.bias_values([2.0, 0.0, 1.0]), [2.0, 0.0, 1.0])
    np.testing.assert_array_equal(neglect_zone.bias_values([1.0, 2.0]), [0.0, 1.0, 2.0])


def test_review_layer_needs_a_significant_drop_and_a_configured_layer_0_is_kept():
    config = {"fusion_layers": None, "num_fusion_layers": 1, "review_layer": None, "significance": 0.05}
    drop = np.array([0.3, 0.0, 0.0, 0.0, 0.0, 0.1])
    assert fusion_layers.choose_layers(drop, [1e-4, 1, 1, 1, 1, 1e-3], config) == ([0], 5)
    assert fusion_layers.choose_layers(drop, [1e-4, 1, 1, 1, 1, 0.2], config) == ([0], None)
    assert fusion_layers.choose_layers(drop, [1] * 6, {**config, "review_layer": 0}) == ([], 0)


def test_random_head_controls_draw_from_all_non_top_heads():
    scores = np.arange(32 * 8, dtype=float).reshape(32, 8)
    config = {"stages_of_32": [[0, 10], [10, 20], [20, 32]], "top_k_of_320": [20], "random_seeds": list(range(5))}
    described, keeps = visual_heads.masks_for(scores, config)
    top = [i for i, d in enumerate(described) if d["heads"] == "top" and d["stage"] == "early"][0]
    randoms = [i for i, d in enumerate(described) if d["heads"] == "random" and d["stage"] == "early"]
    assert described[top]["k"] == 5 and len(randoms) == 5  # 20 of 320 heads -> 5 of an 80-head stage
    masked = lambda i: set(map(tuple, np.argwhere(keeps[i] == 0)))
    assert all(len(masked(i)) == 5 and not masked(i) & masked(top) for i in randoms)
    assert all(l < 10 for i in randoms for l, _ in masked(i)) and len({frozenset(masked(i)) for i in randoms}) == 5


def test_probe_helpers():
    from vlmjax.eval.stats import auroc

    train, test = rp.stratified_split(np.array([True] * 10 + [False] * 5), seed=0)
    assert test.sum() == 3 and not (train & test).any()
    fpr, tpr = rp.roc_curve(np.array([0.9, 0.8, 0.3, 0.1]), np.array([True, False, True, False]))
    np.testing.assert_allclose(np.trapezoid(tpr, fpr), auroc(np.array([True, False, True, False]),
                                                              np.array([0.9, 0.8, 0.3, 0.1])))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_neglect_records_match_hf_attentions_and_logits(models, family, tmp_path):
    """Visual fraction per layer (heads averaged, m_v / (m_v + m_t) over T) and bias-0 p(yes), recomputed in NumPy
    from HF's eager attentions and logits on the study's own first batch."""
    config = config_for("neglect_zone", family, models, tmp_path, biases=[0.0, 2.0])
    neglect_zone.run(config)
    model_path, data = models(family)
    processor = load_processor(model_path)
    questions = common.read_study_set(data, config["question_files"], config["seed"])
    chunk, real, inputs = next(padded_batches(processor, questions, config["batch_size"]))
    hf = run_hf(load_hf_model(model_path), inputs)
    records = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "records.jsonl").open()}
    ids = inputs["input_ids"]
    image_token = vlmjax.load(model_path, progress=False).config.image_token_id
    p_yes = yes_probability(hf["logits"][:, -1], answer_token_ids(processor.tokenizer, "yes"),
                            answer_token_ids(processor.tokenizer, "no"))
    for b, q in enumerate(chunk[:real]):
        visual = ids[b] == image_token
        real_tokens = inputs["attention_mask"][b].astype(bool)
        text = real_tokens & (np.arange(len(visual)) > np.flatnonzero(visual).max())
        fractions = []
        for attn in hf["attentions"]:
            a = attn[b].mean(0)
            m_v, m_t = a[np.ix_(text, visual)].mean(), a[np.ix_(text, text)].mean()
            fractions.append(m_v / (m_v + m_t))
        record = records[q.question_id]
        np.testing.assert_allclose(record["visual_fraction"], fractions, rtol=0, atol=1e-4)
        np.testing.assert_allclose(record["by_bias"]["p_yes"][0], p_yes[b], rtol=0, atol=1e-4)


def test_report_runs_every_study_and_judges_every_claim(tmp_path, monkeypatch):
    from experiments import report

    monkeypatch.setattr(report, "QUICK", {"n_images": 20, "questions": 2, "noise_repeats": 2, "gradient_questions": 2,
                                          "random_seeds": [0, 1], "random_neuron_seeds": [0, 1],
                                          "conditions": ["plain", "noise_delta_visual"]})
    assert report.main(["--out", str(tmp_path), "--quick", "--model", "builtin:llava-shapes"]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| claim")]
    assert len(rows) == len(report.CLAIMS)
    assert all(any(f"**{v}**" in row for v in (report.REPRODUCED, report.NOT_REPRODUCED, report.NOT_APPLICABLE))
               for row in rows)
    for name in report.STUDIES:
        assert f"]({name}/" in text and (tmp_path / name / "summary.json").is_file()
    assert "condition noise_qkv not run" in text  # a claim without its data is not applicable, with the reason

