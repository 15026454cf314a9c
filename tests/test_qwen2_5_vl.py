"""Qwen2.5-VL family: parity with HF PyTorch (fp32, eager attention) with windowed and full vision layers, the window
reordering against HF's own, positions, both key layouts, round trips (HF and `vlmjax convert`), greedy decoding
against HF generate, clear errors."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers.vision_utils import get_vision_window_index

import vlmjax
from converters import hf as hf_conv
from tests.family_fixtures import TOL, Checkpoint, assert_hf_parity, long_text, model_inputs, random_images
from tests.family_fixtures import qwen_vision_towers
from vlmjax import cli
from vlmjax.errors import VlmJaxError
from vlmjax.generate import generate
from vlmjax.models.qwen2_5_vl import window_layout
from vlmjax.processors import IMAGE_PROMPT
from vlmjax.testing.tiny_qwen2_5_vl import make_tiny_qwen2_5_vl
from vlmjax.verify import load_hf_model, run_hf

# (height, width) -> patch grid with the tiny processor: 4x4 (4 tokens, 1 window), 4x8 (8 tokens, 2 windows of 2x2
# merged tokens), 6x10 (15 tokens, 6 windows of 4, 2, 4, 2, 2 and 1 tokens: the last row and column ragged).
SIZES = {"4x4": (56, 56), "4x8": (56, 112), "6x10": (84, 140)}


def _image(size, seed=0):
    return random_images([SIZES[size]], seed)[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(path, processor, vlmjax model, HF model) of a tiny Qwen2.5-VL: vision layers 0 and 2 windowed, 1 full."""
    path = tmp_path_factory.mktemp("qwen2_5_vl")
    _, processor = make_tiny_qwen2_5_vl(path)
    return Checkpoint(path, processor, vlmjax.load(path, progress=False), load_hf_model(path))


def _parity(tiny, inputs):
    return assert_hf_parity(tiny.model, tiny.hf, inputs)


def test_config_has_windowed_and_full_layers(tiny):
    vision = tiny.model.config.vision
    assert vision.full_attention_layers == (1,) and vision.full_attention_flags.tolist() == [False, True, False]
    assert vision.window_tokens == 2 and vision.hidden_act == "silu"


def test_parity_left_padded_batch_with_two_images_of_different_sizes(tiny):
    """Sample 0 (left-padded) holds one image; sample 1 two of different sizes, one with ragged windows."""
    processor = tiny.processor
    texts = [f"USER: {IMAGE_PROMPT} how many red circle are there ? ASSISTANT:",
             f"USER: {IMAGE_PROMPT} left and {IMAGE_PROMPT} right : what is the same ?"]
    inputs = model_inputs(processor, texts, [_image("4x4", 1), _image("4x8", 2), _image("6x10", 3)])
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8], [1, 6, 10]]
    assert (inputs["attention_mask"][0] == 0).any(), "the batch must be left-padded"
    ours = _parity(tiny, inputs)
    assert ours["rope_deltas"][1].tolist() == [(4 - 2 * 4) + (5 - 3 * 5)]  # an image spends max(h, w) positions


def test_parity_long_prompt(tiny):
    processor = tiny.processor
    text = f"USER: {IMAGE_PROMPT} {long_text()} ? ASSISTANT:"
    inputs = model_inputs(processor, [text], [_image("6x10", 5)])
    assert inputs["input_ids"].shape[1] >= 500
    _parity(tiny, inputs)


