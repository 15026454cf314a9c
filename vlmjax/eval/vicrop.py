"""ViCrop-style attention-guided cropping (Zhang et al. 2025, the baseline of docs/methods.md §2): ask, read where
the model looked, crop the original image around it, ask again on the crop.

The attention map is `LastQueryVisualMap` at one decoder layer: the head-mean attention of the prompt's last token
(the query that produces the answer's first token) over the visual tokens, on the patch grid. The crop is the
square window of `window` x the grid's side (in cells, at least one) with the largest attention sum, cell-aligned
and found by a box filter over the grid (ties: the first in row-major order). Its cells are mapped back to the
ORIGINAL image: the grid shows the whole image, except for LLaVA-1.5's processor with centre cropping, where it
shows the central square. The second question sees the crop alone (resized by the processor to the model's input,
which is the zoom); the paper's variant that adds the crop's tokens beside the original image's is not done here.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np
from PIL import Image

from vlmjax.api import jit_per_model
from vlmjax.errors import VlmJaxError
from vlmjax.eval.run import DEFAULT_PROMPT
from vlmjax.generate import generate
from vlmjax.inputs import with_image
from vlmjax.probes import LastQueryVisualMap, map_grids

DEFAULT_WINDOW = 0.5  # the crop's side as a fraction of the image side the grid covers (a quarter of its area)


def peak_window(grid: np.ndarray, window: float = DEFAULT_WINDOW) -> tuple[int, int, int]:
    """(row, col, size) of the size x size cell window of `grid` [gh, gw] with the largest sum, size =
    max(1, round(window * min(gh, gw))); ties go to the first window in row-major order."""
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 2 or not 0 < window <= 1:
        raise VlmJaxError(f"peak_window needs a 2-D map and 0 < window <= 1, got shape {grid.shape}, window {window}.")
    size = max(1, int(round(window * min(grid.shape))))
    padded = np.pad(grid.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = padded[size:, size:] - padded[:-size, size:] - padded[size:, :-size] + padded[:-size, :-size]
    row, col = np.unravel_index(np.argmax(sums), sums.shape)
    return int(row), int(col), size


def covered_region(processor, model_type: str, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the original image that the patch grid shows: the central square where LLaVA-1.5's
    processor centre-crops after resizing the shortest edge, else the whole image."""
    width, height = image_size
    if model_type == "llava" and getattr(processor.image_processor, "do_center_crop", False):
        side = min(width, height)
        return (width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2
    return 0.0, 0.0, float(width), float(height)


def crop_box(grid: np.ndarray, covered: tuple[float, float, float, float],
             window: float = DEFAULT_WINDOW) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) in the original image of the peak window of `grid` [gh, gw], whose cells tile the
    region `covered` (see `covered_region`); rounded outwards to whole pixels."""
    row, col, size = peak_window(grid, window)
    x0, y0, x1, y1 = covered
    cell_w, cell_h = (x1 - x0) / grid.shape[1], (y1 - y0) / grid.shape[0]
    return (int(np.floor(x0 + col * cell_w)), int(np.floor(y0 + row * cell_h)),
            int(np.ceil(x0 + (col + size) * cell_w)), int(np.ceil(y0 + (row + size) * cell_h)))


@jit_per_model()
def attention_maps(model, params, batch):
    """Every layer's last-query visual map [L, B, N]; pass `model.module.decode_start(batch)[0]` (generate's prefill
    positions), so the map is the attention that produced the first answer token."""
    return model.forward(params, batch, {"map": LastQueryVisualMap()}, logits=None)["hooks"]["map"]["attn.pattern"]


def crop_boxes(model, processor, layer_map, meta, images: Sequence[Image.Image],
               window: float = DEFAULT_WINDOW) -> list[tuple[int, int, int, int]]:
    """Each sample's crop box in its original image (`crop_box`) from one layer's map [B, N] (a row of
    `attention_maps`), `meta` the batch's visual metadata."""
    grids = map_grids(np.asarray(layer_map)[None], meta)
    return [crop_box(grid[0], covered_region(processor, model.config.model_type, image.size), window)
            for grid, image in zip(grids, images)]


def _greedy(model, processor, images, texts, max_new_tokens):
    tokenizer = processor.tokenizer
    inputs = dict(processor(images=images, text=texts, return_tensors="np", padding=True))
    tokens = generate(model, inputs, max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    answers = tokenizer.batch_decode(tokens[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in answers], inputs


def vicrop_answers(model, processor, images: Sequence[Image.Image], questions: Sequence[str], *,
                   layer: int | None = None, window: float = DEFAULT_WINDOW, max_new_tokens: int = 4,
                   prompt: str = DEFAULT_PROMPT, batch_size: int = 16) -> list[dict]:
    """For each (image, question): the greedy answer on the image, the attention map's crop box (of `layer`'s
    `LastQueryVisualMap`, default the middle decoder layer) and the greedy answer on the crop. Returns
    [{"answer", "cropped_answer", "box"}]."""
    if len(images) != len(questions):
        raise VlmJaxError(f"{len(images)} images for {len(questions)} questions; pass one image per question.")
    n_layers = model.config.text.num_layers
    layer = n_layers // 2 if layer is None else layer
    if not 0 <= layer < n_layers:
        raise VlmJaxError(f"layer {layer} is out of range; the decoder has layers 0..{n_layers - 1}.")
    processor.tokenizer.padding_side = "left"
    texts = [with_image(processor, prompt.format(question=q)) for q in questions]
    results = []
    for start in range(0, len(images), batch_size):
        chunk_images, chunk_texts = list(images[start:start + batch_size]), texts[start:start + batch_size]
        answers, inputs = _greedy(model, processor, chunk_images, chunk_texts, max_new_tokens)
        batch, meta = model.prepare(inputs)
        maps = np.asarray(attention_maps(model, model.params, model.module.decode_start(batch)[0]))
        boxes = crop_boxes(model, processor, maps[layer], meta, chunk_images, window)
        crops = [image.crop(box) for image, box in zip(chunk_images, boxes)]
        cropped, _ = _greedy(model, processor, crops, chunk_texts, max_new_tokens)
        results += [{"answer": a, "cropped_answer": c, "box": b} for a, c, b in zip(answers, cropped, boxes)]
    return results
