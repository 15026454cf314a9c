import hashlib
import json
import os
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vlmjax.data import shapes
from vlmjax.data.loaders import load_pope, load_vqa


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    summary = shapes.generate_dataset(root, 60, seed=3, image_size=128, occlusion_prob=0.6, progress=False)
    return summary, shapes.load_dataset(root)


def _pixels(ds, scene):
    return np.asarray(Image.open(ds.image_path(scene.image)).convert("RGB"))


def _all_files(root):
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, root)] = handle.read()
    return found


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    kwargs = dict(n_images=8, image_size=64, progress=False)
    shapes.generate_dataset(str(tmp_path / "a"), seed=11, **kwargs)
    shapes.generate_dataset(str(tmp_path / "b"), seed=11, **kwargs)
    shapes.generate_dataset(str(tmp_path / "c"), seed=12, **kwargs)
    first, second, other = (_all_files(str(tmp_path / d)) for d in "abc")
    assert first == second
    assert any(name.endswith(".png") for name in first)
    differing_images = [n for n in first if n.endswith(".png") and first[n] != other[n]]
    assert len(differing_images) == 8


def test_vocabulary_and_colours_cannot_be_confused_with_background():
    assert len(shapes.SHAPES) >= 6 and len(shapes.COLOURS) >= 8 and set(shapes.SIZES) == {"small", "medium", "large"}
    for rgb in shapes.COLOURS.values():
        assert min(rgb) < shapes.BACKGROUND_MIN and len(set(rgb)) > 1  # not a background value, not grey clutter
    assert len(set(shapes.COLOURS.values())) == len(shapes.COLOURS)


def test_scene_variety(dataset):
    _, ds = dataset
    counts = [len(scene.objects) for scene in ds.scenes]
    assert min(counts) >= 1 and max(counts) <= 5 and len(set(counts)) >= 3
    assert {scene.background for scene in ds.scenes} == set(shapes.BACKGROUNDS)
    assert any(scene.n_clutter > 0 for scene in ds.scenes) and any(scene.n_clutter == 0 for scene in ds.scenes)
    fractions = [obj.visible_fraction for scene in ds.scenes for obj in scene.objects]
    assert min(fractions) >= shapes.MIN_VISIBLE_FRACTION and any(f < 1.0 for f in fractions)
    assert {obj.size for scene in ds.scenes for obj in scene.objects} == set(shapes.SIZES)


def test_boxes_lie_inside_the_image_and_match_the_drawn_pixels(dataset):
    _, ds = dataset
    for scene in ds.scenes:
        pixels = _pixels(ds, scene)
        assert pixels.shape == (scene.height, scene.width, 3)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            assert 0 <= x0 < x1 <= scene.width and 0 <= y0 < y1 <= scene.height
            is_colour = np.all(pixels == shapes.COLOURS[obj.colour], axis=-1)
            inside = is_colour[y0:y1, x0:x1]
            assert inside.sum() > 0
            if obj.visible_fraction == 1.0:  # tight box: the shape touches all four edges
                assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        # Each object colour shows only inside boxes of objects of that colour.
        for colour, rgb in shapes.COLOURS.items():
            is_colour = np.all(pixels == rgb, axis=-1)
            for obj in scene.objects:
                if obj.colour == colour:
                    x0, y0, x1, y1 = obj.bbox
                    is_colour[y0:y1, x0:x1] = False
            assert not is_colour.any(), (scene.image, colour)


def test_non_object_pixels_are_pale_background_or_grey_clutter(dataset):
    _, ds = dataset
    for scene in ds.scenes[:20]:
        pixels = _pixels(ds, scene).astype(int)
        flat = pixels.reshape(-1, 3)
        is_object = np.zeros(len(flat), dtype=bool)
        for rgb in shapes.COLOURS.values():
            is_object |= np.all(flat == rgb, axis=-1)
        is_background = flat.min(axis=-1) >= shapes.BACKGROUND_MIN
        is_grey = (flat[:, 0] == flat[:, 1]) & (flat[:, 1] == flat[:, 2])
        assert np.all(is_object | is_background | is_grey)
        if scene.n_clutter:
            assert np.any(is_grey & ~is_background)


