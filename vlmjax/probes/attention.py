"""Attention probes (methods §1, §2, §4, §5): per-layer records reduced from the attn.pattern site."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from vlmjax.errors import VlmJaxError
from vlmjax.hooks import AttentionRowProbe
from vlmjax.metrics import (block_mean, box_to_token_mask, concentration, head_detection_score, last_query_visual_map,
                            region_mass, visual_fraction, visual_fraction_per_head, visual_mass)
from vlmjax.probes.token_sets import (first_query, last_position, mean_weights, one_hot_query, query_index_or_last,
                                      text_after_image)
from vlmjax.visual import QUERY


class VisualAttention(AttentionRowProbe):
    """methods §1 text-to-visual attention, per layer. Site: attn.pattern. Record (a dict, each [L, ...] after the scan):
    mass [B, H] (`mean_{i in T} sum_{j in V} A[h]`), last_query_mass [B, H] (the same for the last query),
    block_mean [B] (`mean_{h, i in T, j in V} A`, whose mean over the neglect zone is the neglect depth),
    visual_fraction [B] (`m_v / (m_v + m_t)`, heads averaged first) and visual_fraction_per_head [B, H].
    All are means over T of per-query sums, so they are taken on T's mean attention row (an AttentionRowProbe)."""

    def query_weights(self, ctx):
        text = text_after_image(ctx.visual_mask, ctx.key_padding)
        return mean_weights(text), mean_weights(one_hot_query(last_position(ctx.key_padding), text.shape[-1]))

    def from_rows(self, rows, ctx):
        text_row, last_row = rows
        visual = ctx.visual_mask
        text = text_after_image(visual, ctx.key_padding)
        has_text = text.any(-1, keepdims=True)  # the single row stands for T: 0 for an empty T, as over T itself
        return {
            "mass": visual_mass(text_row, has_text, visual),
            "last_query_mass": visual_mass(last_row, jnp.ones_like(has_text), visual),
            "block_mean": block_mean(text_row, has_text, visual),
            "visual_fraction": visual_fraction(text_row, has_text, visual, text),
            "visual_fraction_per_head": visual_fraction_per_head(text_row, has_text, visual, text),
        }


class SingleQueryProbe(AttentionRowProbe):
    """A row probe of one query per sample: `query_index` [B] int, or None for the last real token."""

    query_index: Any = None

    def query_weights(self, ctx):
        return (one_hot_query(query_index_or_last(self.query_index, ctx), ctx.key_padding.shape[-1]),)


class LastQueryVisualMap(SingleQueryProbe):
    """methods §2 / §5 attention map: the head-mean attention row of the query (default: the last real token), over the
    visual keys, renormalised to sum 1. Site: attn.pattern. Record [B, N] per layer (0 at non-visual keys)."""

    def from_rows(self, rows, ctx):
        (row,) = rows
        return last_query_visual_map(row, first_query(row), ctx.visual_mask)


class VisualHeadAttention(SingleQueryProbe):
    """methods §4 per-head inputs of the head detection score, at one query per sample (default: the last real token,
    i.e. the answer's query when the answer token is the last one). Site: attn.pattern. Record per layer:
    image_weight [B, H] (`sum_{j in V} A[h, q, j]`), concentration [B, H] (`1 - H(a) / log N_a` over V
    renormalised) and, with a region mask (e.g. a box, see `with_boxes`), region_weight [B, H]."""

    region_mask: Any = None  # [B, N] bool, or None (after SingleQueryProbe's query_index)

    @classmethod
    def with_boxes(cls, boxes, meta, image_size_hw, query_index=None, mode: str = "centre"):
        """Region = the patch tokens whose cell lies in each sample's pixel box (x0, y0, x1, y1) of the preprocessed
        image (`vlmjax.metrics.box_to_token_mask`, same `mode`). One image per sample."""
        if (meta.kind == QUERY).any():
            raise VlmJaxError("VisualHeadAttention.with_boxes: this model's visual tokens are Q-Former queries "
                              "(InstructBLIP), which have no position in the image, so a pixel box selects none of "
                              "them. Pass a region_mask over the query tokens instead.")
        rows, cols, grid = meta.single_patch_grid("VisualHeadAttention.with_boxes")
        try:
            region = box_to_token_mask(boxes, image_size_hw, rows, cols, grid, mode)
        except ValueError as err:
            raise VlmJaxError(f"Region box: {err}.") from None
        return cls(None if query_index is None else jnp.asarray(query_index, jnp.int32), jnp.asarray(region))

    def from_rows(self, rows, ctx):
        (row,) = rows  # [B, H, 1, Nk]
        record = {
            "image_weight": region_mass(row, first_query(row), ctx.visual_mask),
            "concentration": concentration(row[:, :, 0, :], ctx.visual_mask),
        }
        if self.region_mask is not None:
            record["region_weight"] = region_mass(row, first_query(row), self.region_mask)
        return record


def head_detection_scores(record: Mapping[str, jax.Array], layer_weight: Callable | None = None,
                          weight: str = "image_weight") -> jax.Array:
    """methods §4 head detection score [L, H] from a VisualHeadAttention record ([L, B, H] arrays): the attention weight
    (`weight`: "image_weight" or "region_weight") and the concentration are averaged over samples first, as the
    paper averages them over the data set, then `w * c * f(l)` (`vlmjax.metrics.head_detection_score`)."""
    w = jnp.mean(record[weight], axis=1)
    c = jnp.mean(record["concentration"], axis=1)
    layers = jnp.arange(w.shape[0])[:, None]
    return head_detection_score(w, c, layers, layer_weight)
