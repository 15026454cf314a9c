"""Qwen2-VL family: parity with HF PyTorch (fp32, eager attention), M-RoPE positions, patch bucketing without
recompiles, both key layouts, round trip to HF, clear errors."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import vlmjax
from converters import hf as hf_conv
from tests.family_fixtures import TOL, assert_hf_parity, checkpoints, long_text, model_inputs, random_images
from tests.family_fixtures import qwen_vision_towers
from vlmjax.errors import VlmJaxError
from vlmjax.verify import load_hf_model, run_hf
from vlmjax.processors import IMAGE_PROMPT
from vlmjax.testing.tiny_qwen2_vl import make_tiny_qwen2_vl

# (height, width) -> merged grids with the tiny processor's pixel budget: 4x4 patches (16, 4 tokens),
# 4x6 (24, 6 tokens), 4x8 (32, 8 tokens), 6x10 (60, 15 tokens).
SIZES = {"4x4": (56, 56), "4x6": (56, 84), "4x8": (56, 112), "6x10": (84, 140)}


def _image(size, seed=0):
    return random_images([SIZES[size]], seed)[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`tiny(variant="gqa")`: each variant's (path, processor, model, hf model), built and loaded once."""
    return checkpoints(tmp_path_factory, make_tiny_qwen2_vl, "gqa")


def _parity(tiny, inputs, variant="gqa"):
    _, _, model, hf_model = tiny(variant)
    return assert_hf_parity(model, hf_model, inputs)


@pytest.mark.parametrize("variant", ["gqa", "tied"])
def test_parity_one_image(tiny, variant):
    processor = tiny(variant)[1]
    _parity(tiny, model_inputs(processor, [f"USER: {IMAGE_PROMPT} what is in the image ?"], [_image("4x8")]), variant)


def test_parity_two_images_of_different_sizes_in_one_prompt(tiny):
    processor = tiny()[1]
    text = [f"USER: {IMAGE_PROMPT} left and {IMAGE_PROMPT} right : what is the same ?"]
    inputs = model_inputs(processor, text, [_image("4x8", 1), _image("6x10", 2)])
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 8], [1, 6, 10]]
    ours = _parity(tiny, inputs)
    assert ours["rope_deltas"].tolist() == [[(4 - 2 * 4) + (5 - 3 * 5)]]  # an image spends max(h, w) positions


def test_parity_text_only_prompt(tiny):
    processor = tiny()[1]
    inputs = model_inputs(processor, ["USER: how many red circle are there in the box ? ASSISTANT:"])
    ours = _parity(tiny, inputs)
    assert "image_features" not in ours and ours["rope_deltas"].tolist() == [[0]]


def test_parity_left_padded_batch(tiny):
    processor = tiny()[1]
    texts = [f"USER: {IMAGE_PROMPT} what is in the image ?",
             f"USER: {IMAGE_PROMPT} how many red circle are there in the box on the left ? yes or no ? ASSISTANT:"]
    inputs = model_inputs(processor, texts, [_image("4x8", 3), _image("4x4", 4)])
    assert (inputs["attention_mask"][0] == 0).any(), "the batch must be left-padded"
    _parity(tiny, inputs)


def test_parity_long_prompt(tiny):
    processor = tiny()[1]
    text = f"USER: {IMAGE_PROMPT} {long_text()} ? ASSISTANT:"
    inputs = model_inputs(processor, [text], [_image("6x10", 5)])
    assert inputs["input_ids"].shape[1] >= 500
    _parity(tiny, inputs)


