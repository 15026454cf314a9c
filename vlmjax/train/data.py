"""Training data: shapes-world questions as multi-turn conversations, per-token reply weights (with per-category
answer balancing), grounding targets per visual token, and the seeded batch streams of both stages."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
from PIL import Image

from vlmjax.data import shapes
from vlmjax.inputs import image_placeholder
from vlmjax.train.presets import DESCRIBE_QUESTION, PROMPT


def shapes_questions(n_images: int, seed: int, image_size: int, test_fraction: float, tasks: Sequence[str]):
    """(images by file name, {"train": questions, "test": questions}) of an in-memory shapes-world dataset, keeping
    the question families in ``tasks``. POPE questions are pooled over the three negative splits as generated (the
    splits share their "yes" questions, so yes and no stay balanced)."""
    images, scenes = {}, []
    for image, scene in shapes.generate_scenes(n_images, seed, image_size, test_fraction=test_fraction):
        images[scene.image] = image
        scenes.append(scene)
    questions = {subset: [] for subset in shapes.SUBSETS}
    for stem, samples in shapes.build_questions(scenes, seed).items():
        task, subset = stem.split("_")[:2]
        if task in tasks:
            questions[subset].extend(samples)
    if "describe" in tasks:
        for scene in scenes:
            questions[scene.subset].append(describe_sample(scene))
    return images, questions


def describe_sample(scene: shapes.Scene) -> shapes.Sample:
    """"Describe the image." answered by the image's distinct categories in canonical order ("red circle , blue
    square"): dense supervision that ties each colour and shape word to the objects' pixels."""
    present = sorted({obj.category for obj in scene.objects}, key=shapes.CATEGORIES.index)
    return shapes.Sample(question_id=-1, image=scene.image, question=DESCRIBE_QUESTION,
                         answer=" , ".join(f"{colour} {shape}" for colour, shape in present),
                         question_type="describe", subset=scene.subset, split=None, objects=scene.objects)


def patch_labels(image: Image.Image, objects: Sequence[shapes.ShapeObject], patch_size: int, tokenizer,
                 max_objects: int = 1, min_fraction: float = 0.125) -> tuple[np.ndarray, np.ndarray]:
    """Grounding targets of each ``patch_size`` square (row-major, as the visual tokens are ordered): token ids
    [patches, max_objects, 2] of the colour and shape words of the objects showing in most of its pixels (at least
    ``min_fraction`` of them each; -1 beyond), and weights [patches, max_objects], those objects' pixel shares
    (summing to 1 where any object is labelled, 0 elsewhere).

    Pixels are assigned exactly: an object's colour appears only on objects of that colour, and objects of one
    colour never touch, so a pixel of colour c inside the box of the c-coloured object belongs to that object."""
    pixels = np.asarray(image.convert("RGB"))
    owner = np.full(pixels.shape[:2], -1)
    for index, obj in enumerate(objects):
        x0, y0, x1, y1 = obj.bbox
        match = np.all(pixels[y0:y1, x0:x1] == shapes.COLOURS[obj.colour], axis=-1)
        owner[y0:y1, x0:x1][match] = index
    rows, cols = pixels.shape[0] // patch_size, pixels.shape[1] // patch_size
    blocks = owner[:rows * patch_size, :cols * patch_size].reshape(rows, patch_size, cols, patch_size)
    blocks = blocks.transpose(0, 2, 1, 3).reshape(rows * cols, patch_size * patch_size)
    labels = np.full((rows * cols, max_objects, 2), -1, np.int32)
    weights = np.zeros((rows * cols, max_objects), np.float32)
    for patch, block in enumerate(blocks):
        counts = np.bincount(block[block >= 0], minlength=len(objects))
        shown = [i for i in np.argsort(-counts, kind="stable")[:max_objects] if counts[i] >= min_fraction * block.size]
        for k, i in enumerate(shown):
            labels[patch, k] = tokenizer.convert_tokens_to_ids([objects[i].colour, objects[i].shape])
            weights[patch, k] = counts[i] / counts[shown].sum()
    return labels, weights


def answer_weights(questions: Sequence[shapes.Sample]) -> dict[tuple[str, str, str], float]:
    """Loss weight of each (colour, shape, answer) of the POPE questions: n_c / (2 n_{c,answer}), so that in the
    weighted loss every category is "yes" exactly as often as "no" (the mean weight stays 1; a category asked with
    one answer only keeps weight 1).

    POPE's negative sampling makes the answer depend on the category alone: categories asked as "popular" negatives
    are mostly "no", rare ones mostly "yes" (30% to 76% "yes" by category on the built-in training set). Unweighted,
    a model learns that prior and answers from the question without the image (off chance on black images, and
    wrong on another seed's dataset, whose prior differs)."""
    counts = Counter((q.target["colour"], q.target["shape"], q.answer) for q in questions if q.question_type == "pope")
    totals: Counter = Counter()
    for (colour, shape, _), n in counts.items():
        totals[colour, shape] += n
    return {key: totals[key[:2]] / (2 * n) if n < totals[key[:2]] else 1.0 for key, n in counts.items()}


