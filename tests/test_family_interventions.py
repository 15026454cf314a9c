"""The study-facing pieces on the families whose inputs differ from LLaVA-1.5's: the null image on packed Qwen2-VL
patches and LLaVA-NeXT crops (against the processor's own black image), top-attended patch removal and box regions
on Qwen2-VL's (t, h, w) grid (against NumPy on the token coordinates), and the answer token appended under M-RoPE
(against HF's forward on the same extended ids)."""

import numpy as np
import pytest
from PIL import Image

import vlmjax
from vlmjax import interventions as iv
from vlmjax import probes
from vlmjax.testing.tiny_llava_next import make_tiny_llava_next
from vlmjax.processors import IMAGE_PROMPT
from vlmjax.testing.tiny_qwen2_vl import make_tiny_qwen2_vl

LAYERS = 3
PROMPTS = [f"USER: {IMAGE_PROMPT} is there a red circle ? ASSISTANT:", f"USER: {IMAGE_PROMPT} what ? ASSISTANT:"]


def _images(seed, size=(84, 112)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8")) for _ in range(2)]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen")
    _, processor = make_tiny_qwen2_vl(path, text_layers=LAYERS)
    processor.tokenizer.padding_side = "left"
    inputs = dict(processor(images=_images(0), text=PROMPTS, return_tensors="np", padding=True))
    model = vlmjax.load(path, progress=False)
    assert not inputs["attention_mask"][1].all(), "the second prompt is shorter: left padding"
    return dict(path=path, processor=processor, inputs=inputs, model=model, meta=model.prepare(inputs)[1])


def test_null_image_on_packed_qwen2_vl_patches_is_the_processed_black_image(qwen):
    ip = qwen["processor"].image_processor
    black = ip(images=[Image.new("RGB", (112, 84))] * 2, return_tensors="np")["pixel_values"]
    ours = np.asarray(iv.null_image(qwen["inputs"]["pixel_values"], "black", ip.image_mean, ip.image_std))
    assert ours.shape == qwen["inputs"]["pixel_values"].shape == black.shape and ours.ndim == 2
    np.testing.assert_allclose(ours, black, rtol=0, atol=1e-6)


def test_null_image_on_llava_next_crops_is_the_processed_black_image(tmp_path):
    _, processor = make_tiny_llava_next(tmp_path)
    ip = processor.image_processor
    pixel_values = ip(images=_images(1, (40, 60)), return_tensors="np")["pixel_values"]
    black = ip(images=[Image.new("RGB", (60, 40))] * 2, return_tensors="np")["pixel_values"]
    ours = np.asarray(iv.null_image(pixel_values, "black", ip.image_mean, ip.image_std))
    assert ours.ndim == 5 and ours.shape == pixel_values.shape == black.shape
    np.testing.assert_allclose(ours, black, rtol=0, atol=1e-6)  # the processor letterboxes in black too


def test_remove_top_attended_on_qwen2_vl_grid(qwen):
    meta, model = qwen["meta"], qwen["model"]
    assert all(len(image.grid) == 3 for image in meta.images)  # (t, h, w)
    visual = np.asarray(meta.mask)
    visual_map = np.where(visual, np.random.default_rng(2).random(visual.shape), 0)
    hook = iv.RemoveVisualTokens.top_attended(LAYERS, visual_map, meta, fraction=0.3)
    removed = np.asarray(hook.token_mask)
    for b in range(2):  # NumPy: the ceil(30%) highest-map visual tokens of the sample
        count = int(np.ceil(0.3 * visual[b].sum()))
        expected = np.zeros_like(visual[b])
        expected[np.argsort(-visual_map[b])[:count]] = True
        np.testing.assert_array_equal(removed[b], expected)
    out = model(**qwen["inputs"], hooks={"remove": hook}, logits="last")
    assert np.isfinite(np.asarray(out["logits"])).all()
    assert not np.allclose(out["logits"], model(**qwen["inputs"], logits="last")["logits"])


def test_head_attention_box_region_on_qwen2_vl_grid(qwen):
    meta = qwen["meta"]
    _, gh, gw = meta.images[0].grid
    size = (gh * 28, gw * 28)  # a merged token covers 28 x 28 pixels of the preprocessed image
    box = np.array([0, 0, size[1] / 2, size[0]])  # the left half
    hook = probes.VisualHeadAttention.with_boxes(box, meta, size)
    expected = np.asarray(meta.mask) & (np.asarray(meta.grid_col) < gw / 2)
    np.testing.assert_array_equal(np.asarray(hook.region_mask), expected)
    record = qwen["model"](**qwen["inputs"], hooks={"heads": hook}, logits=None)["hooks"]["heads"]["attn.pattern"]
    assert (np.asarray(record["region_weight"]) <= np.asarray(record["image_weight"]) + 1e-6).all()
