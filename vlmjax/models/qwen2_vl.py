"""Qwen2-VL: a ViT over native-resolution patches -> 2x2 patch merger -> features written over the image tokens ->
Qwen2 decoder with multimodal rotary positions (M-RoPE).

`Qwen2VL` is the family's NNX module on the VLM skeleton (models/vlm.py; `vlm.forward(params, batch, cfg, hooks)`
is pure and jittable). `prepare_batch` builds `batch` on the host from the
processor outputs (input_ids, attention_mask, pixel_values [patches, C*T*p*p], image_grid_thw [images, 3],
mm_token_type_ids):
- input_ids, attention_mask [B, N];
- position_ids [3, B, N] and rope_deltas [B, 1]: HF's `get_rope_index` (temporal / row / column position of each
  token; text after an image continues at the image's largest position + 1; padding skipped);
- pixel_values [P', C*T*p*p], vision_segment_ids [P'] and vision_positions [P', 2] (patch row / column for the
  vision rotary embedding), padded from the P real patches to a bucket P' (see `bucket_patches`).

Patch bucketing. The processor emits all images' patches concatenated, so P changes with every image size and a
jitted forward would compile once per size. `prepare_batch` pads the patches to P' = `bucket_patches(P,
cfg.patch_bucket)`: the next power of two by default (`patch_bucket=0`), or the next multiple of `patch_bucket`
(a multiple of spatial_merge_size**2; set it with `dataclasses.replace(cfg, patch_bucket=k)`). Batches whose
patches fall in the same bucket (and whose input_ids have the same shape) reuse one compilation. Padding patches
are zero pixels in a segment of their own: the block-diagonal vision attention keeps every real patch from seeing
them; they sit after all real patches, so the 2x2 merger groups them only with each other, and their merged rows
(the tail of `image_features`, [1, P' / 4, D]) are never written into the sequence.

Image attention is block-diagonal: each image (each frame) attends only to its own patches (HF's cu_seqlens),
built from segment ids so shapes stay static. The vision stack runs on one packed sequence [1, P', Dv]; its
`Context.key_padding` marks the real patches.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from vlmjax.config import DecoderConfig, RopeConfig, decoder_from_hf
from vlmjax.errors import VlmJaxError
from vlmjax.hooks import Context, SiteRunner
from vlmjax.inputs import text_batch
from vlmjax.models import decoder, vlm
from vlmjax.models.decoder import Decoder
from vlmjax.models.layers import (LayerNorm, Linear, activation, additive_mask, apply_rope, attention, key_rows,
                                  rope_inv_freq, scan_stack, vit_block_end)
from vlmjax.models.vlm import VisionLanguageModel
from vlmjax.visual import PATCH, ImageSpan, VisualTokens

ACCEPTED_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
HF_MROPE_SECTION = (16, 24, 24)  # HF's default when the config names none
VISION_LAYER_NORM_EPS = 1e-6  # hard-coded in HF's vision blocks and merger
_QV = "model.visual."


def key_table(mlp: tuple[tuple[str, str], ...], norm_biases: bool) -> tuple:
    """The HF key table of a Qwen2-VL-family model whose vision blocks have the MLP `mlp` ((hf name, our name)
    pairs) and norms with biases (LayerNorm) or without (RMSNorm)."""
    return (
        (_QV + "patch_embed.proj.weight", "vision/patch_embed/kernel", "conv"),  # Conv3d [D, C, T, p, p]
        *key_rows(_QV + "blocks.{i}.", "vision/layers/", (("attn.qkv", "qkv"), ("attn.proj", "proj"), *mlp)),
        *key_rows(_QV + "blocks.{i}.", "vision/layers/", (("norm1", "norm1"), ("norm2", "norm2")), "norm",
                  norm_biases),
        *key_rows(_QV + "merger.", "merger/", (("ln_q", "norm"),), "norm", norm_biases),
        *key_rows(_QV + "merger.", "merger/", (("mlp.0", "fc1"), ("mlp.2", "fc2"))),
        *decoder.KEY_ROWS,
    )


KEY_ROWS = key_table((("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")), norm_biases=True)


@dataclasses.dataclass(frozen=True)
class Qwen2VLVisionConfig:
    embed_dim: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    out_hidden_size: int  # the decoder's hidden size (merger output)
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    vision: Qwen2VLVisionConfig
    text: DecoderConfig
    image_token_id: int
    patch_bucket: int = 0  # 0: pad patches to the next power of two; k > 0: to the next multiple of k
    model_type: str = "qwen2_vl"
    family_name: ClassVar[str] = "Qwen2-VL"  # what error messages call the family


def text_config_from_hf(hf_config, family_name: str) -> DecoderConfig:
    """The Qwen2 decoder with M-RoPE of a Qwen2-VL-family HF config."""
    tc = hf_config.text_config
    if tc.use_sliding_window:
        raise VlmJaxError(f"use_sliding_window=True is not supported for {family_name} (HF windows only the layers "
                          f"past max_window_layers); {family_name} checkpoints ship with it off: set it to false.")
    text = decoder_from_hf({**tc.to_dict(), "model_type": "qwen2"})  # Qwen2VLTextConfig is a Qwen2 decoder
    section = text.rope.mrope_section or HF_MROPE_SECTION
    if sum(section) != text.head_dim // 2:
        raise VlmJaxError(f"mrope_section {list(section)} must sum to head_dim / 2 = {text.head_dim // 2} (the "
                          "rotary frequencies it splits over time, rows and columns); fix rope_parameters.")
    return dataclasses.replace(text, rope=dataclasses.replace(text.rope, mrope_section=tuple(section)),
                               tie_word_embeddings=bool(hf_config.tie_word_embeddings))


def vision_rope_theta(vc, family_name: str) -> float:
    """The vision tower's rotary base, checking that its rotary embedding is the axial (2-D) one."""
    vision_rope = getattr(vc, "rope_parameters", None) or {}
    if vision_rope.get("rope_type", "axial") != "axial":
        raise VlmJaxError(f"Unsupported vision rope type {vision_rope['rope_type']!r}; {family_name}'s vision tower "
                          "uses 'axial' (2-D) rotary embeddings.")
    return float(vision_rope.get("rope_theta", 10000.0))


