"""Information geometry of one residual update X' = X + dX (methods §3): eRank, RID and MixIG.

Each function takes one sample's token matrix ``X[S, D]`` (S tokens x hidden size D) and an optional boolean
``token_mask[S]``. Masked-out tokens (padding) are handled by zeroing their rows, which leaves the singular values and
the singular subspaces of the true tokens unchanged, and by using the true token count S_true = sum(token_mask)
wherever the methods count tokens: in ``min(S, D)`` of RID and in the mean over tokens of the token mixing entropy
(whose distributions also exclude masked tokens as j). The ``batched_*`` versions vmap over [B, S, D] with masks
[B, S].

Only ``jnp`` operations with static shapes (SVD included), so everything runs under ``jit``, ``vmap`` and
``lax.scan``; inputs are promoted to at least float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """Full-precision matmul whatever the backend's default (TPU/GPU would otherwise use reduced-precision passes)."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, and 0 where the denominator is 0."""
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0)


def _masked_tokens(x: jax.Array, token_mask: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """X promoted to float with masked rows zeroed, the float token mask [S], and the true token count."""
    x = jnp.asarray(x)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if token_mask is None:
        mask = jnp.ones(x.shape[0], x.dtype)
    else:
        mask = jnp.asarray(token_mask).astype(x.dtype)
    return jnp.where(mask[:, None] > 0, x, 0), mask, mask.sum()  # where, not *: padding may hold inf/NaN


def _effective_rank_of_spectrum(singular_values: jax.Array) -> jax.Array:
    """exp of the entropy of p_i = sigma_i / sum sigma; 0 for an all-zero spectrum (the zero matrix has rank 0)."""
    total = singular_values.sum()
    p = _safe_divide(singular_values, total)
    positive = p > 0
    spectral_entropy = -jnp.sum(jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1)), 0))
    return jnp.where(total > 0, jnp.exp(spectral_entropy), 0)