def test_vision_tower_windows_against_hf(tiny):
    """The window order is HF's `get_vision_window_index` (merged tokens -> patches); the tower's output
    (`vision.features`, processor order) is HF's last_hidden_state (window order) put back; the merged features
    are HF's pooler output. Windowed layers attend within windows only, the full layer across a frame's windows,
    never across images or to padding."""
    _, processor, model, hf_model = tiny
    grids = [[1, 4, 8], [1, 4, 4]]
    inputs = model_inputs(processor, [f"{IMAGE_PROMPT} {IMAGE_PROMPT}"], [_image("4x8", 6), _image("4x4", 7)])
    assert inputs["image_grid_thw"].tolist() == grids
    batch, _ = model.prepare(inputs)
    v = model.config.vision
    window_index, cu_windows = get_vision_window_index(torch.as_tensor(grids), v.spatial_merge_size, v.window_size,
                                                       v.patch_size)
    hf_order = (window_index.numpy()[:, None] * 4 + np.arange(4)).reshape(-1)
    patches = 48
    np.testing.assert_array_equal(batch["vision_window_order"][:patches], hf_order)
    np.testing.assert_array_equal(batch["vision_window_order"][patches:], np.arange(patches, 64))  # padding stays
    assert cu_windows.tolist() == [0, 16, 32, 48]  # image 0: two windows of 2x2 merged tokens; image 1: one

    out, theirs = qwen_vision_towers(model, hf_model, inputs)
    features = np.asarray(out["hooks"]["features"]["vision.features"])[0]
    assert features.shape[0] == 64  # 48 patches padded to the next power of two
    np.testing.assert_allclose(features[hf_order], theirs.last_hidden_state.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out["image_features"])[0, :12], theirs.pooler_output.numpy(), atol=TOL,
                               rtol=0)
    pattern = np.asarray(out["hooks"]["vision"]["attn.pattern"])[:, 0]  # [Lv, H, 64, 64], window order
    windowed, full = pattern[[0, 2]], pattern[1]
    assert (windowed[..., :16, 16:] == 0).all() and (windowed[..., 16:32, :16] == 0).all()
    assert (full[..., :16, 16:32] > 0).all() and (full[..., :32, 32:] == 0).all()
    assert (pattern[..., 32:48, :32] == 0).all() and (pattern[..., 32:48, 48:] == 0).all()
    np.testing.assert_allclose(pattern[..., :48, :48].sum(-1), 1.0, atol=1e-5)


def test_window_layout_equals_hf_window_index(tiny):
    """Our window order and window ids against HF's `get_vision_window_index` (merged-token order, cumulative window
    lengths) on grids with ragged windows, two frames, several images."""
    v = tiny.model.config.vision
    for grids in ([[1, 6, 10]], [[2, 4, 4]], [[1, 4, 8], [2, 6, 4], [1, 10, 6]], [[1, 8, 8]]):
        order, windows = window_layout(np.array(grids), v)
        index, cu = get_vision_window_index(torch.as_tensor(grids), v.spatial_merge_size, v.window_size, v.patch_size)
        np.testing.assert_array_equal(order, (index.numpy()[:, None] * 4 + np.arange(4)).reshape(-1))
        in_order = windows[order]
        assert (np.diff(in_order) >= 0).all()  # windows are contiguous in window order
        starts = np.flatnonzero(np.diff(in_order, prepend=-1))
        np.testing.assert_array_equal(np.append(starts, len(order)), cu.numpy())


def test_position_ids_equal_hf_get_rope_index(tiny):
    """Qwen2-VL's rope index against HF's on a padded batch with images of two sizes and a text-only sample, and on
    a two-frame image: its temporal ids are its frame indices, not scaled by tokens_per_second (HF scales video's)."""
    _, processor, model, hf_model = tiny
    start, image, end = processor.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>",
                                                                   "<|vision_end|>"])
    two_frames = {"input_ids": np.array([[7, start] + [image] * 8 + [end, 8]]), "attention_mask": np.ones((1, 12)),
                  "pixel_values": np.zeros((32, model.config.vision.patch_dim), np.float32),
                  "image_grid_thw": np.array([[2, 4, 4]])}
    two_frames["mm_token_type_ids"] = (two_frames["input_ids"] == image).astype(int)
    for inputs in (model_inputs(processor, [f"USER: {IMAGE_PROMPT} and {IMAGE_PROMPT} ?", "USER: no image , only text"],
                           [_image("4x8", 9), _image("6x10", 10)]), two_frames):
        batch, _ = model.prepare(inputs)
        positions, deltas = hf_model.model.get_rope_index(
            torch.as_tensor(inputs["input_ids"]), torch.as_tensor(inputs["mm_token_type_ids"]),
            image_grid_thw=torch.as_tensor(inputs["image_grid_thw"]),
            attention_mask=torch.as_tensor(inputs["attention_mask"]))
        real = inputs["attention_mask"].astype(bool)
        np.testing.assert_array_equal(batch["position_ids"][:, real], positions.numpy()[:, real])
        np.testing.assert_array_equal(batch["rope_deltas"], deltas.numpy())
    np.testing.assert_array_equal(batch["position_ids"][0, 0, 2:10], [2] * 4 + [3] * 4)  # frames 0, 1


def test_greedy_decoding_equals_hf_generate(tiny):
    _, processor, model, hf_model = tiny
    texts = [f"USER: {IMAGE_PROMPT} what is in the image ? ASSISTANT:",
             f"USER: {IMAGE_PROMPT} is there a red circle in the box ? yes or no ? ASSISTANT:"]
    inputs = model_inputs(processor, texts, [_image("6x10", 11), _image("4x8", 12)])
    feed = {k: torch.as_tensor(v) for k, v in inputs.items()}
    ref = hf_model.generate(**feed, max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=3)
    ours = generate(model, inputs, 8, eos_token_id=2, pad_token_id=3)
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref.numpy())


