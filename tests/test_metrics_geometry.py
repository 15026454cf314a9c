"""vlmjax.metrics.geometry against plain NumPy (float64, on the true tokens only) with padding masks."""

import math

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", False)
jax.config.update("jax_default_matmul_precision", "highest")

from vlmjax.metrics import geometry as gm  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
SEQ, DIM = 12, 7


def _ref_effective_rank(x):
    sigma = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
    if sigma.sum() == 0:
        return 0.0
    p = sigma / sigma.sum()
    p = p[p > 0]
    return math.exp(-np.sum(p * np.log(p)))


def _ref_rid(x_new, x_old, rank=None, energy=0.99):
    """Both terms of RID(X'|X) on the true tokens (rows already selected)."""
    x_new, x_old = np.asarray(x_new, np.float64), np.asarray(x_old, np.float64)
    spectral = abs(_ref_effective_rank(x_new) - _ref_effective_rank(x_old)) / min(x_new.shape)
    u, sigma, vt = np.linalg.svd(x_old, full_matrices=False)
    numerical_rank = np.linalg.matrix_rank(x_old)
    if rank is None:
        energy_fraction = np.cumsum(sigma**2) / np.sum(sigma**2)
        rank = next(r + 1 for r in range(len(sigma)) if energy_fraction[r] >= energy)
    rank = min(rank, numerical_rank)
    u_r, v_r = u[:, :rank], vt[:rank].T
    column_residual = x_new - u_r @ u_r.T @ x_new
    row_residual = x_new - x_new @ v_r @ v_r.T
    innovation = (np.linalg.norm(column_residual) + np.linalg.norm(row_residual)) / (2 * np.linalg.norm(x_new))
    return spectral, innovation


def _ref_tme(x):
    x = np.asarray(x, np.float64)
    entropies = []
    for t in range(len(x)):
        weights = np.array(
            [(x[t] @ x[j] / (np.linalg.norm(x[t]) * np.linalg.norm(x[j])) + 1) / 2 for j in range(len(x))]
        )
        p = weights / weights.sum()
        entropies.append(-sum(pj * math.log(pj) for pj in p if pj > 0))
    return float(np.mean(entropies))


def _sample(seed, low_rank=None, seq=SEQ, dim=DIM):
    rng = np.random.default_rng(seed)
    if low_rank:
        x = rng.normal(size=(seq, low_rank)) @ rng.normal(size=(low_rank, dim))
        x = x + 1e-2 * rng.normal(size=(seq, dim))  # a dominant low-rank part, small full-rank rest
    else:
        x = rng.normal(size=(seq, dim))
    update = rng.normal(size=(seq, dim)) * 0.5
    return x.astype(np.float32), (x + update).astype(np.float32)


PADDED_MASK = np.array([False, False] + [True] * 8 + [False, False])  # left and right padding


def _padded(x):
    """Put garbage (inf) in the padded rows: the mask must exclude them entirely."""
    return np.where(PADDED_MASK[:, None], x, np.inf).astype(np.float32)


def test_effective_rank():
    x_old, _ = _sample(0)
    np.testing.assert_allclose(gm.effective_rank(x_old), _ref_effective_rank(x_old), **TOL)
    np.testing.assert_allclose(gm.effective_rank(_padded(x_old), PADDED_MASK), _ref_effective_rank(x_old[PADDED_MASK]),
                               **TOL)
    for k in (1, 3, 6):
        np.testing.assert_allclose(gm.effective_rank(np.eye(k, dtype=np.float32)), k, **TOL)
    np.testing.assert_array_equal(gm.effective_rank(np.zeros((4, 3), np.float32)), 0.0)
    np.testing.assert_array_equal(gm.effective_rank(_padded(x_old), np.zeros(SEQ, bool)), 0.0)


def test_rid_matches_reference():
    for seed, low_rank in [(1, None), (2, 3)]:
        x_old, x_new = _sample(seed, low_rank)
        np.testing.assert_allclose(gm.rid_terms(x_new, x_old), _ref_rid(x_new, x_old), **TOL)
        np.testing.assert_allclose(gm.rid(x_new, x_old), sum(_ref_rid(x_new, x_old)), **TOL)
        np.testing.assert_allclose(gm.rid(x_new, x_old, rank=2), sum(_ref_rid(x_new, x_old, rank=2)), **TOL)
        np.testing.assert_allclose(gm.rid(x_new, x_old, energy=0.5), sum(_ref_rid(x_new, x_old, energy=0.5)), **TOL)
        masked = gm.rid_terms(_padded(x_new), _padded(x_old), PADDED_MASK)  # min(S, D) uses the 8 true tokens
        np.testing.assert_allclose(masked, _ref_rid(x_new[PADDED_MASK], x_old[PADDED_MASK]), **TOL)
    # the low-rank sample keeps 3 directions at 99% energy, which is what makes its innovation non-trivial
    x_old, _ = _sample(2, 3)
    sigma = np.linalg.svd(x_old, compute_uv=False)
    assert np.searchsorted(np.cumsum(sigma**2) / np.sum(sigma**2), 0.99) + 1 == 3


