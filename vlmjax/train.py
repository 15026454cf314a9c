"""Train a small VLM (LLaVA or Qwen2-VL architecture) on the shapes world, in JAX, and save it as an HF directory.

``python -m vlmjax.train --preset llava-shapes --out DIR`` generates a shapes-world dataset in memory
(``vlmjax.data.shapes``), builds a word-level tokenizer and the family's HF processor, initialises a small model of
an HF architecture with Flax (``nnx.Rngs``; LLaVA: CLIP tower, MLP projector, Llama decoder; or Qwen2-VL: its tower
with 2-D rotary and patch merger, Qwen2 decoder with M-RoPE), saves it as an HF directory, loads it with
``vlmjax.load`` and trains it with optax (AdamW, warmup then cosine decay) in two stages:

1. alignment: every visual token's output (after the projector / merger) is pulled, through the tied word
   embeddings, towards the colour and shape words of the object it shows (``grounding_loss``), training the vision
   tower and projector the way LLaVA's first stage trains its projector;
2. instruction tuning: multi-turn conversations per image (POPE yes/no questions, then "Describe the image."), loss
   on the reply tokens (each yes/no reply weighted so that every category is as often "yes" as "no",
   ``answer_weights``), plus the grounding loss.

Prompts have the evaluation form ``USER: <image> Is there a red circle in the image? ASSISTANT: yes</s>``. The
trained parameters are written with ``converters.hf.save_hf``, so ``vlmjax.load(DIR)`` and HF ``from_pretrained(DIR)``
both read the result, and ``training_report.json`` beside them records the config, losses, held-out POPE accuracy and
the accuracy with black images. Everything is deterministic given the seed: images, questions, initialisation and
batch order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
from tqdm.auto import tqdm

from vlmjax.data import shapes
from vlmjax.eval.pope import pope_metrics, yes_probability
from vlmjax.eval.run import answer_token_ids
from vlmjax.inputs import image_placeholder
from vlmjax.processors import IMAGE_TOKEN, build_tokenizer

PROMPT = "USER: {image} {question} ASSISTANT:"
FAMILIES = ("llava", "qwen2_vl")
TASKS = ("pope", "attribute", "count", "describe")
DESCRIBE_QUESTION = "Describe the image."


@dataclasses.dataclass
class TrainConfig:
    """Data, model and optimisation settings of one training run (the defaults train the built-in model)."""

    family: str = "llava"
    seed: int = 0
    n_images: int = 30000
    test_fraction: float = 0.05
    image_size: int = 64
    patch_size: int = 8  # Qwen2-VL merges 2x2 patches, so one visual token covers 2 * patch_size pixels
    tasks: tuple[str, ...] = ("pope", "describe")
    vision_hidden: int = 96
    vision_layers: int = 3
    text_hidden: int = 128
    text_layers: int = 3
    text_mlp_ratio: int = 2
    heads: int = 4
    vision_heads: int | None = None  # attention heads of the vision tower (default: ``heads``)
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 3e-3
    alignment_learning_rate: float = 3e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    grounding_weight: float = 1.0
    label_objects: int = 1  # objects per visual token in the grounding target (see patch_labels)
    label_min_fraction: float = 0.125
    alignment_steps: int = 3000
    balance_answers: bool = True  # weight yes/no replies so each category is as often "yes" as "no" (answer_weights)
    checkpoint_every: int = 250  # optimiser steps between orbax checkpoints of a stage (a rerun resumes there)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")


# The settings each shipped model was trained with (``vlmjax/builtin/NAME``).
PRESETS = {
    "llava-shapes": TrainConfig(),
    # 2x2-merged tokens of 16 pixels often show parts of several objects: each gets its share of the target.
    # Without answer balancing: with it, this architecture reached 90.8% held-out (random split 85.3%) instead of
    # 94.5% (benchmarks/training/qwen2-vl-shapes-balanced.json); black images give chance either way.
    "qwen2-vl-shapes": TrainConfig(family="qwen2_vl", label_objects=3, label_min_fraction=0.05,
                                   balance_answers=False),
    # The model organism of the studies: deep enough for layer-wise findings (12 decoder layers of 8 heads, a
    # 4-layer vision tower), trained on the harder question mix too (attributes, counting in a box), so that it is
    # wrong often enough for error analysis.
    "llava-shapes-deep": TrainConfig(tasks=("pope", "attribute", "count", "describe"), text_layers=12, heads=8,
                                     vision_layers=4, vision_heads=4, steps=2000, learning_rate=2e-3,
                                     alignment_steps=2000, checkpoint_every=100),
}


def shapes_vocabulary(image_size: int) -> list[str]:
    """Every word the shapes-world questions and answers use (numbers up to the image side, for boxes and counts)."""
    words = ["Is", "What", "How", "Describe", "there", "a", "an", "in", "the", "image", "many", "are", "box", "color", "shape",
             "object", "is", "yes", "no", "?", "[", "]", ","]
    words += [*shapes.SHAPES, *shapes.SHAPE_PLURALS.values(), *shapes.COLOURS]
    words += [str(n) for n in range(image_size + 1)]
    return words


def build_processor(cfg: TrainConfig):
    """Word-level tokenizer covering the shapes vocabulary plus the family's HF processor: ``LlavaProcessor`` with
    CLIP preprocessing, or the Qwen2-VL processor with a pixel budget that keeps ``image_size`` images unresized."""
    if cfg.family == "qwen2_vl":
        from transformers import Qwen2VLImageProcessorPil

        from vlmjax.processors import build_qwen2_vl_processor as qwen_processor

        side = cfg.image_size
        image_processor = Qwen2VLImageProcessorPil(patch_size=cfg.patch_size, merge_size=2, temporal_patch_size=2,
                                                   min_pixels=side * side, max_pixels=side * side)
        return qwen_processor(extra_words=shapes_vocabulary(side), image_processor=image_processor)
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tokenizer = build_tokenizer(extra_words=shapes_vocabulary(cfg.image_size))
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": cfg.image_size},
                                            crop_size={"height": cfg.image_size, "width": cfg.image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1)


def token_side(cfg: TrainConfig) -> int:
    """Pixels per side of the image square one visual token shows."""
    return 2 * cfg.patch_size if cfg.family == "qwen2_vl" else cfg.patch_size


def hf_config(cfg: TrainConfig, tokenizer):
    """The HF config of the model to train: tied word embeddings (the grounding loss reads visual tokens through
    them), ``heads`` attention heads in the decoder and ``vision_heads`` (default the same) in the vision tower."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2VLConfig

    text = dict(hidden_size=cfg.text_hidden, intermediate_size=cfg.text_mlp_ratio * cfg.text_hidden,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    if cfg.family == "qwen2_vl":
        from vlmjax.processors import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

        pairs = cfg.text_hidden // cfg.heads // 2  # rotary pairs split as in Qwen2-VL: 1/4 time, 3/8 row, 3/8 col
        section = [pairs // 4, (pairs - pairs // 4) // 2, pairs - pairs // 4 - (pairs - pairs // 4) // 2]
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
        vision = dict(depth=cfg.vision_layers, embed_dim=cfg.vision_hidden, hidden_size=cfg.text_hidden,
                      num_heads=cfg.vision_heads or cfg.heads, mlp_ratio=4, patch_size=cfg.patch_size, spatial_merge_size=2,
                      temporal_patch_size=2)
        ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
            ("image_token_id", IMAGE_PAD), ("video_token_id", VIDEO_PAD), ("vision_start_token_id", VISION_START),
            ("vision_end_token_id", VISION_END))}
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads or cfg.heads,
                              image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.vision_hidden)
    return LlavaConfig(vision_config=vision, text_config=LlamaConfig(**text),
                       image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
                       vision_feature_select_strategy="default", tie_word_embeddings=True,
                       image_seq_length=(cfg.image_size // cfg.patch_size) ** 2)


def init_hf_model(cfg: TrainConfig, processor, out_dir: str | Path):
    """Save a randomly initialised model of the configured family and size (Flax initialisation, ``nnx.Rngs(seed)``:
    see ``vlmjax.models.vlm.init_params``) as an HF checkpoint directory with the processor files."""
    from flax import nnx

    from converters.hf import save_hf
    from vlmjax import models
    from vlmjax.models import vlm

    config = hf_config(cfg, processor.tokenizer)
    model_cfg = models.from_hf(config)
    save_hf(vlm.init_params(model_cfg, nnx.Rngs(cfg.seed)), model_cfg, config, out_dir)
    if cfg.family == "qwen2_vl":
        from vlmjax.processors import save_qwen2_vl_processor as save_processor

        save_processor(processor, out_dir)
    else:
        processor.save_pretrained(str(out_dir))


# ------------------------------------------------------------------------------------------------------------ data


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
    image's other questions (describe, attribute), last so that their answers never give a yes/no answer away.
    The image is encoded once for several questions, and the first turn has exactly the evaluation prompt's form."""
    yes_no: dict[tuple, list[shapes.Sample]] = {}
    others: dict[str, list[shapes.Sample]] = {}
    for q in questions:
        if q.question_type == "pope":
            yes_no.setdefault((q.image, q.split), []).append(q)
        else:
            others.setdefault(q.image, []).append(q)
    groups = yes_no or {(image, None): [] for image in others}
    rng = np.random.default_rng([seed, len(questions)])
    return [[group[i] for i in rng.permutation(len(group))] + others.get(image, [])
            for (image, _), group in groups.items()]


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


# -------------------------------------------------------------------------------------------------------- training


def grounding_loss(params, image_features: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean over labelled visual tokens of the cross-entropy between softmax(feature . word embeddings) and the
    target putting, for each object the token shows, its pixel share half on its colour word and half on its shape
    word: it aligns each visual token with the embeddings of what it shows (LLaVA's projector alignment, with the
    vision tower trained too). ``labels`` [images, tokens, objects, 2] and ``weights`` [images, tokens, objects] as
    ``patch_labels`` gives them; ``image_features`` holds those images' tokens in order (Qwen2-VL's packed rows may
    end in padding rows, which are dropped)."""
    images, tokens = labels.shape[:2]
    features = image_features.reshape(-1, image_features.shape[-1])[:images * tokens].reshape(images, tokens, -1)
    log_probs = jax.nn.log_softmax(features.astype(jnp.float32) @ params["text"]["embed"].T)
    picked = jnp.take_along_axis(log_probs[:, :, None, :], jnp.maximum(labels, 0), axis=-1)  # [I, T, K, 2]
    nll = -(picked.mean(-1) * weights).sum(-1)
    labelled = weights.sum(-1) > 0
    return jnp.sum(nll) / jnp.maximum(jnp.sum(labelled), 1)


def model_batch(batch: dict) -> dict:
    """The model's part of a training batch (without the loss targets)."""
    return {k: v for k, v in batch.items() if k not in ("loss_weights", "patch_labels", "patch_weights")}


def training_forward(model, params, batch: dict, logits: str | None) -> dict:
    """``model.forward`` on a training batch, whose images all have the same size: for Qwen2-VL the vision tower
    then runs image by image under ``vmap`` (the skeleton's ``equal_images``), the same numbers as the packed
    block-diagonal attention without its cost quadratic in the batch's total patch count."""
    return model.forward(params, model_batch(batch), logits=logits, equal_images=batch["patch_labels"].shape[0])


def training_loss(model, params, batch, grounding_weight: float) -> tuple[jax.Array, dict]:
    """Answer loss (cross-entropy of the reply tokens given everything before them, averaged with the batch's
    ``loss_weights``) plus ``grounding_weight`` x ``grounding_loss``; returns (total, {"answer": ..., "grounding":
    ...})."""
    out = training_forward(model, params, batch, logits="all")
    log_probs = jax.nn.log_softmax(out["logits"][:, :-1].astype(jnp.float32))
    targets, mask = batch["input_ids"][:, 1:], batch["loss_weights"][:, 1:]
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    answer = jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1)
    grounding = grounding_loss(params, out["image_features"], batch["patch_labels"], batch["patch_weights"])
    return answer + grounding_weight * grounding, {"answer": answer, "grounding": grounding}


def alignment_loss(model, params, batch) -> tuple[jax.Array, dict]:
    """``grounding_loss`` alone, on prompts of visual tokens only (the decoder's outputs are unused, so jit drops
    the decoder): the first stage, which trains the vision tower and projector."""
    out = training_forward(model, params, batch, logits=None)
    grounding = grounding_loss(params, out["image_features"], batch["patch_labels"], batch["patch_weights"])
    return grounding, {"grounding": grounding}


def make_optimizer(cfg: TrainConfig, steps: int, learning_rate: float) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay to zero, gradient clipping, and weight decay on matrices only."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate,
                                                  max(1, int(cfg.warmup_fraction * steps)), steps)
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embed"), params)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask))


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


