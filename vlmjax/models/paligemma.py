"""PaliGemma (1 and 2): SigLIP vision tower -> linear projector -> image features written over the image tokens ->
Gemma (PaliGemma 1) or Gemma 2 (PaliGemma 2) decoder under prefix-LM attention.

`PaliGemma` is the family's NNX module on the VLM skeleton (models/vlm.py; `vlm.forward(params, batch, cfg, hooks)`
is pure and jittable). `batch` holds input_ids, attention_mask [B, N], pixel_values [I, C, H, W] (one image per
run of image tokens, in order), optionally token_type_ids [B, N] and position_ids [B, N]. What differs from LLaVA:

- SigLIP tower: a patch convolution with a bias plus learned position embeddings (no CLS token, no pre-norm), the
  CLIP block (LayerNorm eps and the tanh GELU from the config), a post-layernorm; every patch is a visual token.
- Linear projector from the tower's width to the decoder's.
- Gemma decoder: RMSNorms scale by (1 + w) in fp32 (`layers.rms_norm` with offset 1), input embeddings are multiplied
  by sqrt(D) rounded to the embedding dtype (as HF's scaled embedding), GeGLU MLP with the tanh GELU, head_dim from
  the config. Gemma 2 adds: scores scaled by query_pre_attn_scalar**-0.5 and soft-capped (cap * tanh(s / cap))
  before the mask, the final logits soft-capped the same way, RMSNorms after attention and after the MLP (their
  outputs are what `attn.out` / `mlp.out` add to the residual) besides the ones before, and sliding-window layers
  (HF's `layer_types`; the layers stay stacked and scanned, each picking its mask with the static per-layer flag
  array `layer_sliding` indexed by the scan's layer index).
- Prefix-LM attention (HF's `token_type_ids`): tokens of type 0 (the image, BOS and the prompt: the prefix; the
  processor marks the whole prompt so, and padding too) see every prefix token of their sample both ways, also
  beyond a sliding window; suffix tokens (type 1: `suffix=` text, and every decoded token) are causal. Without
  token_type_ids the whole sequence is causal, as in HF.
- Positions are 1-based: HF's forward uses 1..N (padding included) unless position_ids are given, and decoding
  numbers the real tokens 1, 2, ... from the attention mask (`decode_start`).

Visual-token metadata is LLaVA's (`visual.llava_visual_tokens`: each image one run of grid**2 image tokens, found
from the ids per sample), which assumes nothing about where the runs sit. The processor puts them first (after the
left padding), then BOS and the prompt, so T (methods' text after the image) is BOS, the prompt and any suffix.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmjax.config import CLIPVisionConfig, DecoderConfig, decoder_from_hf
from vlmjax.errors import VlmJaxError
from vlmjax.hooks import Context, SiteRunner
from vlmjax.inputs import text_batch
from vlmjax.models import clip, decoder, vlm
from vlmjax.models.clip import CLIPBlock, patchify
from vlmjax.models.decoder import Decoder, DecoderBlock
from vlmjax.models.layers import (LayerNorm, Linear, RMSNorm, activation, additive_mask, causal_allowed, key_rows,
                                  rope_inv_freq, rope_tables, scan_stack, weight)
from vlmjax.models.vlm import VisionLanguageModel
from vlmjax.visual import VisualTokens, llava_visual_tokens

# labels: the processor's training targets (always returned), accepted and unused by the forward.
ACCEPTED_INPUTS = ("input_ids", "attention_mask", "pixel_values", "token_type_ids", "position_ids", "labels")
_V = "model.vision_tower."
_T = "model.language_model."
KEY_ROWS = (
    (_V + "embeddings.patch_embedding.weight", "vision/patch_embed/kernel", "conv"),
    (_V + "embeddings.patch_embedding.bias", "vision/patch_embed/bias", "none"),
    (_V + "embeddings.position_embedding.weight", "vision/pos_embed", "none"),
    *key_rows(_V, "vision/", (("post_layernorm", "post_norm"),), "norm"),
    *clip.LAYER_KEY_ROWS,
    *key_rows("model.multi_modal_projector.", "", (("linear", "projector"),)),
    *decoder.KEY_ROWS,  # HF's post_attention_layernorm is our post_attn_norm: Gemma's MLP input norm, Gemma 2's
    *key_rows(_T + "layers.{i}.", "text/layers/", (  # attention output norm (then these two norm the MLP)
        ("pre_feedforward_layernorm", "pre_mlp_norm"), ("post_feedforward_layernorm", "post_mlp_norm")), "norm",
              False),
)


@dataclasses.dataclass(frozen=True)
class GemmaConfig(DecoderConfig):
    """A Gemma (`model_type` "gemma") or Gemma 2 ("gemma2") decoder; norm_offset is 1.0 for both."""

    query_pre_attn_scalar: float = 256.0  # scores scaled by its -1/2 power (Gemma: head_dim)
    attn_logit_softcap: float | None = None  # Gemma 2
    sandwich_norms: bool = False  # Gemma 2: RMSNorms after attention and after the MLP too
    layer_sliding: tuple[bool, ...] = ()  # per layer: attends within sliding_window (Gemma 2's sliding layers)


@dataclasses.dataclass(frozen=True)
class PaliGemmaConfig:
    vision: CLIPVisionConfig  # SigLIP: the same fields as CLIP's
    text: GemmaConfig
    image_token_id: int
    model_type: str = "paligemma"

    @property
    def tokens_per_image(self) -> int:
        return self.vision.num_patches


def gemma_from_hf(tc, tie_word_embeddings: bool) -> GemmaConfig:
    """A Gemma or Gemma 2 text config (the rest of the fields are a Llama decoder's)."""
    model_type = getattr(tc, "model_type", None)
    if model_type not in ("gemma", "gemma2"):
        raise VlmJaxError(f"Unsupported PaliGemma text model_type {model_type!r}; vlmjax's PaliGemma runs Gemma "
                          "(PaliGemma 1) and Gemma 2 (PaliGemma 2) decoders.")
    gemma2 = model_type == "gemma2"
    act = tc.hidden_activation if gemma2 else tc.hidden_act
    base = decoder_from_hf({**tc.to_dict(), "model_type": "llama", "hidden_act": act})
    layer_types = tuple(tc.layer_types) if gemma2 else ("full_attention",) * base.num_layers
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown or len(layer_types) != base.num_layers:
        raise VlmJaxError(f"layer_types must give 'full_attention' or 'sliding_attention' for each of the "
                          f"{base.num_layers} layers, got {list(layer_types)}.")
    window = base.sliding_window if gemma2 else None
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(DecoderConfig)}
    fields.update(model_type=model_type, sliding_window=window, tie_word_embeddings=tie_word_embeddings,
                  norm_offset=1.0, mlp_bias=False,  # HF's Gemma MLPs have no biases
                  final_logit_softcap=_cap(tc, "final_logit_softcapping") if gemma2 else None)
    return GemmaConfig(
        **fields,
        query_pre_attn_scalar=float(tc.query_pre_attn_scalar if gemma2 else base.head_dim),
        attn_logit_softcap=_cap(tc, "attn_logit_softcapping") if gemma2 else None,
        sandwich_norms=gemma2,
        layer_sliding=tuple(t == "sliding_attention" and window is not None for t in layer_types),
    )


