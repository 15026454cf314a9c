"""Qwen2.5-VL: Qwen2-VL's design (native-resolution patches, 2x2 patch merger, Qwen2 decoder with M-RoPE) with a
windowed vision tower.

What is Qwen2-VL's is imported from `qwen2_vl.py`: the config reading (`family_config`) and key table
(`key_table`), the prompt's M-RoPE positions and `rope_deltas` (`rope_index`), the patch layout and its padding to a
bucket (`bucket_patches`: one compilation per bucket), the vision block's attention with its rotary tables, the
tower's patch embedding and layer scan, the merger, the decoder and its rotary, the decode positions. What differs:

- Vision blocks: RMSNorm, and a SwiGLU MLP (`mlp.hidden` = act(gate) * up) with biases.
- Windowed attention. Each image frame's merged tokens are cut into windows of `window_size` pixels (windows of
  window_size / (patch_size * spatial_merge_size) merged tokens a side, the last row and column of windows
  ragged); the layers in `fullatt_block_indexes` attend over the whole frame, the others within a window. The
  tower runs on the patches reordered window by window (`window_layout`; a window's merged tokens in raster order,
  each token's spatial_merge_size**2 patches together, as HF's `get_vision_window_index`); the per-layer switch is
  a stacked flag array [Lv] indexed by the layer scan's layer, so every layer is one scan step whatever its kind.
  After the last block the inverse reordering puts the patches back in the processor's order: `vision.features`
  (and `projector.out`) are in the processor's order, as in Qwen2-VL; the `vision.blocks.*` sites see the
  patches in window order (`batch["vision_window_order"]`: position i holds the processor's patch
  `vision_window_order[i]`).
- Temporal positions: `tokens_per_second` and `second_per_grid_ts` scale video frames' temporal ids only; an image's
  temporal ids are its frame indices (HF's `time_interval` is 1 for images), so the positions are Qwen2-VL's.
  Video input is refused with a clear error.

Batch (from `prepare_batch`): Qwen2-VL's (input_ids, attention_mask, position_ids, rope_deltas, pixel_values,
vision_segment_ids, vision_positions, padded to the bucket P'), plus vision_window_order [P'] and
vision_window_ids [P'] (each patch's window in the processor's order; -1 for padding patches, which keep their
places at the end).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmjax.errors import VlmJaxError
from vlmjax.models import qwen2_vl
from vlmjax.models.layers import Linear, RMSNorm, activation
from vlmjax.models.qwen2_vl import block_diagonal_mask
from vlmjax.visual import VisualTokens

# The family API that Qwen2-VL's functions serve unchanged (the patch conv, depths, dtypes, decode positions).
check_dtype, conv_kernel_shape, num_layers = qwen2_vl.check_dtype, qwen2_vl.conv_kernel_shape, qwen2_vl.num_layers
decode_start = qwen2_vl.decode_start
VIDEO_INPUTS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
KEY_ROWS = qwen2_vl.key_table((("mlp.gate_proj", "gate"), ("mlp.up_proj", "up"), ("mlp.down_proj", "down")),
                              norm_biases=False)


@dataclasses.dataclass(frozen=True)
class Qwen2_5VLVisionConfig(qwen2_vl.Qwen2VLVisionConfig):
    window_size: int = 112  # pixels a side
    full_attention_layers: tuple[int, ...] = ()  # HF's fullatt_block_indexes; every other layer is windowed

    @property
    def window_tokens(self) -> int:
        """Merged tokens a side of a window."""
        return self.window_size // (self.patch_size * self.spatial_merge_size)

    @property
    def full_attention_flags(self) -> np.ndarray:
        """[Lv] bool: the layer attends over the whole frame (else within its window)."""
        return np.isin(np.arange(self.num_layers), self.full_attention_layers)


@dataclasses.dataclass(frozen=True)
class Qwen2_5VLConfig(qwen2_vl.Qwen2VLConfig):
    vision: Qwen2_5VLVisionConfig
    model_type: str = "qwen2_5_vl"
    family_name: ClassVar[str] = "Qwen2.5-VL"


def config_from_hf(hf_config) -> Qwen2_5VLConfig:
    vc = hf_config.vision_config
    cfg = qwen2_vl.family_config(Qwen2_5VLConfig, Qwen2_5VLVisionConfig, hf_config, embed_dim=int(vc.hidden_size),
                                 intermediate_size=int(vc.intermediate_size), out_hidden_size=int(vc.out_hidden_size),
                                 window_size=int(vc.window_size),
                                 full_attention_layers=tuple(int(i) for i in vc.fullatt_block_indexes))
    vision = cfg.vision
    if vision.window_tokens < 1:
        raise VlmJaxError(f"window_size={vision.window_size} is smaller than one merged token (patch_size * "
                          f"spatial_merge_size = {vision.patch_size * vision.spatial_merge_size} pixels); fix "
                          "vision_config.window_size.")
    if not all(0 <= i < vision.num_layers for i in vision.full_attention_layers):
        raise VlmJaxError(f"fullatt_block_indexes {list(vision.full_attention_layers)} must be vision layers in "
                          f"0..{vision.num_layers - 1}; fix vision_config.")
    return cfg


# -- host-side inputs ----------------------------------------------------------------------------------------------


def window_layout(grids: np.ndarray, cfg: Qwen2_5VLVisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """(window order [P]: the processor's patch indices, window by window; window ids [P] of the patches in the
    processor's order). Per image frame, in order: windows row by row, a window's merged tokens in raster order,
    each token's merge**2 patches together (HF's `get_vision_window_index`)."""
    merge, side = cfg.spatial_merge_size, cfg.window_tokens
    unit_windows, first_window = [], 0
    for t, h, w in grids.tolist():
        gh, gw = h // merge, w // merge
        rows, cols = -(-gh // side), -(-gw // side)
        frame, row, col = np.meshgrid(np.arange(t), np.arange(gh) // side, np.arange(gw) // side, indexing="ij")
        unit_windows.append(first_window + (frame * rows + row) * cols + col)
        first_window += t * rows * cols
    windows = np.concatenate([u.reshape(-1) for u in unit_windows])  # per merged token, processor order
    units = np.argsort(windows, kind="stable")
    order = (units[:, None] * merge**2 + np.arange(merge**2)).reshape(-1)
    return order.astype(np.int32), np.repeat(windows, merge**2).astype(np.int32)


def prepare_batch(cfg: Qwen2_5VLConfig, inputs: dict, dtype) -> tuple[dict, VisualTokens]:
    """Qwen2-VL's checks and batch, plus the window layout of the patches; video input is refused."""
    videos = sorted(k for k in VIDEO_INPUTS if inputs.get(k) is not None)
    if videos:
        raise VlmJaxError(f"Video input ({', '.join(videos)}) is not supported: vlmjax's Qwen2.5-VL takes images. "
                          "Pass frames as images, or call the processor without videos=.")
    inputs = {k: v for k, v in inputs.items() if k not in VIDEO_INPUTS}
    batch, meta = qwen2_vl.prepare_batch(cfg, inputs, dtype)
    if "pixel_values" in batch:
        order, windows = window_layout(np.asarray(inputs["image_grid_thw"]).astype(np.int64), cfg.vision)
        total, padded = len(order), batch["pixel_values"].shape[0]
        batch["vision_window_order"] = np.concatenate([order, np.arange(total, padded, dtype=np.int32)])
        batch["vision_window_ids"] = np.pad(windows, (0, padded - total), constant_values=-1)
    return batch, meta


