"""Logit lens and residual-update cosine (methods §1), as pure jnp functions usable under jit and vmap.

The lens reads a residual ``h[..., D]`` (typically [B, N, D] at chosen positions, see :func:`gather_positions`) as the
model's own output: ``logits = final_norm(h) @ unembedding`` with ``unembedding[D, V]`` (the transpose of HF's
``lm_head.weight[V, D]``), and ``final_norm`` the model's final normalisation as a callable; a model whose logits
are soft-capped (Gemma 2) passes its ``softcap``. Log-probabilities are computed in at least float32.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from vlmjax.models.layers import softcap as soft_cap

_HIGHEST = jax.lax.Precision.HIGHEST


def gather_positions(hidden: jax.Array, positions: jax.Array) -> jax.Array:
    """hidden [B, N, D] at per-sample positions [B, P] (int) -> [B, P, D]."""
    index = jnp.asarray(positions).astype(jnp.int32)[..., None]
    return jnp.take_along_axis(hidden, index, axis=1)


def lens_logits(
    residual: jax.Array, final_norm: Callable[[jax.Array], jax.Array], unembedding: jax.Array,
    softcap: float | None = None
) -> jax.Array:
    """Logit-lens logits ``final_norm(residual) @ unembedding``: [..., D] -> [..., V], in at least float32."""
    normed = jnp.asarray(final_norm(residual))
    dtype = jnp.promote_types(jnp.promote_types(normed.dtype, jnp.asarray(unembedding).dtype), jnp.float32)
    return soft_cap(jnp.matmul(normed.astype(dtype), jnp.asarray(unembedding).astype(dtype), precision=_HIGHEST),
                    softcap)


def lens_top_k(
    residual: jax.Array, final_norm: Callable[[jax.Array], jax.Array], unembedding: jax.Array, k: int,
    softcap: float | None = None
) -> tuple[jax.Array, jax.Array]:
    """The k most probable tokens under the lens: (ids int32 [..., k], probabilities [..., k]), most probable first.

    ``k`` is static. Ties are ordered as ``jax.lax.top_k`` orders them (lower id first).
    """
    log_probs = jax.nn.log_softmax(lens_logits(residual, final_norm, unembedding, softcap), axis=-1)
    top_log_probs, top_ids = jax.lax.top_k(log_probs, k)
    return top_ids.astype(jnp.int32), jnp.exp(top_log_probs)


def lens_target_rank_and_prob(
    residual: jax.Array, final_norm: Callable[[jax.Array], jax.Array], unembedding: jax.Array, target_ids: jax.Array,
    softcap: float | None = None
) -> tuple[jax.Array, jax.Array]:
    """Rank and probability of a target token under the lens: (rank int32 [...], probability [...]).

    ``target_ids`` broadcasts against ``residual.shape[:-1]`` (e.g. [B, 1] for one target per sample). The rank is the
    number of tokens with a strictly larger logit: 0 = top-1, and ties share the best rank.
    """
    logits = lens_logits(residual, final_norm, unembedding, softcap)
    targets = jnp.broadcast_to(jnp.asarray(target_ids).astype(jnp.int32), logits.shape[:-1])[..., None]
    target_logit = jnp.take_along_axis(logits, targets, axis=-1)
    rank = jnp.sum(logits > target_logit, axis=-1).astype(jnp.int32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return rank, jnp.exp(jnp.take_along_axis(log_probs, targets, axis=-1)[..., 0])


def cosine_of_updates(delta_a: jax.Array, delta_b: jax.Array, mask: jax.Array) -> jax.Array:
    """methods §1 language-prior collapse: ``mean_{i in mask} cos(delta_a[b, i], delta_b[b, i])``. [B].

    ``delta_*`` [B, N, D] are residual updates ``h_l - h_{l-1}`` (e.g. with the real and the null image); ``mask``
    [B, N] selects the positions (text after the image, padding excluded). The cosine of a zero update is 0, and the
    mean over an empty mask is 0.
    """
    delta_a = jnp.asarray(delta_a)
    delta_a = delta_a.astype(jnp.promote_types(delta_a.dtype, jnp.float32))
    delta_b = jnp.asarray(delta_b).astype(delta_a.dtype)
    inside = jnp.asarray(mask, bool)
    dot = jnp.sum(delta_a * delta_b, axis=-1)
    norms = jnp.linalg.norm(delta_a, axis=-1) * jnp.linalg.norm(delta_b, axis=-1)
    positive = norms > 0
    cosine = jnp.where(positive & inside, dot / jnp.where(positive, norms, 1), 0)
    n_positions = inside.sum(-1)
    return jnp.where(n_positions > 0, cosine.sum(-1) / jnp.maximum(n_positions, 1), 0)