def _cap(tc, name: str) -> float | None:
    cap = getattr(tc, name, None)
    return None if cap is None else float(cap)


def config_from_hf(hf_config) -> PaliGemmaConfig:
    vc, tc = hf_config.vision_config, hf_config.text_config
    if vc.model_type != "siglip_vision_model":
        raise VlmJaxError(f"Unsupported PaliGemma vision tower {vc.model_type!r}; vlmjax's PaliGemma runs SigLIP "
                          "('siglip_vision_model').")
    if getattr(vc, "vision_use_head", False):
        raise VlmJaxError("vision_config.vision_use_head is true, but PaliGemma never uses SigLIP's pooling head "
                          "(its features are the tower's last hidden states) and vlmjax does not load it: set "
                          "vision_use_head to false in config.json and drop the vision_tower.head.* tensors.")
    if hf_config.projection_dim != tc.hidden_size:
        raise VlmJaxError(f"projection_dim ({hf_config.projection_dim}) must equal the text hidden_size "
                          f"({tc.hidden_size}): the projector writes image features into the text embeddings.")
    vision = CLIPVisionConfig(hidden_size=int(vc.hidden_size), intermediate_size=int(vc.intermediate_size),
                              num_layers=int(vc.num_hidden_layers), num_heads=int(vc.num_attention_heads),
                              image_size=int(vc.image_size), patch_size=int(vc.patch_size),
                              num_channels=int(vc.num_channels), layer_norm_eps=float(vc.layer_norm_eps),
                              hidden_act=vc.hidden_act)
    return PaliGemmaConfig(vision=vision, text=gemma_from_hf(tc, bool(hf_config.tie_word_embeddings)),
                           image_token_id=int(hf_config.image_token_id))


