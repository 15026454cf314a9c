"""Gradients with respect to every layer's output (methods §1 gradient visual importance)."""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.api import jit_per_model
from vlmjax.errors import VlmJaxError
from vlmjax.hooks import Hook
from vlmjax.metrics import gather_positions
from vlmjax.models.decoder import unembed_matrix
from vlmjax.models.layers import softcap
from vlmjax.probes.residual import text_params
from vlmjax.probes.token_sets import last_position


class ResidualProbe(Hook):
    """Adds `delta[l]` ([B, N, D], zeros) to each layer's output: the gradient of any function of the output with
    respect to delta is its gradient with respect to the layer outputs. Site: resid_post."""

    query_blocks: ClassVar[bool] = True

    per_layer = ("delta",)
    delta: Any  # [L, B, N, D]

    def __call__(self, site, value, ctx):
        if site != "resid_post":
            return value, None
        return value + self.delta.astype(value.dtype), None


@jit_per_model()
def _target_logit_gradients(model, params, batch, target_ids, query_index):
    b, n = batch["input_ids"].shape
    d = model.config.text.hidden_size
    num_layers = model.num_layers["blocks"]

    def target_logit(delta):
        out = model.forward(params, batch, {"probe": ResidualProbe(delta)}, logits=None)
        final = gather_positions(out["last_hidden_state"], query_index[:, None])[:, 0]
        logits = softcap(final @ unembed_matrix(text_params(params)).astype(final.dtype),
                         model.config.text.final_logit_softcap)
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
