"""The token sets and queries of methods' notation, per sample from the batch's masks: V (the visual tokens,
`ctx.visual_mask`), T (`text_after_image`), the last real token (`last_position`), and the single averaged query row
the attention probes read (`mean_weights`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def text_after_image(visual_mask: jax.Array, key_padding: jax.Array) -> jax.Array:
    """[B, N] bool, methods' T: real tokens after each sample's last visual token (all real tokens if it has none)."""
    index = jnp.arange(visual_mask.shape[1])
    last_visual = jnp.max(jnp.where(visual_mask, index, -1), axis=1)
    return key_padding & (index > last_visual[:, None])


def last_position(key_padding: jax.Array) -> jax.Array:
    """[B] int32: each sample's last real token (the query that predicts the next token)."""
    index = jnp.arange(key_padding.shape[1], dtype=jnp.int32)
    return jnp.max(jnp.where(key_padding, index, 0), axis=1)


def query_index_or_last(query_index, ctx) -> jax.Array:
    return last_position(ctx.key_padding) if query_index is None else jnp.asarray(query_index, jnp.int32)


def one_hot_query(query_index: jax.Array, n: int) -> jax.Array:
    return query_index[:, None] == jnp.arange(n)[None, :]


def mean_weights(query_mask: jax.Array) -> jax.Array:
    """[B, N] fp32 weights of a query set's mean (1 / |set| on it, 0 elsewhere; all 0 for an empty set): the
    weighting of the single averaged query row the attention probes read (`vlmjax.hooks.AttentionRowProbe`). Every
    metric they take is linear in the query rows it averages, so it gives the same value on this row as on the full
    pattern."""
    weights = query_mask.astype(jnp.float32)
    return weights / jnp.maximum(weights.sum(-1, keepdims=True), 1)


def first_query(row: jax.Array) -> jax.Array:
    """[B] zeros: the query index of the single row of a [B, H, 1, Nk] attention."""
    return jnp.zeros(row.shape[0], jnp.int32)
