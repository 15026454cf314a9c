"""Metrics and captures as hooks (methods §1-§5): per-layer records reduced inside the compiled forward.

Each probe reads a block site and returns a small record per layer (e.g. [B, H] instead of the [B, H, N, N]
pattern), stacked over layers by the layer scan: `out["hooks"][name][site]` is [L, ...] (a dict of such arrays for
probes that return several quantities). The math is `vlmjax.metrics`'; this module only picks the token sets:

- V, the visual tokens: `ctx.visual_mask` (from the input ids, per sample).
- T, the text after the image: real tokens after the sample's last visual token (`text_after_image`); every real
  token of a sample without visual tokens.
- The query of last-query metrics: the sample's last real token (`last_position`), or a given `query_index` [B].

`capture(sites, num_layers)` records named sites (`blocks.3.attn.pattern`, `logits`) and only the named layers.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from vlmjax.errors import VlmJaxError
from vlmjax.hooks import Capture, Hook, VisionCapture, parse_site
from vlmjax.metrics import (
    batched_effective_rank,
    batched_mix_ig,
    batched_rid,
    block_mean,
    box_to_token_mask,
    concentration,
    cosine_of_updates,
    gather_positions,
    head_detection_score,
    hellinger,
    last_query_visual_map,
    lens_target_rank_and_prob,
    lens_top_k,
    region_mass,
    spatial_entropy,
    top_fraction_clusters,
    visual_fraction,
    visual_fraction_per_head,
    visual_mass,
)
from vlmjax.models.decoder import unembed_matrix
from vlmjax.models.layers import rms_norm
from vlmjax.visual import GRID_KINDS

# ---------------------------------------------------------------------------------------------------------------------
# Token sets


def text_after_image(visual_mask: jax.Array, key_padding: jax.Array) -> jax.Array:
    """[B, N] bool, methods' T: real tokens after each sample's last visual token (all real tokens if it has none)."""
    index = jnp.arange(visual_mask.shape[1])
    last_visual = jnp.max(jnp.where(visual_mask, index, -1), axis=1)
    return key_padding & (index > last_visual[:, None])


def last_position(key_padding: jax.Array) -> jax.Array:
    """[B] int32: each sample's last real token (the query that predicts the next token)."""
    index = jnp.arange(key_padding.shape[1], dtype=jnp.int32)
    return jnp.max(jnp.where(key_padding, index, 0), axis=1)


def _query_index(query_index, ctx) -> jax.Array:
    return last_position(ctx.key_padding) if query_index is None else jnp.asarray(query_index, jnp.int32)


def _one_hot_query(query_index: jax.Array, n: int) -> jax.Array:
    return query_index[:, None] == jnp.arange(n)[None, :]


def _mean_query_row(attn: jax.Array, query_mask: jax.Array) -> jax.Array:
    """[B, H, 1, Nk]: the attention rows of the masked queries averaged (0 for an empty set), as one contraction
    over the query axis, so the layer's [B, H, N, N] pattern is read once and never copied. Every metric below is
    linear in the query rows it averages, so it gives the same value on this single row as on the full pattern."""
    weights = query_mask.astype(jnp.float32)
    weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1)
    return jnp.sum(attn.astype(jnp.float32) * weights[:, None, :, None], axis=2, keepdims=True)


def _first_query(row: jax.Array) -> jax.Array:
    """[B] zeros: the query index of the single row of a [B, H, 1, Nk] attention."""
    return jnp.zeros(row.shape[0], jnp.int32)


# ---------------------------------------------------------------------------------------------------------------------
# Attention probes


class VisualAttention(Hook):
    """methods §1 text-to-visual attention, per layer. Site: attn.pattern. Record (a dict, each [L, ...] after the scan):
    mass [B, H] (`mean_{i in T} sum_{j in V} A[h]`), last_query_mass [B, H] (the same for the last query),
    block_mean [B] (`mean_{h, i in T, j in V} A`, whose mean over the neglect zone is the neglect depth),
    visual_fraction [B] (`m_v / (m_v + m_t)`, heads averaged first) and visual_fraction_per_head [B, H].
    All are means over T of per-query sums, so they are taken on T's mean attention row (`_mean_query_row`)."""

    def __call__(self, site, value, ctx):
        if site != "attn.pattern":
            return value, None
        visual = ctx.visual_mask
        text = text_after_image(visual, ctx.key_padding)
        text_row = _mean_query_row(value, text)
        last_row = _mean_query_row(value, _one_hot_query(last_position(ctx.key_padding), value.shape[-1]))
        has_text = text.any(-1, keepdims=True)  # the single row stands for T: 0 for an empty T, as over T itself
        record = {
            "mass": visual_mass(text_row, has_text, visual),
            "last_query_mass": visual_mass(last_row, jnp.ones_like(has_text), visual),
            "block_mean": block_mean(text_row, has_text, visual),
            "visual_fraction": visual_fraction(text_row, has_text, visual, text),
            "visual_fraction_per_head": visual_fraction_per_head(text_row, has_text, visual, text),
        }
        return value, record