def family_config(config_class: type[Qwen2VLConfig], vision_class: type[Qwen2VLVisionConfig], hf_config,
                  **vision_fields) -> Qwen2VLConfig:
    """A Qwen2-VL-family config from an HF config: the fields every member reads alike, plus `vision_fields` (the
    widths, whose HF names differ, and the member's own)."""
    vc = hf_config.vision_config
    vision = vision_class(num_layers=int(vc.depth), num_heads=int(vc.num_heads), patch_size=int(vc.patch_size),
                          temporal_patch_size=int(vc.temporal_patch_size),
                          spatial_merge_size=int(vc.spatial_merge_size), in_channels=int(vc.in_channels),
                          hidden_act=vc.hidden_act, rope_theta=vision_rope_theta(vc, config_class.family_name),
                          **vision_fields)
    return config_class(vision=vision, text=text_config_from_hf(hf_config, config_class.family_name),
                        image_token_id=int(hf_config.image_token_id))


def config_from_hf(hf_config) -> Qwen2VLConfig:
    vc = hf_config.vision_config
    return family_config(Qwen2VLConfig, Qwen2VLVisionConfig, hf_config, embed_dim=int(vc.embed_dim),
                         intermediate_size=int(vc.embed_dim * vc.mlp_ratio), out_hidden_size=int(vc.hidden_size))


num_layers = vlm.num_layers


def conv_kernel_shape(cfg: Qwen2VLConfig) -> tuple[int, ...]:
    v = cfg.vision
    return (v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)


