"""The runnable studies: they run end to end on a small model, write their outputs and resume without repeating."""

import json

import numpy as np
import pytest

from vlmjax.tiny import make_tiny_llava

from experiments import fusion_layers, neglect_zone, reliability_probes as rp, update_geometry, visual_heads


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    make_tiny_llava(path, variant="gqa", text_layers=4)
    return path


def test_neglect_zone_study_runs_and_resumes(tiny_model, tmp_path):
    config = json.loads(neglect_zone.CONFIG.read_text())
    config.update(model=str(tiny_model), out=str(tmp_path), n_images=12, limit_per_split=3, batch_size=4)
    summary = neglect_zone.run(config)
    assert summary["questions"] == 9 and summary["zone"] == [1, 2]
    assert len(summary["visual_fraction"]) == 4 and all(0 < f < 1 for f in summary["visual_fraction"])
    assert [v["bias"] for v in summary["viar"]] == config["biases"]
    assert len({round(v["brier"], 9) for v in summary["viar"]}) > 1  # the bias changes p(yes)
    records = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(records) == 9 and (tmp_path / "neglect_zone.png").stat().st_size > 10_000
    again = neglect_zone.run(config)  # everything done: nothing recomputed, the same summary
    assert (tmp_path / "records.jsonl").read_text().splitlines() == records
    assert again == summary


def test_fusion_layers_study_runs_and_resumes(tiny_model, tmp_path):
    config = json.loads(fusion_layers.CONFIG.read_text())
    config.update(model=str(tiny_model), out=str(tmp_path), n_images=12, limit_per_split=3, batch_size=4)
    summary = fusion_layers.run(config)
    assert summary["questions"] == 9 and len(summary["accuracy_masked_at_layer"]) == 4
    assert len(summary["fusion_layers"]) == 1 and summary["fusion_layers"][0] < 2 and summary["review_layer"] >= 2
    assert sum(summary["pre_integrated_layer_counts"]) == 9
    assert all(c == 0 for i, c in enumerate(summary["pre_integrated_layer_counts"]) if i not in summary["fusion_layers"])
    for name in ("records_masking.jsonl", "records_refined.jsonl"):
        assert len((tmp_path / name).read_text().splitlines()) == 9
    assert fusion_layers.run(config) == summary


def test_visual_heads_study_runs_and_resumes(tiny_model, tmp_path):
    config = json.loads(visual_heads.CONFIG.read_text())
    config.update(model=str(tiny_model), out=str(tmp_path), n_images=12, limit_per_split=3, batch_size=4,
                  top_k=[1, 2])
    summary = visual_heads.run(config)
    scores = summary["scores"]
    assert len(scores) == 4 and len(scores[0]) == 4 and all(s >= 0 for row in scores for s in row)
    runs = summary["masking"]
    assert runs[0]["heads"] == "none" and {r["heads"] for r in runs[1:]} == {"top", "random"}
    assert {r["stage"] for r in runs[1:]} == {"early", "mid", "late"}  # 4 layers: [0, 1), [1, 2), [2, 4)
    assert visual_heads.run(config) == summary


def test_update_geometry_study_runs_and_resumes(tiny_model, tmp_path):
    config = json.loads(update_geometry.CONFIG.read_text())
    config.update(model=str(tiny_model), out=str(tmp_path), n_images=12, limit_per_split=2, batch_size=3)
    summary = update_geometry.run(config)
    plain, noised = summary["conditions"]["plain"], summary["conditions"]["noise_delta"]
    assert set(summary["conditions"]) == set(update_geometry.CONDITIONS)
    assert 0 < plain["attention_rid"] and 0 < plain["mlp_rid"] and len(plain["attention_rid_per_layer"]) == 4
    assert noised["attention_rid"] != plain["attention_rid"]  # the noise reaches the measured updates
    assert update_geometry.run(config) == summary


def test_reliability_probes_study_runs_and_resumes(tiny_model, tmp_path):
    assert rp.auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])) == 0.75
    train, test = rp.stratified_split(np.array([True] * 10 + [False] * 5), seed=0)
    assert test.sum() == 3 and not (train & test).any()
    config = json.loads(rp.CONFIG.read_text())
    config.update(model=str(tiny_model), out=str(tmp_path), n_images=12, limit_per_split=4, batch_size=4,
                  ablate_neurons=3)
    summary = rp.run(config)
    assert summary["questions"] == 12 and len(summary["probe_auroc"]) == 4 and summary["map_layer"] == 2
    assert len(summary["ablated_dims"]) == 3 and 0 <= summary["accuracy_top_patches_removed"] <= 1
    assert rp.run(config) == summary