class LastQueryVisualMap(Hook):
    """methods §2 / §5 attention map: the head-mean attention row of the query (default: the last real token), over the
    visual keys, renormalised to sum 1. Site: attn.pattern. Record [B, N] per layer (0 at non-visual keys)."""

    query_index: Any = None  # [B] int, or None for the last real token

    def __call__(self, site, value, ctx):
        if site != "attn.pattern":
            return value, None
        query = _one_hot_query(_query_index(self.query_index, ctx), value.shape[-1])
        row = _mean_query_row(value, query)
        return value, last_query_visual_map(row, _first_query(row), ctx.visual_mask)


class VisualHeadAttention(Hook):
    """methods §4 per-head inputs of the head detection score, at one query per sample (default: the last real token,
    i.e. the answer's query when the answer token is the last one). Site: attn.pattern. Record per layer:
    image_weight [B, H] (`sum_{j in V} A[h, q, j]`), concentration [B, H] (`1 - H(a) / log N_a` over V
    renormalised) and, with a region mask (e.g. a box, see `with_boxes`), region_weight [B, H]."""

    query_index: Any = None  # [B] int, or None for the last real token
    region_mask: Any = None  # [B, N] bool, or None

    @classmethod
    def with_boxes(cls, boxes, meta, image_size_hw, query_index=None, mode: str = "centre"):
        """Region = the patch tokens whose cell lies in each sample's pixel box (x0, y0, x1, y1) of the preprocessed
        image (`vlmjax.metrics.box_to_token_mask`, same `mode`). One image per sample."""
        rows, cols, grid = meta.single_patch_grid("VisualHeadAttention.with_boxes")
        try:
            region = box_to_token_mask(boxes, image_size_hw, rows, cols, grid, mode)
        except ValueError as err:
            raise VlmJaxError(f"Region box: {err}.") from None
        return cls(None if query_index is None else jnp.asarray(query_index, jnp.int32), jnp.asarray(region))

    def __call__(self, site, value, ctx):
        if site != "attn.pattern":
            return value, None
        query = _one_hot_query(_query_index(self.query_index, ctx), value.shape[-1])
        row = _mean_query_row(value, query)  # [B, H, 1, Nk]
        record = {
            "image_weight": region_mass(row, _first_query(row), ctx.visual_mask),
            "concentration": concentration(row[:, :, 0, :], ctx.visual_mask),
        }
        if self.region_mask is not None:
            record["region_weight"] = region_mass(row, _first_query(row), self.region_mask)
        return value, record


def head_detection_scores(record: Mapping[str, jax.Array], layer_weight: Callable | None = None,
                          weight: str = "image_weight") -> jax.Array:
    """methods §4 head detection score [L, H] from a VisualHeadAttention record ([L, B, H] arrays): the attention weight
    (`weight`: "image_weight" or "region_weight") and the concentration are averaged over samples first, as the
    paper averages them over the data set, then `w * c * f(l)` (`vlmjax.metrics.head_detection_score`)."""
    w = jnp.mean(record[weight], axis=1)
    c = jnp.mean(record["concentration"], axis=1)
    layers = jnp.arange(w.shape[0])[:, None]
    return head_detection_score(w, c, layers, layer_weight)


# ---------------------------------------------------------------------------------------------------------------------
# Residual-stream probes


