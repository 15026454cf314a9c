"""Primitives shared by every model file: the parameter-holding Flax modules (`Linear`, `RMSNorm`, `LayerNorm`; with
`layers=(L,)` their parameters carry a leading layer axis, for a block module that holds every layer), `scan_stack`
(runs such a block under the hooks' layer scan), activations, rotary embeddings, masks, attention with sites, and
`key_rows` (HF key-table rows of those modules).

Numerics follow the HF PyTorch reference exactly where it matters for fp32 parity: RMSNorm in fp32 then cast before
the weight, softmax in fp32 then cast to the compute dtype, masks added as finfo.min (never -inf), rotary tables in
fp32 cast to the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmjax.config import RopeConfig
from vlmjax.errors import VlmJaxError
from vlmjax.hooks import SiteRunner, scan_layers

INIT_STD = 0.02  # HF's initializer_range: normal(0, 0.02) matrices and embeddings, zero biases, unit norm scales


def weight(rngs: nnx.Rngs, *shape: int) -> nnx.Param:
    """A matrix or embedding parameter, initialised normal(0, INIT_STD)."""
    return nnx.Param(INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32))


def constant(value: float, *shape: int) -> nnx.Param:
    return nnx.Param(jnp.full(shape, value, jnp.float32))


class Linear(nnx.Module):
    """x @ kernel (+ bias): kernel [*layers, in, out], bias [*layers, out] (`layers` = (L,) in a stacked block)."""

    def __init__(self, n_in: int, n_out: int, *, bias: bool = True, layers: tuple[int, ...] = (), rngs: nnx.Rngs):
        self.kernel = weight(rngs, *layers, n_in, n_out)
        self.bias = constant(0.0, *layers, n_out) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...]
        return y if self.bias is None else y + self.bias[...]


class RMSNorm(nnx.Module):
    """`offset` 1.0 is Gemma's norm: the weight w scales by (1 + w), initialised at w = 0 (see `rms_norm`)."""

    def __init__(self, dim: int, eps: float, *, offset: float = 0.0, layers: tuple[int, ...] = ()):
        self.scale, self.eps, self.offset = constant(1.0 - offset, *layers, dim), eps, offset

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm({"scale": self.scale[...]}, x, self.eps, self.offset)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, layers: tuple[int, ...] = ()):
        self.scale, self.bias, self.eps = constant(1.0, *layers, dim), constant(0.0, *layers, dim), eps

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        return (h * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(dtype)


def vit_block_end(x, z, out_proj: Linear, norm2: nnx.Module, mlp, run) -> jax.Array:
    """A pre-norm ViT block after attention (CLIP's and the Qwen2-VL family's towers): the attention update (z
    [B, N, H, hd] projected), then the MLP update `mlp(norm2(x), run)` (which calls the `mlp.hidden` site), with
    their sites."""
    b, n = x.shape[:2]
    x = run("resid_mid", x + run("attn.out", out_proj(z.reshape(b, n, -1))))
    return run("resid_post", x + run("mlp.out", mlp(norm2(x), run)))


def scan_stack(blocks: nnx.Module, call, x, hooks, ctx, start: int, stop: int):
    """Layers [start, stop) of a stacked block module under the hooks' layer scan: (x, records stacked per layer).

    `blocks` holds every layer's parameters with a leading [L] axis. Its state is split off once and sliced by the
    scan; each step merges one layer's slice back into the module (`nnx.merge`) and runs `call(layer, x, run)`,
    so the compiled program holds one block whatever the depth."""
    graph, state = nnx.split(blocks)
    return scan_layers(lambda p, h, run: call(nnx.merge(graph, p), h, run), state, x, hooks, ctx, start, stop)


def rms_norm(p: dict, x: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """Llama's RMSNorm (normalised in fp32, cast, then scaled), or with `offset` Gemma's: scaled by (offset + w) in
    fp32, then cast."""
    dtype = x.dtype
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    if offset:
        return (h * (offset + p["scale"].astype(jnp.float32))).astype(dtype)
    return p["scale"] * h.astype(dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's logit soft-capping, cap * tanh(x / cap) (x unchanged when cap is None)."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": _quick_gelu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise VlmJaxError(f"Unsupported activation {name!r}; vlmjax knows {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies in float32, computed as HF does (so the tables agree to the last bit where possible)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / np.float32(rope.factor)
    elif rope.rope_type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(inv_freq: np.ndarray, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, N, head_dim] for integer positions [B, N] (fp32 math, cast to the compute dtype)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, N, H, hd]; cos/sin [B, N, hd]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def additive_mask(allowed: jax.Array, dtype) -> jax.Array:
    """0 where allowed, finfo(dtype).min elsewhere (as HF eager attention; -inf would give NaN on empty rows)."""
    return jnp.where(allowed, jnp.zeros((), dtype), jnp.finfo(dtype).min)


def causal_allowed(
    key_padding: jax.Array, num_queries: int, sliding_window: int | None = None, query_offset: int | jax.Array = 0
) -> jax.Array:
    """[B, 1, Nq, Nk] bool: key j visible to query i (absolute index i + offset) under causality, window, padding."""
    nk = key_padding.shape[-1]
    q_idx = jnp.arange(num_queries)[:, None] + query_offset
    k_idx = jnp.arange(nk)[None, :]
    allowed = k_idx <= q_idx
    if sliding_window is not None:
        allowed = allowed & (k_idx > q_idx - sliding_window)
    return allowed[None, None] & key_padding[:, None, None, :].astype(bool)


QUERY_BLOCK_BYTES = 4 << 20  # the scores of one query block in blocked attention on a CPU (L3-sized blocks won)


def attention(q, k, v, mask_add, site, scale: float, logit_cap: float | None = None):
    """Scaled dot-product attention exposing the canonical sites.

    q [B, Nq, H, hd], k/v [B, Nk, KVH, hd] (grouped-query heads are shared by H // KVH query heads),
    mask_add broadcastable to [B, H, Nq, Nk] or None; `logit_cap` soft-caps the scaled scores before the mask
    (Gemma 2). Sites: attn.scores (pre-softmax, after the mask),
    attn.pattern (post-softmax), attn.z (per-head mixed values [B, Nq, H, hd]).

    On the CPU backend, when every hook on the stack allows it (`Hook.query_blocks`) and the scores exceed
    QUERY_BLOCK_BYTES, the queries run in blocks of rows under `jax.lax.map`: each block's scores and pattern stay
    in cache instead of a [B, H, Nq, Nk] tensor going through memory three times (the attention is memory-bound on
    a CPU; a GPU's or TPU's memory makes that traffic cheap, and a loop over blocks would only serialise the
    work). The values are the same; the hooks see each block's rows at the two sites (`vlmjax.hooks.query_rows`).
    `site` is the block's SiteRunner, or a function (name, value) -> value (that attention never runs in blocks).
    """
    heads, kv_heads = q.shape[2], k.shape[2]
    if kv_heads != heads:
        k = jnp.repeat(k, heads // kv_heads, axis=2)
        v = jnp.repeat(v, heads // kv_heads, axis=2)
    # Heads-major [B, H, N, hd] operands: on XLA:CPU this attention runs ~20% faster than on [B, N, H, hd] ones.
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    b, h, nq, nk = *q.shape[:3], k.shape[2]
    rows = max(8, QUERY_BLOCK_BYTES // (b * h * nk * jnp.dtype(q.dtype).itemsize))
    if nq <= rows or jax.default_backend() != "cpu" or not isinstance(site, SiteRunner) or not site.query_blocks():
        return site("attn.z", _attention_rows(q, k, v, mask_add, site, scale, logit_cap).transpose(0, 2, 1, 3))
    blocks = -(-nq // rows)
    rows = -(-nq // blocks)  # the same number of blocks, the least padding
    q = jnp.pad(q, ((0, 0), (0, 0), (0, blocks * rows - nq), (0, 0)))
    if mask_add is not None and mask_add.shape[2] != 1:
        mask_add = jnp.pad(mask_add, ((0, 0), (0, 0), (0, blocks * rows - nq), (0, 0)))

    def one_block(start):
        q_rows = jax.lax.dynamic_slice_in_dim(q, start, rows, axis=2)
        mask_rows = mask_add if mask_add is None or mask_add.shape[2] == 1 else (
            jax.lax.dynamic_slice_in_dim(mask_add, start, rows, axis=2))
        block = site.query_block(start)
        return _attention_rows(q_rows, k, v, mask_rows, block, scale, logit_cap), block.records

    z, records = jax.lax.map(one_block, jnp.arange(blocks, dtype=jnp.int32) * rows)
    site.finish_query_blocks(records)
    z = z.transpose(1, 0, 3, 2, 4).reshape(b, blocks * rows, h, -1)[:, :nq]
    return site("attn.z", z)


def _attention_rows(q, k, v, mask_add, site, scale: float, logit_cap: float | None):
    """z [B, H, Nq, hd] of heads-major q [B, H, Nq, hd] (all queries, or a block), with the attention sites."""
    scores = softcap(jnp.einsum("bhqd,bhkd->bhqk", q, k) * jnp.asarray(scale, q.dtype), logit_cap)
    if mask_add is not None:
        scores = scores + mask_add
    scores = site("attn.scores", scores)
    pattern = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    pattern = site("attn.pattern", pattern)
    return jnp.einsum("bhqk,bhkd->bhqd", pattern, v)


def key_rows(hf_prefix: str, ours_prefix: str, names, kind: str = "linear", biases: bool = True) -> tuple:
    """HF key-table rows (see converters/keymaps.py) of `Linear`s (kind "linear": weight -> kernel, transposed) or
    norms ("norm": weight -> scale), each `(hf name, our name)` in `names`, with their biases."""
    ours = "kernel" if kind == "linear" else "scale"
    return tuple(
        (f"{hf_prefix}{hf}.{w}", f"{ours_prefix}{name}/{ours if w == 'weight' else 'bias'}",
         kind if kind == "linear" and w == "weight" else "none")
        for hf, name in names for w in (("weight", "bias") if biases else ("weight",))
    )
