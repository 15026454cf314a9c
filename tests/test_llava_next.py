"""LLaVA-NeXT against HF PyTorch: any-resolution geometry, fp32 parity, round trip, token metadata and errors."""

import dataclasses

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution  # noqa: E402
from transformers.models.llava_next import modeling_llava_next as hf_next  # noqa: E402

from converters.hf import save_hf  # noqa: E402
from converters.keymaps import canonical_key  # noqa: E402
from tests.family_fixtures import TOL, assert_hf_parity, checkpoints, model_inputs, random_images  # noqa: E402
from vlmjax.errors import VlmJaxError  # noqa: E402
from vlmjax.models import llava_next  # noqa: E402
from vlmjax.verify import load_hf_model, run_hf  # noqa: E402
from vlmjax.testing.tiny_llava_next import PINPOINTS, VARIANTS, make_tiny_llava_next  # noqa: E402
from vlmjax.visual import BASE, CROP, NEWLINE, TEXT  # noqa: E402

PROMPT = "USER: <image> what is in the image ? ASSISTANT:"
LONG_PROMPT = "USER: <image> how many red circle are there in the box ? yes no ASSISTANT: the"
# (image (height, width) per sample, prompts): every image fills its crop grid differently
CASES = {
    # a wide image (1 x 2 crops, mosaic rows unpadded) beside a tall-ish one (2 x 2, columns unpadded): 3 vs 5 patches
    "wide_and_square": ([(20, 70), (60, 40)], [PROMPT, LONG_PROMPT]),
    # two images in one sample (2 x 1 crops; 2 x 2 without unpadding), the other sample text only
    "two_in_one_sample": ([(70, 20), (50, 50)], ["USER: <image> and <image> what ? ASSISTANT:",
                                                    "USER: how many red circle are there ? ASSISTANT: no"]),
    "tall_and_square": ([(70, 20), (60, 40)], [PROMPT, LONG_PROMPT]),
}
REAL_CONFIG = dict(image_size=336, patch_size=14, pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336],
                                                             [336, 1008]])


def processor_inputs(processor, case):
    sizes, prompts = CASES[case]
    return model_inputs(processor, prompts, random_images(sizes))


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """`build(variant)`: each variant's tiny checkpoint (path, processor, vlmjax model, HF model), built once."""
    return checkpoints(tmp_path_factory, make_tiny_llava_next)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request, build):
    return build(request.param)


@pytest.fixture(scope="module")
def vicuna(build):
    return build("vicuna")


# -- geometry ----------------------------------------------------------------------------------------------------


def test_layout_matches_hf_on_the_real_grid(vicuna):
    """Best pinpoint, crop grid and unpadded mosaic size as HF computes them, on LLaVA-1.6's own geometry."""
    size, patch, pinpoints = REAL_CONFIG["image_size"], REAL_CONFIG["patch_size"], REAL_CONFIG["pinpoints"]
    tiny_cfg = vicuna.model.config
    cfg = dataclasses.replace(tiny_cfg, vision=dataclasses.replace(tiny_cfg.vision, image_size=size, patch_size=patch),
                              image_grid_pinpoints=tuple(map(tuple, pinpoints)))
    rng = np.random.default_rng(0)
    chosen = set()
    for height, width in [*rng.integers(1, 2500, size=(300, 2)), (336, 336), (1, 2000), (2000, 1), (337, 1000)]:
        image_size = (int(height), int(width))
        best = hf_select_best_resolution(image_size, pinpoints)
        assert llava_next.select_best_resolution(image_size, pinpoints) == best
        layout = llava_next.anyres_layout(image_size, cfg)
        assert (layout.crop_rows, layout.crop_cols) == hf_next.get_anyres_image_grid_shape(image_size, pinpoints,
                                                                                            size)
        mosaic = torch.zeros(1, layout.crop_rows * layout.grid, layout.crop_cols * layout.grid)
        assert layout.kept_shape == tuple(hf_next.unpad_image(mosaic, image_size).shape[1:])
        chosen.add(best)
    assert chosen == {tuple(p) for p in pinpoints}


# -- parity ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["wide_and_square", "two_in_one_sample", "tall_and_square"])
def test_parity_with_hf(tiny, case):
    inputs = processor_inputs(tiny.processor, case)
    grids = {hf_select_best_resolution(tuple(s), PINPOINTS) for s in inputs["image_sizes"]}
    assert len(grids) == 2, "each case should exercise two different crop grids"
    assert_hf_parity(tiny.model, tiny.hf, inputs)