class LogitLens(Hook):
    """methods §1 logit lens: each layer's output (resid_post) at chosen positions read through the final norm and the
    unembedding. Site: resid_post. Record per layer: top_ids [B, P, k] int32, top_probs [B, P, k] and, with target
    ids, target_rank [B, P] (0 = top-1) and target_prob [B, P]. The last layer reproduces the model's own output."""

    final_norm_scale: Any  # [D]
    unembedding: Any  # [D, V]
    positions: Any = None  # [B, P] int, or None for the last real token
    target_ids: Any = None  # [B, P] (or broadcastable) int, or None
    k: int = struct.field(pytree_node=False, default=5)
    eps: float = struct.field(pytree_node=False, default=1e-6)

    @classmethod
    def from_model(cls, model, k: int = 5, positions=None, target_ids=None):
        """With the decoder's final-norm scale, unembedding and norm eps (for params holding a "text" decoder)."""
        text = _text_params(model.params)
        return cls(text["final_norm"]["scale"], unembed_matrix(text),
                   None if positions is None else jnp.asarray(positions, jnp.int32),
                   None if target_ids is None else jnp.asarray(target_ids, jnp.int32),
                   k, model.config.text.rms_norm_eps)

    def __call__(self, site, value, ctx):
        if site != "resid_post":
            return value, None
        positions = last_position(ctx.key_padding)[:, None] if self.positions is None else self.positions
        residual = gather_positions(value, positions)
        final_norm = functools.partial(rms_norm, {"scale": self.final_norm_scale}, eps=self.eps)
        top_ids, top_probs = lens_top_k(residual, final_norm, self.unembedding, self.k)
        record = {"top_ids": top_ids, "top_probs": top_probs}
        if self.target_ids is not None:
            record["target_rank"], record["target_prob"] = lens_target_rank_and_prob(
                residual, final_norm, self.unembedding, self.target_ids)
        return value, record


class ResidualUpdateCosine(Hook):
    """methods §1 language-prior collapse: `mean_{i in T} cos(h_l[i] - h_{l-1}[i] (real), same (null image))` per layer.
    The batch holds the pairs: its first half the real images, its second half the same prompts with null images
    (`paired_inputs`). Site: resid_post (the update against ctx.earlier's resid_pre). Record [B / 2] per layer."""

    def __call__(self, site, value, ctx):
        if site != "resid_post":
            return value, None
        if value.shape[0] % 2:
            raise VlmJaxError(f"ResidualUpdateCosine needs a batch of (real, null) pairs, an even batch size; got "
                              f"{value.shape[0]}. Build it with vlmjax.probes.paired_inputs.")
        half = value.shape[0] // 2
        update = value - ctx.earlier["resid_pre"]
        text = text_after_image(ctx.visual_mask, ctx.key_padding)[:half]
        return value, cosine_of_updates(update[:half], update[half:], text)


def paired_inputs(inputs: Mapping[str, Any], null_pixel_values) -> dict:
    """Processor outputs doubled for ResidualUpdateCosine: the same prompts twice, the real images then the null ones
    (e.g. `vlmjax.interventions.null_image(pixel_values, "black", mean, std)`)."""
    paired = {key: np.concatenate([np.asarray(v), np.asarray(v)]) for key, v in inputs.items()
              if key != "pixel_values" and v is not None}
    paired["pixel_values"] = np.concatenate([np.asarray(inputs["pixel_values"]), np.asarray(null_pixel_values)])
    return paired


GEOMETRY_TOKENS = ("all", "visual", "text")


class UpdateGeometry(Hook):
    """methods §3 information geometry of the attention update (X = resid_pre, X' = resid_mid) and the MLP update
    (X = resid_mid, X' = resid_post), per sample over its real tokens (`tokens`: all, visual or text ones).
    Sites: resid_mid (attention), resid_post (MLP). Record per site and layer: erank_before, erank_after, rid and
    mix_ig, each [B]. RID's rank is the smallest holding `energy` of X's squared singular values [inferred]."""

    tokens: str = struct.field(pytree_node=False, default="all")
    energy: float = struct.field(pytree_node=False, default=0.99)

    def __call__(self, site, value, ctx):
        before_site = {"resid_mid": "resid_pre", "resid_post": "resid_mid"}.get(site)
        if before_site is None:
            return value, None
        if self.tokens not in GEOMETRY_TOKENS:
            raise VlmJaxError(f"UpdateGeometry tokens must be one of {GEOMETRY_TOKENS}, got {self.tokens!r}.")
        before = ctx.earlier[before_site]
        scope = {"all": True, "visual": ctx.visual_mask, "text": ~ctx.visual_mask}[self.tokens]
        mask = ctx.key_padding & scope
        record = {
            "erank_before": batched_effective_rank(before, mask),
            "erank_after": batched_effective_rank(value, mask),
            "rid": batched_rid(value, before, mask, energy=self.energy),
            "mix_ig": batched_mix_ig(value, before, mask),
        }
        return value, record


class HiddenStates(Hook):
    """A block site's value at chosen positions (default: the last real token) and, with `only_layers`, only at those
    layers, e.g. for linear probes (methods §5). Record [B, P, ...] per recorded layer."""

    positions: Any = None  # [B, P] int, or None for the last real token
    site: str = struct.field(pytree_node=False, default="resid_post")
    only_layers: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)

    def __call__(self, site, value, ctx):
        if site != self.site:
            return value, None
        positions = last_position(ctx.key_padding)[:, None] if self.positions is None else self.positions
        index = jnp.asarray(positions, jnp.int32).reshape(positions.shape + (1,) * (value.ndim - 2))
        return value, jnp.take_along_axis(value, index, axis=1)


