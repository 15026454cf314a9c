"""Attention metrics of one layer, as pure functions of arrays (methods §1, §2, §4, §5).

Conventions shared by every function here:

- ``attn[B, H, Nq, Nk]`` holds post-softmax attention probabilities of one layer (``Nq`` may be 1 for a decode step).
- Token sets are boolean masks over positions, per sample: ``query_mask[B, Nq]``, ``key_mask``/``visual_mask``/
  ``text_mask[B, Nk]``. Padding is excluded simply by being False in every mask. Visual tokens are never assumed to
  form a constant span.
- A single query is given either by a one-hot ``query_mask`` or, for the last-query functions, by ``query_index[B]``.
- Empty sets never give NaN: a mean over an empty set, or a ratio whose denominator is 0, returns 0.

Everything except :func:`top_fraction_mask`, :func:`top_fraction_clusters` and :func:`box_to_token_mask` (host-side
NumPy, documented there) uses only ``jnp`` operations with static shapes, so it can run inside ``jit``, ``vmap`` and
a ``lax.scan`` over layers.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

SPATIAL_ENTROPY_EPS = 1e-9  # methods §5: H_s = -sum M log(M + 1e-9)


def _as_float(x: jax.Array) -> jax.Array:
    """Promote to at least float32, so that sums of bfloat16 attention stay accurate."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, and 0 where the denominator is 0 (no NaN in values or gradients)."""
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0)


def _mask_like(mask: jax.Array, values: jax.Array) -> jax.Array:
    """A per-sample mask [B, N] as float, with singleton axes inserted after B so it broadcasts against values
    [B, ..., N] (e.g. over heads). A mask already of values' rank is returned as is."""
    mask = jnp.asarray(mask)
    if 2 <= mask.ndim < values.ndim:
        mask = mask.reshape(mask.shape[:1] + (1,) * (values.ndim - mask.ndim) + mask.shape[1:])
    return mask.astype(values.dtype)


def _attention_block(attn: jax.Array, query_mask: jax.Array, key_mask: jax.Array) -> jax.Array:
    """attn [B, H, Nq, Nk] as float, 0 outside the (query, key) block. jnp.where rather than a product, so that NaN
    rows of fully masked (padding) queries cannot leak into the sums."""
    inside = jnp.asarray(query_mask, bool)[:, None, :, None] & jnp.asarray(key_mask, bool)[:, None, None, :]
    return jnp.where(inside, _as_float(attn), 0)


# ---------------------------------------------------------------------------------------------------------------------
# Masses and block means (methods §1)


def visual_mass(attn: jax.Array, query_mask: jax.Array, key_mask: jax.Array) -> jax.Array:
    """Per-head attention mass on a key set, averaged over a query set: ``mean_{i in Q} sum_{j in K} A[h, i, j]``.

    methods §1 ``mass_l`` per head (average the result over heads for the methods' head-mean). With a one-hot query_mask it
    is the last-query variant. Returns [B, H]; 0 when the query set is empty (and, naturally, when the key set is).
    """
    block = _attention_block(attn, query_mask, key_mask)
    n_queries = jnp.asarray(query_mask).astype(block.dtype).sum(-1)
    return _safe_divide(block.sum((-2, -1)), n_queries[:, None])


def block_mean_per_head(attn: jax.Array, query_mask: jax.Array, key_mask: jax.Array) -> jax.Array:
    """Per-head mean attention over a block of (query, key) pairs: ``mean_{i in Q, j in K} A[h, i, j]``. [B, H].

    This is a per-key mean (divides by |Q| * |K|), unlike :func:`visual_mass`. 0 when either set is empty.
    """
    block = _attention_block(attn, query_mask, key_mask)
    n_queries = jnp.asarray(query_mask).astype(block.dtype).sum(-1)
    n_keys = jnp.asarray(key_mask).astype(block.dtype).sum(-1)
    pair_count = n_queries * n_keys
    return _safe_divide(block.sum((-2, -1)), pair_count[:, None])


