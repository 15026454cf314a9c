"""DoLa, decoding by contrasting layers (Chuang et al. 2023; docs/methods.md §6), as pure jnp pieces that
`vlmjax.generate` runs inside its compiled decode (`generate(..., dola_layers=[...])`).

At each step, every candidate (premature) layer j gives an early-exit distribution q_j: the logit lens (final norm
and LM head) on that layer's resid_post at the current position. The premature layer is chosen per sample and per
step as M = argmax_j JSD(q_N || q_j), with q_N the model's own output distribution, and the next token is the
argmax of the contrast `log q_N - log q_M` over the plausible tokens, those with `q_N >= relative_top * max q_N`
(the others get -inf). Only the candidates' residuals at the last position ([C, B, D]) leave the layer scan.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from vlmjax.hooks import Hook
from vlmjax.metrics.lens import lens_logits
from vlmjax.models.layers import rms_norm

RELATIVE_TOP = 0.1  # the paper's alpha: tokens below 0.1 x the most probable one's q_N are cut


class LastResidual(Hook):
    """resid_post at the last position, [B, D], at `only_layers` only (records stack over them, increasing)."""

    query_blocks: ClassVar[bool] = True

    only_layers: tuple[int, ...] = struct.field(pytree_node=False, default=())

    def __call__(self, site, value, ctx):
        return (value, value[:, -1]) if site == "resid_post" else (value, None)


def jensen_shannon(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """JSD(p || q) in nats over the last axis, from log-probabilities: `(KL(p || m) + KL(q || m)) / 2`,
    m = (p + q) / 2. Bounded by log 2."""
    log_m = jnp.logaddexp(log_p, log_q) - jnp.log(2.0)

    def kl_to_m(log_a):
        a = jnp.exp(log_a)
        return jnp.sum(jnp.where(a > 0, a * (log_a - log_m), 0.0), axis=-1)

    return 0.5 * (kl_to_m(log_p) + kl_to_m(log_q))


def dola_scores(final_logits, candidate_residuals, final_norm_scale, unembedding, eps: float,
                relative_top: float = RELATIVE_TOP, norm_offset: float = 0.0, softcap: float | None = None):
    """(scores [B, V], premature [B] index into the candidates) from the model's logits [B, V] and the candidate
    layers' residuals [C, B, D]: `log q_N - log q_M` with M the candidate of largest JSD(q_N || q_j), and -inf where
    `log q_N < log(relative_top) + max log q_N`. `norm_offset` / `softcap`: the decoder's (Gemma's (1 + w) norm,
    Gemma 2's logit soft-cap), so the early exits read the layers as the model's own head does."""
    log_final = jax.nn.log_softmax(final_logits.astype(jnp.float32), axis=-1)
    final_norm = functools.partial(rms_norm, {"scale": final_norm_scale}, eps=eps, offset=norm_offset)
    log_early = jax.nn.log_softmax(lens_logits(candidate_residuals, final_norm, unembedding, softcap), axis=-1)
    premature = jnp.argmax(jensen_shannon(log_final[None], log_early), axis=0)
    log_premature = jnp.take_along_axis(log_early, premature[None, :, None], axis=0)[0]
    cut = log_final < jnp.log(relative_top) + jnp.max(log_final, axis=-1, keepdims=True)
    return jnp.where(cut, -jnp.inf, log_final - log_premature), premature.astype(jnp.int32)
