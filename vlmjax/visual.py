"""Visual-token metadata: where each sample's image tokens are, which image and patch each one shows.

Computed on the host from input ids and the config's image token id (never a constant span), carried beside the
batch, and used by every intervention and metric that needs the visual set V of docs/methods.md.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vlmjax.errors import VlmJaxError

TEXT, PATCH, CLS = 0, 1, 2
BASE, CROP, NEWLINE = 3, 4, 5  # LLaVA-NeXT: base-image patch, crop-mosaic patch, row-end newline
QUERY = 6  # InstructBLIP: a Q-Former query output (no image position; laid on a 1 x Q line by query index)
KIND_NAMES = {TEXT: "text", PATCH: "patch", CLS: "cls", BASE: "base", CROP: "crop", NEWLINE: "newline", QUERY: "query"}
GRID_KINDS = (PATCH, BASE, QUERY)  # the tokens of an image's own grid (LLaVA-NeXT's crops lie on another)


@dataclasses.dataclass
class ImageSpan:
    sample: int  # row of the batch
    start: int  # first token position
    length: int  # number of visual tokens
    grid: tuple[int, ...]  # patch grid (rows, cols) of its patch tokens (LLaVA-NeXT: of its base-image tokens;
    # Qwen2-VL: (t, rows, cols) of its merged grid; InstructBLIP: (1, Q), its queries by index) -- the last two
    # entries are always (rows, cols)
    crop_grid: tuple[int, int] | None = None  # LLaVA-NeXT: (rows, cols) of the unpadded crop mosaic


@dataclasses.dataclass
class VisualTokens:
    mask: np.ndarray  # [B, N] bool
    image_index: np.ndarray  # [B, N] int32, index into pixel_values' images, -1 for text
    grid_row: np.ndarray  # [B, N] int32 patch row (in its grid: base or crop mosaic), -1 where not a patch
    grid_col: np.ndarray  # [B, N] int32
    kind: np.ndarray  # [B, N] int8: TEXT, PATCH, CLS (LLaVA), BASE, CROP, NEWLINE (LLaVA-NeXT), QUERY (InstructBLIP)
    images: list[ImageSpan]

    @classmethod
    def empty(cls, mask: np.ndarray) -> VisualTokens:
        """Metadata of the image-token `mask` [B, N] with nothing filled in: image_index, grid_row and grid_col -1,
        every kind TEXT, no images (a family's metadata function fills them in place)."""
        unset = lambda: np.full(mask.shape, -1, np.int32)
        return cls(mask, unset(), unset(), unset(), np.zeros(mask.shape, np.int8), [])

    def positions(self, sample: int) -> np.ndarray:
        return np.flatnonzero(self.mask[sample])

    def single_patch_grid(self, who: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """(grid rows, grid cols [B, N], -1 off the grid; the grid's (rows, cols)) for a batch of one image per
        sample, all of one patch grid: the patch tokens (LLaVA-NeXT: the base image's; Qwen2-VL: the merged grid of
        the image's single frame, (t, h, w) -> (h, w)). `who` names the caller in the error."""
        grids = {image.grid[-2:] for image in self.images}
        if len(grids) != 1 or len(self.images) != len(self.mask):
            raise VlmJaxError(f"{who} needs exactly one image per sample, all of one patch grid; this batch has "
                              f"{len(self.images)} image(s) for {len(self.mask)} sample(s), grids {sorted(grids)}. "
                              "Build the token mask yourself.")
        on_grid = np.isin(self.kind, GRID_KINDS)
        return np.where(on_grid, self.grid_row, -1), np.where(on_grid, self.grid_col, -1), grids.pop()


def llava_visual_tokens(input_ids: np.ndarray, image_token_id: int, grid: int, with_cls: bool,
                        num_images: int | None = None) -> VisualTokens:
    """Metadata for LLaVA-1.5 prompts: each image is a contiguous run of tokens_per_image image tokens."""
    input_ids = np.asarray(input_ids)
    per_image = grid * grid + int(with_cls)
    meta = VisualTokens.empty(input_ids == image_token_id)
    mask, images = meta.mask, meta.images
    for s in range(len(mask)):
        pos = np.flatnonzero(mask[s])
        if len(pos) % per_image:
            raise VlmJaxError(
                f"Sample {s} has {len(pos)} image tokens, not a multiple of the {per_image} tokens one image "
                f"takes in this model. Build the prompt with the model's processor, which expands each image "
                f"placeholder to {per_image} image tokens.")
        for start in pos[::per_image]:
            span = np.arange(start, start + per_image)
            if not mask[s, span].all():
                raise VlmJaxError(f"Sample {s}: the image tokens starting at position {start} are not contiguous; "
                                  f"each image must be one run of {per_image} image tokens.")
            meta.image_index[s, span] = len(images)
            patches = span[int(with_cls):]
            if with_cls:
                meta.kind[s, start] = CLS
            meta.kind[s, patches] = PATCH
            meta.grid_row[s, patches] = np.arange(grid * grid) // grid
            meta.grid_col[s, patches] = np.arange(grid * grid) % grid
            images.append(ImageSpan(sample=s, start=int(start), length=per_image, grid=(grid, grid)))
    if num_images is not None and len(images) != num_images:
        raise VlmJaxError(
            f"pixel_values holds {num_images} image(s) but the input ids have image tokens for {len(images)} "
            f"({int(mask.sum())} image tokens, {per_image} per image). Pass one image per image placeholder in "
            "the prompt (the processor does this when given the same images and text).")
    return meta
