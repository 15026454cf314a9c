"""LLaVA-NeXT (1.6): LLaVA's CLIP tower, projector and decoder with any-resolution tiling.

Each image is resized to the best of `image_grid_pinpoints` and cut into crops of the tower's size; the tower sees a
base image (the whole picture at tower size) plus those crops. The decoder sees, per image, the base-image tokens,
then the crop mosaic (crop features tiled back into one grid, the rows or columns that only show the letterbox
padding removed), each mosaic row followed by the learned `image_newline` vector.

The token layout depends on image sizes, so it is computed on the host by `prepare_batch` (`anyres_layout`) and
reaches the jitted forward (`LlavaNext` on the VLM skeleton, models/vlm.py) as index arrays; the forward is
shape-static given the batch shapes. The batch holds input_ids [B, N], attention_mask [B, N], optionally
position_ids [B, N], and with images pixel_values [P, C, S, S] (the real crops of all images in order, each
image's base image first, the processor's padding crops dropped) and image_feature_index [B, N] (per image token,
its row of the [P * S'^2 + 1, D] table of projected crop features followed by `image_newline`; S' = S / patch
size).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmjax.config import LlavaConfig, llava_from_hf
from vlmjax.errors import VlmJaxError
from vlmjax.inputs import text_batch
from vlmjax.models import llava
from vlmjax.models.layers import weight
from vlmjax.models.llava import decode_start  # noqa: F401  (family interface: decoding)
from vlmjax.visual import BASE, CROP, NEWLINE, ImageSpan, VisualTokens

ACCEPTED_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "position_ids")
KEY_ROWS = (*llava.KEY_ROWS, ("model.image_newline", "image_newline", "none"))
conv_kernel_shape = llava.conv_kernel_shape
num_layers = llava.num_layers


@dataclasses.dataclass(frozen=True)
class LlavaNextConfig(LlavaConfig):
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()  # candidate (height, width) resolutions, in pixels
    model_type: str = "llava_next"


def config_from_hf(hf_config) -> LlavaNextConfig:
    base = llava_from_hf(hf_config)
    pinpoints = tuple((int(h), int(w)) for h, w in hf_config.image_grid_pinpoints)
    size = base.vision.image_size
    if not pinpoints or any(h % size or w % size for h, w in pinpoints):
        raise VlmJaxError(f"image_grid_pinpoints {list(pinpoints)} must be a non-empty list of (height, width) "
                          f"multiples of the vision tower's image_size {size}; fix them in config.json.")
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(LlavaConfig) if f.name != "model_type"}
    return LlavaNextConfig(**fields, image_grid_pinpoints=pinpoints)


# -- any-resolution geometry (host) ------------------------------------------------------------------------------


def select_best_resolution(image_size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """HF's choice of pinpoint for an image (height, width): most effective pixels, then least waste."""
    height, width = image_size
    best, best_effective, best_waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = pw * ph - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (ph, pw), effective, waste
    return best


@dataclasses.dataclass(frozen=True)
class AnyresLayout:
    """Where one image's tokens come from: its crops tile a (crop_rows * g) x (crop_cols * g) mosaic of patch
    features (g = grid size of one crop), of which rows [row_start, row_stop) x cols [col_start, col_stop) are kept."""

    grid: int
    crop_rows: int
    crop_cols: int
    row_start: int
    row_stop: int
    col_start: int
    col_stop: int

    @property
    def num_crops(self) -> int:
        return self.crop_rows * self.crop_cols

    @property
    def kept_shape(self) -> tuple[int, int]:
        return self.row_stop - self.row_start, self.col_stop - self.col_start

    @property
    def num_tokens(self) -> int:
        rows, cols = self.kept_shape
        return self.grid**2 + rows * (cols + 1)


