"""What the family test files share: noise images, the processor's inputs, each tiny checkpoint built and loaded
(into vlmjax and into HF) once per module, the fp32 parity check against HF, a long prompt, and the Qwen2-VL
family's vision towers run side by side."""

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

import vlmjax
from vlmjax.hooks import Capture, VisionCapture
from vlmjax.verify import compare, load_hf_model, run_hf

TOL = 1e-4  # fp32 parity with HF eager attention
WORDS = "the red circle is left of a blue square and".split()


class Checkpoint(NamedTuple):
    path: Path  # the checkpoint directory
    processor: object
    model: vlmjax.VLM
    hf: object  # the HF PyTorch model of the same checkpoint


def random_images(sizes, seed: int = 0) -> list[Image.Image]:
    """One uniform-noise RGB image per (height, width) in `sizes`, drawn in turn from one seeded generator."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in sizes]


def model_inputs(processor, texts, images=None, **options) -> dict:
    """The processor's numpy outputs for `texts` and `images`, padded to the longest text unless `options` say."""
    return dict(processor(images=images, text=texts, return_tensors="np", **{"padding": True, **options}))


def long_text(words: int = 520) -> str:
    """`words` words of the tiny tokenizer's vocabulary (a prompt of 500+ tokens by default)."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(words))


def checkpoints(tmp_path_factory, make, default_variant: str | None = None):
    """`get(variant)`: the Checkpoint of `make(path, variant=variant)`'s tiny model, each variant built once."""
    built = {}

    def get(variant=default_variant):
        if variant not in built:
            path = tmp_path_factory.mktemp(variant)
            _, processor = make(path, variant=variant)
            built[variant] = Checkpoint(path, processor, vlmjax.load(path, progress=False), load_hf_model(path))
        return built[variant]

    return get


def assert_hf_parity(model, hf_model, inputs, **options) -> dict:
    """Our forward (with `options`) against HF's on `inputs`: logits, every hidden state and every attention pattern
    within TOL at the real (non-padding) tokens; returns our output."""
    ours = model(**inputs, output_hidden_states=True, output_attentions=True, **options)
    result = compare(ours, run_hf(hf_model, inputs), inputs["attention_mask"])
    assert len(result.hidden_states) == model.config.text.num_layers + 1
    assert len(result.attentions) == model.config.text.num_layers
    assert result.worst <= TOL, result.table()
    return ours


def qwen_vision_towers(model, hf_model, inputs) -> tuple[dict, object]:
    """(our output, capturing `vision.features` and every vision layer's `attn.pattern`; the output of HF's vision
    model) of a Qwen2-VL-family model on `inputs`."""
    hooks = {"features": Capture(sites=frozenset({"vision.features"})),
             "vision": VisionCapture(sites=frozenset({"attn.pattern"}))}
    with torch.no_grad():
        theirs = hf_model.model.visual(torch.as_tensor(inputs["pixel_values"]),
                                       grid_thw=torch.as_tensor(inputs["image_grid_thw"]))
    return model(**inputs, hooks=hooks), theirs