def test_vision_tower_alone_and_block_diagonal_attention(tiny):
    """Merger input and output against HF's vision model on two images packed with padding patches; image 0 never
    attends to image 1's patches nor to padding."""
    _, processor, model, hf_model = tiny()
    inputs = model_inputs(processor, [f"{IMAGE_PROMPT} {IMAGE_PROMPT}"], [_image("4x8", 6), _image("4x4", 7)])
    out, theirs = qwen_vision_towers(model, hf_model, inputs)
    patches, tokens = 48, 12
    features = np.asarray(out["hooks"]["features"]["vision.features"])
    assert features.shape[1] == 64  # 48 patches padded to the next power of two
    np.testing.assert_allclose(features[0, :patches], theirs.last_hidden_state.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out["image_features"])[0, :tokens], theirs.pooler_output.numpy(),
                               atol=TOL, rtol=0)
    pattern = np.asarray(out["hooks"]["vision"]["attn.pattern"])  # [Lv, 1, H, 64, 64]
    assert pattern.shape[0] == model.config.vision.num_layers
    assert (pattern[..., :32, 32:] == 0).all() and (pattern[..., 32:48, :32] == 0).all()
    assert (pattern[..., 32:48, 48:] == 0).all()
    np.testing.assert_allclose(pattern[..., :48, :48].sum(-1), 1.0, atol=1e-5)


def test_position_ids_equal_hf_get_rope_index(tiny):
    _, processor, model, hf_model = tiny()
    cases = [
        model_inputs(processor, [f"USER: {IMAGE_PROMPT} and {IMAGE_PROMPT} ?", "USER: no image here , only text"],
                [_image("4x6", 8), _image("6x10", 9)]),
        model_inputs(processor, ["a", f"the {IMAGE_PROMPT} left {IMAGE_PROMPT} right of the image"],
                [_image("4x4", 10), _image("4x8", 11)]),
        model_inputs(processor, ["text only , no picture", "yes"]),
    ]
    for inputs in cases:
        batch, _ = model.prepare(inputs)
        grid = inputs.get("image_grid_thw")
        positions, deltas = hf_model.model.get_rope_index(
            torch.as_tensor(inputs["input_ids"]), torch.as_tensor(inputs["mm_token_type_ids"]),
            image_grid_thw=None if grid is None else torch.as_tensor(grid),
            attention_mask=torch.as_tensor(inputs["attention_mask"]))
        real = inputs["attention_mask"].astype(bool)
        np.testing.assert_array_equal(batch["position_ids"][:, real], positions.numpy()[:, real])
        np.testing.assert_array_equal(batch["rope_deltas"], deltas.numpy())
    assert batch["position_ids"][:, 1, -1].tolist() == [0, 0, 0]  # left-padded text: positions count real tokens


def test_visual_metadata_from_ids_and_grids(tiny):
    _, processor, model, _ = tiny()
    texts = ["USER: what ?", f"USER: {IMAGE_PROMPT} and {IMAGE_PROMPT} ?"]
    inputs = model_inputs(processor, texts, [_image("4x6", 12), _image("4x4", 13)])
    _, meta = model.prepare(inputs)
    ids = inputs["input_ids"]
    assert len(meta.positions(0)) == 0
    np.testing.assert_array_equal(meta.positions(1), np.flatnonzero(ids[1] == model.config.image_token_id))
    assert [(s.sample, s.length, s.grid) for s in meta.images] == [(1, 6, (1, 2, 3)), (1, 4, (1, 2, 2))]
    first = meta.images[0]
    span = np.arange(first.start, first.start + first.length)
    assert meta.grid_row[1, span].tolist() == [0, 0, 0, 1, 1, 1]
    assert meta.grid_col[1, span].tolist() == [0, 1, 2, 0, 1, 2]
    assert meta.image_index[1, meta.images[1].start] == 1


def test_same_bucket_does_not_recompile(tiny):
    """24 and 32 patches both pad to 32: one compilation; 16 patches is another bucket: a second one. Padding
    patches do not change the logits."""
    _, processor, model, _ = tiny()
    text = [f"USER: {IMAGE_PROMPT} what is in the image ?"]
    fixed = dict(padding="max_length", max_length=24)
    model = vlmjax.VLM(model.config, model.params, model.hf_config)  # a fresh jit cache
    logits = {}
    for size in ("4x6", "4x8"):
        inputs = model_inputs(processor, text, [_image(size, 14)], **fixed)
        logits[size] = np.asarray(model(**inputs).logits)
        assert model._jitted._cache_size() == 1, size
    model(**model_inputs(processor, text, [_image("4x4", 14)], **fixed))
    assert model._jitted._cache_size() == 2
    exact = vlmjax.VLM(dataclasses.replace(model.config, patch_bucket=4), model.params, model.hf_config)
    unpadded = np.asarray(exact(**model_inputs(processor, text, [_image("4x6", 14)], **fixed)).logits)
    np.testing.assert_allclose(logits["4x6"], unpadded, atol=1e-5, rtol=0)