def test_train_and_test_share_no_images(dataset):
    summary, ds = dataset
    assert summary["images_per_subset"] == {"train": 48, "test": 12}
    by_subset = {"train": set(), "test": set()}
    digests = {"train": set(), "test": set()}
    for scene in ds.scenes:
        by_subset[scene.subset].add(scene.image)
        digests[scene.subset].add(hashlib.sha256(_pixels(ds, scene).tobytes()).hexdigest())
    assert not by_subset["train"] & by_subset["test"]
    assert not digests["train"] & digests["test"]
    for stem, samples in ds.questions.items():
        subset = stem.split("_")[1]
        assert {s.image for s in samples} <= by_subset[subset], stem


def test_question_ids_are_unique_and_files_round_trip(dataset):
    summary, ds = dataset
    ids = [s.question_id for samples in ds.questions.values() for s in samples]
    assert len(ids) == len(set(ids))
    regenerated = shapes.build_questions(ds.scenes, seed=3)
    assert regenerated == ds.questions
    assert set(summary["question_files"]) == {f"{stem}.jsonl" for stem in regenerated}


def test_pope_files_are_in_popes_format_and_load_with_the_pope_loader(dataset):
    _, ds = dataset
    for split in shapes.POPE_SPLITS:
        path = os.path.join(ds.root, f"pope_test_{split}.jsonl")
        with open(path) as handle:
            first = json.loads(handle.readline())
        assert {"question_id", "image", "text", "label"} <= set(first)
        records = load_pope(path, os.path.join(ds.root, "images"))
        assert [r.label for r in records] == [s.answer for s in ds.questions[f"pope_test_{split}"]]
        assert records[0].load_image().size == (128, 128)
    counts = load_vqa(os.path.join(ds.root, "count_test.jsonl"), os.path.join(ds.root, "images"))
    assert all(r.answer.isdigit() and r.extra["region"] for r in counts)


def _pope(ds, split):
    return [s for subset in shapes.SUBSETS for s in ds.questions[f"pope_{subset}_{split}"]]


def test_pope_answers_match_the_scene_and_are_balanced(dataset):
    _, ds = dataset
    for split in shapes.POPE_SPLITS:
        samples = _pope(ds, split)
        labels = Counter(s.answer for s in samples)
        assert labels["yes"] == labels["no"] > 0
        for sample in samples:
            present = {obj.category for obj in sample.objects}
            category = (sample.target["colour"], sample.target["shape"])
            assert (category in present) == (sample.answer == "yes")
            assert sample.question == shapes.pope_question(*category)
            assert re.fullmatch(r"Is there an? \w+ \w+ in the image\?", sample.question)
    assert shapes.pope_question("orange", "star") == "Is there an orange star in the image?"


def test_pope_splits_share_positives_but_not_negatives(dataset):
    _, ds = dataset
    positives = {split: [(s.image, s.question) for s in _pope(ds, split) if s.answer == "yes"]
                 for split in shapes.POPE_SPLITS}
    assert positives["random"] == positives["popular"] == positives["adversarial"]
    negatives = {split: [s.question for s in _pope(ds, split) if s.answer == "no"] for split in shapes.POPE_SPLITS}
    assert negatives["random"] != negatives["popular"] != negatives["adversarial"]


def test_popular_negatives_are_the_most_frequent_absent_categories(dataset):
    _, ds = dataset
    frequency, _ = shapes.category_statistics(ds.scenes)
    ranking = shapes.popularity_ranking(frequency)
    assert [frequency[c] for c in ranking] == sorted(frequency[c] for c in shapes.CATEGORIES)[::-1]
    by_image: dict[str, list] = {}
    for sample in _pope(ds, "popular"):
        if sample.answer == "no":
            by_image.setdefault(sample.image, []).append((sample.target["colour"], sample.target["shape"]))
    for image, negatives in by_image.items():
        present = {obj.category for obj in next(s for s in ds.scenes if s.image == image).objects}
        absent_ranking = [c for c in ranking if c not in present]
        assert negatives == absent_ranking[: len(negatives)]
        # and so each is among the globally most frequent categories
        assert max(ranking.index(c) for c in negatives) < len(present) + len(negatives)