def check_dtype(cfg: Qwen2VLConfig, dtype) -> None:
    """Refuse float16: the family's activations overflow it (inf/NaN in the HF reference too)."""
    if jnp.dtype(dtype) == jnp.float16:
        raise VlmJaxError(f"{cfg.family_name} does not run in float16: its activations overflow the float16 range "
                          "(the HF reference gives inf/NaN too). Load it with dtype='bfloat16' or 'float32'.")


# -- host-side inputs ----------------------------------------------------------------------------------------------


def bucket_patches(num_patches: int, bucket: int) -> int:
    """The padded patch count: the next power of two (bucket=0) or the next multiple of `bucket`."""
    if bucket == 0:
        return 1 << max(num_patches - 1, 0).bit_length()
    return -(-num_patches // bucket) * bucket


def _check_grids(cfg: Qwen2VLConfig, pixels, grids) -> np.ndarray:
    v = cfg.vision
    if (pixels is None) != (grids is None):
        raise VlmJaxError("pixel_values and image_grid_thw come together (the processor returns both); pass both "
                          "or neither.")
    if pixels is None:
        return np.zeros((0, 3), np.int64)
    if pixels.ndim != 2 or pixels.shape[1] != v.patch_dim:
        raise VlmJaxError(f"pixel_values must have shape [patches, {v.patch_dim}] (C*T*p*p = {v.in_channels}*"
                          f"{v.temporal_patch_size}*{v.patch_size}*{v.patch_size}) for this model, got "
                          f"{tuple(pixels.shape)}. Preprocess images with the model's {cfg.family_name} processor.")
    grids = np.asarray(grids).astype(np.int64)
    m = v.spatial_merge_size
    if grids.ndim != 2 or grids.shape[1] != 3 or (grids <= 0).any() or (grids[:, 1:] % m).any():
        raise VlmJaxError(f"image_grid_thw must be [images, 3] positive (t, h, w) patch counts with h and w "
                          f"multiples of spatial_merge_size={m}, got {grids.tolist()}.")
    if int(grids.prod(-1).sum()) != pixels.shape[0]:
        raise VlmJaxError(f"image_grid_thw {grids.tolist()} describes {int(grids.prod(-1).sum())} patches but "
                          f"pixel_values holds {pixels.shape[0]}. Pass the image_grid_thw the processor returned "
                          "with these pixel_values.")
    return grids


def rope_index(input_ids, attention_mask, grids, image_token_id: int, merge: int):
    """HF's `get_rope_index` in numpy: (position_ids [3, B, N], rope_deltas [B, 1], image spans).

    Per sample, over its non-padding tokens: text advances all three positions by one; an image's tokens (merged
    grid t x h x w) get (start + t_i, start + row, start + col) and the text after it starts at start + max(h, w).
    Each run of image tokens is consumed image by image in image_grid_thw's order; a run that does not split into
    whole images raises. Spans are (sample, token positions, image index, merged grid (t, h, w)).
    A left-padded text-only sample thus starts at position 0, as in HF's `generate`; HF's plain forward without
    images uses arange(N) instead, padding included (the two agree whenever a batch holds an image or no padding)."""
    b, n = input_ids.shape
    positions = np.zeros((3, b, n), np.int64)
    deltas = np.zeros((b, 1), np.int64)
    spans, image = [], 0
    for s in range(b):
        real = np.flatnonzero(attention_mask[s])
        chunks, start, offset = [], 0, 0
        for is_image, run in itertools.groupby(input_ids[s, real] == image_token_id):
            length = len(list(run))
            if not is_image:
                chunks.append(np.broadcast_to(np.arange(start, start + length), (3, length)))
                start, offset = start + length, offset + length
                continue
            end = offset + length
            while offset < end:
                if image >= len(grids):
                    raise VlmJaxError(f"Sample {s} has image tokens at position {real[offset]} beyond the "
                                      f"{len(grids)} image(s) of image_grid_thw. Pass every image of the prompt.")
                t, h, w = (int(x) for x in grids[image] // (1, merge, merge))
                if offset + t * h * w > end:
                    raise VlmJaxError(
                        f"Sample {s}: the image-token run at position {real[offset]} holds {end - offset} tokens "
                        f"but image {image} (image_grid_thw {grids[image].tolist()}) needs {t * h * w} = t*h*w / "
                        f"{merge}**2. Build input_ids and image_grid_thw with the processor from the same images.")
                grid = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij"))
                chunks.append(grid.reshape(3, -1) + start)
                spans.append((s, real[offset:offset + t * h * w], image, (t, h, w)))
                start, offset, image = start + max(h, w), offset + t * h * w, image + 1
        if chunks:
            flat = np.concatenate(chunks, axis=1)
            positions[:, s, real] = flat
            deltas[s] = flat.max() + 1 - len(real)
    if image != len(grids):
        raise VlmJaxError(f"image_grid_thw has {len(grids)} image(s) but the input ids hold image tokens for "
                          f"{image}. Pass one image per image placeholder (the processor expands each "
                          "<|image_pad|> to the image's token count).")
    return positions, deltas, spans


def visual_tokens(input_ids, spans, image_token_id: int) -> VisualTokens:
    """Metadata: each image token's image and (row, col) on its image's merged grid; ImageSpan.grid is (t, h, w)."""
    meta = VisualTokens.empty(input_ids == image_token_id)
    for s, tokens, image, (t, h, w) in spans:
        cell = np.arange(len(tokens)) % (h * w)
        meta.image_index[s, tokens], meta.kind[s, tokens] = image, PATCH
        meta.grid_row[s, tokens], meta.grid_col[s, tokens] = cell // w, cell % w
        meta.images.append(ImageSpan(sample=s, start=int(tokens[0]), length=len(tokens), grid=(t, h, w)))
    return meta


def vision_patch_layout(grids, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment ids [P], (row, col) [P, 2]) of the processor's patch order: one segment per image frame; within a
    frame, patches go merge-block by merge-block (HF's `get_vision_position_ids` and cu_seqlens)."""
    segments, positions, frames = [], [], 0
    for t, h, w in grids.tolist():
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = lambda a: a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
        positions.append(np.tile(np.stack([block(rows), block(cols)], -1), (t, 1)))
        segments.append(np.repeat(np.arange(frames, frames + t), h * w))
        frames += t
    return np.concatenate(segments).astype(np.int32), np.concatenate(positions).astype(np.int32)


def prepare_batch(cfg: Qwen2VLConfig, inputs: dict, dtype) -> tuple[dict, VisualTokens]:
    """Check processor outputs; build the batch (positions and patch layout computed here) and the metadata."""
    check_dtype(cfg, dtype)
    batch = text_batch(inputs, cfg.text.vocab_size, (cfg.image_token_id,), ACCEPTED_INPUTS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    is_image = ids == cfg.image_token_id
    types = inputs.get("mm_token_type_ids")
    if types is not None:
        types = np.asarray(types)
        if (types[None] if types.ndim == 1 else types).shape != ids.shape:
            raise VlmJaxError(f"mm_token_type_ids has shape {types.shape} but input_ids has {ids.shape}.")
        types = types.reshape(ids.shape)
        if (types == 2).any():
            raise VlmJaxError(f"mm_token_type_ids marks video tokens; vlmjax's {cfg.family_name} takes images only.")
        if ((types == 1) != is_image).any():
            raise VlmJaxError(f"mm_token_type_ids disagrees with input_ids about which tokens are image tokens (id "
                              f"{cfg.image_token_id}). Pass the processor's outputs unchanged.")
    pixels = inputs.get("pixel_values")
    pixels = None if pixels is None else np.asarray(pixels)
    grids = _check_grids(cfg, pixels, inputs.get("image_grid_thw"))
    merge = cfg.vision.spatial_merge_size
    expected_tokens = int(grids.prod(-1).sum()) // merge**2
    if int(is_image.sum()) != expected_tokens:
        raise VlmJaxError(f"input_ids hold {int(is_image.sum())} image tokens but image_grid_thw "
                          f"{grids.tolist()} gives {expected_tokens} (t*h*w / {merge}**2 per image). Build the prompt "
                          "with the processor from the same images, which expands each <|image_pad|> to that count.")
    positions, deltas, spans = rope_index(ids, mask, grids, cfg.image_token_id, merge)
    batch["position_ids"], batch["rope_deltas"] = positions.astype(np.int32), deltas.astype(np.int32)
    if pixels is not None:
        if cfg.patch_bucket % merge**2:
            raise VlmJaxError(f"patch_bucket={cfg.patch_bucket} must be a multiple of spatial_merge_size**2 = "
                              f"{merge**2} so padding patches never share a merge group with real ones.")
        total = pixels.shape[0]
        padded = bucket_patches(total, cfg.patch_bucket)
        segments, patch_positions = vision_patch_layout(grids, merge)
        batch["pixel_values"] = np.pad(pixels, ((0, padded - total), (0, 0))).astype(np.dtype(dtype))
        batch["vision_segment_ids"] = np.pad(segments, (0, padded - total), constant_values=-1)
        batch["vision_positions"] = np.pad(patch_positions, ((0, padded - total), (0, 0)))
    return batch, visual_tokens(ids, spans, cfg.image_token_id)


# -- vision tower --------------------------------------------------------------------------------------------------


def vision_rope_tables(cfg: Qwen2VLVisionConfig, patch_positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """fp32 cos/sin [1, P, head_dim]: the first half of the rotary frequencies turn with the patch row, the
    second with the column (HF's axial Qwen2VLVisionRotaryEmbedding)."""
    head_dim = cfg.embed_dim // cfg.num_heads
    inv_freq = jnp.asarray(rope_inv_freq(RopeConfig(theta=cfg.rope_theta), head_dim // 2))
    freqs = (patch_positions.astype(jnp.float32)[..., None] * inv_freq).reshape(-1, head_dim // 2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[None]
    return jnp.cos(emb), jnp.sin(emb)


def block_diagonal_mask(segments: jax.Array, dtype) -> jax.Array:
    """The additive mask [1, 1, P, P] that lets each patch attend only to the patches of its own segment."""
    return additive_mask((segments[:, None] == segments[None, :])[None, None], dtype)


class VisionBlock(nnx.Module):
    """All vision layers, parameters stacked [L, ...] (fused qkv); called on one layer's slice. A family member with
    other norms or another MLP sets `Norm` and overrides `init_mlp` / `mlp`."""

    Norm = LayerNorm

    def __init__(self, cfg: Qwen2VLVisionConfig, *, rngs: nnx.Rngs):
        d, L = cfg.embed_dim, (cfg.num_layers,)
        self.cfg = cfg
        self.norm1 = self.Norm(d, VISION_LAYER_NORM_EPS, layers=L)
        self.qkv = Linear(d, 3 * d, layers=L, rngs=rngs)
        self.proj = Linear(d, d, layers=L, rngs=rngs)
        self.norm2 = self.Norm(d, VISION_LAYER_NORM_EPS, layers=L)
        self.init_mlp(cfg, rngs)

    def init_mlp(self, cfg: Qwen2VLVisionConfig, rngs: nnx.Rngs) -> None:
        self.fc1 = Linear(cfg.embed_dim, cfg.intermediate_size, layers=(cfg.num_layers,), rngs=rngs)
        self.fc2 = Linear(cfg.intermediate_size, cfg.embed_dim, layers=(cfg.num_layers,), rngs=rngs)

    def mlp(self, h: jax.Array, run: SiteRunner) -> jax.Array:
        """The MLP update of normed h, with the `mlp.hidden` site."""
        return self.fc2(run("mlp.hidden", activation(self.cfg.hidden_act)(self.fc1(h))))

    def __call__(self, x: jax.Array, run: SiteRunner, cos, sin, mask_add) -> jax.Array:
        x = run("resid_pre", x)
        z = vision_attention(self.qkv, run("attn.input", self.norm1(x)), run, cos, sin, mask_add, self.cfg.num_heads)
        return vit_block_end(x, z, self.proj, self.norm2, self.mlp, run)


def vision_attention(qkv: Linear, h: jax.Array, run: SiteRunner, cos, sin, mask_add, heads: int) -> jax.Array:
    """The towers' self-attention on normed h [1, P, Dv]: fused qkv, the 2-D rotary in fp32 (as HF's vision
    rotary), then attention under `mask_add`; per-head mixed values [1, P, Hv, hdv]."""
    b, n, d = h.shape
    qkv = qkv(h).reshape(b, n, 3, heads, d // heads)
    q, k, v = run("attn.q", qkv[:, :, 0]), run("attn.k", qkv[:, :, 1]), run("attn.v", qkv[:, :, 2])
    q = apply_rope(q.astype(jnp.float32), cos, sin).astype(h.dtype)
    k = apply_rope(k.astype(jnp.float32), cos, sin).astype(h.dtype)
    return attention(q, k, v, mask_add, run, (d // heads) ** -0.5)


class VisionTower(nnx.Module):
    Block = VisionBlock  # the stacked layers' module

    def __init__(self, cfg: Qwen2VLVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch_embed = Linear(cfg.patch_dim, cfg.embed_dim, bias=False, rngs=rngs)
        self.layers = self.Block(cfg, rngs=rngs)

    def __call__(self, batch: dict, hooks, site: SiteRunner) -> jax.Array:
        """[1, P', Dv]: the batch's packed patches through the tower, each image frame attending to its own
        patches."""
        segments = batch["vision_segment_ids"]
        mask_add = block_diagonal_mask(segments, self.patch_embed.kernel[...].dtype)
        x = self.embed(batch["pixel_values"], site)
        return self.blocks(x, batch["vision_positions"], segments, lambda layer: mask_add, hooks, site)

    def embed(self, pixel_values: jax.Array, site: SiteRunner) -> jax.Array:
        """[1, P', Dv]: the patches [P', C*T*p*p] embedded (the `vision.embed` site)."""
        dtype = self.patch_embed.kernel[...].dtype
        return site("vision.embed", self.patch_embed(pixel_values.astype(dtype))[None])

    def blocks(self, x, patch_positions, segments, layer_mask, hooks, site: SiteRunner) -> jax.Array:
        """The layers on embedded patches x [1, P', Dv] at (row, col) `patch_positions`; `layer_mask(layer)` is the
        additive mask of a layer (the scan's traced layer index); patches of segment -1 are padding."""
        cos, sin = vision_rope_tables(self.cfg, patch_positions)
        ctx = Context(stack="vision.blocks", key_padding=(segments >= 0)[None])
        call = lambda layer, h, run: layer(h, run, cos, sin, layer_mask(run.ctx.layer))
        x, records = scan_stack(self.layers, call, x, hooks, ctx, 0, self.cfg.num_layers)
        site.add_records(records)
        return x


class PatchMerger(nnx.Module):
    """Each spatial_merge_size**2 neighbouring patches, normed and concatenated, through a 2-layer MLP."""

    Norm = LayerNorm

    def __init__(self, cfg: Qwen2VLVisionConfig, *, rngs: nnx.Rngs):
        merged = cfg.embed_dim * cfg.spatial_merge_size**2
        self.norm = self.Norm(cfg.embed_dim, VISION_LAYER_NORM_EPS)
        self.fc1 = Linear(merged, merged, rngs=rngs)
        self.fc2 = Linear(merged, cfg.out_hidden_size, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.norm(x).reshape(x.shape[0], -1, self.fc1.kernel[...].shape[0])
        return self.fc2(activation("gelu")(self.fc1(h)))


# -- decoder -------------------------------------------------------------------------------------------------------


def mrope_tables(rope: RopeConfig, head_dim: int, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, N, head_dim] from positions [3, B, N]: the rotary frequencies are split in mrope_section
    chunks turning with the temporal, row and column position in turn (fp32 math, cast to the compute dtype)."""
    axis_of_freq = np.arange(len(rope.mrope_section)).repeat(rope.mrope_section) % 3
    per_freq = jnp.moveaxis(positions[axis_of_freq], 0, -1).astype(jnp.float32)  # [B, N, head_dim / 2]
    freqs = per_freq * jnp.asarray(rope_inv_freq(rope, head_dim), jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def decode_start(batch: dict) -> tuple[dict, np.ndarray]:
    """(prefill batch, first decode position [B]): the prompt keeps its rope-index positions; the k-th new token
    of a sample is at (its real tokens before it) + rope_deltas, as HF decodes, i.e. max prompt position + 1 + k."""
    real = batch["attention_mask"].astype(np.int32).sum(axis=1)
    return batch, (real + batch["rope_deltas"][:, 0]).astype(np.int32)


# -- model ---------------------------------------------------------------------------------------------------------


class Qwen2VL(VisionLanguageModel):
    Vision, Merger = VisionTower, PatchMerger  # a family member with another tower or merger sets these

    def __init__(self, cfg: Qwen2VLConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = self.Vision(cfg.vision, rngs=rngs)
        self.merger = self.Merger(cfg.vision, rngs=rngs)
        self.text = Decoder(cfg.text, rngs=rngs)

    def image_features(self, batch, hooks, site, equal_images=None) -> jax.Array:
        """[1, P' / merge**2, D]: the vision tower on the packed patches, then the patch merger. With
        `equal_images` = n, the patches are n same-grid images run one by one under `vmap` (the same numbers as
        the block-diagonal packed attention, at a cost linear in n); vision records then stack over images."""
        if equal_images is None:
            return self.merged_features(batch, hooks, site)

        def one_image(pixels, positions):
            runner = SiteRunner(hooks, site.ctx)
            image = {"pixel_values": pixels, "vision_segment_ids": jnp.zeros(pixels.shape[0], jnp.int32),
                     "vision_positions": positions}
            return self.merged_features(image, hooks, runner)[0], runner.records

        per_image = lambda a: a.reshape(equal_images, -1, *a.shape[1:])
        features, records = jax.vmap(one_image)(per_image(batch["pixel_values"]), per_image(batch["vision_positions"]))
        site.add_records(records)
        return features.reshape(1, -1, features.shape[-1])

    def merged_features(self, batch, hooks, site: SiteRunner) -> jax.Array:
        """The tower on the batch's patches, then the merger, with the `vision.features` and `projector.out` sites."""
        return site("projector.out", self.merger(site("vision.features", self.vision(batch, hooks, site))))

    def rotary(self, batch, dtype):
        return mrope_tables(self.cfg.text.rope, self.cfg.text.head_dim, batch["position_ids"], dtype)

    def step_rotary(self, positions, dtype):
        """After the prompt, the three M-RoPE axes advance together."""
        positions = jnp.broadcast_to(positions[None, :, None], (3, positions.shape[0], 1))
        return mrope_tables(self.cfg.text.rope, self.cfg.text.head_dim, positions, dtype)

    def __call__(self, batch, hooks=None, **options) -> dict:
        """The skeleton's forward; the output also holds the `rope_deltas` decoding needs."""
        return {**super().__call__(batch, hooks, **options), "rope_deltas": batch["rope_deltas"]}


Model = Qwen2VL