def anyres_layout(image_size: tuple[int, int], cfg: LlavaNextConfig) -> AnyresLayout:
    """The crop grid of the best pinpoint and HF's `unpad_image` of the crop mosaic, for an image (height, width)."""
    height, width = image_size
    g, size = cfg.vision.grid_size, cfg.vision.image_size
    best_h, best_w = select_best_resolution(image_size, cfg.image_grid_pinpoints)
    rows, cols = best_h // size, best_w // size
    mosaic_h, mosaic_w = rows * g, cols * g
    r0, r1, c0, c1 = 0, mosaic_h, 0, mosaic_w
    if width / height > mosaic_w / mosaic_h:
        pad = (mosaic_h - int(round(height * (mosaic_w / width), 7))) // 2
        r0, r1 = pad, mosaic_h - pad
    else:
        pad = (mosaic_w - int(round(width * (mosaic_h / height), 7))) // 2
        c0, c1 = pad, mosaic_w - pad
    return AnyresLayout(g, rows, cols, r0, r1, c0, c1)


def token_sources(layout: AnyresLayout, first_patch: int, newline_row: int):
    """Per token of one image, in sequence order: (row of the feature table, kind, grid row, grid col)."""
    g = layout.grid
    base = np.arange(g * g)
    rows, cols = np.meshgrid(np.arange(layout.row_start, layout.row_stop),
                             np.arange(layout.col_start, layout.col_stop), indexing="ij")
    crop = 1 + (rows // g) * layout.crop_cols + cols // g
    crop_index = (first_patch + crop) * g * g + (rows % g) * g + cols % g
    with_newline = lambda a, fill: np.concatenate([a, np.full((a.shape[0], 1), fill)], axis=1).reshape(-1)
    index = np.concatenate([first_patch * g * g + base, with_newline(crop_index, newline_row)])
    kind = np.concatenate([np.full(g * g, BASE), with_newline(np.full(rows.shape, CROP), NEWLINE)])
    grid_row = np.concatenate([base // g, with_newline(rows - layout.row_start, -1)])
    grid_col = np.concatenate([base % g, with_newline(cols - layout.col_start, -1)])
    return index, kind, grid_row, grid_col


# -- inputs -------------------------------------------------------------------------------------------------------


def _check_images(cfg: LlavaNextConfig, pixels, sizes) -> list[AnyresLayout]:
    vc = cfg.vision
    if cfg.vision_feature_select_strategy != "default":
        raise VlmJaxError("This checkpoint sets vision_feature_select_strategy='full', which LLaVA-NeXT cannot use "
                          "with a CLIP tower: each crop then has a CLS token, so crops do not tile the mosaic (HF's "
                          "pack_image_features fails as well). Set it to 'default' in config.json.")
    if sizes is None:
        raise VlmJaxError("image_sizes is required with pixel_values for LLaVA-NeXT: the crop layout of each image "
                          "depends on its original (height, width). Pass the processor's image_sizes output too.")
    sizes = np.asarray(sizes)
    want = (vc.num_channels, vc.image_size, vc.image_size)
    if pixels.ndim != 5 or tuple(pixels.shape[2:]) != want:
        raise VlmJaxError(f"pixel_values must have shape [images, patches, {want[0]}, {want[1]}, {want[2]}] for this "
                          f"model, got {tuple(pixels.shape)}. Preprocess images with the model's LlavaNextProcessor.")
    if sizes.shape != (pixels.shape[0], 2) or not np.issubdtype(sizes.dtype, np.integer) or (sizes <= 0).any():
        raise VlmJaxError(f"image_sizes must be positive integers [images, 2] = (height, width) per image, one per "
                          f"image of pixel_values ({pixels.shape[0]}), got {sizes.dtype} {sizes.shape}. Pass the "
                          "processor's image_sizes unchanged.")
    layouts = [anyres_layout((int(h), int(w)), cfg) for h, w in sizes]
    for i, layout in enumerate(layouts):
        if 1 + layout.num_crops > pixels.shape[1]:
            raise VlmJaxError(
                f"Image {i} of size {tuple(int(v) for v in sizes[i])} needs {1 + layout.num_crops} patches (base + "
                f"crops) but pixel_values holds {pixels.shape[1]} per image: image_sizes and pixel_values come from "
                "different images or image_grid_pinpoints. Pass both from one processor call.")
    return layouts


def visual_tokens(input_ids: np.ndarray, image_token_id: int, layouts: list[AnyresLayout]):
    """(VisualTokens, image_feature_index [B, N]): the images fill the image-token positions in order, each one
    contiguous run of its layout's token count within one sample (as the processor writes them)."""
    meta = VisualTokens.empty(input_ids == image_token_id)
    mask = meta.mask
    feature_index = np.zeros(mask.shape, np.int32)
    counts = [layout.num_tokens for layout in layouts]
    if mask.any() and not layouts:
        raise VlmJaxError(f"input_ids hold {int(mask.sum())} image tokens but no pixel_values were given. Pass the "
                          "processor's pixel_values and image_sizes for the images of the prompt.")
    if int(mask.sum()) != sum(counts):
        raise VlmJaxError(
            f"input_ids hold {int(mask.sum())} image tokens but image_sizes imply {sum(counts)} ({counts} per image). "
            "Build the prompt with the model's processor from the same images (it expands each image placeholder to "
            "its count), and keep the processor's patch_size and vision_feature_select_strategy equal to the model's.")
    slots = np.argwhere(mask)  # (sample, position), in the order HF's masked_scatter fills them
    first_patch = np.cumsum([0] + [1 + layout.num_crops for layout in layouts])
    newline_row = int(first_patch[-1]) * layouts[0].grid ** 2 if layouts else 0
    cursor = 0
    for i, layout in enumerate(layouts):
        span = slots[cursor:cursor + layout.num_tokens]
        cursor += layout.num_tokens
        s, start = (int(v) for v in span[0])
        if (span[:, 0] != s).any() or (span[:, 1] != np.arange(start, start + len(span))).any():
            raise VlmJaxError(
                f"Image {i} takes {len(span)} image tokens, but the image tokens from sample {s} position {start} on "
                "are not one contiguous run in one sample. Build each prompt with the model's processor, one image "
                "placeholder per image, in the order of the images.")
        pos = span[:, 1]
        feature_index[s, pos], meta.kind[s, pos], meta.grid_row[s, pos], meta.grid_col[s, pos] = token_sources(
            layout, int(first_patch[i]), newline_row)
        meta.image_index[s, pos] = i
        meta.images.append(ImageSpan(sample=s, start=start, length=len(span), grid=(layout.grid, layout.grid),
                                     crop_grid=layout.kept_shape))
    return meta, feature_index


def prepare_batch(cfg: LlavaNextConfig, inputs: dict, dtype) -> tuple[dict, VisualTokens]:
    """Check processor outputs, compute the any-resolution layout and build the batch plus visual-token metadata."""
    batch = text_batch(inputs, cfg.text.vocab_size, (cfg.image_token_id,), ACCEPTED_INPUTS)
    pixels = inputs.get("pixel_values")
    layouts = []
    if pixels is not None and len(pixels):
        pixels = np.asarray(pixels)
        layouts = _check_images(cfg, pixels, inputs.get("image_sizes"))
        crops = [pixels[i, :1 + layout.num_crops] for i, layout in enumerate(layouts)]
        batch["pixel_values"] = np.concatenate(crops).astype(np.dtype(dtype))
    meta, feature_index = visual_tokens(batch["input_ids"], cfg.image_token_id, layouts)
    if layouts:
        batch["image_feature_index"] = feature_index
    return batch, meta


# -- model --------------------------------------------------------------------------------------------------------


class LlavaNext(llava.Llava):
    """LLaVA's modules plus the learned `image_newline` [D] that ends each mosaic row."""

    def __init__(self, cfg: LlavaNextConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.image_newline = weight(rngs, cfg.text.hidden_size)

    def merge_images(self, x, batch, features):
        """Write each image token's source (a crop feature or `image_newline`) over its embedding."""
        d = x.shape[-1]
        table = jnp.concatenate([features.reshape(-1, d), self.image_newline[...][None].astype(features.dtype)])
        visual_mask = batch["input_ids"] == self.cfg.image_token_id
        return jnp.where(visual_mask[..., None], table.astype(x.dtype)[batch["image_feature_index"]], x)


Model = LlavaNext