conv_kernel_shape, num_layers = clip.conv_kernel_shape, vlm.num_layers


def prepare_batch(cfg: PaliGemmaConfig, inputs: dict, dtype) -> tuple[dict, VisualTokens]:
    """Check processor outputs and build the batch (token_type_ids kept for the prefix-LM mask) plus metadata."""
    batch = text_batch(inputs, cfg.text.vocab_size, (cfg.image_token_id,), ACCEPTED_INPUTS)
    ids = batch["input_ids"]
    types = inputs.get("token_type_ids")
    if types is not None:
        types = np.asarray(types)
        types = types[None] if types.ndim == 1 else types
        if types.shape != ids.shape or not np.isin(types, (0, 1)).all():
            raise VlmJaxError(f"token_type_ids must be 0 (prefix: image and prompt) or 1 (suffix) for each token, of "
                              f"the shape of input_ids {ids.shape}; got {types.shape} with values "
                              f"{sorted(np.unique(types).tolist())[:5]}. Pass the processor's token_type_ids.")
        batch["token_type_ids"] = types.astype(np.int32)
    pixels = inputs.get("pixel_values")
    if pixels is not None:
        batch["pixel_values"] = pixels = clip.checked_pixels(cfg.vision, pixels, dtype,
                                                             " (single images: no video, no other resolution)")
    meta = llava_visual_tokens(ids, cfg.image_token_id, cfg.vision.grid_size, False,
                               num_images=0 if pixels is None else pixels.shape[0])
    return batch, meta


def decode_start(batch: dict) -> tuple[dict, np.ndarray]:
    """(prefill batch, first decode position [B]): HF's generation positions, 1-based over the real tokens (padding
    at 1, never seen)."""
    mask = batch["attention_mask"]
    positions = np.where(mask == 0, 1, np.cumsum(mask, axis=-1)).astype(np.int32)
    return {**batch, "position_ids": positions}, positions[:, -1] + 1


# -- vision tower --------------------------------------------------------------------------------------------------


