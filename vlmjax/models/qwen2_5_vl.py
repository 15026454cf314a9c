"""Qwen2.5-VL: Qwen2-VL's design (native-resolution patches, 2x2 patch merger, Qwen2 decoder with M-RoPE) with a
windowed vision tower.

What is Qwen2-VL's is imported from `qwen2_vl.py`: the prompt's M-RoPE positions and `rope_deltas` (`rope_index`),
the patch layout and its padding to a bucket (`bucket_patches`: one compilation per bucket), the vision rotary
tables, the merger's MLP, the decoder and its rotary, the decode positions. What differs:

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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmjax.errors import VlmJaxError
from vlmjax.hooks import Context, SiteRunner
from vlmjax.models import decoder, qwen2_vl
from vlmjax.models.decoder import Decoder
from vlmjax.models.layers import Linear, RMSNorm, activation, additive_mask, key_rows, scan_stack
from vlmjax.models.qwen2_vl import (VISION_LAYER_NORM_EPS, text_config_from_hf, vision_attention, vision_rope_tables,
                                    vision_rope_theta)
from vlmjax.visual import VisualTokens

# The family API that Qwen2-VL's functions serve unchanged (the patch conv, depths, dtypes, decode positions).
check_dtype, conv_kernel_shape, num_layers = qwen2_vl.check_dtype, qwen2_vl.conv_kernel_shape, qwen2_vl.num_layers
decode_start = qwen2_vl.decode_start
VIDEO_INPUTS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
_QV = "model.visual."
KEY_ROWS = (
    (_QV + "patch_embed.proj.weight", "vision/patch_embed/kernel", "conv"),  # Conv3d [D, C, T, p, p]
    *key_rows(_QV + "blocks.{i}.", "vision/layers/", (("attn.qkv", "qkv"), ("attn.proj", "proj"),
                                                      ("mlp.gate_proj", "gate"), ("mlp.up_proj", "up"),
                                                      ("mlp.down_proj", "down"))),
    *key_rows(_QV + "blocks.{i}.", "vision/layers/", (("norm1", "norm1"), ("norm2", "norm2")), "norm", False),
    *key_rows(_QV + "merger.", "merger/", (("ln_q", "norm"),), "norm", False),
    *key_rows(_QV + "merger.", "merger/", (("mlp.0", "fc1"), ("mlp.2", "fc2"))),
    *decoder.KEY_ROWS,
)


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


def config_from_hf(hf_config) -> Qwen2_5VLConfig:
    vc = hf_config.vision_config
    vision = Qwen2_5VLVisionConfig(
        embed_dim=int(vc.hidden_size),
        intermediate_size=int(vc.intermediate_size),
        num_layers=int(vc.depth),
        num_heads=int(vc.num_heads),
        out_hidden_size=int(vc.out_hidden_size),
        patch_size=int(vc.patch_size),
        temporal_patch_size=int(vc.temporal_patch_size),
        spatial_merge_size=int(vc.spatial_merge_size),
        in_channels=int(vc.in_channels),
        hidden_act=vc.hidden_act,
        rope_theta=vision_rope_theta(vc),
        window_size=int(vc.window_size),
        full_attention_layers=tuple(int(i) for i in vc.fullatt_block_indexes),
    )
    if vision.window_tokens < 1:
        raise VlmJaxError(f"window_size={vision.window_size} is smaller than one merged token (patch_size * "
                          f"spatial_merge_size = {vision.patch_size * vision.spatial_merge_size} pixels); fix "
                          "vision_config.window_size.")
    if not all(0 <= i < vision.num_layers for i in vision.full_attention_layers):
        raise VlmJaxError(f"fullatt_block_indexes {list(vision.full_attention_layers)} must be vision layers in "
                          f"0..{vision.num_layers - 1}; fix vision_config.")
    return Qwen2_5VLConfig(vision=vision, text=text_config_from_hf(hf_config),
                           image_token_id=int(hf_config.image_token_id))


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


class VisionBlock(nnx.Module):
    """All vision layers, parameters stacked [L, ...]: RMSNorm, fused qkv, SwiGLU MLP; one layer's slice per call."""

    def __init__(self, cfg: Qwen2_5VLVisionConfig, *, rngs: nnx.Rngs):
        d, f, L = cfg.embed_dim, cfg.intermediate_size, (cfg.num_layers,)
        self.cfg = cfg
        self.norm1 = RMSNorm(d, VISION_LAYER_NORM_EPS, layers=L)
        self.qkv = Linear(d, 3 * d, layers=L, rngs=rngs)
        self.proj = Linear(d, d, layers=L, rngs=rngs)
        self.norm2 = RMSNorm(d, VISION_LAYER_NORM_EPS, layers=L)
        self.gate = Linear(d, f, layers=L, rngs=rngs)
        self.up = Linear(d, f, layers=L, rngs=rngs)
        self.down = Linear(f, d, layers=L, rngs=rngs)

    def __call__(self, x: jax.Array, run: SiteRunner, cos, sin, mask_add) -> jax.Array:
        b, n, _ = x.shape
        x = run("resid_pre", x)
        z = vision_attention(self.qkv, run("attn.input", self.norm1(x)), run, cos, sin, mask_add, self.cfg.num_heads)
        x = run("resid_mid", x + run("attn.out", self.proj(z.reshape(b, n, -1))))
        h = self.norm2(x)
        h = run("mlp.hidden", activation(self.cfg.hidden_act)(self.gate(h)) * self.up(h))
        return run("resid_post", x + run("mlp.out", self.down(h)))