def test_padded_batch_drops_padding_crops(vicuna):
    inputs = processor_inputs(vicuna.processor, "wide_and_square")
    batch, _ = vicuna.model.prepare(inputs)
    assert inputs["pixel_values"].shape[:2] == (2, 5)  # the processor pads the 3-patch image to 5
    np.testing.assert_array_equal(batch["pixel_values"], np.concatenate(
        [inputs["pixel_values"][0, :3], inputs["pixel_values"][1]]))


# -- round trip --------------------------------------------------------------------------------------------------


def test_round_trip_to_hf(vicuna, tmp_path):
    model = vicuna.model
    out_dir = save_hf(model.params, model.config, model.hf_config, tmp_path / "hf", source_dir=vicuna.path)

    def keys(directory):
        with safe_open(str(directory / "model.safetensors"), framework="np") as f:
            return set(f.keys())

    assert keys(out_dir) == {canonical_key(k) for k in keys(vicuna.path)}  # HF itself saves the legacy layout
    inputs = processor_inputs(vicuna.processor, "wide_and_square")
    again = run_hf(load_hf_model(out_dir), inputs)["logits"]
    np.testing.assert_array_equal(again, run_hf(vicuna.hf, inputs)["logits"])


# -- visual-token metadata ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["wide_and_square", "two_in_one_sample"])
def test_metadata_follows_hf_packing(vicuna, case):
    """Feed HF's pack_image_features features that carry their own (patch, token) index, and check that each image
    token's kind, image, grid coordinate and gather row say where HF put what."""
    inputs = processor_inputs(vicuna.processor, case)
    batch, meta = vicuna.model.prepare(inputs)
    cfg, hf_model = vicuna.model.config, vicuna.hf
    g = cfg.vision.grid_size
    num_patches, per_patch, d = batch["pixel_values"].shape[0], g * g, cfg.text.hidden_size
    marked = torch.arange(num_patches * per_patch, dtype=torch.float32).reshape(num_patches, per_patch, 1)
    patch_counts = [hf_next.image_size_to_num_patches(s, PINPOINTS, cfg.vision.image_size)
                    for s in inputs["image_sizes"]]
    packed, _ = hf_model.model.pack_image_features(
        torch.split(marked.expand(-1, -1, d), patch_counts), torch.as_tensor(inputs["image_sizes"]), "default",
        image_newline=torch.full((d,), -1.0))
    source = torch.cat(packed)[:, 0].numpy().astype(np.int64)  # per image token in order: patch * g^2 + token, or -1

    newline_row = num_patches * per_patch
    ours = batch["image_feature_index"][meta.mask]
    np.testing.assert_array_equal(np.where(ours == newline_row, -1, ours), source)

    first_patch = np.cumsum([0, *patch_counts])
    image = meta.image_index[meta.mask]
    patch, token = source // per_patch, source % per_patch
    expected_kind = np.where(source < 0, NEWLINE, np.where(patch == first_patch[image], BASE, CROP))
    np.testing.assert_array_equal(meta.kind[meta.mask], expected_kind)
    assert (meta.kind[~meta.mask] == TEXT).all() and (meta.image_index[~meta.mask] == -1).all()

    rows, cols = meta.grid_row[meta.mask], meta.grid_col[meta.mask]
    is_base, is_crop = expected_kind == BASE, expected_kind == CROP
    np.testing.assert_array_equal(rows[is_base], token[is_base] // g)
    np.testing.assert_array_equal(cols[is_base], token[is_base] % g)
    assert (rows[~(is_base | is_crop)] == -1).all() and (cols[~(is_base | is_crop)] == -1).all()
    for i, span in enumerate(meta.images):
        _, crop_cols = hf_next.get_anyres_image_grid_shape(inputs["image_sizes"][i], PINPOINTS, cfg.vision.image_size)
        here = is_crop & (image == i)
        crop = patch[here] - first_patch[i] - 1
        mosaic_row = crop // crop_cols * g + token[here] // g
        mosaic_col = crop % crop_cols * g + token[here] % g
        np.testing.assert_array_equal(rows[here], mosaic_row - mosaic_row.min())
        np.testing.assert_array_equal(cols[here], mosaic_col - mosaic_col.min())
        assert span.crop_grid == (rows[here].max() + 1, cols[here].max() + 1)
        assert span.crop_grid[0] == int(((expected_kind == NEWLINE) & (image == i)).sum())
        assert meta.mask[span.sample, span.start:span.start + span.length].all()
    assert [span.sample for span in meta.images] == ([0, 0] if case == "two_in_one_sample" else [0, 1])


# -- errors ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_inputs(vicuna):
    return dict(processor_inputs(vicuna.processor, "wide_and_square"))


def test_error_token_count_does_not_match_image_sizes(vicuna, good_inputs):
    sizes = good_inputs["image_sizes"].copy()
    sizes[0] = sizes[0][::-1]  # the wide image declared tall: 40 tokens instead of 34
    inputs = {**good_inputs, "image_sizes": sizes}
    with pytest.raises(VlmJaxError, match=r"image tokens but image_sizes imply"):
        vicuna.model.prepare(inputs)


def test_error_missing_image_sizes(vicuna, good_inputs):
    inputs = {k: v for k, v in good_inputs.items() if k != "image_sizes"}
    with pytest.raises(VlmJaxError, match="image_sizes is required"):
        vicuna.model.prepare(inputs)


@pytest.mark.parametrize("bad_pixels, message", [
    (lambda p: p[:, 0], r"pixel_values must have shape \[images, patches, 3, 28, 28\]"),
    (lambda p: p[..., :14], r"pixel_values must have shape"),
    (lambda p: p[:, :2], r"Image 0 of size \(20, 70\) needs 3 patches .* pixel_values holds 2 per image"),
])
def test_error_pixel_values_shape(vicuna, good_inputs, bad_pixels, message):
    with pytest.raises(VlmJaxError, match=message):
        vicuna.model.prepare({**good_inputs, "pixel_values": bad_pixels(good_inputs["pixel_values"])})


def test_error_image_sizes_shape(vicuna, good_inputs):
    with pytest.raises(VlmJaxError, match=r"image_sizes must be positive integers \[images, 2\]"):
        vicuna.model.prepare({**good_inputs, "image_sizes": good_inputs["image_sizes"][:1]})


def test_error_image_tokens_without_pixels(vicuna, good_inputs):
    inputs = {k: v for k, v in good_inputs.items() if k not in ("pixel_values", "image_sizes")}
    with pytest.raises(VlmJaxError, match="no pixel_values were given"):
        vicuna.model.prepare(inputs)


def test_error_image_tokens_not_contiguous(vicuna, good_inputs):
    ids = good_inputs["input_ids"].copy()
    image_token = vicuna.model.config.image_token_id
    start = int(np.flatnonzero(ids[0] == image_token)[0])
    ids[0, [start - 1, start]] = ids[0, [start, start - 1]]  # same count, a text token now splits the run
    with pytest.raises(VlmJaxError, match="not one contiguous run"):
        vicuna.model.prepare({**good_inputs, "input_ids": ids})


def test_error_full_strategy(vicuna, good_inputs):
    cfg = dataclasses.replace(vicuna.model.config, vision_feature_select_strategy="full")
    with pytest.raises(VlmJaxError, match="vision_feature_select_strategy='full'"):
        llava_next.prepare_batch(cfg, good_inputs, np.float32)


def test_error_pinpoints_not_multiples_of_crop(vicuna):
    hf_config = vicuna.model.hf_config.__class__.from_dict(vicuna.model.hf_config.to_dict())
    hf_config.image_grid_pinpoints = [[30, 56]]
    with pytest.raises(VlmJaxError, match="multiples of the vision tower's image_size 28"):
        llava_next.config_from_hf(hf_config)


def test_text_only_batch_runs(vicuna):
    inputs = vicuna.processor(text=["what is in the image ?"], return_tensors="np")
    out = vicuna.model(**inputs)
    assert not out.visual.mask.any() and "pixel_values" not in vicuna.model.prepare(inputs)[0]
    assert np.abs(np.asarray(out.logits) - run_hf(vicuna.hf, dict(inputs))["logits"]).max() <= TOL


def test_vision_tower_and_packing_alone_match_hf(vicuna):
    """The image features written over the image tokens (tower, projector, crops, unpadding, newlines) equal HF's
    get_image_features output on its own."""
    import torch

    from vlmjax.hooks import Capture

    inputs = dict(processor_inputs(vicuna.processor, "wide_and_square"))
    out = vicuna.model(**inputs, hooks={"embed": Capture(sites=frozenset({"embed"}))}, logits=None)
    ours = np.asarray(out["hooks"]["embed"]["embed"])[inputs["input_ids"] == vicuna.model.config.image_token_id]
    with torch.no_grad():
        packed = vicuna.hf.model.get_image_features(pixel_values=torch.as_tensor(inputs["pixel_values"]),
                                                       image_sizes=torch.as_tensor(inputs["image_sizes"]))
    theirs = torch.cat(list(packed.pooler_output)).numpy()
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-4