class StageCheckpoints:
    """Orbax checkpoints of one training stage (parameters, optimiser state, per-step loss history) under
    ``directory``, every ``every`` steps and at the stage's end, the two newest kept. The run's settings are written
    beside them, and a resume with other settings is refused: its steps would continue a different run."""

    def __init__(self, directory: str | Path, every: int, settings: dict):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).absolute()
        self.every = every
        settings = json.loads(json.dumps(settings))  # as stored (tuples become lists)
        settings_file = self.directory / "settings.json"
        if settings_file.exists():
            stored = json.loads(settings_file.read_text())
            differing = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
            if differing:
                from vlmjax.errors import VlmJaxError

                raise VlmJaxError(
                    f"{self.directory} holds checkpoints of a run with other settings ({', '.join(differing)} "
                    f"differ: {', '.join(f'{k}={stored.get(k)!r} there, {settings.get(k)!r} now' for k in differing)}"
                    f"). Resume with the same settings, or train into another --out directory.")
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            settings_file.write_text(json.dumps(settings, indent=1))
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=2))

    def restore(self, params, opt_state) -> tuple[int, object, object, dict]:
        """(step, params, opt_state, log) of the newest checkpoint, or (0, the given state, an empty log) if none;
        the log holds the per-step loss history and the seconds spent on the stage so far."""
        import orbax.checkpoint as ocp

        step = self.manager.latest_step()
        if step is None:
            return 0, params, opt_state, {"history": {}, "seconds": 0.0}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                      log=ocp.args.JsonRestore()))
        return step, restored["state"]["params"], restored["state"]["opt_state"], restored["log"]

    def save(self, step: int, params, opt_state, log: dict, final: bool) -> None:
        import orbax.checkpoint as ocp

        if final or step % self.every == 0:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
                log=ocp.args.JsonSave(log)))
            if final:
                self.manager.wait_until_finished()