def test_hf_round_trip_identical_logits(tiny, tmp_path):
    for variant in ("gqa", "tied"):
        path, processor, model, hf_model = tiny(variant)
        out_dir = hf_conv.save_hf(model.params, model.config, model.hf_config, tmp_path / variant, source_dir=path)
        saved = load_file(out_dir / "model.safetensors")
        assert "model.visual.patch_embed.proj.weight" in saved and ("lm_head.weight" in saved) == (variant == "gqa")
        inputs = model_inputs(processor, [f"USER: {IMAGE_PROMPT} and {IMAGE_PROMPT} ?"], [_image("4x8"), _image("4x4")])
        original = run_hf(hf_model, inputs)["logits"]
        again = run_hf(load_hf_model(out_dir), inputs)["logits"]
        np.testing.assert_array_equal(original, again)


def test_both_key_layouts_load(tiny, tmp_path):
    """transformers writes the flat layout (model.layers.*, visual.*); the nested one (model.language_model.*,
    model.visual.*) loads to the same parameters."""
    path, _, model, _ = tiny()
    flat = load_file(path / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight" in flat and "visual.patch_embed.proj.weight" in flat
    nested = {}
    for key, value in flat.items():
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model."):
            key = key.replace("model.", "model.language_model.", 1)
        nested[key] = value
    (tmp_path / "nested").mkdir()
    save_file(nested, tmp_path / "nested" / "model.safetensors")
    shutil.copy(path / "config.json", tmp_path / "nested" / "config.json")
    loaded = vlmjax.load(tmp_path / "nested", progress=False)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(model.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- bad input ----------------------------------------------------------------------------------------------------


def test_error_grid_does_not_match_pixels_or_tokens(tiny):
    _, processor, model, _ = tiny()
    inputs = model_inputs(processor, [f"USER: {IMAGE_PROMPT} and {IMAGE_PROMPT} ?"], [_image("4x8"), _image("4x4")])
    wrong_grid = {**inputs, "image_grid_thw": np.array([[1, 4, 6], [1, 4, 4]])}
    with pytest.raises(VlmJaxError, match="describes 40 patches but pixel_values holds 48"):
        model.prepare(wrong_grid)
    swapped = {**inputs, "image_grid_thw": inputs["image_grid_thw"][::-1].copy()}
    with pytest.raises(VlmJaxError, match=r"run at position \d+ holds 4 tokens but image 1 .* needs 8"):
        model.prepare(swapped)
    drop = int(np.flatnonzero(inputs["input_ids"][0] == model.config.image_token_id)[0])
    fewer = {k: np.delete(inputs[k], drop, axis=1) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    with pytest.raises(VlmJaxError, match="input_ids hold 11 image tokens but image_grid_thw .* gives 12"):
        model.prepare({**inputs, **fewer})
    with pytest.raises(VlmJaxError, match="pixel_values and image_grid_thw come together"):
        model.prepare({k: v for k, v in inputs.items() if k != "image_grid_thw"})
    mislabelled = {**inputs, "mm_token_type_ids": np.zeros_like(inputs["mm_token_type_ids"])}
    with pytest.raises(VlmJaxError, match="mm_token_type_ids disagrees with input_ids"):
        model.prepare(mislabelled)


def test_error_float16_at_load(tiny):
    path = tiny()[0]
    with pytest.raises(VlmJaxError, match="^Qwen2-VL does not run in float16.*bfloat16"):
        vlmjax.load(path, dtype="float16", progress=False)


def test_error_unknown_rope_type(tiny, tmp_path):
    path = tiny()[0]
    shutil.copytree(path, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0,
                                                "mrope_section": [2, 3, 3]}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(VlmJaxError, match="Unsupported rope type 'dynamic'"):
        vlmjax.load(tmp_path / "m", progress=False)
