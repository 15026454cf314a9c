"""CLIP vision transformer (the LLaVA vision tower) as Flax NNX modules.

Params (`CLIPVision`): patch_embed.kernel [C*p*p, D] (the Conv2d as a matmul on flattened patches, (C, p, p)
order), class_embed [D], pos_embed [P+1, D], pre_norm, layers (one `CLIPBlock`, stacked [L, ...]: norm1, q, k, v,
o, norm2, fc1, fc2), post_norm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmjax.config import CLIPVisionConfig
from vlmjax.errors import VlmJaxError
from vlmjax.hooks import Context, SiteRunner
from vlmjax.models.layers import (LayerNorm, Linear, activation, attention, key_rows, scan_stack, vit_block_end,
                                  weight)

_V = "model.vision_tower."
LAYER_KEY_ROWS = (  # the stacked encoder layers (`CLIPBlock`), named alike in SigLIP's towers
    *key_rows(_V + "encoder.layers.{i}.", "vision/layers/", (
        ("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v"), ("self_attn.out_proj", "o"),
        ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"))),
    *key_rows(_V + "encoder.layers.{i}.", "vision/layers/", (("layer_norm1", "norm1"), ("layer_norm2", "norm2")),
              "norm"),
)
KEY_ROWS = (
    (_V + "embeddings.patch_embedding.weight", "vision/patch_embed/kernel", "conv"),
    (_V + "embeddings.class_embedding", "vision/class_embed", "none"),
    (_V + "embeddings.position_embedding.weight", "vision/pos_embed", "none"),
    *key_rows(_V, "vision/", (("pre_layrnorm", "pre_norm"), ("post_layernorm", "post_norm")), "norm"),
    *LAYER_KEY_ROWS,
)


def conv_kernel_shape(cfg) -> tuple[int, ...]:
    """HF's shape [D, C, p, p] of the patch Conv2d of a family whose `cfg.vision` is a `CLIPVisionConfig` (CLIP,
    SigLIP, BLIP-2's ViT)."""
    v = cfg.vision
    return (v.hidden_size, v.num_channels, v.patch_size, v.patch_size)


def checked_pixels(vc: CLIPVisionConfig, pixels, dtype, accepted: str = "") -> np.ndarray:
    """The processor's pixel_values [images, C, S, S] for the tower of `vc`, checked and cast to `dtype`;
    `accepted` says in the error what else the family does not take."""
    pixels = np.asarray(pixels)
    want = (vc.num_channels, vc.image_size, vc.image_size)
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
        raise VlmJaxError(f"pixel_values must have shape [images, {want[0]}, {want[1]}, {want[2]}] for this "
                          f"model{accepted}, got {tuple(pixels.shape)}. Preprocess images with the model's processor.")
    return pixels.astype(np.dtype(dtype))


def patchify(pixel_values: jax.Array, patch: int) -> jax.Array:
    """[I, C, H, W] -> [I, (H/p)*(W/p), C*p*p], patches in row-major grid order, each flattened as (C, p, p)."""
    n, c, h, w = pixel_values.shape
    x = pixel_values.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


class CLIPBlock(nnx.Module):
    """All L encoder layers, parameters stacked [L, ...]; called on one layer's slice (see `scan_stack`). A ViT with
    other attention projections (BLIP-2's fused qkv) overrides `init_attention`, `qkv_heads` and `out_proj`."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        d, i, L = cfg.hidden_size, cfg.intermediate_size, (cfg.num_layers,)
        self.cfg = cfg
        self.norm1 = LayerNorm(d, cfg.layer_norm_eps, layers=L)
        self.init_attention(cfg, rngs)
        self.norm2 = LayerNorm(d, cfg.layer_norm_eps, layers=L)
        self.fc1 = Linear(d, i, layers=L, rngs=rngs)
        self.fc2 = Linear(i, d, layers=L, rngs=rngs)

    def init_attention(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs) -> None:
        d, L = cfg.hidden_size, (cfg.num_layers,)
        self.q, self.k, self.v, self.o = (Linear(d, d, layers=L, rngs=rngs) for _ in range(4))

    def qkv_heads(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys and values [B, N, H, hd] of normed h [B, N, D]."""
        b, n, d = h.shape
        heads = lambda t: t.reshape(b, n, self.cfg.num_heads, d // self.cfg.num_heads)
        return heads(self.q(h)), heads(self.k(h)), heads(self.v(h))

    @property
    def out_proj(self) -> Linear:
        return self.o

    def mlp(self, h: jax.Array, run: SiteRunner) -> jax.Array:
        return self.fc2(run("mlp.hidden", activation(self.cfg.hidden_act)(self.fc1(h))))

    def __call__(self, x: jax.Array, run: SiteRunner) -> jax.Array:
        x = run("resid_pre", x)
        q, k, v = self.qkv_heads(run("attn.input", self.norm1(x)))
        q, k, v = run("attn.q", q), run("attn.k", k), run("attn.v", v)
        z = attention(q, k, v, None, run, q.shape[-1] ** -0.5)
        return vit_block_end(x, z, self.out_proj, self.norm2, self.mlp, run)


class CLIPVision(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.cfg = cfg
        self.patch_embed = Linear(cfg.num_channels * cfg.patch_size**2, d, bias=False, rngs=rngs)
        self.class_embed = weight(rngs, d)
        self.pos_embed = weight(rngs, cfg.num_patches + 1, d)
        self.pre_norm = LayerNorm(d, cfg.layer_norm_eps)
        self.layers = CLIPBlock(cfg, rngs=rngs)
        self.post_norm = LayerNorm(d, cfg.layer_norm_eps)

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        kernel = self.patch_embed.kernel[...]
        patches = patchify(pixel_values.astype(kernel.dtype), self.cfg.patch_size) @ kernel
        cls = jnp.broadcast_to(self.class_embed[...], (patches.shape[0], 1, patches.shape[-1])).astype(kernel.dtype)
        return self.pre_norm(jnp.concatenate([cls, patches], axis=1) + self.pos_embed[...][None])

    def hidden_states_at(self, pixel_values: jax.Array, indices, hooks, site: SiteRunner) -> tuple:
        """The tower's HF `hidden_states[i]` for each i in `indices` (0 = embeddings after pre-norm, l + 1 = output
        of layer l; negative indices count from the end), and the layer records. Layers past the deepest one asked
        for are not run."""
        total = self.cfg.num_layers + 1
        x = site("vision.embed", self.embed(pixel_values))
        ctx = Context(stack="vision.blocks")
        states, records, done = {0: x}, [], 0
        for target in sorted({i % total for i in indices}):
            if target > done:
                x, rec = scan_stack(self.layers, lambda layer, h, run: layer(h, run), x, hooks, ctx, done, target)
                records.append(rec)
                done = target
            states[target] = x
        merged = jax.tree.map(lambda *r: jnp.concatenate(r, axis=0), *records) if len(records) > 1 else (
            records[0] if records else {})
        return tuple(states[i % total] for i in indices), merged