def test_adversarial_negatives_share_an_attribute_and_co_occur_most(dataset):
    _, ds = dataset
    _, cooccurrence = shapes.category_statistics(ds.scenes)
    scenes = {scene.image: scene for scene in ds.scenes}
    checked = 0
    for sample in _pope(ds, "adversarial"):
        if sample.answer != "no":
            continue
        present = {obj.category for obj in scenes[sample.image].objects}
        negative = (sample.target["colour"], sample.target["shape"])
        assert shapes.shares_attribute(negative, present)
        chosen = {(s.target["colour"], s.target["shape"]) for s in _pope(ds, "adversarial")
                  if s.image == sample.image and s.answer == "no"}
        rivals = [c for c in shapes.CATEGORIES
                  if c not in present and c not in chosen and shapes.shares_attribute(c, present)]
        score = shapes.cooccurrence_score(negative, present, cooccurrence)
        assert all(shapes.cooccurrence_score(c, present, cooccurrence) <= score for c in rivals)
        checked += 1
    assert checked > 0
    random_share = np.mean([shapes.shares_attribute((s.target["colour"], s.target["shape"]),
                                                    {o.category for o in s.objects})
                            for s in _pope(ds, "random") if s.answer == "no"])
    assert random_share < 1.0  # the adversarial rule is not what random sampling gives anyway


def test_count_questions_count_objects_of_the_shape_inside_the_region(dataset):
    _, ds = dataset
    samples = ds.questions["count_train"] + ds.questions["count_test"]
    assert len(samples) == len(ds.scenes)
    for sample in samples:
        x0, y0, x1, y1 = sample.region
        assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
        assert f"[{x0}, {y0}, {x1}, {y1}]" in sample.question
        assert shapes.SHAPE_PLURALS[sample.target["shape"]] in sample.question
        expected = 0
        for obj in sample.objects:
            inside = obj.bbox[0] >= x0 and obj.bbox[1] >= y0 and obj.bbox[2] <= x1 and obj.bbox[3] <= y1
            disjoint = obj.bbox[2] <= x0 or obj.bbox[0] >= x1 or obj.bbox[3] <= y0 or obj.bbox[1] >= y1
            assert inside or disjoint  # the region never cuts an object
            expected += inside and obj.shape == sample.target["shape"]
        assert sample.answer == str(expected)
    assert len({s.answer for s in samples}) >= 2


def test_attribute_questions_ask_about_unique_objects(dataset):
    _, ds = dataset
    samples = ds.questions["attribute_train"] + ds.questions["attribute_test"]
    kinds = Counter(s.target["attribute"] for s in samples)
    assert kinds["colour"] > 0 and kinds["shape"] > 0
    for sample in samples:
        if sample.target["attribute"] == "colour":
            matches = [o for o in sample.objects if o.shape == sample.target["shape"]]
            assert len(matches) == 1 and sample.answer == matches[0].colour
            assert sample.question == f"What color is the {matches[0].shape}?"
        else:
            matches = [o for o in sample.objects if o.colour == sample.target["colour"]]
            assert len(matches) == 1 and sample.answer == matches[0].shape


def test_rectangular_images_use_pixel_coordinates_of_the_generated_image():
    prior = shapes.category_prior(0)
    for index in range(10):
        image, _, _, objects = shapes.render_scene(np.random.default_rng(index), 160, 72, prior, occlusion_prob=1.0)
        assert image.size == (160, 72)
        for obj in objects:
            assert 0 <= obj.bbox[0] < obj.bbox[2] <= 160 and 0 <= obj.bbox[1] < obj.bbox[3] <= 72


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="too small"):
        next(shapes.generate_scenes(1, 0, image_size=16))
    with pytest.raises(ValueError, match="max_objects"):
        next(shapes.generate_scenes(1, 0, max_objects=9))


def test_command_line_entry_point(tmp_path, capsys):
    summary = shapes.main([str(tmp_path), "--n-images", "3", "--image-size", "48", "--seed", "5"])
    assert summary["image_size"] == [48, 48] and summary["images_per_subset"] == {"train": 2, "test": 1}
    assert '"seed": 5' in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "images")) == 3