def conversations(questions: Sequence[shapes.Sample], seed: int) -> list[list[shapes.Sample]]:
    """One conversation per image and POPE split: that split's yes/no questions in a seeded random order, then the
    image's other questions (describe, attribute, count), last so that their answers never give a yes/no answer
    away; and one per image of its open questions alone (attribute, count; seeded order), so that these are also
    asked as the first turn, the form every evaluation uses (without it a model answers "yes"/"no" to a first-turn
    "What color is the square?"). The image is encoded once for several questions, and the first turn has exactly the
    evaluation prompt's form."""
    yes_no: dict[tuple, list[shapes.Sample]] = {}
    others: dict[str, list[shapes.Sample]] = {}
    for q in questions:
        if q.question_type == "pope":
            yes_no.setdefault((q.image, q.split), []).append(q)
        else:
            others.setdefault(q.image, []).append(q)
    groups = yes_no or {(image, None): [] for image in others}
    rng = np.random.default_rng([seed, len(questions)])
    dialogues = [[group[i] for i in rng.permutation(len(group))] + others.get(image, [])
                 for (image, _), group in groups.items()]
    for image, asked in others.items():
        open_questions = [q for q in asked if q.question_type != "describe"]
        if open_questions and yes_no:
            dialogues.append([open_questions[i] for i in rng.permutation(len(open_questions))])
    return dialogues


def conversation_text(turns: Sequence[shapes.Sample], eos: str, image: str) -> str:
    """``USER: <image> Q1 ASSISTANT: A1</s> USER: Q2 ASSISTANT: A2</s> ...`` (``image``: the image placeholder)"""
    first, *rest = turns
    return (PROMPT.format(image=image, question=first.question) + f" {first.answer}{eos}"
            + "".join(f" USER: {q.question} ASSISTANT: {q.answer}{eos}" for q in rest))


def reply_starts(input_ids: np.ndarray, tokenizer) -> np.ndarray:
    """True on each reply's first token (just after ``ASSISTANT :``)."""
    assistant, colon = tokenizer.convert_tokens_to_ids(["ASSISTANT", ":"])
    starts = np.zeros(input_ids.shape, bool)
    starts[:, 2:] = (input_ids[:, :-2] == assistant) & (input_ids[:, 1:-1] == colon)
    return starts


def loss_weights(input_ids: np.ndarray, dialogues: Sequence[Sequence[shapes.Sample]], tokenizer,
                 weights: dict[tuple[str, str, str], float] | None) -> np.ndarray:
    """Per-token answer-loss weights: 1 on the assistant's reply tokens (from just after each ``ASSISTANT :``
    through the next ``</s>``), 0 elsewhere, and on the yes/no token of each POPE turn its ``answer_weights`` entry
    (when ``weights`` is given)."""
    starts = reply_starts(input_ids, tokenizer)
    is_eos = input_ids == tokenizer.eos_token_id
    mask = (np.cumsum(starts, axis=1) > np.cumsum(is_eos, axis=1) - is_eos).astype(np.float32)
    if weights is None:
        return mask
    for row, turns in enumerate(dialogues):
        positions = np.flatnonzero(starts[row])
        assert len(positions) == len(turns), "one reply per turn"
        for position, q in zip(positions, turns):
            if q.question_type == "pope":
                mask[row, position] = weights[q.target["colour"], q.target["shape"], q.answer]
    return mask