def block_mean(attn: jax.Array, query_mask: jax.Array, key_mask: jax.Array) -> jax.Array:
    """Mean over heads, masked queries and masked keys: ``mean_{h, i in Q, j in K} A[h, i, j]``. [B].

    methods §1 per-sample block mean (with Q = text after the image, K = visual tokens); averaging it over the
    neglect-zone layers gives the neglect depth. 0 when either set is empty.
    """
    return block_mean_per_head(attn, query_mask, key_mask).mean(-1)


def visual_fraction_per_head(
    attn: jax.Array, query_mask: jax.Array, visual_mask: jax.Array, text_mask: jax.Array
) -> jax.Array:
    """Per-head visual fraction ``m_v / (m_v + m_t)`` with per-key means (methods §1), the ratio taken per head. [B, H].

    ``m_v = mean_{i in Q, j in V} A[h]``, ``m_t = mean_{i in Q, j in T} A[h]``. 0 when m_v + m_t = 0 (e.g. empty sets).
    """
    visual = block_mean_per_head(attn, query_mask, visual_mask)
    text = block_mean_per_head(attn, query_mask, text_mask)
    return _safe_divide(visual, visual + text)


def visual_fraction(attn: jax.Array, query_mask: jax.Array, visual_mask: jax.Array, text_mask: jax.Array) -> jax.Array:
    """Canonical methods §1 visual fraction ``frac_l = m_v / (m_v + m_t)``. [B].

    Heads are averaged BEFORE the ratio: ``m_v = mean_{h, i in Q, j in V} A``, ``m_t = mean_{h, i in Q, j in T} A``
    (per-key means; Q is normally the text after the image, i.e. ``text_mask``). See
    :func:`visual_fraction_per_head` for the ratio per head. 0 when m_v + m_t = 0.
    """
    visual = block_mean(attn, query_mask, visual_mask)
    text = block_mean(attn, query_mask, text_mask)
    return _safe_divide(visual, visual + text)


# ---------------------------------------------------------------------------------------------------------------------
# Last-query attention maps (methods §2, §4, §5)


def _query_rows(attn: jax.Array, query_index: jax.Array) -> jax.Array:
    """The attention rows of one query per sample: attn[b, :, query_index[b], :] -> [B, H, Nk]."""
    index = jnp.asarray(query_index).astype(jnp.int32)[:, None, None, None]
    return jnp.take_along_axis(_as_float(attn), index, axis=2)[:, :, 0, :]


def region_mass(attn: jax.Array, query_index: jax.Array, region_mask: jax.Array) -> jax.Array:
    """Per-head attention weight of one query on a key set: ``sum_{j in R} A[h, q, j]``. [B, H].

    methods §4: with ``region_mask = visual_mask`` this is the head's image weight w; with a box mask from
    :func:`box_to_token_mask` it is the weight on the visual tokens inside the box. 0 for an empty region.
    """
    rows = _query_rows(attn, query_index)
    return jnp.where(jnp.asarray(region_mask, bool)[:, None, :], rows, 0).sum(-1)


def last_query_visual_map(attn: jax.Array, query_index: jax.Array, visual_mask: jax.Array) -> jax.Array:
    """Head-mean attention row of query ``query_index[b]``, restricted to visual keys and renormalised. [B, Nk].

    methods §2 / §5 attention map: sums to 1 over the visual keys, 0 at every other key. All zeros (sum 0, not 1) when
    the visual set is empty or the query gives it no attention at all.
    """
    row = _query_rows(attn, query_index).mean(1)
    visual_row = jnp.where(jnp.asarray(visual_mask, bool), row, 0)
    return _safe_divide(visual_row, visual_row.sum(-1, keepdims=True))


