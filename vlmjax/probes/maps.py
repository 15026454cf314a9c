"""Host-side analysis of per-layer attention maps (methods §2 and §5): patch grids, spatial statistics, the
contrastive mask."""

from __future__ import annotations

from typing import Iterable

import jax.numpy as jnp
import numpy as np

from vlmjax.errors import VlmJaxError
from vlmjax.metrics import hellinger, spatial_entropy, top_fraction_clusters
from vlmjax.visual import GRID_KINDS


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