# ---------------------------------------------------------------------------------------------------------------------
# Gradients (methods §1 gradient visual importance)


class ResidualProbe(Hook):
    """Adds `delta[l]` ([B, N, D], zeros) to each layer's output: the gradient of any function of the output with
    respect to delta is its gradient with respect to the layer outputs. Site: resid_post."""

    per_layer = ("delta",)
    delta: Any  # [L, B, N, D]

    def __call__(self, site, value, ctx):
        if site != "resid_post":
            return value, None
        return value + self.delta.astype(value.dtype), None


@functools.partial(jax.jit, static_argnums=0)
def _target_logit_gradients(model, params, batch, target_ids, query_index):
    b, n = batch["input_ids"].shape
    d = model.config.text.hidden_size
    num_layers = model.num_layers["blocks"]

    def target_logit(delta):
        out = model.forward(params, batch, {"probe": ResidualProbe(delta)}, logits=None)
        final = gather_positions(out["last_hidden_state"], query_index[:, None])[:, 0]
        logits = final @ unembed_matrix(_text_params(params)).astype(final.dtype)
        return jnp.take_along_axis(logits, target_ids[:, None], axis=1).sum()

    return jax.grad(target_logit)(jnp.zeros((num_layers, b, n, d), jnp.float32))


def residual_gradients(model, inputs: Mapping[str, Any], target_ids, query_index=None, params=None) -> jax.Array:
    """d logit[b, q_b, target_b] / d h_l for every layer output h_l (resid_post): [L, B, N, D]. The query q_b is
    the last real token unless given ([B]); samples are independent, so one backward pass serves the batch."""
    batch, _ = model.prepare(inputs)
    query = last_position(jnp.asarray(batch["attention_mask"])) if query_index is None else query_index
    return _target_logit_gradients(model, model.params if params is None else params, batch,
                                   jnp.asarray(target_ids, jnp.int32).reshape(-1), jnp.asarray(query, jnp.int32))


def visual_gradient_importance(model, inputs: Mapping[str, Any], target_ids, query_index=None,
                               params=None) -> jax.Array:
    """methods §1 gradient visual importance [L, B]: the mean over each sample's visual positions of the L2 norm of the
    target logit's gradient with respect to each layer's output (e.g. the first-step "yes" logit)."""
    _, meta = model.prepare(inputs)
    if not np.asarray(meta.mask).any(1).all():
        raise VlmJaxError("visual_gradient_importance needs visual tokens in every sample of the batch.")
    norms = jnp.linalg.norm(residual_gradients(model, inputs, target_ids, query_index, params), axis=-1)
    visual = jnp.asarray(meta.mask)
    return jnp.sum(jnp.where(visual, norms, 0), axis=-1) / visual.sum(-1)


def _text_params(params: dict) -> dict:
    if "text" not in params:
        raise VlmJaxError(f"This probe needs the decoder's params under 'text'; the model's params have "
                          f"{sorted(params)}.")
    return params["text"]


# ---------------------------------------------------------------------------------------------------------------------
# Captures by canonical site name


def capture(sites: Iterable[str], num_layers: Mapping[str, int]) -> dict[str, Hook]:
    """Hooks recording the named sites, keyed by the names: global sites (`logits`), decoder block sites
    (`blocks.3.attn.pattern`, recorded at that layer only) and vision block sites (`vision.blocks.1.resid_post`;
    the vision tower's capture stacks every layer it runs). Names are checked with `vlmjax.hooks.parse_site` (an
    unknown name gets the nearest valid ones). Read the values with `read_captures(out, hooks, num_layers)`."""
    hooks = {}
    for name in sites:
        stack, layer, site = parse_site(name, num_layers)
        if stack == "":
            hooks[name] = Capture(sites=frozenset({site}))
        elif stack == "blocks":
            hooks[name] = Capture(sites=frozenset({site}), only_layers=(layer,))
        else:
            hooks[name] = VisionCapture(sites=frozenset({site}))
    return hooks