def effective_rank(x: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """methods §3 ``eRank(X) = exp(-sum p_i log p_i)`` with ``p_i = sigma_i / sum sigma`` (singular values, not squared).

    eRank(I_k) = k. Returns 0 for the zero matrix (and when every token is masked).
    """
    x, _, _ = _masked_tokens(x, token_mask)
    return _effective_rank_of_spectrum(jnp.linalg.svd(x, compute_uv=False))


def _kept_directions(singular_values: jax.Array, shape: tuple[int, int], rank, energy) -> jax.Array:
    """Float mask [K] over singular directions (sorted descending) keeping the first r.

    r = ``rank`` if given (may be traced), else the smallest rank holding ``energy`` of sum sigma^2; either way r is
    capped at the numerical rank (sigma > max(S, D) * eps * sigma_max, as numpy.linalg.matrix_rank), so that no
    direction of the null space, which the SVD picks arbitrarily, is ever kept.
    """
    n_directions = singular_values.shape[0]
    tolerance = max(shape) * jnp.finfo(singular_values.dtype).eps * singular_values[0]
    numerical_rank = jnp.sum(singular_values > tolerance)
    if rank is None:
        squared = singular_values**2
        cumulative_fraction = _safe_divide(jnp.cumsum(squared), squared.sum())
        rank = jnp.sum(cumulative_fraction < energy) + 1
    kept_rank = jnp.minimum(jnp.asarray(rank), numerical_rank)
    return (jnp.arange(n_directions) < kept_rank).astype(singular_values.dtype)


def rid_terms(
    x_new: jax.Array,
    x_old: jax.Array,
    token_mask: jax.Array | None = None,
    rank=None,
    energy: float = 0.99,
) -> tuple[jax.Array, jax.Array]:
    """The two terms of methods §3 RID(X'|X): (spectral change, subspace innovation).

    spectral change = ``|eRank(X') - eRank(X)| / min(S_true, D)``; subspace innovation =
    ``(||(I - P_C) X'||_F + ||X' (I - P_R)||_F) / (2 ||X'||_F)``, with P_C / P_R the projections onto the left / right
    singular subspaces of X truncated to rank r (see :func:`rid` for r). Each term is 0 when its denominator is 0.
    """
    x_new, _, n_tokens = _masked_tokens(x_new, token_mask)
    x_old, _, _ = _masked_tokens(x_old, token_mask)
    left, singular_old, right_t = jnp.linalg.svd(x_old, full_matrices=False)
    singular_new = jnp.linalg.svd(x_new, compute_uv=False)

    size = jnp.minimum(n_tokens, x_new.shape[1])
    spectral_change = _safe_divide(
        jnp.abs(_effective_rank_of_spectrum(singular_new) - _effective_rank_of_spectrum(singular_old)), size
    )

    kept = _kept_directions(singular_old, x_old.shape, rank, energy)
    left_kept = left * kept  # zeroed columns instead of slicing: r may be traced
    right_kept = right_t.T * kept
    column_residual = x_new - _matmul(left_kept, _matmul(left_kept.T, x_new))
    row_residual = x_new - _matmul(_matmul(x_new, right_kept), right_kept.T)
    subspace_innovation = _safe_divide(
        jnp.linalg.norm(column_residual) + jnp.linalg.norm(row_residual), 2 * jnp.linalg.norm(x_new)
    )
    return spectral_change, subspace_innovation


def rid(
    x_new: jax.Array,
    x_old: jax.Array,
    token_mask: jax.Array | None = None,
    rank=None,
    energy: float = 0.99,
) -> jax.Array:
    """methods §3 relative information delta RID(X'|X) = spectral change + subspace innovation, in [0, 2].

    ``rank`` r truncates the singular subspaces of X (an int or a traced int scalar); default: the smallest r holding
    ``energy`` (0.99 [inferred]) of X's squared singular-value energy. r is capped at X's numerical rank, so
    RID(X|X) = 0 at full rank. For an all-zero X no direction is kept (innovation 1 for a non-zero X').
    """
    spectral_change, subspace_innovation = rid_terms(x_new, x_old, token_mask, rank, energy)
    return spectral_change + subspace_innovation


def token_mixing_entropy(x: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """methods §3 token mixing entropy ``TME = mean_t H(P_t)``, ``P_tj ∝ (x~_t . x~_j + 1) / 2`` over j, in nats.

    x~ are unit-norm rows (a zero row stays zero, so its similarities are 1/2). Masked tokens are excluded both as t
    and as j. 0 when every token is masked.
    """
    x, mask, n_tokens = _masked_tokens(x, token_mask)
    norms = jnp.linalg.norm(x, axis=1, keepdims=True)
    unit = _safe_divide(x, norms)
    cosine = _matmul(unit, unit.T)
    affinity = jnp.clip((cosine + 1) / 2, 0, 1) * mask[None, :]  # clip: round-off can push |cos| past 1
    mixing = _safe_divide(affinity, affinity.sum(1, keepdims=True))
    positive = mixing > 0
    row_entropy = -jnp.sum(jnp.where(positive, mixing * jnp.log(jnp.where(positive, mixing, 1)), 0), axis=1)
    return _safe_divide(jnp.sum(row_entropy * mask), n_tokens)


def mix_ig(x_new: jax.Array, x_old: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """methods §3 ``MixIG = TME(X') - TME(X)``: positive when the update increases token mixing."""
    return token_mixing_entropy(x_new, token_mask) - token_mixing_entropy(x_old, token_mask)


def _full_mask(x: jax.Array, token_mask: jax.Array | None) -> jax.Array:
    return jnp.ones(x.shape[:2], bool) if token_mask is None else jnp.asarray(token_mask)


def batched_effective_rank(x: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """:func:`effective_rank` over a batch: x [B, S, D], token_mask [B, S] -> [B]."""
    return jax.vmap(effective_rank)(x, _full_mask(x, token_mask))


def batched_rid_terms(
    x_new: jax.Array, x_old: jax.Array, token_mask: jax.Array | None = None, rank=None, energy: float = 0.99
) -> tuple[jax.Array, jax.Array]:
    """:func:`rid_terms` over a batch: [B, S, D] pairs, token_mask [B, S], rank None, a scalar or [B] -> two [B]."""
    mask = _full_mask(x_new, token_mask)
    if rank is None:
        return jax.vmap(lambda new, old, m: rid_terms(new, old, m, None, energy))(x_new, x_old, mask)
    ranks = jnp.broadcast_to(jnp.asarray(rank), x_new.shape[:1])
    return jax.vmap(lambda new, old, m, r: rid_terms(new, old, m, r, energy))(x_new, x_old, mask, ranks)


def batched_rid(
    x_new: jax.Array, x_old: jax.Array, token_mask: jax.Array | None = None, rank=None, energy: float = 0.99
) -> jax.Array:
    """:func:`rid` over a batch: [B, S, D] pairs, token_mask [B, S], rank None, a scalar or [B] -> [B]."""
    spectral_change, subspace_innovation = batched_rid_terms(x_new, x_old, token_mask, rank, energy)
    return spectral_change + subspace_innovation


def batched_token_mixing_entropy(x: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """:func:`token_mixing_entropy` over a batch: x [B, S, D], token_mask [B, S] -> [B]."""
    return jax.vmap(token_mixing_entropy)(x, _full_mask(x, token_mask))


def batched_mix_ig(x_new: jax.Array, x_old: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """:func:`mix_ig` over a batch: [B, S, D] pairs, token_mask [B, S] -> [B]."""
    return jax.vmap(mix_ig)(x_new, x_old, _full_mask(x_new, token_mask))
