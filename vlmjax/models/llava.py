"""LLaVA-1.5: CLIP vision tower -> MLP projector -> image features written over the image tokens -> decoder.

`Llava` is the family's NNX module on the VLM skeleton (models/vlm.py: run it with `vlm.forward(params, batch, cfg,
hooks)`, pure and jittable); `batch` holds input_ids [B, N], attention_mask [B, N],
pixel_values [I, C, H, W] (the images of all samples in order, as the HF processor returns them) and optionally
position_ids [B, N]. Visual-token positions are read from input_ids (== cfg.image_token_id), per sample.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmjax.config import LlavaConfig
from vlmjax.config import llava_from_hf as config_from_hf
from vlmjax.inputs import text_batch
from vlmjax.models import clip, decoder, vlm
from vlmjax.models.clip import CLIPVision
from vlmjax.models.decoder import Decoder
from vlmjax.models.layers import Linear, activation, key_rows
from vlmjax.models.vlm import VisionLanguageModel
from vlmjax.visual import VisualTokens, llava_visual_tokens

ACCEPTED_INPUTS = ("input_ids", "attention_mask", "pixel_values", "position_ids")
KEY_ROWS = (
    *clip.KEY_ROWS,
    *key_rows("model.multi_modal_projector.", "projector/", (("linear_1", "linear_1"), ("linear_2", "linear_2"))),
    *decoder.KEY_ROWS,
)


conv_kernel_shape, num_layers = clip.conv_kernel_shape, vlm.num_layers


def prepare_batch(cfg: LlavaConfig, inputs: dict, dtype) -> tuple[dict, VisualTokens]:
    """Check processor outputs and build the batch plus visual-token metadata."""
    batch = text_batch(inputs, cfg.text.vocab_size, (cfg.image_token_id,), ACCEPTED_INPUTS)
    pixels = inputs.get("pixel_values")
    if pixels is not None:
        batch["pixel_values"] = pixels = clip.checked_pixels(cfg.vision, pixels, dtype)
    meta = llava_visual_tokens(batch["input_ids"], cfg.image_token_id, cfg.vision.grid_size,
                               cfg.vision_feature_select_strategy == "full",
                               num_images=0 if pixels is None else pixels.shape[0])
    return batch, meta


class Projector(nnx.Module):
    """LLaVA's 2-layer MLP from the concatenated vision feature layers to the decoder's width."""

    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
        dv, d = cfg.vision.hidden_size * len(cfg.vision_feature_layers), cfg.text.hidden_size
        self.linear_1 = Linear(dv, d, bias=cfg.projector_bias, rngs=rngs)
        self.linear_2 = Linear(d, d, bias=cfg.projector_bias, rngs=rngs)
        self.act = cfg.projector_hidden_act

    def __call__(self, features: jax.Array) -> jax.Array:
        return self.linear_2(activation(self.act)(self.linear_1(features)))


class Llava(VisionLanguageModel):
    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = CLIPVision(cfg.vision, rngs=rngs)
        self.projector = Projector(cfg, rngs=rngs)
        self.text = Decoder(cfg.text, rngs=rngs)

    def image_features(self, batch, hooks, site, equal_images=None) -> jax.Array:
        """[I, T, D]: selected vision hidden states (CLS dropped for the "default" strategy), projected."""
        states, records = self.vision.hidden_states_at(batch["pixel_values"], self.cfg.vision_feature_layers,
                                                       hooks, site)
        site.add_records(records)
        if self.cfg.vision_feature_select_strategy == "default":
            states = tuple(s[:, 1:] for s in states)
        features = site("vision.features", jnp.concatenate(states, axis=-1))
        return site("projector.out", self.projector(features))


Model = Llava


def decode_start(batch: dict) -> tuple[dict, np.ndarray]:
    """(prefill batch, first decode position [B]): HF's generation positions (mask cumsum - 1, 0 at padding)."""
    mask = batch["attention_mask"]
    positions = np.where(mask == 0, 0, np.cumsum(mask, axis=-1) - 1).astype(np.int32)
    return {**batch, "position_ids": positions}, positions[:, -1] + 1