def _flat_cell_index(grid_rows: jax.Array, grid_cols: jax.Array, grid_shape: tuple[int, int]):
    """Row-major cell index of each token and whether it lies on the grid (coordinate -1 or out of range: off)."""
    grid_height, grid_width = grid_shape
    rows = jnp.asarray(grid_rows).astype(jnp.int32)
    cols = jnp.asarray(grid_cols).astype(jnp.int32)
    on_grid = (rows >= 0) & (rows < grid_height) & (cols >= 0) & (cols < grid_width)
    return rows * grid_width + cols, on_grid


def visual_map_to_grid(
    token_map: jax.Array, grid_rows: jax.Array, grid_cols: jax.Array, grid_shape: tuple[int, int]
) -> jax.Array:
    """Scatter per-token values [B, Nk] onto the patch grid [B, gh, gw] (methods §5 "reshaped to the patch grid").

    ``grid_rows``/``grid_cols`` [B, Nk] give each visual token's cell; -1 (or any off-grid value) marks a non-visual
    token, which is dropped. Cells no token maps to are 0; tokens sharing a cell are summed. ``grid_shape`` is static.
    """
    grid_height, grid_width = grid_shape
    token_map = _as_float(token_map)
    cell, on_grid = _flat_cell_index(grid_rows, grid_cols, grid_shape)
    n_cells = grid_height * grid_width
    target = jnp.where(on_grid, cell, n_cells)  # off-grid tokens go to a spare cell, dropped below
    batch = jnp.arange(token_map.shape[0])[:, None]
    grid = jnp.zeros((token_map.shape[0], n_cells + 1), token_map.dtype).at[batch, target].add(token_map)
    return grid[:, :n_cells].reshape(token_map.shape[0], grid_height, grid_width)


def grid_to_visual_map(grid: jax.Array, grid_rows: jax.Array, grid_cols: jax.Array) -> jax.Array:
    """Gather per-cell values [B, gh, gw] back to the tokens [B, Nk] (inverse of :func:`visual_map_to_grid`);
    0 at non-visual tokens (coordinate -1)."""
    grid = jnp.asarray(grid)
    cell, on_grid = _flat_cell_index(grid_rows, grid_cols, grid.shape[-2:])
    flat = grid.reshape(grid.shape[0], -1)
    values = jnp.take_along_axis(flat, jnp.where(on_grid, cell, 0), axis=1)
    return jnp.where(on_grid, values, 0)


# ---------------------------------------------------------------------------------------------------------------------
# Entropy, concentration, spatial statistics (methods §4, §5)


def entropy(probabilities: jax.Array, mask: jax.Array | None = None, eps: float = 1e-9, axis=-1) -> jax.Array:
    """Shannon entropy in nats, ``-sum p log(p + eps)`` over ``axis`` (masked entries only, if a mask is given).

    The eps keeps log finite at p = 0 (methods §4, §5); the input is not renormalised here.
    """
    probabilities = _as_float(probabilities)
    terms = -probabilities * jnp.log(probabilities + eps)
    if mask is not None:
        terms = jnp.where(_mask_like(mask, terms) > 0, terms, 0)
    return terms.sum(axis)


def concentration(weights: jax.Array, mask: jax.Array, eps: float = 1e-9) -> jax.Array:
    """methods §4 concentration ``c = 1 - H(a) / log N_a`` of the masked slice of ``weights``, renormalised to sum 1.

    ``weights`` [..., N] (e.g. [B, N] or per head [B, H, N]); ``mask`` [B, N] (broadcast over heads) or of weights'
    shape. N_a is the number of masked entries per sample. 1 for a one-hot slice, 0 for a uniform one. Returns 0 when
    N_a < 2 (log N_a = 0: no spread is possible) or when the slice carries no weight.
    """
    weights = _as_float(weights)
    mask = _mask_like(mask, weights)
    sliced = jnp.where(mask > 0, weights, 0)
    slice_mass = sliced.sum(-1, keepdims=True)
    normalised = _safe_divide(sliced, slice_mass)
    n_entries = jnp.broadcast_to(mask, weights.shape).sum(-1)
    max_entropy = jnp.log(jnp.maximum(n_entries, 1))
    score = 1 - _safe_divide(entropy(normalised, mask, eps), max_entropy)
    return jnp.where((n_entries >= 2) & (slice_mass[..., 0] > 0), score, 0)