class VisionTower(nnx.Module):
    def __init__(self, cfg: Qwen2_5VLVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch_embed = Linear(cfg.patch_dim, cfg.embed_dim, bias=False, rngs=rngs)
        self.layers = VisionBlock(cfg, rngs=rngs)

    def __call__(self, batch: dict, hooks, site: SiteRunner) -> jax.Array:
        """[1, P', Dv] in the processor's patch order: the packed patches reordered window by window, through the
        blocks (full layers: each frame attends to itself; windowed layers: each window), then put back."""
        dtype = self.patch_embed.kernel[...].dtype
        order = batch["vision_window_order"]
        x = site("vision.embed", self.patch_embed(batch["pixel_values"].astype(dtype))[None])[:, order]
        cos, sin = vision_rope_tables(self.cfg, batch["vision_positions"][order])
        frames, windows = batch["vision_segment_ids"][order], batch["vision_window_ids"][order]
        block_diagonal = lambda segments: additive_mask((segments[:, None] == segments[None, :])[None, None], dtype)
        full, windowed = block_diagonal(frames), block_diagonal(windows)
        is_full = jnp.asarray(self.cfg.full_attention_flags)
        ctx = Context(stack="vision.blocks", key_padding=(frames >= 0)[None])
        call = lambda layer, h, run: layer(h, run, cos, sin, jnp.where(is_full[run.ctx.layer], full, windowed))
        x, records = scan_stack(self.layers, call, x, hooks, ctx, 0, self.cfg.num_layers)
        site.add_records(records)
        return jnp.zeros_like(x).at[:, order].set(x)


class PatchMerger(qwen2_vl.PatchMerger):
    """Qwen2-VL's merger with an RMSNorm before it."""

    def __init__(self, cfg: Qwen2_5VLVisionConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.norm = RMSNorm(cfg.embed_dim, VISION_LAYER_NORM_EPS)


# -- model ---------------------------------------------------------------------------------------------------------


class Qwen2_5VL(qwen2_vl.Qwen2VL):
    """Qwen2-VL's model (M-RoPE rotary, decode steps, `rope_deltas` in the output) with the windowed tower."""

    def __init__(self, cfg: Qwen2_5VLConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision, rngs=rngs)
        self.merger = PatchMerger(cfg.vision, rngs=rngs)
        self.text = Decoder(cfg.text, rngs=rngs)

    def image_features(self, batch, hooks, site, equal_images=None) -> jax.Array:
        """[1, P' / merge**2, D]: the windowed tower on the packed patches, then the merger."""
        if equal_images is not None:
            raise VlmJaxError("equal_images (the vision tower image by image under vmap) is not implemented for "
                              "Qwen2.5-VL; leave it unset: the packed tower gives the same numbers.")
        x = self.vision(batch, hooks, site)
        return site("projector.out", self.merger(site("vision.features", x)))


Model = Qwen2_5VL
