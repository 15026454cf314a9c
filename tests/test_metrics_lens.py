"""vlmjax.metrics.lens against plain NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", False)
jax.config.update("jax_default_matmul_precision", "highest")

from vlmjax.metrics import lens  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
BATCH, N_TOKENS, DIM, VOCAB = 2, 6, 8, 20

_rng = np.random.default_rng(0)
RESIDUAL = _rng.normal(size=(BATCH, N_TOKENS, DIM)).astype(np.float32)
NORM_WEIGHT = (1 + 0.1 * _rng.normal(size=DIM)).astype(np.float32)
UNEMBEDDING = _rng.normal(size=(DIM, VOCAB)).astype(np.float32)


def rms_norm(h):
    return h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6) * NORM_WEIGHT


def _ref_probabilities(residual):
    residual = np.asarray(residual, np.float64)
    normed = residual / np.sqrt(np.mean(residual**2, -1, keepdims=True) + 1e-6) * NORM_WEIGHT
    logits = normed @ UNEMBEDDING.astype(np.float64)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    return logits, probabilities / probabilities.sum(-1, keepdims=True)


def test_gather_positions():
    positions = np.array([[5, 0], [2, 3]])
    expected = np.stack([RESIDUAL[b, positions[b]] for b in range(BATCH)])
    np.testing.assert_array_equal(lens.gather_positions(RESIDUAL, positions), expected)


def test_top_k_and_target_rank():
    logits, probabilities = _ref_probabilities(RESIDUAL)
    np.testing.assert_allclose(lens.lens_logits(RESIDUAL, rms_norm, UNEMBEDDING), logits, **TOL)
    ids, top_probabilities = lens.lens_top_k(RESIDUAL, rms_norm, UNEMBEDDING, k=3)
    for b in range(BATCH):
        for i in range(N_TOKENS):
            order = sorted(range(VOCAB), key=lambda v: -probabilities[b, i, v])[:3]
            assert ids[b, i].tolist() == order
            np.testing.assert_allclose(top_probabilities[b, i], probabilities[b, i, order], **TOL)

    targets = np.array([[4], [17]])  # one target per sample, broadcast over positions
    rank, probability = lens.lens_target_rank_and_prob(RESIDUAL, rms_norm, UNEMBEDDING, targets)
    for b in range(BATCH):
        for i in range(N_TOKENS):
            target = targets[b, 0]
            assert rank[b, i] == sum(logits[b, i, v] > logits[b, i, target] for v in range(VOCAB))
            np.testing.assert_allclose(probability[b, i], probabilities[b, i, target], **TOL)
    top_ids = ids[..., 0]
    top_rank, _ = lens.lens_target_rank_and_prob(RESIDUAL, rms_norm, UNEMBEDDING, top_ids)
    np.testing.assert_array_equal(top_rank, 0)

    jitted_top_k = jax.jit(lens.lens_top_k, static_argnums=(1, 3))
    np.testing.assert_array_equal(jitted_top_k(RESIDUAL, rms_norm, UNEMBEDDING, 3)[0], ids)
    per_sample = jax.vmap(lambda r, t: lens.lens_target_rank_and_prob(r, rms_norm, UNEMBEDDING, t))(RESIDUAL, targets)
    np.testing.assert_array_equal(per_sample[0], rank)
    np.testing.assert_allclose(per_sample[1], probability, **TOL)


def test_cosine_of_updates():
    rng = np.random.default_rng(1)
    delta_a = rng.normal(size=(3, N_TOKENS, DIM)).astype(np.float32)
    delta_b = rng.normal(size=(3, N_TOKENS, DIM)).astype(np.float32)
    delta_a[0, 4] = 0  # a zero update counts as cosine 0
    delta_a[1, 0] = np.nan  # padding garbage outside the mask must not leak in
    mask = np.zeros((3, N_TOKENS), bool)
    mask[0, 2:] = True
    mask[1, 1:4] = True  # sample 2: empty mask -> 0

    expected = []
    for b in range(3):
        cosines = []
        for i in np.flatnonzero(mask[b]):
            norms = np.linalg.norm(delta_a[b, i]) * np.linalg.norm(delta_b[b, i])
            cosines.append(0.0 if norms == 0 else float(delta_a[b, i] @ delta_b[b, i]) / norms)
        expected.append(np.mean(cosines) if cosines else 0.0)
    result = lens.cosine_of_updates(delta_a, delta_b, mask)
    np.testing.assert_allclose(result, expected, **TOL)
    assert result[2] == 0.0
    np.testing.assert_allclose(jax.jit(lens.cosine_of_updates)(delta_a, delta_b, mask), result, **TOL)
    np.testing.assert_allclose(lens.cosine_of_updates(delta_b, delta_b, mask)[:2], 1.0, **TOL)
    np.testing.assert_allclose(lens.cosine_of_updates(delta_b, -2 * delta_b, mask)[:2], -1.0, **TOL)
    assert math.isfinite(float(result[1]))
