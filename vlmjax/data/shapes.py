"""Shapes world: a seeded procedural benchmark with exact ground truth for mechanistic VLM studies.

Each image holds 1-5 flat-coloured objects (shape x colour x size) on a pale background (solid, gradient or light
noise), with optional partial occlusion and small grey clutter marks that are not objects. Every object records its
shape, colour, size, pixel bounding box and visible fraction, so attention maps and answers can be checked against
exact locations.

Conventions
- Boxes are ``[x0, y0, x1, y1]`` in pixels of the generated image, with exclusive right/bottom edges: the object's
  pixels lie in columns ``x0..x1-1`` and rows ``y0..y1-1`` (so ``image.crop(box)`` is the object's box). Object boxes
  are tight around the whole (amodal) shape, occluded parts included.
- Backgrounds keep every channel in [150, 255] and clutter is grey, while every object colour has a channel below 150
  and is not grey: an object colour's exact RGB value only ever appears on objects of that colour.
- An object *category* is a colour-shape pair ("red circle"); there are ``len(COLOURS) * len(SHAPES)`` of them, and
  their frequencies follow a Zipf-like prior drawn from the seed (so "popular" negatives differ from "random" ones).

Question families (question text uses "color", the spelling VQA-trained models have seen; code uses "colour")
- ``pope``: "Is there a {colour} {shape} in the image?" (always colour + shape: this tests binding, and grey clutter
  can never be mistaken for a named object). Per image, up to ``pope_per_image`` distinct present categories give
  "yes" questions and as many absent categories give "no" questions, so yes/no is exactly balanced. Negatives follow
  POPE's three splits:
  * ``random``: absent categories drawn uniformly without replacement;
  * ``popular``: the most frequent absent categories, by the number of images of the whole dataset (all subsets)
    containing them (ties: canonical category order);
  * ``adversarial``: absent categories that share the colour or the shape of a present object, ranked by how often
    they co-occur (in images of the whole dataset) with the image's present categories (ties: a seeded shuffle).
- ``count`` (PointQA-style): "How many {shapes} are in the box [x0, y0, x1, y1]?"; the box is also in ``region``.
  The region is chosen so every object is either fully inside it or disjoint from it; the answer (a decimal string)
  counts objects of that shape (any colour) inside.
- ``attribute``: "What color is the {shape}?" (only when that shape is unique in the image) and "What shape is the
  {colour} object?" (only when that colour is unique); single-word answers.

On disk (``generate_dataset``): ``images/{subset}_{index:06d}.png``; ``scenes.jsonl`` (one scene per image);
``pope_{subset}_{split}.jsonl`` in POPE's format ``{"question_id", "image", "text", "label"}`` plus extra keys;
``count_{subset}.jsonl`` and ``attribute_{subset}.jsonl`` in the generic VQA format
``{"question_id", "image", "question", "answer"}`` plus extra keys; ``dataset.json`` (the summary). Question ids are
integers unique across the whole dataset. Subsets ``train`` and ``test`` hold different images.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
                 "cross": "crosses", "diamond": "diamonds"}
COLOURS = {
    "red": (220, 30, 30),
    "orange": (245, 130, 20),
    "yellow": (240, 210, 20),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "purple": (140, 50, 180),
    "pink": (245, 120, 190),
    "brown": (130, 80, 30),
}
# Side of an object's square footprint, as a fraction of min(width, height).
SIZES = {"small": 0.11, "medium": 0.18, "large": 0.27}
CATEGORIES = tuple((colour, shape) for colour in COLOURS for shape in SHAPES)
POPE_SPLITS = ("random", "popular", "adversarial")
BACKGROUNDS = ("solid", "gradient", "noise")
SUBSETS = ("train", "test")

MIN_IMAGE_SIDE = 32
BACKGROUND_MIN, BACKGROUND_MAX = 150, 255
MIN_VISIBLE_FRACTION = 0.5
PLACEMENT_ATTEMPTS = 60
REGION_ATTEMPTS = 50
ZIPF_EXPONENT = 0.7

# Independent random streams derived from the seed, so adding questions never changes the images.
_STREAM_PRIOR, _STREAM_SCENE, _STREAM_QUESTIONS = 0, 1, 2
# Sub-streams of an image's questions; POPE negatives use the split's index in POPE_SPLITS (0-2).
_TASK_POSITIVES, _TASK_COUNT, _TASK_ATTRIBUTE = 3, 4, 5


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: what it is, where it is (pixel box, see module docstring) and how much of it is visible."""

    shape: str
    colour: str
    size: str
    bbox: tuple[int, int, int, int]
    visible_fraction: float = 1.0

    @property
    def category(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    def to_json(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "bbox": list(self.bbox),
                "visible_fraction": self.visible_fraction}

    @classmethod
    def from_json(cls, data: dict) -> "ShapeObject":
        return cls(data["shape"], data["colour"], data["size"], tuple(data["bbox"]), data["visible_fraction"])


@dataclass(frozen=True)
class Scene:
    """One generated image's ground truth."""

    image: str
    subset: str
    width: int
    height: int
    background: str
    n_clutter: int
    objects: tuple[ShapeObject, ...]

    def to_json(self) -> dict:
        data = asdict(self)
        data["objects"] = [obj.to_json() for obj in self.objects]
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Scene":
        return cls(data["image"], data["subset"], data["width"], data["height"], data["background"],
                   data["n_clutter"], tuple(ShapeObject.from_json(o) for o in data["objects"]))


@dataclass(frozen=True)
class Sample:
    """One question about one image.

    ``split`` is the POPE negative-sampling split (random/popular/adversarial) for ``pope`` questions and None
    otherwise; ``subset`` is train/test; ``region`` is the counting box; ``target`` names what is asked about.
    """

    question_id: int
    image: str
    question: str
    answer: str
    question_type: str
    subset: str
    split: str | None
    objects: tuple[ShapeObject, ...]
    region: tuple[int, int, int, int] | None = None
    target: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """POPE format for ``pope`` questions, generic VQA format otherwise; ground truth as extra keys."""
        if self.question_type == "pope":
            data = {"question_id": self.question_id, "image": self.image, "text": self.question, "label": self.answer}
        else:
            data = {"question_id": self.question_id, "image": self.image, "question": self.question,
                    "answer": self.answer}
        data.update({"question_type": self.question_type, "subset": self.subset, "split": self.split,
                     "region": list(self.region) if self.region is not None else None, "target": self.target,
                     "objects": [obj.to_json() for obj in self.objects]})
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Sample":
        is_pope = "label" in data
        region = data.get("region")
        return cls(data["question_id"], data["image"], data["text" if is_pope else "question"],
                   data["label" if is_pope else "answer"], data["question_type"], data["subset"], data["split"],
                   tuple(ShapeObject.from_json(o) for o in data["objects"]),
                   tuple(region) if region is not None else None, data["target"])


@dataclass
class ShapesDataset:
    """A dataset read back from disk: the summary, every scene, and the questions of each JSONL file (by stem)."""

    root: str
    summary: dict
    scenes: list[Scene]
    questions: dict[str, list[Sample]]

    def image_path(self, image: str) -> str:
        return os.path.join(self.root, "images", image)


# ----------------------------------------------------------------------------------------------------- rendering


def _image_dims(image_size: int | Sequence[int]) -> tuple[int, int]:
    width, height = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ValueError(f"image_size {image_size} is too small: each side must be at least {MIN_IMAGE_SIDE} pixels")
    return int(width), int(height)


def category_prior(seed: int) -> np.ndarray:
    """Zipf-like probabilities over CATEGORIES (a seeded permutation of ranks), so some categories are common."""
    rng = np.random.default_rng([seed, _STREAM_PRIOR])
    weights = 1.0 / (1.0 + np.arange(len(CATEGORIES))) ** ZIPF_EXPONENT
    weights = weights[rng.permutation(len(CATEGORIES))]
    return weights / weights.sum()


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, str]:
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    base = rng.uniform(175, 250, size=3)
    if kind == "solid":
        pixels = np.broadcast_to(base, (height, width, 3)).astype(np.float64)
    elif kind == "gradient":
        other = rng.uniform(175, 250, size=3)
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:height, 0:width]
        ramp = xs * math.cos(angle) + ys * math.sin(angle)
        ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-9)
        pixels = base + ramp[..., None] * (other - base)
    else:
        pixels = base + rng.normal(0.0, 6.0, size=(height, width, 1))
    return np.clip(np.rint(pixels), BACKGROUND_MIN, BACKGROUND_MAX).astype(np.uint8), kind