def test_rid_identity_and_edge_cases():
    x_old, x_new = _sample(3)
    full_rank = min(SEQ, DIM)
    np.testing.assert_allclose(gm.rid(x_old, x_old, rank=full_rank), 0.0, atol=1e-5)
    np.testing.assert_allclose(gm.rid(x_old, x_old, energy=1.0), 0.0, atol=1e-5)
    np.testing.assert_allclose(gm.rid(x_old, x_old, rank=100), 0.0, atol=1e-5)  # capped at the numerical rank
    # a zero X keeps no direction: all of X' is innovation (and the eRank change is eRank(X') / min(S, D))
    zero = np.zeros_like(x_old)
    np.testing.assert_allclose(gm.rid_terms(x_new, zero)[1], 1.0, **TOL)
    np.testing.assert_allclose(gm.rid_terms(x_new, zero)[0], _ref_effective_rank(x_new) / full_rank, **TOL)
    np.testing.assert_array_equal(gm.rid(zero, zero), 0.0)
    np.testing.assert_array_equal(gm.rid(_padded(x_new), _padded(x_old), np.zeros(SEQ, bool)), 0.0)


def test_token_mixing_entropy_and_mix_ig():
    x_old, x_new = _sample(4)
    np.testing.assert_allclose(gm.token_mixing_entropy(x_old), _ref_tme(x_old), **TOL)
    np.testing.assert_allclose(gm.token_mixing_entropy(_padded(x_old), PADDED_MASK), _ref_tme(x_old[PADDED_MASK]),
                               **TOL)
    np.testing.assert_allclose(gm.mix_ig(x_new, x_old), _ref_tme(x_new) - _ref_tme(x_old), **TOL)
    np.testing.assert_allclose(
        gm.mix_ig(_padded(x_new), _padded(x_old), PADDED_MASK),
        _ref_tme(x_new[PADDED_MASK]) - _ref_tme(x_old[PADDED_MASK]),
        **TOL,
    )
    identical_tokens = np.tile(x_old[:1], (5, 1))  # all cosines 1: P uniform, TME = log 5
    np.testing.assert_allclose(gm.token_mixing_entropy(identical_tokens), math.log(5), **TOL)
    np.testing.assert_array_equal(gm.token_mixing_entropy(_padded(x_old), np.zeros(SEQ, bool)), 0.0)


def test_batched_jit_and_traced_rank():
    samples = [_sample(seed, low_rank) for seed, low_rank in [(5, None), (6, 2), (7, 4)]]
    x_old = np.stack([s[0] for s in samples])
    x_new = np.stack([s[1] for s in samples])
    masks = np.zeros((3, SEQ), bool)
    masks[0, :] = True
    masks[1, 3:10] = True
    masks[2, :5] = True
    x_old_padded = np.where(masks[..., None], x_old, np.inf).astype(np.float32)
    x_new_padded = np.where(masks[..., None], x_new, np.inf).astype(np.float32)

    expected = {
        "erank": [_ref_effective_rank(x_new[b][masks[b]]) for b in range(3)],
        "rid": [sum(_ref_rid(x_new[b][masks[b]], x_old[b][masks[b]])) for b in range(3)],
        "rid_rank": [sum(_ref_rid(x_new[b][masks[b]], x_old[b][masks[b]], rank=r)) for b, r in enumerate([1, 2, 3])],
        "tme": [_ref_tme(x_new[b][masks[b]]) for b in range(3)],
        "mix_ig": [_ref_tme(x_new[b][masks[b]]) - _ref_tme(x_old[b][masks[b]]) for b in range(3)],
    }
    computed = {
        "erank": gm.batched_effective_rank(x_new_padded, masks),
        "rid": gm.batched_rid(x_new_padded, x_old_padded, masks),
        "rid_rank": gm.batched_rid(x_new_padded, x_old_padded, masks, rank=np.array([1, 2, 3])),
        "tme": gm.batched_token_mixing_entropy(x_new_padded, masks),
        "mix_ig": gm.batched_mix_ig(x_new_padded, x_old_padded, masks),
    }
    for name in expected:
        np.testing.assert_allclose(computed[name], expected[name], **TOL, err_msg=name)
    np.testing.assert_allclose(gm.batched_effective_rank(x_new), [_ref_effective_rank(x) for x in x_new], **TOL)

    jitted = {
        "erank": jax.jit(gm.batched_effective_rank)(x_new_padded, masks),
        "rid": jax.jit(gm.batched_rid)(x_new_padded, x_old_padded, masks),
        "rid_rank": jax.jit(gm.batched_rid)(x_new_padded, x_old_padded, masks, jnp.array([1, 2, 3])),
        "tme": jax.jit(gm.batched_token_mixing_entropy)(x_new_padded, masks),
        "mix_ig": jax.jit(gm.batched_mix_ig)(x_new_padded, x_old_padded, masks),
    }
    for name in expected:
        np.testing.assert_allclose(jitted[name], computed[name], **TOL, err_msg=name)
    # a traced scalar rank inside jit (truncation by a mask, not a slice)
    rid_with_rank = jax.jit(lambda new, old, r: gm.rid(new, old, rank=r))
    for r in (1, 4):
        np.testing.assert_allclose(rid_with_rank(x_new[0], x_old[0], r), sum(_ref_rid(x_new[0], x_old[0], rank=r)),
                                   **TOL)