def spatial_entropy(attention_map: jax.Array, axis=(-2, -1)) -> jax.Array:
    """methods §5 spatial entropy ``H_s = -sum M log(M + 1e-9)`` of a normalised map, over ``axis``.

    Default axes fit a grid [..., gh, gw]; pass ``axis=-1`` for a token map [B, Nk] (zeros at non-visual tokens add
    nothing, so both give the same value). 0 for an all-zero map.
    """
    return entropy(attention_map, eps=SPATIAL_ENTROPY_EPS, axis=axis)


def top_fraction_mask(map_grid, fraction: float = 0.3) -> np.ndarray:
    """Host-side (NumPy): boolean mask of the top ``fraction`` cells of each 2-D map [gh, gw] or [B, gh, gw].

    Keeps the ``ceil(fraction * gh * gw)`` highest cells; ties are broken by row-major order (a stable sort), so the
    count is exact even for flat maps. Shared definition of "the top-30% patches" of methods §5.
    """
    maps = np.asarray(map_grid, dtype=np.float64)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    batch = maps.reshape((-1,) + maps.shape[-2:])
    n_cells = batch.shape[1] * batch.shape[2]
    n_top = max(1, math.ceil(fraction * n_cells - 1e-9))
    order = np.argsort(-batch.reshape(len(batch), -1), axis=1, kind="stable")
    top = np.zeros((len(batch), n_cells), dtype=bool)
    np.put_along_axis(top, order[:, :n_top], True, axis=1)
    return top.reshape(maps.shape)