def read_captures(out: Mapping[str, Any], hooks: Mapping[str, Hook], num_layers: Mapping[str, int]
                  ) -> dict[str, jax.Array]:
    """{site name: value} for the hooks `capture(sites, num_layers)` built (block sites without their layer axis)."""
    values = {}
    for name in hooks:
        stack, layer, site = parse_site(name, num_layers)
        value = out["hooks"][name][site]
        if stack == "blocks":
            value = value[0]
        elif stack == "vision.blocks":
            if layer >= value.shape[0]:
                raise VlmJaxError(f"{name}: this model's vision tower stops after layer {value.shape[0] - 1} (the "
                                  "layers after the feature layer are never run).")
            value = value[layer]
        values[name] = value
    return values


class RopeBaseline(Hook):
    """methods §3 RoPE baseline eps_RoPE = RID(X with rotary | X without), per layer and sample, X being the keys of all
    heads side by side ([N, KVH * hd], real tokens) [inferred: the methods name no tensor; keys are where rotary acts
    and what attention reads]. Site: attn.rot_k (needs attn.k earlier in the block). Record [B] per layer."""

    energy: float = struct.field(pytree_node=False, default=0.99)

    def __call__(self, site, value, ctx):
        if site != "attn.rot_k":
            return value, None
        flat = lambda k: k.reshape(*k.shape[:2], -1)
        return value, batched_rid(flat(value), flat(ctx.earlier["attn.k"]), ctx.key_padding, energy=self.energy)


# ---------------------------------------------------------------------------------------------------------------------
# Host-side analysis of per-layer attention maps (methods §2 and §5)


def map_grids(maps, meta) -> list[np.ndarray]:
    """Per-sample patch grids of `LastQueryVisualMap` records [L, B, N]: [L, gh, gw] for each sample's first image
    (its patch tokens placed by their grid row / column; CLS, newline and LLaVA-NeXT crop tokens left out)."""
    maps = np.asarray(maps)
    grids = []
    for b in range(maps.shape[1]):
        image = next((im for im in meta.images if im.sample == b), None)
        if image is None:
            raise VlmJaxError(f"Sample {b} has no image: an attention map needs visual tokens.")
        rows, cols = image.grid[-2:]
        tokens = np.flatnonzero((meta.image_index[b] == meta.images.index(image)) & np.isin(meta.kind[b], GRID_KINDS))
        grid = np.zeros((maps.shape[0], rows, cols), maps.dtype)
        grid[:, meta.grid_row[b, tokens], meta.grid_col[b, tokens]] = maps[:, b, tokens]
        grids.append(grid)
    return grids


def map_statistics(maps, meta, fraction: float = 0.3) -> dict[str, np.ndarray]:
    """methods §5 per layer and sample: spatial entropy of the map and the number of connected clusters of its top
    `fraction` patches; methods §2 Hellinger distance between every pair of layers' maps. Shapes [L, B], [L, B],
    [B, L, L]."""
    maps = np.asarray(maps)
    grids = map_grids(maps, meta)
    entropy = np.stack([np.asarray(spatial_entropy(jnp.asarray(g))) for g in grids], axis=1)
    clusters = np.stack([np.asarray(top_fraction_clusters(g, fraction)) for g in grids], axis=1)
    per_sample = np.moveaxis(maps, 1, 0)  # [B, L, N]
    distance = np.asarray(hellinger(jnp.asarray(per_sample)[:, :, None], jnp.asarray(per_sample)[:, None, :]))
    return {"spatial_entropy": entropy, "clusters": clusters, "hellinger": distance}


def contrastive_mask(maps, visual_mask, fusion_layers: Iterable[int], post_layer: int, percentile: float = 20.0):
    """methods §2 contrastive attention: the pre-integrated layer i* = argmax over `fusion_layers` of H(A_i, A_post),
    C = |A_post - A_i*|, and the visual tokens whose C is below its `percentile`-th percentile (to be scaled down
    at the review layer with `interventions.ScaleVisualStates`). `maps` [L, B, N] from `LastQueryVisualMap`,
    `visual_mask` [B, N] (the metadata's mask). Returns (i* [B], C [B, N], mask [B, N] bool)."""
    maps = np.asarray(maps)
    fusion = np.asarray(list(fusion_layers))
    post = maps[post_layer]
    distances = np.stack([np.asarray(hellinger(jnp.asarray(maps[i]), jnp.asarray(post))) for i in fusion])  # [F, B]
    chosen = fusion[np.argmax(distances, axis=0)]
    contrast = np.abs(post - maps[chosen, np.arange(maps.shape[1])])
    visual = np.asarray(visual_mask, bool)
    cut = np.array([np.percentile(c[v], percentile) if v.any() else -np.inf for c, v in zip(contrast, visual)])
    return chosen, contrast, visual & (contrast < cut[:, None])
