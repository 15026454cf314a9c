"""CLIP vision transformer (the LLaVA vision tower) as pure functions over a parameter pytree.

Params: patch_embed.kernel [C*p*p, D] (the Conv2d as a matmul on flattened patches, (C, p, p) order), class_embed
[D], pos_embed [P+1, D], pre_norm, layers (stacked [L, ...]: norm1, q, k, v, o, norm2, fc1, fc2), post_norm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlmjax.config import CLIPVisionConfig
from vlmjax.hooks import Context, SiteRunner, scan_layers
from vlmjax.models.layers import activation, attention, layer_norm, linear


def param_shapes(cfg: CLIPVisionConfig) -> dict:
    d, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    lin = lambda n_in, n_out: {"kernel": (L, n_in, n_out), "bias": (L, n_out)}
    norm = lambda *lead: {"scale": (*lead, d), "bias": (*lead, d)}
    return {
        "patch_embed": {"kernel": (cfg.num_channels * cfg.patch_size**2, d)},
        "class_embed": (d,),
        "pos_embed": (cfg.num_patches + 1, d),
        "pre_norm": norm(),
        "layers": {
            "norm1": norm(L), "q": lin(d, d), "k": lin(d, d), "v": lin(d, d), "o": lin(d, d),
            "norm2": norm(L), "fc1": lin(d, i), "fc2": lin(i, d),
        },
        "post_norm": norm(),
    }


def patchify(pixel_values: jax.Array, patch: int) -> jax.Array:
    """[I, C, H, W] -> [I, (H/p)*(W/p), C*p*p], patches in row-major grid order, each flattened as (C, p, p)."""
    n, c, h, w = pixel_values.shape
    x = pixel_values.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


def embed(params: dict, pixel_values: jax.Array, cfg: CLIPVisionConfig) -> jax.Array:
    dtype = params["patch_embed"]["kernel"].dtype
    patches = patchify(pixel_values.astype(dtype), cfg.patch_size) @ params["patch_embed"]["kernel"]
    cls = jnp.broadcast_to(params["class_embed"], (patches.shape[0], 1, patches.shape[-1])).astype(dtype)
    x = jnp.concatenate([cls, patches], axis=1) + params["pos_embed"][None]
    return layer_norm(params["pre_norm"], x, cfg.layer_norm_eps)


def block(cfg: CLIPVisionConfig, p: dict, x: jax.Array, run: SiteRunner) -> jax.Array:
    b, n, d = x.shape
    heads, hd = cfg.num_heads, d // cfg.num_heads
    x = run("resid_pre", x)
    h = run("attn.input", layer_norm(p["norm1"], x, cfg.layer_norm_eps))
    q = run("attn.q", linear(p["q"], h).reshape(b, n, heads, hd))
    k = run("attn.k", linear(p["k"], h).reshape(b, n, heads, hd))
    v = run("attn.v", linear(p["v"], h).reshape(b, n, heads, hd))
    z = attention(q, k, v, None, run, hd**-0.5)
    x = x + run("attn.out", linear(p["o"], z.reshape(b, n, d)))
    x = run("resid_mid", x)
    h = layer_norm(p["norm2"], x, cfg.layer_norm_eps)
    h = run("mlp.hidden", activation(cfg.hidden_act)(linear(p["fc1"], h)))
    x = x + run("mlp.out", linear(p["fc2"], h))
    return run("resid_post", x)


def hidden_states_at(params: dict, pixel_values: jax.Array, cfg: CLIPVisionConfig, indices, hooks, site) -> tuple:
    """The vision tower's HF `hidden_states[i]` for each i in `indices` (0 = embeddings after pre-norm, l + 1 =
    output of layer l; negative indices count from the end). Layers past the deepest one asked for are not run."""
    total = cfg.num_layers + 1
    wanted = sorted({i % total for i in indices})
    x = site("vision.embed", embed(params, pixel_values, cfg))
    ctx = Context(stack="vision.blocks")
    states, records, done = {0: x}, [], 0
    for target in wanted:
        if target > done:
            x, rec = scan_layers(lambda p, h, r: block(cfg, p, h, r), params["layers"], x, hooks, ctx, done, target)
            records.append(rec)
            done = target
        states[target] = x
    merged = jax.tree.map(lambda *r: jnp.concatenate(r, axis=0), *records) if len(records) > 1 else (
        records[0] if records else {})
    return tuple(states[i % total] for i in indices), merged, done
