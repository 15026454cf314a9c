"""Interventions on the forward pass as hooks (methods §1-§6), and input transforms for null / noised images.

Every intervention is a `Hook` (see `vlmjax.hooks`): its continuous parameters are traced array fields (one compiled
forward serves every value: sweeps under `jax.vmap`, gradients with respect to them), per-layer parameters carry a
leading [num_layers] axis (listed in `per_layer`), and it is built with a constructor helper that checks layer and
head indices, e.g. `AttentionBias.on_layers(num_layers, range(8, 17), bias=2.0)`. Pass interventions (and metrics
from `vlmjax.probes`) in `hooks={...}`; they run in the mapping's order, each on the value the previous one returned.
At its identity setting (bias 0, keep 1, scale 1, no layer active) every intervention leaves the forward
bit-identical. What needs the batch (an image in every sample, token masks of the batch's shape) is checked on the
host by each hook's `validate(meta, name)`, which `model(...)` calls before anything is traced.

Conventions shared with the model: the additive attention mask puts disallowed scores at finfo.min (never -inf), so
a score below finfo.min / 2 is one the mask (or an earlier hook) ruled out; blocking a score sets it to finfo.min.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from vlmjax.errors import VlmJaxError
from vlmjax.hooks import ATTENTION_SITES, BLOCK_SITES, Hook, query_rows
from vlmjax.metrics import grid_to_visual_map, top_fraction_mask, visual_map_to_grid

RESIDUAL_SITES = ("resid_pre", "resid_mid", "resid_post")
QKV_SITES = ("attn.q", "attn.k", "attn.v")


# ---------------------------------------------------------------------------------------------------------------------
# Host-side helpers


def layer_flags(num_layers: int, layers: int | Iterable[int] | None) -> np.ndarray:
    """[num_layers] bool, True at `layers` (an int, an iterable, or None for every layer); clear error out of range."""
    if layers is None:
        return np.ones(num_layers, bool)
    layers = [layers] if isinstance(layers, (int, np.integer)) else list(layers)
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise VlmJaxError(f"Layer index {bad[0]} out of range: this stack has layers 0..{num_layers - 1}.")
    flags = np.zeros(num_layers, bool)
    flags[layers] = True
    return flags


def _blocked(value: jax.Array) -> jax.Array:
    return jnp.asarray(jnp.finfo(value.dtype).min, value.dtype)


def _allowed(scores: jax.Array) -> jax.Array:
    """Scores the additive mask (or an earlier hook) has not set to finfo.min."""
    return scores > jnp.finfo(scores.dtype).min / 2


def _token_mask_like(mask: jax.Array, value: jax.Array, site: str) -> jax.Array:
    """A per-token [B, N] mask shaped to broadcast against a site's value: query rows of attention sites
    ([B, 1, N, 1]), the token axis 1 of every other block site ([B, N, 1, ...])."""
    if site in ATTENTION_SITES:
        return mask[:, None, :, None]
    return mask.reshape(mask.shape + (1,) * (value.ndim - 2))


def _decode_step(value: jax.Array, token_mask: jax.Array) -> bool:
    """True in a cached decode step (`vlmjax.generate`): the value holds the new token only while the token mask
    covers the whole cache. The new token is never a visual one, so hidden-state edits of visual tokens leave it be
    (they acted on the prompt in prefill, and the cache holds their effect)."""
    return value.shape[1] != token_mask.shape[1]


def _require_visual(meta, name: str) -> None:
    empty = np.flatnonzero(~np.asarray(meta.mask).any(1))
    if empty.size:
        raise VlmJaxError(f"Hook {name!r} acts on visual tokens, but sample(s) {empty.tolist()} of this batch have "
                          "none (a text-only prompt?). Give every sample an image, or leave those samples out.")


def _require_token_mask(mask, meta, name: str, visual_only: bool) -> None:
    mask = np.asarray(mask)
    if mask.shape != np.asarray(meta.mask).shape:
        raise VlmJaxError(f"Hook {name!r}: token mask has shape {mask.shape} but the batch is "
                          f"{np.asarray(meta.mask).shape} (samples, tokens).")
    if visual_only and (mask & ~np.asarray(meta.mask)).any():
        b, n = np.argwhere(mask & ~np.asarray(meta.mask))[0]
        raise VlmJaxError(f"Hook {name!r}: the token mask selects position {n} of sample {b}, which is not a visual "
                          "token. Build the mask from the visual metadata (`model.prepare(inputs)[1]`).")


# ---------------------------------------------------------------------------------------------------------------------
# Base class


class Intervention(Hook):
    """A hook that changes the forward pass. `validate(meta, name)` checks it against a batch on the host."""

    def validate(self, meta, name: str) -> None:
        """Raise a VlmJaxError if this intervention cannot apply to the batch described by `meta` (VisualTokens)."""


# ---------------------------------------------------------------------------------------------------------------------
# Attention scores


class AttentionBias(Intervention):
    """VIAR (methods §1): add `bias[l]` to the pre-softmax scores of every query at visual keys, at each layer l.

    `first_columns` (compatibility option, static): add it to the first K key columns whatever they hold, as the
    original VIAR code did with K = 576; use only to reproduce a published number. Site: attn.scores."""

    per_layer = ("bias",)
    query_blocks: ClassVar[bool] = True
    bias: Any  # [L] float, 0 where the layer is untouched
    first_columns: int | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def on_layers(cls, num_layers: int, layers=range(8, 17), bias: float = 2.0, first_columns: int | None = None):
        """VIAR's defaults: b = 2.0 on layers 8-16 (LLaVA-1.5-7B's neglect zone)."""
        return cls(jnp.asarray(np.where(layer_flags(num_layers, layers), bias, 0.0), jnp.float32), first_columns)

    def __call__(self, site, value, ctx):
        if site != "attn.scores":
            return value, None
        if self.first_columns is None:
            keys = ctx.visual_mask
        else:
            keys = jnp.broadcast_to(jnp.arange(value.shape[-1]) < self.first_columns, ctx.visual_mask.shape)
        bias = jnp.where(keys, self.bias, 0).astype(value.dtype)
        return value + bias[:, None, None, :], None

    def validate(self, meta, name):
        if self.first_columns is None:
            _require_visual(meta, name)


class BlockTextToVisual(Intervention):
    """Block text-to-visual attention (methods §2 masking): at active layers, every non-visual query's scores at visual
    keys are set to finfo.min. Site: attn.scores."""

    per_layer = ("active",)
    query_blocks: ClassVar[bool] = True
    active: Any  # [L] bool

    @classmethod
    def on_layers(cls, num_layers: int, layers):
        return cls(jnp.asarray(layer_flags(num_layers, layers)))

    def __call__(self, site, value, ctx):
        if site != "attn.scores":
            return value, None
        visual_queries = query_rows(ctx, ctx.visual_mask, value.shape[2])
        blocked = self.active & ~visual_queries[:, None, :, None] & ctx.visual_mask[:, None, None, :]
        return jnp.where(blocked, _blocked(value), value), None

    def validate(self, meta, name):
        _require_visual(meta, name)


class RemoveVisualTokens(Intervention):
    """Remove chosen visual tokens from attention (methods §5): at active layers (default: all) their key columns are set
    to finfo.min for every query, so no token reads from them. Site: attn.scores."""

    per_layer = ("active",)
    query_blocks: ClassVar[bool] = True
    token_mask: Any  # [B, N] bool, the visual tokens to remove
    active: Any  # [L] bool

    @classmethod
    def from_mask(cls, num_layers: int, token_mask, layers=None):
        return cls(jnp.asarray(token_mask, bool), jnp.asarray(layer_flags(num_layers, layers)))

    @classmethod
    def top_attended(cls, num_layers: int, visual_map, meta, fraction: float = 0.3, layers=None):
        """The top `fraction` of each sample's patches by a visual attention map [B, N] (e.g. a
        `vlmjax.probes.LastQueryVisualMap` record of one layer), as methods §5's top-30% masking. One image per
        sample; the patches of its own grid (`VisualTokens.single_patch_grid`)."""
        rows, cols, grid = meta.single_patch_grid("RemoveVisualTokens.top_attended")
        cells = np.asarray(visual_map_to_grid(jnp.asarray(visual_map), rows, cols, grid))
        top = top_fraction_mask(cells, fraction)
        mask = np.asarray(grid_to_visual_map(top.astype(np.float32), rows, cols)) > 0
        return cls.from_mask(num_layers, mask, layers)

    def __call__(self, site, value, ctx):
        if site != "attn.scores":
            return value, None
        removed = self.active & self.token_mask[:, None, None, :]
        return jnp.where(removed, _blocked(value), value), None

    def validate(self, meta, name):
        _require_visual(meta, name)
        _require_token_mask(self.token_mask, meta, name, visual_only=True)


HEAD_MASK_MODES = ("uniform", "zero_output")


class HeadMask(Intervention):
    """Head masking (methods §4) with a traced keep mask [L, H] (1 = keep, 0 = masked; values in between interpolate
    `keep * x + (1 - keep) * masked`, so d output / d keep is a head attribution).

    mode "uniform" (the original code's convention): the head's allowed scores are set to 0 after the causal mask
    (masked entries stay at finfo.min), so it attends uniformly to the keys it may see. Site: attn.scores.
    mode "zero_output": the head's mixed values are zeroed. Site: attn.z."""

    per_layer = ("keep",)
    query_blocks: ClassVar[bool] = True
    keep: Any  # [L, H] float
    mode: str = struct.field(pytree_node=False, default="uniform")

    @classmethod
    def heads(cls, num_layers: int, num_heads: int, heads: Iterable[tuple[int, int]] = (), mode: str = "uniform"):
        """Mask the listed (layer, head) pairs; with no heads, the identity (keep = 1), e.g. for attribution."""
        if mode not in HEAD_MASK_MODES:
            raise VlmJaxError(f"HeadMask mode must be one of {HEAD_MASK_MODES}, got {mode!r}.")
        keep = np.ones((num_layers, num_heads), np.float32)
        for layer, head in heads:
            layer_flags(num_layers, layer)
            if not 0 <= head < num_heads:
                raise VlmJaxError(f"Head index {head} out of range at layer {layer}: heads are 0..{num_heads - 1}.")
            keep[layer, head] = 0.0
        return cls(jnp.asarray(keep), mode)

    def __call__(self, site, value, ctx):
        if self.mode == "uniform" and site == "attn.scores":
            keep = self.keep.astype(value.dtype)[None, :, None, None]
            uniform = jnp.where(_allowed(value), jnp.zeros((), value.dtype), value)
            return keep * value + (1 - keep) * uniform, None
        if self.mode == "zero_output" and site == "attn.z":
            return value * self.keep.astype(value.dtype)[None, None, :, None], None
        return value, None


# ---------------------------------------------------------------------------------------------------------------------
# Hidden states


class ZeroVisualStates(Intervention):
    """Layer-wise visual masking (methods §2): the hidden states at visual positions are set to zero at the input of each
    active layer (usually one). Site: resid_pre."""

    per_layer = ("active",)
    query_blocks: ClassVar[bool] = True
    active: Any  # [L] bool

    @classmethod
    def at_layers(cls, num_layers: int, layers):
        return cls(jnp.asarray(layer_flags(num_layers, layers)))

    def __call__(self, site, value, ctx):
        if site != "resid_pre" or _decode_step(value, ctx.visual_mask):
            return value, None
        return jnp.where(self.active & ctx.visual_mask[..., None], jnp.zeros((), value.dtype), value), None

    def validate(self, meta, name):
        _require_visual(meta, name)


class ScaleVisualStates(Intervention):
    """Soft mask (methods §2): the hidden states of chosen visual tokens are multiplied by `scale` at the input of each
    active layer (the review layer in the paper; scale 0.5 by default [inferred]). Site: resid_pre."""

    per_layer = ("active",)
    query_blocks: ClassVar[bool] = True
    token_mask: Any  # [B, N] bool
    scale: Any  # scalar float
    active: Any  # [L] bool

    @classmethod
    def at_layers(cls, num_layers: int, layers, token_mask, scale: float = 0.5):
        return cls(jnp.asarray(token_mask, bool), jnp.asarray(scale, jnp.float32),
                   jnp.asarray(layer_flags(num_layers, layers)))

    def __call__(self, site, value, ctx):
        if site != "resid_pre" or _decode_step(value, self.token_mask):
            return value, None
        factor = jnp.where(self.active & self.token_mask, self.scale, 1).astype(value.dtype)
        return value * factor[..., None], None

    def validate(self, meta, name):
        _require_visual(meta, name)
        _require_token_mask(self.token_mask, meta, name, visual_only=True)


ABLATION_SITES = ("mlp.hidden", *RESIDUAL_SITES)


class NeuronAblation(Intervention):
    """Neuron ablation (methods §5): `keep * x + (1 - keep) * replacement` on the last axis of a site, at every position.
    keep [L, W] is 1 for untouched units; replacement is 0 (zero ablation) or a mean activation (mean ablation).
    Sites: mlp.hidden (MLP neurons, W = intermediate size) or a residual site (residual dims, W = hidden size)."""

    per_layer = ("keep", "replacement")
    query_blocks: ClassVar[bool] = True
    keep: Any  # [L, W] float
    replacement: Any  # [L, W] float
    site: str = struct.field(pytree_node=False, default="mlp.hidden")

    @classmethod
    def zero(cls, num_layers: int, width: int, neurons: Mapping[int, Iterable[int]], site: str = "mlp.hidden"):
        """Zero the units `neurons[layer]` at each listed layer, e.g. `{20: [5, 17, 99]}`."""
        return cls.mean(num_layers, neurons, np.zeros((num_layers, width), np.float32), site)

    @classmethod
    def mean(cls, num_layers: int, neurons: Mapping[int, Iterable[int]], means, site: str = "mlp.hidden"):
        """Replace the units `neurons[layer]` by their mean activation `means[layer]` ([L, W], e.g. averaged over a
        dataset from a capture of the site)."""
        if site not in ABLATION_SITES:
            raise VlmJaxError(f"NeuronAblation site must be one of {ABLATION_SITES}, got {site!r}.")
        means = np.asarray(means, np.float32)
        if means.ndim != 2 or means.shape[0] != num_layers:
            raise VlmJaxError(f"means must have shape [{num_layers}, width], got {means.shape}.")
        keep = np.ones(means.shape, np.float32)
        for layer, units in neurons.items():
            layer_flags(num_layers, layer)
            units = list(units)
            bad = [u for u in units if not 0 <= u < means.shape[1]]
            if bad:
                raise VlmJaxError(f"Unit index {bad[0]} out of range at layer {layer}: {site} has units "
                                  f"0..{means.shape[1] - 1}.")
            keep[layer, units] = 0.0
        return cls(jnp.asarray(keep), jnp.asarray(means), site)

    def __call__(self, site, value, ctx):
        if site != self.site:
            return value, None
        keep = self.keep.astype(value.dtype)
        return keep * value + (1 - keep) * self.replacement.astype(value.dtype), None


class ActivationPatch(Intervention):
    """Activation patching: at active layers and chosen positions, a block site's value is replaced by the one of
    another run (`source` [L, B, N, ...], e.g. a `Capture` of resid_post from a clean run), per sample. For
    attn.scores / attn.pattern the positions select query rows."""

    per_layer = ("source", "active")
    source: Any  # [L, B, N, ...] (attention sites: [L, B, H, N, N])
    positions: Any  # [B, N] bool
    active: Any  # [L] bool
    site: str = struct.field(pytree_node=False, default="resid_post")

    @property
    def query_blocks(self) -> bool:
        return self.site not in ATTENTION_SITES  # its source holds the whole pattern

    @classmethod
    def from_capture(cls, source, layers, positions, site: str = "resid_post"):
        """`source` holds the site's values at every layer, as a capture of that site returns them."""
        if site not in BLOCK_SITES:
            raise VlmJaxError(f"ActivationPatch patches a block site, one of {BLOCK_SITES}; got {site!r}.")
        source = jnp.asarray(source)
        return cls(source, jnp.asarray(positions, bool), jnp.asarray(layer_flags(source.shape[0], layers)), site)

    def __call__(self, site, value, ctx):
        if site != self.site:
            return value, None
        if self.source.shape != value.shape:
            raise VlmJaxError(f"ActivationPatch at {site}: source has shape {self.source.shape} per layer but the "
                              f"run has {value.shape}; capture the source on a batch of the same shape.")
        where = self.active & _token_mask_like(self.positions, value, site)
        return jnp.where(where, self.source.astype(value.dtype), value), None

    def validate(self, meta, name):
        _require_token_mask(self.positions, meta, name, visual_only=False)


# ---------------------------------------------------------------------------------------------------------------------
# Noise substitution (methods §3)


NOISE_SCOPES = ("all", "visual", "visual_keys")


def _check_scope(scope: str) -> str:
    if scope not in NOISE_SCOPES:
        raise VlmJaxError(f"Noise scope must be one of {NOISE_SCOPES} (every position, the visual query positions, "
                          f"the attention to visual keys), got {scope!r}.")
    return scope


def _scope(ctx, scope: str):
    """[B, N] bool: the positions a noise substitution touches (every one, or the visual ones)."""
    return jnp.ones_like(ctx.visual_mask) if scope == "all" else ctx.visual_mask


class NoiseAttentionOutput(Intervention):
    """Noise-Δ (methods §3): at active layers the attention update is replaced by Gaussian noise of its own RMS
    [inferred scale], in one of three scopes (static `scope`):
    - "all": the update (attn.out) of every position -> N(0, rms_t^2), rms_t its per-token RMS;
    - "visual": the same at the visual query positions only;
    - "visual_keys": what every query reads from the visual keys: in each head's mixed values (attn.z),
      `z_V = sum_{j in V} A[h, i, j] v_j` is replaced by noise of its per-(token, head) RMS, the rest of z kept.
    The noise of layer l is drawn from `fold_in(key, l)` (see `noise`). Sites: attn.out, or attn.z for
    "visual_keys" (which reads attn.pattern and attn.v earlier in the block)."""

    per_layer = ("active",)
    key: Any  # a jax.random key
    active: Any  # [L] bool
    scope: str = struct.field(pytree_node=False, default="all")

    @property
    def query_blocks(self) -> bool:
        return self.scope != "visual_keys"  # which reads the whole pattern

    @classmethod
    def on_layers(cls, num_layers: int, key, layers=None, scope: str = "all"):
        return cls(key, jnp.asarray(layer_flags(num_layers, layers)), _check_scope(scope))

    def noise(self, layer, shape) -> jax.Array:
        """The standard normal draw of a layer, float32 of `shape` (attn.out's [B, N, D]; attn.z's [B, N, H, hd])."""
        return jax.random.normal(jax.random.fold_in(self.key, layer), shape, jnp.float32)

    def __call__(self, site, value, ctx):
        if site != ("attn.z" if self.scope == "visual_keys" else "attn.out"):
            return value, None

        def substitute(value):
            if self.scope == "visual_keys":
                return self._visual_keys(value, ctx)
            h = value.astype(jnp.float32)
            rms = jnp.sqrt(jnp.mean(h * h, axis=-1, keepdims=True))
            noisy = (self.noise(ctx.layer, value.shape) * rms).astype(value.dtype)
            return jnp.where(_scope(ctx, self.scope)[..., None], noisy, value)

        return jax.lax.cond(self.active, substitute, lambda value: value, value), None

    def _visual_keys(self, z, ctx):
        pattern, v = ctx.earlier["attn.pattern"], ctx.earlier["attn.v"]  # [B, H, Nq, Nk], [B, Nk, KVH, hd]
        v = jnp.repeat(v, z.shape[2] // v.shape[2], axis=2).astype(jnp.float32)
        visual = jnp.einsum("bhqk,bkhd->bqhd", pattern.astype(jnp.float32) * ctx.visual_mask[:, None, None, :], v)
        rms = jnp.sqrt(jnp.mean(visual * visual, axis=-1, keepdims=True))
        return (z.astype(jnp.float32) - visual + self.noise(ctx.layer, z.shape) * rms).astype(z.dtype)

    def validate(self, meta, name):
        if self.scope != "all":
            _require_visual(meta, name)


class NoiseQKV(Intervention):
    """Noise-QKV (methods §3): at active layers the query, key and value projections use Gaussian weights with each
    original matrix's std [inferred] (biases kept), applied to the block's normed input (`ctx.earlier["attn.input"]`),
    in one of three scopes (static `scope`): "all" positions; "visual": q, k and v of the visual positions (the
    visual tokens' own projections); "visual_keys": k and v of the visual positions only, queries kept, so every
    query reads the image through noise keys and values. The weights are drawn inside the forward, at active layers
    only (`lax.cond`), from `fold_in(fold_in(key, l), m)`, m = 0, 1, 2 for q, k, v (see `kernel`), so nothing of the
    model's size is stored. Sites: attn.q, attn.k, attn.v."""

    per_layer = ("std", "q_bias", "k_bias", "v_bias", "active")
    query_blocks: ClassVar[bool] = True
    key: Any  # a jax.random key
    std: Any  # [L, 3] float: std of W_q, W_k, W_v per layer
    q_bias: Any  # [L, H * hd] (zeros for a model without q/k/v biases)
    k_bias: Any  # [L, KVH * hd]
    v_bias: Any  # [L, KVH * hd]
    active: Any  # [L] bool
    scope: str = struct.field(pytree_node=False, default="all")

    @classmethod
    def from_params(cls, text_params: dict, key, layers=None, scope: str = "all"):
        """From the decoder's params (`model.params["text"]` for LLaVA): per-matrix stds and biases of every layer."""
        layer_params = text_params["layers"]
        num_layers = layer_params["q"]["kernel"].shape[0]
        std = jnp.stack([jnp.std(layer_params[m]["kernel"].astype(jnp.float32), axis=(1, 2)) for m in "qkv"], -1)
        biases = [layer_params[m].get("bias", jnp.zeros((num_layers, layer_params[m]["kernel"].shape[-1])))
                  for m in "qkv"]
        return cls(key, std, *biases, jnp.asarray(layer_flags(num_layers, layers)), _check_scope(scope))

    def kernel(self, layer, which: int, shape, std) -> jax.Array:
        """The Gaussian kernel [D, out] (float32) replacing projection `which` (0 q, 1 k, 2 v) at `layer`."""
        key = jax.random.fold_in(jax.random.fold_in(self.key, layer), which)
        return jax.random.normal(key, shape, jnp.float32) * std

    def __call__(self, site, value, ctx):
        if site not in QKV_SITES or (self.scope == "visual_keys" and site == "attn.q"):
            return value, None
        which = QKV_SITES.index(site)

        def substitute(value):
            h = ctx.earlier["attn.input"]
            shape = (h.shape[-1], value.shape[2] * value.shape[3])
            kernel = self.kernel(ctx.layer, which, shape, self.std[which]).astype(value.dtype)
            bias = (self.q_bias, self.k_bias, self.v_bias)[which].astype(value.dtype)
            noisy = (h @ kernel + bias).reshape(value.shape)
            return jnp.where(_scope(ctx, self.scope)[..., None, None], noisy, value)

        return jax.lax.cond(self.active, substitute, lambda value: value, value), None

    def validate(self, meta, name):
        if self.scope != "all":
            _require_visual(meta, name)


# ---------------------------------------------------------------------------------------------------------------------
# Input transforms (methods §1 null image, methods §6 VCD)

NULL_IMAGE_LEVELS = {"black": 0.0, "gray": 128 / 255}  # pixel intensity in [0, 1], as the processor rescales uint8


def null_image(pixel_values, kind: str, mean, std) -> jax.Array:
    """A replacement image of the same shape, already normalised as the processor would: every pixel at the level of
    `kind` ("black": 0, the methods §1 null image; "gray": uint8 128), `(level - mean) / std` per channel. Takes every
    family's layout: images [B, C, H, W], crops [B, P, C, H, W] (LLaVA-NeXT; channels third from last) and packed
    patches [P, C * T * p * p] (Qwen2-VL; each patch's values channel-major, so the channel is the leading factor)."""
    if kind not in NULL_IMAGE_LEVELS:
        raise VlmJaxError(f"Null image kind must be one of {sorted(NULL_IMAGE_LEVELS)}, got {kind!r}.")
    pixel_values = jnp.asarray(pixel_values)
    mean, std = jnp.asarray(mean, jnp.float32).reshape(-1), jnp.asarray(std, jnp.float32).reshape(-1)
    if mean.shape != std.shape:
        raise VlmJaxError(f"mean and std need one value per channel each, got {mean.shape[0]} and {std.shape[0]}.")
    level = (NULL_IMAGE_LEVELS[kind] - mean) / std  # [C]
    if pixel_values.ndim == 2:
        if pixel_values.shape[1] % level.shape[0]:
            raise VlmJaxError(f"Packed patches of width {pixel_values.shape[1]} do not split into {level.shape[0]} "
                              "channels. Use the processor's image_mean / image_std.")
        per_channel = pixel_values.shape[1] // level.shape[0]
        return jnp.broadcast_to(jnp.repeat(level, per_channel), pixel_values.shape).astype(pixel_values.dtype)
    if pixel_values.ndim < 4 or pixel_values.shape[-3] != level.shape[0]:
        raise VlmJaxError(f"mean and std need one value per channel: pixel_values of shape {pixel_values.shape} "
                          f"(channels third from last, or packed patches [P, C*T*p*p]) against {level.shape[0]} "
                          "values. Use the processor's image_mean / image_std.")
    return jnp.broadcast_to(level[:, None, None], pixel_values.shape).astype(pixel_values.dtype)


VCD_STEPS = 1000


def vcd_noise(pixel_values, key, step: int = 500, packed_layout: tuple[int, int] | None = None) -> jax.Array:
    """VCD's distorted image (methods §6): `sqrt(abar_t) x + sqrt(1 - abar_t) eps` on the normalised pixels, with
    `beta = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5`, `abar = cumprod(1 - beta)`, t = `step` (0-based,
    as VCD indexes its tables), eps standard normal from `key`. The schedule is computed in float64 (VCD's float32
    torch.cumprod is off by ~3e-7 relative at t = 500).

    Packed patches [P, C * T * p * p] (Qwen2-VL) need `packed_layout` = (C, T) (the vision config's in_channels and
    temporal_patch_size): a still image's patch holds its frame T times, and every copy gets the same noise, as
    noising the image before patching does (independent noise per copy would change the noise the patch embedding
    sees)."""
    if not 0 <= step < VCD_STEPS:
        raise VlmJaxError(f"VCD step must lie in 0..{VCD_STEPS - 1}, got {step}.")
    betas = 1 / (1 + np.exp(-np.linspace(-6, 6, VCD_STEPS))) * (5e-3 - 1e-5) + 1e-5
    alpha_bar = np.cumprod(1 - betas)[step]
    pixel_values = jnp.asarray(pixel_values)
    shape = pixel_values.shape
    if pixel_values.ndim == 2:
        if packed_layout is None or shape[1] % (packed_layout[0] * packed_layout[1]):
            raise VlmJaxError(f"Packed patches of width {shape[1]} need packed_layout=(channels, "
                              "temporal_patch_size) that divides it, e.g. (model.config.vision.in_channels, "
                              f"model.config.vision.temporal_patch_size); got {packed_layout}.")
        channels, frames = packed_layout
        one_frame = jax.random.normal(key, (shape[0], channels, 1, shape[1] // (channels * frames)), jnp.float32)
        eps = jnp.repeat(one_frame, frames, axis=2).reshape(shape)
    else:
        eps = jax.random.normal(key, shape, jnp.float32)
    signal, noise = np.float32(np.sqrt(alpha_bar)), np.float32(np.sqrt(1 - alpha_bar))
    noised = signal * pixel_values.astype(jnp.float32) + noise * eps
    return noised.astype(pixel_values.dtype)
