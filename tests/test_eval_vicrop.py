"""ViCrop-style cropping: the crop box of hand-made maps, and the two passes on the built-in model."""

import numpy as np
import pytest
from PIL import Image
from transformers import AutoProcessor

import vlmjax
from vlmjax.builtin import builtin_path
from vlmjax.errors import VlmJaxError
from vlmjax.eval.vicrop import covered_region, crop_box, peak_window, vicrop_answers


def test_peak_window_and_crop_box_on_hand_made_maps():
    grid = np.zeros((8, 8))
    grid[6, 1], grid[7, 2], grid[0, 7] = 0.3, 0.3, 0.4  # two cells bottom-left outweigh the single top-right one
    assert peak_window(grid, 0.25) == (6, 1, 2)  # 2 x 2 windows: only rows 6-7, cols 1-2 hold 0.6
    # 8 x 8 cells tiling a 64 x 64 image: each cell is 8 pixels
    assert crop_box(grid, (0, 0, 64, 64), 0.25) == (8, 48, 24, 64)
    # the same map over the central square of a 100 x 60 image (x from 20 to 80, 7.5-pixel cells), rounded outwards
    assert crop_box(grid, (20, 0, 80, 60), 0.25) == (27, 45, 43, 60)
    assert peak_window(grid, 0.1) == (0, 7, 1)  # one cell: the single largest
    assert peak_window(np.ones((4, 4)), 0.5) == (0, 0, 2)  # ties: the first in row-major order
    assert peak_window(grid, 1.0) == (0, 0, 8)
    with pytest.raises(VlmJaxError, match="window"):
        peak_window(grid, 0.0)


def test_covered_region():
    class Llava:
        image_processor = type("P", (), {"do_center_crop": True})()

    assert covered_region(Llava(), "llava", (100, 60)) == (20, 0, 80, 60)
    assert covered_region(Llava(), "qwen2_vl", (100, 60)) == (0, 0, 100, 60)


def test_vicrop_answers_on_the_builtin_model():
    model = vlmjax.load("builtin:llava-shapes", progress=False)
    processor = AutoProcessor.from_pretrained(builtin_path("llava-shapes"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")) for _ in range(3)]
    questions = ["Is there a red circle in the image?", "What color is the square?", "Is there a blue star?"]
    results = vicrop_answers(model, processor, images, questions, layer=1, batch_size=2)
    assert len(results) == 3
    for result in results:
        x0, y0, x1, y1 = result["box"]
        assert x1 - x0 == y1 - y0 == 32 and 0 <= x0 <= 32 and 0 <= y0 <= 32  # half the side, on the 8-pixel grid
        assert x0 % 8 == 0 and y0 % 8 == 0
    crops = [image.crop(result["box"]) for image, result in zip(images[:2], results)]
    again = vicrop_answers(model, processor, crops, questions[:2], layer=1, batch_size=2)
    assert [r["answer"] for r in again] == [r["cropped_answer"] for r in results[:2]]  # = plain answers on the crops
    with pytest.raises(VlmJaxError, match="layer"):
        vicrop_answers(model, processor, images[:1], questions[:1], layer=3)