def test_both_key_layouts_and_round_trips(tiny, tmp_path):
    """transformers writes the flat layout (model.layers.*, visual.*); the nested one (model.language_model.*,
    model.visual.*) loads to the same parameters, and so does `vlmjax convert`'s output; save_hf's output gives HF
    bit-identical logits."""
    path, processor, model, hf_model = tiny
    flat = load_file(path / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight" in flat and "visual.blocks.0.mlp.gate_proj.weight" in flat
    nested = {("model." + k if k.startswith("visual.") else k.replace("model.", "model.language_model.", 1)
               if k.startswith("model.") else k): v for k, v in flat.items()}
    (tmp_path / "nested").mkdir()
    save_file(nested, tmp_path / "nested" / "model.safetensors")
    shutil.copy(path / "config.json", tmp_path / "nested" / "config.json")
    converted = tmp_path / "converted"
    assert cli.main(["convert", str(path), str(converted)]) == 0
    for other in (vlmjax.load(tmp_path / "nested", progress=False), vlmjax.load(converted, progress=False)):
        assert other.config == model.config  # same config and bit-identical params: the same logits
        for a, b in zip(jax.tree.leaves(other.params), jax.tree.leaves(model.params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    inputs = model_inputs(processor, [f"USER: {IMAGE_PROMPT} and {IMAGE_PROMPT} ?"], [_image("4x8"), _image("4x4")])
    out_dir = hf_conv.save_hf(model.params, model.config, model.hf_config, tmp_path / "hf", source_dir=path)
    saved = load_file(out_dir / "model.safetensors")
    assert "model.visual.merger.ln_q.weight" in saved and "model.visual.blocks.2.mlp.down_proj.bias" in saved
    np.testing.assert_array_equal(run_hf(hf_model, inputs)["logits"], run_hf(load_hf_model(out_dir), inputs)["logits"])


# -- bad input ----------------------------------------------------------------------------------------------------


def test_error_video_input(tiny):
    _, processor, model, _ = tiny
    inputs = model_inputs(processor, [f"USER: {IMAGE_PROMPT} ?"], [_image("4x4")])
    videos = {**inputs, "pixel_values_videos": inputs["pixel_values"], "video_grid_thw": inputs["image_grid_thw"]}
    with pytest.raises(VlmJaxError, match=r"Video input \(pixel_values_videos, video_grid_thw\) is not supported"):
        model(**videos)
    with pytest.raises(VlmJaxError, match="second_per_grid_ts.*not supported"):
        model.prepare({**inputs, "second_per_grid_ts": np.array([1.0])})
    marked = {**inputs, "mm_token_type_ids": np.where(inputs["mm_token_type_ids"] == 1, 2, 0)}
    with pytest.raises(VlmJaxError, match=r"marks video tokens; vlmjax's Qwen2\.5-VL takes images only"):
        model.prepare(marked)
    model.prepare({**inputs, "second_per_grid_ts": None})  # what a processor returns without videos


def test_error_float16_names_qwen2_5_vl(tiny):
    with pytest.raises(VlmJaxError, match=r"^Qwen2\.5-VL does not run in float16.*bfloat16"):
        vlmjax.load(tiny.path, dtype="float16", progress=False)


def test_error_unsupported_options_and_bad_configs(tiny, tmp_path):
    path, processor, model, _ = tiny
    inputs = model_inputs(processor, [f"USER: {IMAGE_PROMPT} ?"], [_image("4x4")])
    batch, _ = model.prepare(inputs)
    with pytest.raises(VlmJaxError, match="equal_images .* not implemented for Qwen2.5-VL"):
        model.forward(model.params, batch, equal_images=1)
    # VCD runs on the packed patches; contrasted with the image itself, (1 + a) l - a l = l: plain greedy tokens
    np.testing.assert_array_equal(generate(model, inputs, 2, contrast_pixel_values=inputs["pixel_values"]),
                                  generate(model, inputs, 2))
    config = json.loads((path / "config.json").read_text())
    for change, message in (({"window_size": 20}, "window_size=20 is smaller than one merged token"),
                            ({"fullatt_block_indexes": [3]}, r"fullatt_block_indexes \[3\] must be vision layers")):
        bad = tmp_path / next(iter(change))
        shutil.copytree(path, bad)
        (bad / "config.json").write_text(json.dumps({**config, "vision_config": {**config["vision_config"], **change}}))
        with pytest.raises(VlmJaxError, match=message):
            vlmjax.load(bad, progress=False)