def _draw_clutter(rng: np.random.Generator, image: Image.Image, n_marks: int) -> None:
    """Small grey dots, dashes and ticks: visual distractors that are never objects (grey is no object colour)."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    unit = max(1, round(min(width, height) / 150))
    for _ in range(n_marks):
        grey = int(rng.integers(60, 141))
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        kind = rng.integers(3)
        if kind == 0:
            radius = unit * float(rng.uniform(0.8, 1.6))
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(grey,) * 3)
        else:
            length = min(width, height) * float(rng.uniform(0.02, 0.06))
            angle = float(rng.uniform(0, math.pi))
            end = (x + length * math.cos(angle), y + length * math.sin(angle))
            points = [(x, y), end] if kind == 1 else [(x, y), end, (end[0] + length / 2, end[1] - length / 2)]
            draw.line(points, fill=(grey,) * 3, width=unit)


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """The shape's outline in the unit square (y down); circles are drawn as ellipses instead."""
    if shape == "square":
        return [(0, 0), (1, 0), (1, 1), (0, 1)]
    if shape == "triangle":
        return [(0.5, 0), (1, 1), (0, 1)]
    if shape == "diamond":
        return [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]
    if shape == "cross":
        a, b = 1 / 3, 2 / 3
        return [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = 0.5 if k % 2 == 0 else 0.2
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((0.5 + radius * math.cos(angle), 0.5 + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of a shape filling a side x side footprint (no anti-aliasing: exact colours)."""
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    extent = side - 1
    if shape == "circle":
        draw.ellipse([0, 0, extent, extent], fill=255)
    else:
        draw.polygon([(x * extent, y * extent) for x, y in _unit_polygon(shape)], fill=255)
    return np.asarray(canvas) > 0


def _boxes_touch(a: Sequence[int], b: Sequence[int], gap: int) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def render_scene(
    rng: np.random.Generator,
    width: int,
    height: int,
    prior: np.ndarray,
    *,
    max_objects: int = 5,
    occlusion_prob: float = 0.3,
    clutter_prob: float = 0.5,
) -> tuple[Image.Image, str, int, tuple[ShapeObject, ...]]:
    """Draw one scene; returns (image, background kind, number of clutter marks, objects in drawing order).

    Without occlusion, object boxes keep a 2-pixel gap. With occlusion (probability ``occlusion_prob`` per image), a
    later object may cover an earlier one, but never one of the same colour, and every object keeps at least
    MIN_VISIBLE_FRACTION of its pixels. An object that cannot be placed is dropped (the first always fits).
    """
    pixels, background = _background(rng, width, height)
    image = Image.fromarray(pixels)
    n_clutter = int(rng.integers(1, 7)) if rng.random() < clutter_prob else 0
    _draw_clutter(rng, image, n_clutter)
    pixels = np.array(image)

    allow_occlusion = bool(rng.random() < occlusion_prob)
    n_wanted = int(rng.integers(1, max_objects + 1))
    owner = np.full((height, width), -1, dtype=np.int16)  # index of the object that shows at each pixel
    placed: list[dict] = []
    for _ in range(n_wanted):
        colour, shape = CATEGORIES[rng.choice(len(CATEGORIES), p=prior)]
        size = tuple(SIZES)[rng.integers(len(SIZES))]
        side = max(5, round(SIZES[size] * min(width, height)))
        mask = shape_mask(shape, side)
        rows, cols = np.nonzero(mask)
        for _attempt in range(PLACEMENT_ATTEMPTS):
            if allow_occlusion and placed and rng.random() < 0.5:
                anchor = placed[rng.integers(len(placed))]["bbox"]
                x0 = int(np.clip(rng.integers(anchor[0] - side + 1, anchor[2]), 0, width - side))
                y0 = int(np.clip(rng.integers(anchor[1] - side + 1, anchor[3]), 0, height - side))
            else:
                x0, y0 = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            bbox = (x0 + int(cols.min()), y0 + int(rows.min()), x0 + int(cols.max()) + 1, y0 + int(rows.max()) + 1)
            if _placement_ok(bbox, colour, mask, x0, y0, placed, owner, allow_occlusion):
                window = owner[y0:y0 + side, x0:x0 + side]
                window[mask] = len(placed)
                pixels[y0:y0 + side, x0:x0 + side][mask] = COLOURS[colour]
                placed.append({"shape": shape, "colour": colour, "size": size, "bbox": bbox, "area": int(mask.sum())})
                break

    visible = np.bincount(owner[owner >= 0].ravel(), minlength=len(placed))
    objects = tuple(
        ShapeObject(p["shape"], p["colour"], p["size"], p["bbox"], round(float(visible[i]) / p["area"], 4))
        for i, p in enumerate(placed)
    )
    return Image.fromarray(pixels), background, n_clutter, objects


def _placement_ok(bbox, colour, mask, x0, y0, placed, owner, allow_occlusion) -> bool:
    if not allow_occlusion:
        return not any(_boxes_touch(bbox, other["bbox"], gap=2) for other in placed)
    if any(other["colour"] == colour and _boxes_touch(bbox, other["bbox"], gap=2) for other in placed):
        return False
    side = mask.shape[0]
    current = np.bincount(owner[owner >= 0].ravel(), minlength=len(placed))
    covered_owners = owner[y0:y0 + side, x0:x0 + side][mask]
    covered = np.bincount(covered_owners[covered_owners >= 0], minlength=len(placed))
    return all((current[i] - covered[i]) >= MIN_VISIBLE_FRACTION * p["area"] for i, p in enumerate(placed))


# ----------------------------------------------------------------------------------------------------- questions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def pope_question(colour: str, shape: str) -> str:
    return f"Is there {_article(colour)} {colour} {shape} in the image?"


def category_statistics(scenes: Iterable[Scene]) -> tuple[Counter, Counter]:
    """(images containing each category, images containing each unordered pair of distinct categories)."""
    frequency: Counter = Counter()
    cooccurrence: Counter = Counter()
    for scene in scenes:
        present = sorted({obj.category for obj in scene.objects})
        frequency.update(present)
        cooccurrence.update((a, b) for i, a in enumerate(present) for b in present[i + 1:])
    return frequency, cooccurrence


def popularity_ranking(frequency: Counter) -> list[tuple[str, str]]:
    """All categories, most frequent first; ties in canonical CATEGORIES order."""
    return sorted(CATEGORIES, key=lambda c: (-frequency[c], CATEGORIES.index(c)))


def cooccurrence_score(candidate: tuple[str, str], present: Iterable[tuple[str, str]], cooccurrence: Counter) -> int:
    """Images in which ``candidate`` appears together with each present category, summed over those categories."""
    return sum(cooccurrence[tuple(sorted((candidate, other)))] for other in present)


def shares_attribute(candidate: tuple[str, str], present: Iterable[tuple[str, str]]) -> bool:
    return any(candidate[0] == colour or candidate[1] == shape for colour, shape in present)


def pope_negatives(
    split: str,
    present: set[tuple[str, str]],
    n_negatives: int,
    rng: np.random.Generator,
    popularity: list[tuple[str, str]],
    cooccurrence: Counter,
) -> list[tuple[str, str]]:
    """Absent categories for one image under POPE's ``random`` / ``popular`` / ``adversarial`` rule."""
    absent = [c for c in CATEGORIES if c not in present]
    if split == "random":
        return [absent[i] for i in rng.choice(len(absent), size=n_negatives, replace=False)]
    if split == "popular":
        return [c for c in popularity if c not in present][:n_negatives]
    if split == "adversarial":
        tie_break = {c: i for i, c in enumerate(absent[j] for j in rng.permutation(len(absent)))}
        ranked = sorted(absent, key=lambda c: (not shares_attribute(c, present),
                                               -cooccurrence_score(c, present, cooccurrence), tie_break[c]))
        return ranked[:n_negatives]
    raise ValueError(f"unknown POPE split {split!r}; expected one of {POPE_SPLITS}")


def _choose_region(rng: np.random.Generator, scene: Scene) -> tuple[int, int, int, int]:
    """A box that holds some objects whole and cuts none (fallback: the whole image)."""
    for _ in range(REGION_ATTEMPTS):
        box_w = int(rng.integers(int(0.3 * scene.width), int(0.9 * scene.width) + 1))
        box_h = int(rng.integers(int(0.3 * scene.height), int(0.9 * scene.height) + 1))
        x0, y0 = int(rng.integers(0, scene.width - box_w + 1)), int(rng.integers(0, scene.height - box_h + 1))
        region = (x0, y0, x0 + box_w, y0 + box_h)
        inside = [_box_inside(obj.bbox, region) for obj in scene.objects]
        cut = [_boxes_touch(obj.bbox, region, gap=0) and not whole for obj, whole in zip(scene.objects, inside)]
        if any(inside) and not any(cut):
            return region
    return (0, 0, scene.width, scene.height)


def _box_inside(box: Sequence[int], region: Sequence[int]) -> bool:
    return box[0] >= region[0] and box[1] >= region[1] and box[2] <= region[2] and box[3] <= region[3]


def count_in_region(scene: Scene, shape: str, region: Sequence[int]) -> int:
    return sum(obj.shape == shape and _box_inside(obj.bbox, region) for obj in scene.objects)


def build_questions(
    scenes: Sequence[Scene], seed: int, *, pope_per_image: int = 3, first_question_id: int = 1
) -> dict[str, list[Sample]]:
    """Every question of every family for ``scenes``, keyed by output file stem (e.g. ``pope_test_adversarial``).

    Popularity and co-occurrence are counted over all of ``scenes``. Each image's questions come from its own
    random stream, so one image's questions do not depend on the others' random draws.
    """
    frequency, cooccurrence = category_statistics(scenes)
    popularity = popularity_ranking(frequency)
    files: dict[str, list[Sample]] = {}
    next_id = first_question_id

    def add(stem: str, scene: Scene, **fields) -> None:
        nonlocal next_id
        files.setdefault(stem, []).append(
            Sample(question_id=next_id, image=scene.image, subset=scene.subset, objects=scene.objects, **fields))
        next_id += 1

    for subset in SUBSETS:
        subset_scenes = [(i, s) for i, s in enumerate(scenes) if s.subset == subset]
        # Positives depend only on the image, so the three splits ask about the same present objects.
        positives = {}
        for index, scene in subset_scenes:
            rng = np.random.default_rng([seed, _STREAM_QUESTIONS, index, _TASK_POSITIVES])
            present = sorted({obj.category for obj in scene.objects}, key=CATEGORIES.index)
            chosen = rng.choice(len(present), min(pope_per_image, len(present)), replace=False)
            positives[index] = [present[i] for i in chosen]
        for split_index, split in enumerate(POPE_SPLITS):
            for index, scene in subset_scenes:
                rng = np.random.default_rng([seed, _STREAM_QUESTIONS, index, split_index])
                present = {obj.category for obj in scene.objects}
                negatives = pope_negatives(split, present, len(positives[index]), rng, popularity, cooccurrence)
                for positive, negative in zip(positives[index], negatives):
                    for (colour, shape), label in ((positive, "yes"), (negative, "no")):
                        add(f"pope_{subset}_{split}", scene, question=pope_question(colour, shape), answer=label,
                            question_type="pope", split=split, target={"colour": colour, "shape": shape})
        for index, scene in subset_scenes:
            rng = np.random.default_rng([seed, _STREAM_QUESTIONS, index, _TASK_COUNT])
            region = _choose_region(rng, scene)
            shapes_inside = sorted({o.shape for o in scene.objects if _box_inside(o.bbox, region)}, key=SHAPES.index)
            if shapes_inside and rng.random() < 0.85:
                shape = shapes_inside[rng.integers(len(shapes_inside))]
            else:
                shape = SHAPES[rng.integers(len(SHAPES))]
            add(f"count_{subset}", scene,
                question=f"How many {SHAPE_PLURALS[shape]} are in the box [{', '.join(map(str, region))}]?",
                answer=str(count_in_region(scene, shape, region)), question_type="count", split=None,
                region=region, target={"shape": shape})
        for index, scene in subset_scenes:
            rng = np.random.default_rng([seed, _STREAM_QUESTIONS, index, _TASK_ATTRIBUTE])
            shape_counts = Counter(o.shape for o in scene.objects)
            colour_counts = Counter(o.colour for o in scene.objects)
            unique_shape = [o for o in scene.objects if shape_counts[o.shape] == 1]
            unique_colour = [o for o in scene.objects if colour_counts[o.colour] == 1]
            if unique_shape:
                obj = unique_shape[rng.integers(len(unique_shape))]
                add(f"attribute_{subset}", scene, question=f"What color is the {obj.shape}?", answer=obj.colour,
                    question_type="attribute", split=None, target={"attribute": "colour", "shape": obj.shape})
            if unique_colour:
                obj = unique_colour[rng.integers(len(unique_colour))]
                add(f"attribute_{subset}", scene, question=f"What shape is the {obj.colour} object?",
                    answer=obj.shape, question_type="attribute", split=None,
                    target={"attribute": "shape", "colour": obj.colour})
    return files


# ----------------------------------------------------------------------------------------------------- dataset I/O


def generate_scenes(
    n_images: int,
    seed: int,
    image_size: int | Sequence[int] = 224,
    *,
    test_fraction: float = 0.2,
    max_objects: int = 5,
    occlusion_prob: float = 0.3,
    clutter_prob: float = 0.5,
    progress: bool = False,
) -> Iterable[tuple[Image.Image, Scene]]:
    """Yield (image, scene) for each image index; the last ``round(n_images * test_fraction)`` are ``test``.

    Image ``i`` depends only on (seed, i) and the rendering options, never on the other images.
    """
    if not 1 <= max_objects <= 5:
        raise ValueError(f"max_objects must be between 1 and 5, got {max_objects}")
    width, height = _image_dims(image_size)
    prior = category_prior(seed)
    n_test = int(round(n_images * test_fraction))
    for index in tqdm(range(n_images), desc="shapes world", unit="img", disable=not progress):
        subset = "test" if index >= n_images - n_test else "train"
        rng = np.random.default_rng([seed, _STREAM_SCENE, index])
        image, background, n_clutter, objects = render_scene(
            rng, width, height, prior, max_objects=max_objects, occlusion_prob=occlusion_prob,
            clutter_prob=clutter_prob)
        yield image, Scene(f"{subset}_{index:06d}.png", subset, width, height, background, n_clutter, objects)


def _write_jsonl(path: str, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def generate_dataset(
    out_dir: str,
    n_images: int,
    seed: int,
    image_size: int | Sequence[int] = 224,
    *,
    test_fraction: float = 0.2,
    max_objects: int = 5,
    occlusion_prob: float = 0.3,
    clutter_prob: float = 0.5,
    pope_per_image: int = 3,
    progress: bool = True,
) -> dict:
    """Generate and write a shapes-world dataset to ``out_dir`` (layout in the module docstring); returns its summary.

    The same arguments give byte-identical files.
    """
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    scenes = []
    for image, scene in generate_scenes(n_images, seed, image_size, test_fraction=test_fraction,
                                        max_objects=max_objects, occlusion_prob=occlusion_prob,
                                        clutter_prob=clutter_prob, progress=progress):
        image.save(os.path.join(image_dir, scene.image), format="PNG")
        scenes.append(scene)
    _write_jsonl(os.path.join(out_dir, "scenes.jsonl"), (scene.to_json() for scene in scenes))
    questions = build_questions(scenes, seed, pope_per_image=pope_per_image)
    for stem, samples in questions.items():
        _write_jsonl(os.path.join(out_dir, f"{stem}.jsonl"), (sample.to_json() for sample in samples))

    frequency, _ = category_statistics(scenes)
    width, height = _image_dims(image_size)
    summary = {
        "generator": "vlmjax.data.shapes",
        "seed": seed,
        "n_images": n_images,
        "image_size": [width, height],
        "options": {"test_fraction": test_fraction, "max_objects": max_objects, "occlusion_prob": occlusion_prob,
                    "clutter_prob": clutter_prob, "pope_per_image": pope_per_image},
        "images_per_subset": dict(Counter(scene.subset for scene in scenes)),
        "n_objects": sum(len(scene.objects) for scene in scenes),
        "question_files": {f"{stem}.jsonl": len(samples) for stem, samples in questions.items()},
        "category_frequency": {f"{c} {s}": frequency[(c, s)] for c, s in popularity_ranking(frequency)},
    }
    with open(os.path.join(out_dir, "dataset.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    return summary


def read_questions(path: str) -> list[Sample]:
    """Read one question file written by ``generate_dataset`` back into Samples."""
    with open(path, encoding="utf-8") as handle:
        return [Sample.from_json(json.loads(line)) for line in handle if line.strip()]


def load_dataset(root: str) -> ShapesDataset:
    """Read a dataset written by ``generate_dataset``."""
    with open(os.path.join(root, "dataset.json"), encoding="utf-8") as handle:
        summary = json.load(handle)
    with open(os.path.join(root, "scenes.jsonl"), encoding="utf-8") as handle:
        scenes = [Scene.from_json(json.loads(line)) for line in handle if line.strip()]
    questions = {name[: -len(".jsonl")]: read_questions(os.path.join(root, name)) for name in summary["question_files"]}
    return ShapesDataset(root, summary, scenes, questions)


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m vlmjax.data.shapes OUT_DIR --n-images 500 --seed 0``: generate a dataset and print its summary."""
    parser = argparse.ArgumentParser(description="Generate a shapes-world benchmark (images + question JSONL).")
    parser.add_argument("out_dir", help="directory to write images/, scenes.jsonl, the question files and dataset.json")
    parser.add_argument("--n-images", type=int, default=500, help="images to generate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the images, category prior and questions (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=224,
                        help="image side in pixels (default: %(default)s; the built-in models read 64)")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="fraction of the images in the test subset, the last ones (default: %(default)s)")
    parser.add_argument("--occlusion-prob", type=float, default=0.3,
                        help="probability that an image lets objects partly cover each other (default: %(default)s)")
    parser.add_argument("--clutter-prob", type=float, default=0.5,
                        help="probability that an image gets small grey clutter marks (default: %(default)s)")
    args = parser.parse_args(argv)
    summary = generate_dataset(args.out_dir, args.n_images, args.seed, args.image_size,
                               test_fraction=args.test_fraction, occlusion_prob=args.occlusion_prob,
                               clutter_prob=args.clutter_prob)
    print(json.dumps({k: v for k, v in summary.items() if k != "category_frequency"}, indent=1))
    return summary


if __name__ == "__main__":
    main()