def top_fraction_clusters(map_grid, fraction: float = 0.3, connectivity: int = 4):
    """Host-side (NumPy/SciPy, not jittable: the count is discrete): number of connected components of the top
    ``fraction`` patches of a 2-D attention map (methods §5), via ``scipy.ndimage.label``.

    ``connectivity`` 4 (default: cells touching by an edge) or 8 (edges or corners). Takes [gh, gw] -> int or
    [B, gh, gw] -> int array [B]. The top set is :func:`top_fraction_mask`'s.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    top = top_fraction_mask(map_grid, fraction)
    batch = top.reshape((-1,) + top.shape[-2:])
    counts = np.array([ndimage.label(cells, structure=structure)[1] for cells in batch])
    return int(counts[0]) if top.ndim == 2 else counts.reshape(top.shape[:-2])


# ---------------------------------------------------------------------------------------------------------------------
# Boxes (methods §4 region weight)


def box_to_token_mask(
    box_xyxy,
    image_size_hw,
    grid_rows,
    grid_cols,
    grid_shape: tuple[int, int],
    mode: str = "centre",
) -> np.ndarray:
    """Host-side (NumPy): the visual tokens whose patch cell falls in a pixel box. Returns bool [B, Nk] (or [Nk]).

    ``box_xyxy`` [4] or [B, 4] = (x0, y0, x1, y1) in pixels of the preprocessed image of size ``image_size_hw``
    (H, W) or [B, 2]; the image is split uniformly into the ``grid_shape`` (gh, gw) patch cells, and token k sits in
    cell (grid_rows[k], grid_cols[k]), -1 for non-visual tokens (never selected).

    ``mode="centre"`` (default): a cell is selected when its centre lies inside the closed box, so a box smaller than a
    patch may select nothing. ``mode="overlap"``: selected when the cell and the box overlap with positive area.

    A box partly outside the image is clipped to it. Raises ValueError for a box with non-finite coordinates, an empty
    box (x1 <= x0 or y1 <= y0), or one lying entirely outside the image.
    """
    if mode not in ("centre", "overlap"):
        raise ValueError(f"mode must be 'centre' or 'overlap', got {mode!r}")
    rows = np.asarray(grid_rows)
    cols = np.asarray(grid_cols)
    unbatched = rows.ndim == 1
    rows, cols = np.atleast_2d(rows), np.atleast_2d(cols)
    batch_size = rows.shape[0]
    boxes = np.broadcast_to(np.asarray(box_xyxy, dtype=np.float64), (batch_size, 4))
    sizes = np.broadcast_to(np.asarray(image_size_hw, dtype=np.float64), (batch_size, 2))
    grid_height, grid_width = grid_shape

    selected = np.zeros(rows.shape, dtype=bool)
    for sample, ((x0, y0, x1, y1), (height, width)) in enumerate(zip(boxes, sizes)):
        if not np.all(np.isfinite([x0, y0, x1, y1])):
            raise ValueError(f"box {sample} has non-finite coordinates: {(x0, y0, x1, y1)}")
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {sample} is empty: (x0, y0, x1, y1) = {(x0, y0, x1, y1)} needs x1 > x0 and y1 > y0")
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise ValueError(
                f"box {sample} {(x0, y0, x1, y1)} lies outside the image of size (H, W) = {(height, width)}"
            )
        x0, x1 = max(x0, 0.0), min(x1, width)
        y0, y1 = max(y0, 0.0), min(y1, height)
        on_grid = (rows[sample] >= 0) & (rows[sample] < grid_height) & (cols[sample] >= 0) & (cols[sample] < grid_width)
        cell_height, cell_width = height / grid_height, width / grid_width
        top, left = rows[sample] * cell_height, cols[sample] * cell_width
        if mode == "centre":
            centre_y, centre_x = top + cell_height / 2, left + cell_width / 2
            inside = (centre_x >= x0) & (centre_x <= x1) & (centre_y >= y0) & (centre_y <= y1)
        else:
            inside = (left < x1) & (left + cell_width > x0) & (top < y1) & (top + cell_height > y0)
        selected[sample] = on_grid & inside
    return selected[0] if unbatched else selected


# ---------------------------------------------------------------------------------------------------------------------
# Comparing maps and scoring heads (methods §2, §4)


def hellinger(p: jax.Array, q: jax.Array, axis=-1) -> jax.Array:
    """methods §2 Hellinger distance ``sqrt(sum_j (sqrt p_j - sqrt q_j)^2) / sqrt 2`` between distributions on ``axis``.

    0 for p = q, 1 for disjoint supports. Tiny negative inputs (round-off) are clipped to 0.
    """
    root_p = jnp.sqrt(jnp.maximum(_as_float(p), 0))
    root_q = jnp.sqrt(jnp.maximum(_as_float(q), 0))
    return jnp.sqrt(jnp.sum((root_p - root_q) ** 2, axis=axis)) / jnp.sqrt(2.0)


def contrastive_attention(attention_post: jax.Array, attention_pre: jax.Array) -> jax.Array:
    """methods §2 contrastive attention ``C = |A_post - A_pre|`` (elementwise, e.g. of two visual maps)."""
    return jnp.abs(_as_float(attention_post) - _as_float(attention_pre))


def default_layer_weight(layer_index: jax.Array) -> jax.Array:
    """methods §4 default decreasing layer weight ``f(l) = 1 / log(l + e)`` [inferred]; f(0) = 1 for 0-based layers."""
    return 1.0 / jnp.log(_as_float(layer_index) + math.e)


def head_detection_score(
    weight: jax.Array,
    concentration: jax.Array,
    layer_index: jax.Array,
    layer_weight: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """methods §4 head detection score ``w * c * f(l)`` (elementwise with broadcasting, e.g. [L, H] with l of [L, 1]).

    ``layer_index`` is 0-based; ``layer_weight`` is f (default :func:`default_layer_weight`).
    """
    layer_weight = default_layer_weight if layer_weight is None else layer_weight
    return _as_float(weight) * _as_float(concentration) * layer_weight(jnp.asarray(layer_index))