class SiglipVision(nnx.Module):
    """Params: patch_embed (kernel [C*p*p, Dv], bias), pos_embed [P, Dv], layers (a `CLIPBlock`), post_norm."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.cfg = cfg
        self.patch_embed = Linear(cfg.num_channels * cfg.patch_size**2, d, rngs=rngs)
        self.pos_embed = weight(rngs, cfg.num_patches, d)
        self.layers = CLIPBlock(cfg, rngs=rngs)
        self.post_norm = LayerNorm(d, cfg.layer_norm_eps)

    def __call__(self, pixel_values: jax.Array, hooks, site: SiteRunner) -> jax.Array:
        """[I, P, Dv]: the last layer's hidden states after the post-layernorm (HF's last_hidden_state)."""
        kernel = self.patch_embed.kernel[...]
        x = self.patch_embed(patchify(pixel_values.astype(kernel.dtype), self.cfg.patch_size))
        x = site("vision.embed", x + self.pos_embed[...][None])
        x, records = scan_stack(self.layers, lambda layer, h, run: layer(h, run), x, hooks,
                                Context(stack="vision.blocks"), 0, self.cfg.num_layers)
        site.add_records(records)
        return self.post_norm(x)


# -- decoder -------------------------------------------------------------------------------------------------------


class GemmaBlock(DecoderBlock):
    """All Gemma / Gemma 2 layers, parameters stacked [L, ...]: the Llama block's (norms with the config's offset 1),
    plus Gemma 2's norms after the MLP; called on one layer's slice (see `scan_stack`). The mask is [B, 1, Nq, Nk],
    or [2, B, 1, Nq, Nk] (full, sliding) when some layers slide."""

    def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)  # post_attn_norm: Gemma's MLP input norm; Gemma 2's attention output norm
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=cfg.norm_offset, layers=(cfg.num_layers,))
        self.pre_mlp_norm = norm() if cfg.sandwich_norms else None
        self.post_mlp_norm = norm() if cfg.sandwich_norms else None

    def __call__(self, x: jax.Array, run: SiteRunner, cos, sin, mask_add) -> jax.Array:
        cfg, (b, n, _) = self.cfg, x.shape
        if any(cfg.layer_sliding):
            mask_add = mask_add[jnp.asarray(cfg.layer_sliding, jnp.int32)[run.ctx.layer]]
        x = run("resid_pre", x)
        z = self.self_attention(run("attn.input", self.input_norm(x)), run, cos, sin, mask_add,
                                cfg.query_pre_attn_scalar**-0.5, cfg.attn_logit_softcap)
        update = self.o(z.reshape(b, n, cfg.num_heads * cfg.head_dim))
        if cfg.sandwich_norms:
            update = self.post_attn_norm(update)
        x = run("resid_mid", x + run("attn.out", update))
        h = self.pre_mlp_norm(x) if cfg.sandwich_norms else self.post_attn_norm(x)
        h = run("mlp.hidden", activation(cfg.hidden_act)(self.gate(h)) * self.up(h))
        update = self.down(h)
        if cfg.sandwich_norms:
            update = self.post_mlp_norm(update)
        return run("resid_post", x + run("mlp.out", update))


class GemmaDecoder(Decoder):
    Block = GemmaBlock

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        """Embeddings times sqrt(D), the factor rounded to the embedding dtype first (HF's scaled embedding)."""
        table = self.embed[...]
        return table[ids] * jnp.asarray(np.float32(self.cfg.hidden_size**0.5)).astype(table.dtype)


# -- model ---------------------------------------------------------------------------------------------------------


class PaliGemma(VisionLanguageModel):
    def __init__(self, cfg: PaliGemmaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = SiglipVision(cfg.vision, rngs=rngs)
        self.projector = Linear(cfg.vision.hidden_size, cfg.text.hidden_size, rngs=rngs)
        self.text = GemmaDecoder(cfg.text, rngs=rngs)

    def image_features(self, batch, hooks, site, equal_images=None) -> jax.Array:
        """[I, P, D]: every patch of the SigLIP tower's output, projected."""
        features = site("vision.features", self.vision(batch["pixel_values"], hooks, site))
        return site("projector.out", self.projector(features))

    def rotary(self, batch, dtype):
        """1-based positions: HF's default 1..N, or the batch's position_ids."""
        input_ids = batch["input_ids"]
        positions = batch.get("position_ids")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(1, input_ids.shape[1] + 1), input_ids.shape)
        return rope_tables(rope_inv_freq(self.cfg.text.rope, self.cfg.text.head_dim), positions, dtype)

    def attention_mask(self, key_padding, num_queries, dtype, query_offset=0, batch=None):
        """Causal (windowed in sliding layers), widened by the prefix-LM block of the batch's token_type_ids: every
        pair of real prefix tokens (type 0) of a sample sees each other. Stacked (full, sliding) when layers slide."""
        types = None if batch is None else batch.get("token_type_ids")

        def mask(window):
            allowed = causal_allowed(key_padding, num_queries, window, query_offset)
            if types is not None:
                prefix = types == 0
                allowed = allowed | (prefix[:, None, :, None] & prefix[:, None, None, :]
                                     & key_padding[:, None, None, :].astype(bool))
            return additive_mask(allowed, dtype)

        text = self.cfg.text
        return jnp.stack([mask(None), mask(text.sliding_window)]) if any(text.layer_sliding) else mask(None)


Model = PaliGemma
