"""LLaVA-1.5: CLIP vision tower -> MLP projector -> image features written over the image tokens -> decoder.

`forward(params, batch, cfg, hooks)` is pure and jittable; `batch` holds input_ids [B, N], attention_mask [B, N],
pixel_values [I, C, H, W] (the images of all samples in order, as the HF processor returns them) and optionally
position_ids [B, N]. Visual-token positions are read from input_ids (== cfg.image_token_id), per sample.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from converters.keymaps import LLAVA_ROWS as KEY_ROWS
from vlmjax.config import LlavaConfig
from vlmjax.config import llava_from_hf as config_from_hf
from vlmjax.errors import VlmJaxError
from vlmjax.hooks import Context, SiteRunner
from vlmjax.inputs import text_batch
from vlmjax.models import clip, decoder
from vlmjax.models.layers import activation, linear, rope_inv_freq, rope_tables
from vlmjax.visual import VisualTokens, llava_visual_tokens

ACCEPTED_INPUTS = ("input_ids", "attention_mask", "pixel_values", "position_ids")


def num_layers(cfg: LlavaConfig) -> dict[str, int]:
    return {"blocks": cfg.text.num_layers, "vision.blocks": cfg.vision.num_layers}


def conv_kernel_shape(cfg: LlavaConfig) -> tuple[int, ...]:
    v = cfg.vision
    return (v.hidden_size, v.num_channels, v.patch_size, v.patch_size)


def prepare_batch(cfg: LlavaConfig, inputs: dict, dtype) -> tuple[dict, VisualTokens]:
    """Check processor outputs and build the batch plus visual-token metadata."""
    batch = text_batch(inputs, cfg.text.vocab_size, (cfg.image_token_id,), ACCEPTED_INPUTS)
    pixels = inputs.get("pixel_values")
    vc = cfg.vision
    if pixels is not None:
        pixels = np.asarray(pixels)
        want = (vc.num_channels, vc.image_size, vc.image_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
            raise VlmJaxError(f"pixel_values must have shape [images, {want[0]}, {want[1]}, {want[2]}] for this "
                              f"model, got {tuple(pixels.shape)}. Preprocess images with the model's processor.")
        batch["pixel_values"] = pixels.astype(np.dtype(dtype))
    meta = llava_visual_tokens(batch["input_ids"], cfg.image_token_id, vc.grid_size,
                               cfg.vision_feature_select_strategy == "full",
                               num_images=0 if pixels is None else pixels.shape[0])
    return batch, meta


def param_shapes(cfg: LlavaConfig) -> dict:
    dv = cfg.vision.hidden_size * len(cfg.vision_feature_layers)
    d = cfg.text.hidden_size
    bias = lambda n: {"bias": (n,)} if cfg.projector_bias else {}
    return {
        "vision": clip.param_shapes(cfg.vision),
        "projector": {"linear_1": {"kernel": (dv, d), **bias(d)}, "linear_2": {"kernel": (d, d), **bias(d)}},
        "text": decoder.param_shapes(cfg.text),
    }


def image_features(params, pixel_values, cfg: LlavaConfig, hooks, run_global) -> jax.Array:
    """[I, T, D]: selected vision hidden states (CLS dropped for the "default" strategy), projected."""
    states, records, _ = clip.hidden_states_at(
        params["vision"], pixel_values, cfg.vision, cfg.vision_feature_layers, hooks, run_global
    )
    for name, r in records.items():
        run_global.records.setdefault(name, {}).update(r)
    if cfg.vision_feature_select_strategy == "default":
        states = tuple(s[:, 1:] for s in states)
    feats = run_global("vision.features", jnp.concatenate(states, axis=-1))
    p = params["projector"]
    h = activation(cfg.projector_hidden_act)(linear(p["linear_1"], feats))
    return run_global("projector.out", linear(p["linear_2"], h))


def merge_image_features(embeds, input_ids, features, image_token_id):
    """Write the image features, in order, over the image-token positions (HF's masked_scatter)."""
    b, n, d = embeds.shape
    is_image = (input_ids == image_token_id).reshape(-1)
    flat = features.reshape(-1, d).astype(embeds.dtype)
    index = jnp.clip(jnp.cumsum(is_image) - 1, 0, flat.shape[0] - 1)
    return jnp.where(is_image[:, None], flat[index], embeds.reshape(-1, d)).reshape(b, n, d)


def add_image_features(params, batch, cfg: LlavaConfig, x, hooks, run_global):
    """LLaVA-1.5's merge: each image's projected features over its run of image tokens."""
    feats = image_features(params, batch["pixel_values"], cfg, hooks, run_global)
    return merge_image_features(x, batch["input_ids"], feats, cfg.image_token_id), feats


def rotary_1d(cfg, batch, dtype):
    """Llama-style rotary tables from 1-D position ids (HF's default: 0..N-1)."""
    input_ids = batch["input_ids"]
    positions = batch.get("position_ids")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    return rope_tables(rope_inv_freq(cfg.text.rope, cfg.text.head_dim), positions, dtype)


def step_rotary(cfg, positions, dtype):
    """Rotary tables [B, 1, hd] for one decode step at 1-D positions [B]."""
    return rope_tables(rope_inv_freq(cfg.text.rope, cfg.text.head_dim), positions[:, None], dtype)


def decode_start(batch: dict) -> tuple[dict, np.ndarray]:
    """(prefill batch, first decode position [B]): HF's generation positions (mask cumsum - 1, 0 at padding)."""
    mask = batch["attention_mask"]
    positions = np.where(mask == 0, 0, np.cumsum(mask, axis=-1) - 1).astype(np.int32)
    return {**batch, "position_ids": positions}, positions[:, -1] + 1


def language_forward(params, batch, cfg, hooks, add_images, *, rotary=rotary_1d, output_hidden_states=False,
                     output_attentions=False, logits="all", start_layer=0, stop_layer=None, resid=None) -> dict:
    """The forward of every family that writes image features over image tokens of a Llama-family decoder, given
    its way of merging them (`add_images(params, batch, cfg, x, hooks, run_global) -> (x, features)`) and of
    building rotary tables (`rotary(cfg, batch, dtype) -> (cos, sin)`).

    `stop_layer` / `start_layer` + `resid` split the decoder: a run stopped at layer l returns the residual entering
    layer l under "resid", and a run started at l from that residual skips the vision tower and the layers before l
    (a sweep computes the part its values share once; see vlmjax.sweep)."""
    hooks = decoder.output_hooks(hooks, output_hidden_states, output_attentions)
    input_ids = batch["input_ids"]
    key_padding = batch.get("attention_mask")
    key_padding = jnp.ones_like(input_ids, bool) if key_padding is None else key_padding.astype(bool)
    visual_mask = input_ids == cfg.image_token_id
    run_global = SiteRunner(hooks, Context(stack="", visual_mask=visual_mask, key_padding=key_padding))
    text = params["text"]
    out = {}
    if resid is not None:
        x = resid
    else:
        x = text["embed"][jnp.where(visual_mask, 0, input_ids)]
        if batch.get("pixel_values") is not None:
            x, out["image_features"] = add_images(params, batch, cfg, x, hooks, run_global)
    cos, sin = rotary(cfg, batch, x.dtype)
    out.update(decoder.forward_from_embeddings(
        text, x, cos, sin, key_padding, visual_mask, hooks, run_global, cfg.text, logits,
        start_layer=start_layer, stop_layer=stop_layer, embed_site=resid is None))
    return out


def forward(params, batch, cfg: LlavaConfig, hooks=None, **options) -> dict:
    """Options: output_hidden_states, output_attentions, logits ("all" | "last" | None), start_layer, stop_layer,
    resid (see `language_forward`)."""
    return language_forward(params, batch, cfg, hooks, add_image_features, **options)
