"""CLIP vision transformer (the LLaVA vision tower) as Flax NNX modules.

Params (`CLIPVision`): patch_embed.kernel [C*p*p, D] (the Conv2d as a matmul on flattened patches, (C, p, p)
order), class_embed [D], pos_embed [P+1, D], pre_norm, layers (one `CLIPBlock`, stacked [L, ...]: norm1, q, k, v,
o, norm2, fc1, fc2), post_norm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlmjax.config import CLIPVisionConfig
from vlmjax.hooks import Context, SiteRunner
from vlmjax.models.layers import LayerNorm, Linear, attention, key_rows, scan_stack, vit_block_end, weight

_V = "model.vision_tower."
KEY_ROWS = (
    (_V + "embeddings.patch_embedding.weight", "vision/patch_embed/kernel", "conv"),
    (_V + "embeddings.class_embedding", "vision/class_embed", "none"),
    (_V + "embeddings.position_embedding.weight", "vision/pos_embed", "none"),
    *key_rows(_V, "vision/", (("pre_layrnorm", "pre_norm"), ("post_layernorm", "post_norm")), "norm"),
    *key_rows(_V + "encoder.layers.{i}.", "vision/layers/", (
        ("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v"), ("self_attn.out_proj", "o"),
        ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"))),
    *key_rows(_V + "encoder.layers.{i}.", "vision/layers/", (("layer_norm1", "norm1"), ("layer_norm2", "norm2")),
              "norm"),
)


def patchify(pixel_values: jax.Array, patch: int) -> jax.Array:
    """[I, C, H, W] -> [I, (H/p)*(W/p), C*p*p], patches in row-major grid order, each flattened as (C, p, p)."""
    n, c, h, w = pixel_values.shape
    x = pixel_values.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


class CLIPBlock(nnx.Module):
    """All L encoder layers, parameters stacked [L, ...]; called on one layer's slice (see `scan_stack`)."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        d, i, L = cfg.hidden_size, cfg.intermediate_size, (cfg.num_layers,)
        self.cfg = cfg
        self.norm1 = LayerNorm(d, cfg.layer_norm_eps, layers=L)
        self.q, self.k, self.v, self.o = (Linear(d, d, layers=L, rngs=rngs) for _ in range(4))
        self.norm2 = LayerNorm(d, cfg.layer_norm_eps, layers=L)
        self.fc1 = Linear(d, i, layers=L, rngs=rngs)
        self.fc2 = Linear(i, d, layers=L, rngs=rngs)

    def __call__(self, x: jax.Array, run: SiteRunner) -> jax.Array:
        b, n, d = x.shape
        heads = self.cfg.num_heads
        x = run("resid_pre", x)
        h = run("attn.input", self.norm1(x))
        q = run("attn.q", self.q(h).reshape(b, n, heads, d // heads))
        k = run("attn.k", self.k(h).reshape(b, n, heads, d // heads))
        v = run("attn.v", self.v(h).reshape(b, n, heads, d // heads))
        z = attention(q, k, v, None, run, (d // heads) ** -0.5)
        return vit_block_end(x, z, self.o, self.norm2, self.fc1, self.fc2, self.cfg.hidden_act, run)


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