# -- vision tower --------------------------------------------------------------------------------------------------


class VisionBlock(qwen2_vl.VisionBlock):
    """Qwen2-VL's block with RMSNorms and a SwiGLU MLP (biases)."""

    Norm = RMSNorm

    def init_mlp(self, cfg: Qwen2_5VLVisionConfig, rngs: nnx.Rngs) -> None:
        d, f, L = cfg.embed_dim, cfg.intermediate_size, (cfg.num_layers,)
        self.gate = Linear(d, f, layers=L, rngs=rngs)
        self.up = Linear(d, f, layers=L, rngs=rngs)
        self.down = Linear(f, d, layers=L, rngs=rngs)

    def mlp(self, h: jax.Array, run) -> jax.Array:
        return self.down(run("mlp.hidden", activation(self.cfg.hidden_act)(self.gate(h)) * self.up(h)))


class VisionTower(qwen2_vl.VisionTower):
    Block = VisionBlock

    def __call__(self, batch: dict, hooks, site) -> jax.Array:
        """[1, P', Dv] in the processor's patch order: the packed patches reordered window by window, through the
        blocks (full layers: each frame attends to itself; windowed layers: each window), then put back."""
        dtype = self.patch_embed.kernel[...].dtype
        order = batch["vision_window_order"]
        x = self.embed(batch["pixel_values"], site)[:, order]
        frames, windows = batch["vision_segment_ids"][order], batch["vision_window_ids"][order]
        full, windowed = block_diagonal_mask(frames, dtype), block_diagonal_mask(windows, dtype)
        is_full = jnp.asarray(self.cfg.full_attention_flags)
        x = self.blocks(x, batch["vision_positions"][order], frames,
                        lambda layer: jnp.where(is_full[layer], full, windowed), hooks, site)
        return jnp.zeros_like(x).at[:, order].set(x)


class PatchMerger(qwen2_vl.PatchMerger):
    """Qwen2-VL's merger with an RMSNorm before it."""

    Norm = RMSNorm


# -- model ---------------------------------------------------------------------------------------------------------


class Qwen2_5VL(qwen2_vl.Qwen2VL):
    """Qwen2-VL's model (M-RoPE rotary, decode steps, `rope_deltas` in the output) with the windowed tower."""

    Vision, Merger = VisionTower, PatchMerger

    def image_features(self, batch, hooks, site, equal_images=None) -> jax.Array:
        """[1, P' / merge**2, D]: the windowed tower on the packed patches, then the merger."""
        if equal_images is not None:
            raise VlmJaxError("equal_images (the vision tower image by image under vmap) is not implemented for "
                              "Qwen2.5-VL; leave it unset: the packed tower gives the same numbers.")
        return self.merged_features(batch, hooks, site)


Model = Qwen2_5VL