def encode(processor, images: dict[str, Image.Image], dialogues: Sequence[Sequence[shapes.Sample]],
           token_side: int, label_objects: int = 1, label_min_fraction: float = 0.125,
           answer_balance: dict[tuple[str, str, str], float] | None = None) -> dict:
    """Training arrays from processor outputs: per image, ``pixel_values`` (Qwen2-VL: [images, patches, dim] and
    ``image_grid_thw``), ``patch_labels`` and ``patch_weights`` (per visual token of ``token_side`` pixels, see
    ``patch_labels``); per conversation, left-padded ``input_ids`` / ``attention_mask``, ``loss_weights`` (the
    reply tokens, yes/no ones weighted by ``answer_balance``, see ``loss_weights``) and ``image_index`` (its image's
    row)."""
    tokenizer = processor.tokenizer
    names = sorted({turns[0].image for turns in dialogues})
    row = {name: i for i, name in enumerate(names)}
    pictures = processor.image_processor([images[n] for n in names], return_tensors="np")
    per_image = {"pixel_values": np.asarray(pictures["pixel_values"], np.float32)}
    if "image_grid_thw" in pictures:  # Qwen2-VL concatenates all images' patches; here every image has one grid
        per_image["image_grid_thw"] = np.asarray(pictures["image_grid_thw"])
        per_image["pixel_values"] = per_image["pixel_values"].reshape(len(names), -1, per_image["pixel_values"].shape[-1])
    by_image: dict[str, list[Sequence[shapes.Sample]]] = {}
    for turns in dialogues:
        by_image.setdefault(turns[0].image, []).append(turns)
    labels, weights = (np.stack(a) for a in zip(*(
        patch_labels(images[n], by_image[n][0][0].objects, token_side, tokenizer, label_objects, label_min_fraction)
        for n in names)))
    sequences, image_index, ordered = [], [], []
    for name, group in by_image.items():
        texts = [conversation_text(turns, tokenizer.eos_token, image_placeholder(processor)) for turns in group]
        out = processor(images=[images[name]] * len(group), text=texts, return_tensors="np", padding="longest")
        sequences += [ids[mask.astype(bool)] for ids, mask in zip(out["input_ids"], out["attention_mask"])]
        image_index += [row[name]] * len(group)
        ordered += group
    length = max(len(s) for s in sequences)
    input_ids = np.full((len(sequences), length), tokenizer.pad_token_id, np.int32)
    attention_mask = np.zeros((len(sequences), length), bool)
    for i, sequence in enumerate(sequences):
        input_ids[i, length - len(sequence):] = sequence
        attention_mask[i, length - len(sequence):] = True
    return {**per_image, "patch_labels": labels, "patch_weights": weights, "input_ids": input_ids,
            "attention_mask": attention_mask,
            "loss_weights": loss_weights(input_ids, ordered, tokenizer, answer_balance),
            "image_index": np.asarray(image_index)}



def model_batch(batch: dict) -> dict:
    """The model's part of a training batch (without the loss targets)."""
    return {k: v for k, v in batch.items() if k not in ("loss_weights", "patch_labels", "patch_weights")}



def _epochs(n: int, batch_size: int, steps: int, seed: int, start: int = 0):
    """Index batches ``start``..``steps - 1`` of a run drawing ``steps`` batches epoch by epoch from seeded
    permutations of ``range(n)`` (a resumed run skips the draws it has done without building their batches)."""
    rng = np.random.default_rng(seed)
    order = np.empty(0, int)
    for step in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        chosen, order = order[:batch_size], order[batch_size:]
        if step >= start:
            yield chosen


def image_inputs(data: dict[str, np.ndarray], rows: np.ndarray) -> dict:
    """``pixel_values`` (and Qwen2-VL's ``image_grid_thw``) of images ``rows``, laid out as the processor does."""
    pixels = data["pixel_values"][rows]
    if "image_grid_thw" not in data:
        return {"pixel_values": pixels}
    return {"pixel_values": pixels.reshape(-1, pixels.shape[-1]), "image_grid_thw": data["image_grid_thw"][rows]}


def conversation_batches(model, data: dict[str, np.ndarray], batch_size: int, steps: int, seed: int, start: int = 0):
    """Batches of conversations (through ``model.prepare``, as processor outputs) with reply masks and the patch
    labels of their images, from step ``start``."""
    for chosen in _epochs(len(data["input_ids"]), batch_size, steps, seed, start):
        rows = data["image_index"][chosen]
        batch, _ = model.prepare({"input_ids": data["input_ids"][chosen],
                                  "attention_mask": data["attention_mask"][chosen], **image_inputs(data, rows)})
        yield {**batch, "loss_weights": data["loss_weights"][chosen], "patch_labels": data["patch_labels"][rows],
               "patch_weights": data["patch_weights"][rows]}


def image_batches(model, data: dict[str, np.ndarray], batch_size: int, steps: int, seed: int, start: int = 0):
    """Batches of images with patch labels, each prompt being its visual tokens alone, from step ``start``."""
    n_images, n_tokens = data["patch_labels"].shape[:2]
    input_ids = np.full((batch_size, n_tokens), model.config.image_token_id, np.int32)
    for chosen in _epochs(n_images, batch_size, steps, seed, start):
        batch, _ = model.prepare({"input_ids": input_ids, "attention_mask": np.ones_like(input_ids, bool),
                                  **image_inputs(data, chosen)})
        yield {**batch, "patch_labels": data["patch_labels"][chosen], "patch_weights": data["patch_weights"][chosen]}