def fit(params, loss_fn, batch_stream, steps: int, learning_rate: float, cfg: TrainConfig, desc: str,
        progress: bool = True, checkpoints: StageCheckpoints | None = None):
    """Optimise ``loss_fn(params, batch) -> (loss, parts)`` over ``steps`` batches with a jitted AdamW step;
    returns (params, {part: per-step values}, seconds spent). ``batch_stream(start)`` yields the batches from step
    ``start``; with ``checkpoints`` the stage resumes from its newest checkpoint (a finished stage returns at once)
    and the seconds include those of the earlier pieces."""
    optimizer = make_optimizer(cfg, steps, learning_rate)

    @jax.jit
    def step(params, opt_state, batch):
        (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, parts

    opt_state, log, done = optimizer.init(params), {"history": {}, "seconds": 0.0}, 0
    if checkpoints is not None:
        done, params, opt_state, log = checkpoints.restore(params, opt_state)
    history, started = log["history"], time.perf_counter() - log["seconds"]
    bar = tqdm(batch_stream(done), total=steps, initial=done, desc=desc, disable=not progress or done == steps)
    for index, batch in enumerate(bar, start=done + 1):
        params, opt_state, parts = step(params, opt_state, batch)
        for name, value in parts.items():
            history.setdefault(name, []).append(float(value))
        if index % 10 == 0:
            bar.set_postfix({name: f"{np.mean(values[-10:]):.3f}" for name, values in history.items()})
        if checkpoints is not None:
            log = {"history": history, "seconds": time.perf_counter() - started}
            checkpoints.save(index, params, opt_state, log, final=index == steps)
    return params, history, time.perf_counter() - started if done < steps else log["seconds"]


def train(model, data: dict[str, np.ndarray], cfg: TrainConfig, progress: bool = True,
          checkpoint_dir: str | Path | None = None):
    """Two stages from ``model.params``: ``cfg.alignment_steps`` of ``alignment_loss`` on images, then
    ``cfg.steps`` of ``training_loss`` on conversations. Returns (params, {"alignment": history, "training":
    history}, seconds of training), each history holding per-step values of the loss parts. With
    ``checkpoint_dir`` each stage checkpoints there (orbax) and a rerun resumes where the last one stopped."""
    stage = lambda name: None if checkpoint_dir is None else StageCheckpoints(
        Path(checkpoint_dir) / name, cfg.checkpoint_every, dataclasses.asdict(cfg))
    params, aligned, align_seconds = fit(model.params, lambda p, b: alignment_loss(model, p, b),
                          lambda start: image_batches(model, data, cfg.batch_size, cfg.alignment_steps, cfg.seed,
                                                      start),
                          cfg.alignment_steps, cfg.alignment_learning_rate, cfg, "aligning", progress,
                          stage("alignment"))
    params, trained, train_seconds = fit(params, lambda p, b: training_loss(model, p, b, cfg.grounding_weight),
                          lambda start: conversation_batches(model, data, cfg.batch_size, cfg.steps, cfg.seed, start),
                          cfg.steps, cfg.learning_rate, cfg, "training", progress, stage("training"))
    return params, {"alignment": aligned, "training": trained}, align_seconds + train_seconds


# ------------------------------------------------------------------------------------------------------ evaluation


def evaluate_yes_no(model, processor, images: dict[str, Image.Image], questions: Sequence[shapes.Sample],
                    black_images: bool = False, batch_size: int = 64) -> dict:
    """First-token POPE scoring: p_yes from the yes/no logits after ``ASSISTANT:``; ``pope_metrics`` of the
    decisions (p_yes >= 0.5) plus ``p_yes``. With ``black_images`` every image is replaced by a black one."""
    processor.tokenizer.padding_side = "left"
    yes_ids, no_ids = (answer_token_ids(processor.tokenizer, word) for word in ("yes", "no"))
    p_yes = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        pictures = [Image.new("RGB", images[q.image].size) if black_images else images[q.image] for q in chunk]
        text = [PROMPT.format(image=image_placeholder(processor), question=q.question) for q in chunk]
        inputs = processor(images=pictures, text=text,
                           return_tensors="np", padding="longest")
        logits = model(**inputs, logits="last").logits[:, -1]
        p_yes.extend(yes_probability(np.asarray(logits), yes_ids, no_ids).tolist())
    metrics = pope_metrics(["yes" if p >= 0.5 else "no" for p in p_yes], [q.answer for q in questions])
    return {**metrics, "p_yes": p_yes}


def parameter_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def evaluate_first_token(model, processor, images: dict[str, Image.Image], questions: Sequence[shapes.Sample],
                         batch_size: int = 64) -> dict[str, float]:
    """Accuracy of the most likely first reply token against the (one-word) answer, per question type: the
    held-out figure of the attribute and counting questions, whose answers are single words of the vocabulary."""
    processor.tokenizer.padding_side = "left"
    right: dict[str, list[bool]] = {}
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        text = [PROMPT.format(image=image_placeholder(processor), question=q.question) for q in chunk]
        inputs = processor(images=[images[q.image] for q in chunk], text=text, return_tensors="np", padding="longest")
        predicted = np.asarray(model(**inputs, logits="last").logits[:, -1]).argmax(-1)
        for q, token in zip(chunk, predicted):
            right.setdefault(q.question_type, []).append(int(token) in answer_token_ids(processor.tokenizer, q.answer))
    return {kind: float(np.mean(values)) for kind, values in right.items()}


def run(cfg: TrainConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Generate data, initialise, train, save to ``out_dir`` and evaluate on the held-out test subset. Training
    checkpoints into ``out_dir/checkpoints`` (removed once the model and its report are written), so a killed run
    started again with the same settings resumes where it stopped."""
    import vlmjax
    from converters.hf import save_hf

    started = time.perf_counter()
    out_dir = Path(out_dir)
    images, questions = shapes_questions(cfg.n_images, cfg.seed, cfg.image_size, cfg.test_fraction, cfg.tasks)
    train_questions = questions["train"]
    test_questions = [q for q in questions["test"] if q.question_type == "pope"]
    open_questions = [q for q in questions["test"] if q.question_type in ("attribute", "count")]
    with tempfile.TemporaryDirectory() as init_dir:
        processor = build_processor(cfg)
        init_hf_model(cfg, processor, init_dir)
        model = vlmjax.load(init_dir, progress=False)
        weights = answer_weights(train_questions) if cfg.balance_answers else None
        data = encode(processor, images, conversations(train_questions, cfg.seed), token_side(cfg),
                      cfg.label_objects, cfg.label_min_fraction, weights)
        data_seconds = time.perf_counter() - started
        params, history, train_seconds = train(model, data, cfg, progress, out_dir / "checkpoints")
        save_hf(params, model.config, model.hf_config, out_dir, source_dir=init_dir)
    trained = vlmjax.load(out_dir, progress=False)
    real = evaluate_yes_no(trained, processor, images, test_questions)
    black = evaluate_yes_no(trained, processor, images, test_questions, black_images=True)
    by_split = lambda result: {split: float(np.mean([(p >= 0.5) == (q.answer == "yes")
                                                     for p, q in zip(result["p_yes"], test_questions)
                                                     if q.split == split])) for split in shapes.POPE_SPLITS}
    report = {"config": dataclasses.asdict(cfg), "parameters": parameter_count(params),
              "train_questions": len(train_questions), "train_images": len(data["pixel_values"]),
              "test_questions": len(test_questions), "train_seconds": round(train_seconds, 1),
              "data_seconds": round(data_seconds, 1), "device": jax.devices()[0].device_kind,
              "alignment_loss_last_50": float(np.mean(history["alignment"]["grounding"][-50:])),
              "answer_loss_first_50": float(np.mean(history["training"]["answer"][:50])),
              "answer_loss_last_50": float(np.mean(history["training"]["answer"][-50:])),
              "grounding_loss_last_50": float(np.mean(history["training"]["grounding"][-50:])),
              "loss_curves_per_100_steps": {f"{stage}.{part}": [round(float(np.mean(v[i:i + 100])), 4)
                                                                 for i in range(0, len(v), 100)]
                                            for stage, parts in history.items() for part, v in parts.items()},
              "test_accuracy": real["accuracy"], "test_accuracy_by_split": by_split(real),
              "test_f1": real["f1"], "test_yes_ratio": real["yes_ratio"],
              "black_image_accuracy": black["accuracy"], "black_image_accuracy_by_split": by_split(black),
              "black_image_yes_ratio": black["yes_ratio"]}
    if open_questions:
        report["test_first_token_accuracy"] = evaluate_first_token(trained, processor, images, open_questions)
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Train a small VLM on the shapes world (JAX, CPU) and save it as an "
                                                 "HF checkpoint directory. Flags override the preset's settings.")
    parser.add_argument("--out", required=True, help="output directory (HF format)")
    parser.add_argument("--preset", default="llava-shapes", choices=sorted(PRESETS),
                        help="the settings of a built-in model (default: llava-shapes)")
    field_help = {
        "family": "model family: llava (CLIP tower, MLP projector, Llama) or qwen2_vl (Qwen2-VL tower and merger, "
                  "Qwen2 with M-RoPE)",
        "seed": "seed of the images, questions, initialisation and batch order",
        "n_images": "shapes-world images to generate (train and held-out test together)",
        "test_fraction": "fraction of the images held out as the test split",
        "image_size": "image side in pixels",
        "patch_size": "vision patch side in pixels (Qwen2-VL merges 2x2 patches into one visual token)",
        "tasks": f"question families to train on, a comma-separated subset of {TASKS}",
        "vision_hidden": "vision tower width",
        "vision_layers": "vision tower layers",
        "text_hidden": "decoder width",
        "text_layers": "decoder layers",
        "text_mlp_ratio": "decoder MLP width as a multiple of the decoder width",
        "heads": "attention heads of the vision tower and of the decoder",
        "steps": "instruction-tuning steps",
        "batch_size": "sequences (alignment: images) per step",
        "learning_rate": "peak AdamW learning rate of instruction tuning (warmup, then cosine decay)",
        "alignment_learning_rate": "peak AdamW learning rate of the alignment stage",
        "warmup_fraction": "fraction of each stage's steps spent warming the learning rate up",
        "weight_decay": "AdamW weight decay",
        "grad_clip": "global gradient-norm clip",
        "grounding_weight": "weight of the grounding loss added to the reply loss in instruction tuning",
        "label_objects": "objects per visual token in the grounding target",
        "label_min_fraction": "smallest share of a token's pixels an object needs to be in its grounding target",
        "alignment_steps": "steps of the alignment stage (vision tower and projector towards the word embeddings)",
        "balance_answers": "weight yes/no replies so that every category is as often 'yes' as 'no'",
        "vision_heads": "attention heads of the vision tower (default: --heads)",
        "checkpoint_every": "optimiser steps between orbax checkpoints (a rerun into the same --out resumes)",
    }
    for field in dataclasses.fields(TrainConfig):
        flag, help_text = "--" + field.name.replace("_", "-"), field_help[field.name] + " (default: the preset's)"
        if field.name == "tasks":
            parser.add_argument(flag, help=help_text)
        elif field.name == "family":
            parser.add_argument(flag, choices=FAMILIES, help=help_text)
        elif isinstance(field.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=type(field.default), help=help_text)
    args = vars(parser.parse_args(argv))
    out, preset = args.pop("out"), PRESETS[args.pop("preset")]
    if args["tasks"] is not None:
        args["tasks"] = tuple(t for t in args["tasks"].split(",") if t)
        unknown = set(args["tasks"]) - set(TASKS)
        if unknown:
            parser.error(f"unknown tasks {sorted(unknown)}; choose from {TASKS}")
    cfg = dataclasses.replace(preset, **{k: v for k, v in args.items() if v is not None})
    report = run(cfg, out)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1))
    return report


if __name__ == "__main__":
    main()
