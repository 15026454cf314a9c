"""Residual-stream probes (methods §1, §3, §5): logit lens, real-vs-null update cosine, update geometry, hidden
states at chosen positions, the RoPE baseline; the ranking of units for probe-guided ablation."""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from vlmjax.errors import VlmJaxError
from vlmjax.hooks import ATTENTION_SITES, Hook
from vlmjax.metrics import (batched_effective_rank, batched_mix_ig, batched_rid, cosine_of_updates, gather_positions,
                            lens_target_rank_and_prob, lens_top_k)
from vlmjax.models.decoder import unembed_matrix
from vlmjax.models.layers import rms_norm
from vlmjax.probes.token_sets import last_position, text_after_image


class LogitLens(Hook):
    """methods §1 logit lens: each layer's output (resid_post) at chosen positions read through the final norm and the
    unembedding. Site: resid_post. Record per layer: top_ids [B, P, k] int32, top_probs [B, P, k] and, with target
    ids, target_rank [B, P] (0 = top-1) and target_prob [B, P]. The last layer reproduces the model's own output."""

    query_blocks: ClassVar[bool] = True

    final_norm_scale: Any  # [D]
    unembedding: Any  # [D, V]
    positions: Any = None  # [B, P] int, or None for the last real token
    target_ids: Any = None  # [B, P] (or broadcastable) int, or None
    k: int = struct.field(pytree_node=False, default=5)
    eps: float = struct.field(pytree_node=False, default=1e-6)
    norm_offset: float = struct.field(pytree_node=False, default=0.0)  # Gemma's (1 + w) norm: 1.0
    softcap: float | None = struct.field(pytree_node=False, default=None)  # Gemma 2's final logit soft-cap

    @classmethod
    def from_model(cls, model, k: int = 5, positions=None, target_ids=None):
        """With the decoder's final norm (scale, eps, offset), unembedding and logit soft-cap (for params holding a
        "text" decoder)."""
        text, cfg = text_params(model.params), model.config.text
        return cls(text["final_norm"]["scale"], unembed_matrix(text),
                   None if positions is None else jnp.asarray(positions, jnp.int32),
                   None if target_ids is None else jnp.asarray(target_ids, jnp.int32),
                   k, cfg.rms_norm_eps, cfg.norm_offset, cfg.final_logit_softcap)

    def __call__(self, site, value, ctx):
        if site != "resid_post":
            return value, None
        positions = last_position(ctx.key_padding)[:, None] if self.positions is None else self.positions
        residual = gather_positions(value, positions)
        final_norm = functools.partial(rms_norm, {"scale": self.final_norm_scale}, eps=self.eps,
                                       offset=self.norm_offset)
        top_ids, top_probs = lens_top_k(residual, final_norm, self.unembedding, self.k, self.softcap)
        record = {"top_ids": top_ids, "top_probs": top_probs}
        if self.target_ids is not None:
            record["target_rank"], record["target_prob"] = lens_target_rank_and_prob(
                residual, final_norm, self.unembedding, self.target_ids, self.softcap)
        return value, record


class ResidualUpdateCosine(Hook):
    """methods §1 language-prior collapse: `mean_{i in T} cos(h_l[i] - h_{l-1}[i] (real), same (null image))` per layer.
    The batch holds the pairs: its first half the real images, its second half the same prompts with null images
    (`paired_inputs`). Site: resid_post (the update against ctx.earlier's resid_pre). Record [B / 2] per layer."""

    query_blocks: ClassVar[bool] = True

    def __call__(self, site, value, ctx):
        if site != "resid_post":
            return value, None
        if value.shape[0] % 2:
            raise VlmJaxError(f"ResidualUpdateCosine needs a batch of (real, null) pairs, an even batch size; got "
                              f"{value.shape[0]}. Build it with vlmjax.probes.paired_inputs.")
        half = value.shape[0] // 2
        update = value - ctx.earlier["resid_pre"]
        text = text_after_image(ctx.visual_mask, ctx.key_padding)[:half]
        return value, cosine_of_updates(update[:half], update[half:], text)


def paired_inputs(inputs: Mapping[str, Any], null_pixel_values) -> dict:
    """Processor outputs doubled for ResidualUpdateCosine: the same prompts twice, the real images then the null ones
    (e.g. `vlmjax.interventions.null_image(pixel_values, "black", mean, std)`)."""
    paired = {key: np.concatenate([np.asarray(v), np.asarray(v)]) for key, v in inputs.items()
              if key != "pixel_values" and v is not None}
    paired["pixel_values"] = np.concatenate([np.asarray(inputs["pixel_values"]), np.asarray(null_pixel_values)])
    return paired


GEOMETRY_TOKENS = ("all", "visual", "text")


class UpdateGeometry(Hook):
    """methods §3 information geometry of the attention update (X = resid_pre, X' = resid_mid) and the MLP update
    (X = resid_mid, X' = resid_post), per sample over its real tokens (`tokens`: all, visual or text ones).
    Sites: resid_mid (attention), resid_post (MLP). Record per site and layer: erank_before, erank_after, rid and
    mix_ig, each [B]. RID's rank is the smallest holding `energy` of X's squared singular values [inferred]."""

    query_blocks: ClassVar[bool] = True

    tokens: str = struct.field(pytree_node=False, default="all")
    energy: float = struct.field(pytree_node=False, default=0.99)

    def __call__(self, site, value, ctx):
        before_site = {"resid_mid": "resid_pre", "resid_post": "resid_mid"}.get(site)
        if before_site is None:
            return value, None
        if self.tokens not in GEOMETRY_TOKENS:
            raise VlmJaxError(f"UpdateGeometry tokens must be one of {GEOMETRY_TOKENS}, got {self.tokens!r}.")
        before = ctx.earlier[before_site]
        scope = {"all": True, "visual": ctx.visual_mask, "text": ~ctx.visual_mask}[self.tokens]
        mask = ctx.key_padding & scope
        record = {
            "erank_before": batched_effective_rank(before, mask),
            "erank_after": batched_effective_rank(value, mask),
            "rid": batched_rid(value, before, mask, energy=self.energy),
            "mix_ig": batched_mix_ig(value, before, mask),
        }
        return value, record


class HiddenStates(Hook):
    """A block site's value at chosen positions (default: the last real token) and, with `only_layers`, only at those
    layers, e.g. for linear probes (methods §5). Record [B, P, ...] per recorded layer."""

    @property
    def query_blocks(self) -> bool:
        return self.site not in ATTENTION_SITES

    positions: Any = None  # [B, P] int, or None for the last real token
    site: str = struct.field(pytree_node=False, default="resid_post")
    only_layers: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)

    def __call__(self, site, value, ctx):
        if site != self.site:
            return value, None
        positions = last_position(ctx.key_padding)[:, None] if self.positions is None else self.positions
        index = jnp.asarray(positions, jnp.int32).reshape(positions.shape + (1,) * (value.ndim - 2))
        return value, jnp.take_along_axis(value, index, axis=1)


class RopeBaseline(Hook):
    """methods §3 RoPE baseline eps_RoPE = RID(X with rotary | X without), per layer and sample, X being the keys of all
    heads side by side ([N, KVH * hd], real tokens) [inferred: the methods name no tensor; keys are where rotary acts
    and what attention reads]. Site: attn.rot_k (needs attn.k earlier in the block). Record [B] per layer."""

    query_blocks: ClassVar[bool] = True

    energy: float = struct.field(pytree_node=False, default=0.99)

    def __call__(self, site, value, ctx):
        if site != "attn.rot_k":
            return value, None
        flat = lambda k: k.reshape(*k.shape[:2], -1)
        return value, batched_rid(flat(value), flat(ctx.earlier["attn.k"]), ctx.key_padding, energy=self.energy)


class ResidualRopeBaseline(Hook):
    """methods §3 RoPE baseline on the tensor of the attention RID: `eps_RoPE = RID(X' | X'_noRoPE)` per layer and
    sample, X' = resid_mid (the residual after attention, as `UpdateGeometry` measures the attention update) and
    X'_noRoPE = resid_pre + the same layer's attention recomputed from the same queries, keys and values without
    rotary (the scores' mask kept), over the sample's real tokens. So the attention RID can be read against the
    innovation that rotary alone puts into that tensor. The recomputation reads the block's attn.q/k/v and
    attn.scores (for the mask; a hook that changes the scores' values is not seen) and the output projection passed
    in (`from_model`). Site: resid_mid. Record [B] per layer."""

    per_layer = ("o_kernel", "o_bias")
    o_kernel: Any  # [L, H * hd, D]
    o_bias: Any  # [L, D] (zeros for a model without an output bias)
    energy: float = struct.field(pytree_node=False, default=0.99)

    @classmethod
    def from_model(cls, model, energy: float = 0.99):
        o = text_params(model.params)["layers"]["o"]
        return cls(o["kernel"], o.get("bias", jnp.zeros(o["kernel"].shape[::2], o["kernel"].dtype)), energy)

    def __call__(self, site, value, ctx):
        if site != "resid_mid":
            return value, None
        q, k, v = (ctx.earlier[s].astype(jnp.float32) for s in ("attn.q", "attn.k", "attn.v"))
        k, v = (jnp.repeat(t, q.shape[2] // t.shape[2], axis=2) for t in (k, v))
        masked = ctx.earlier["attn.scores"]
        allowed = masked > jnp.finfo(masked.dtype).min / 2
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
        pattern = jax.nn.softmax(jnp.where(allowed, scores, jnp.finfo(jnp.float32).min), axis=-1)
        z = jnp.einsum("bhqk,bkhd->bqhd", pattern, v).reshape(*q.shape[:2], -1)
        without = ctx.earlier["resid_pre"].astype(jnp.float32) + z @ self.o_kernel.astype(jnp.float32) + self.o_bias
        return value, batched_rid(value, without, ctx.key_padding, energy=self.energy)


def text_params(params: dict) -> dict:
    if "text" not in params:
        raise VlmJaxError(f"This probe needs the decoder's params under 'text'; the model's params have "
                          f"{sorted(params)}.")
    return params["text"]


def rank_units(weights, activations) -> np.ndarray:
    """Units (MLP neurons, residual dimensions) ordered for probe-guided ablation, most important first, by the
    standardised coefficient `|w_i| * std_i` (methods §5).

    `weights` [D] are a linear probe's coefficients on the raw activations, `activations` [Q, D] the units' values
    on the questions the probe was fit on. Ranking by |w_i| alone favours low-variance units: a unit that barely
    varies needs a large coefficient to move the probe's logit, yet zeroing it changes little. |w_i| std_i is the
    change of the logit per standard deviation of the unit, its contribution at its own scale; it is unchanged when
    a unit is rescaled (w_i / c, c x_i) and equals |weight| of a probe fit on standardised features. Ties keep
    the lower index first."""
    weights, activations = np.asarray(weights, dtype=float), np.asarray(activations, dtype=float)
    if weights.ndim != 1 or activations.ndim != 2 or activations.shape[1] != len(weights):
        raise VlmJaxError(f"rank_units needs weights [D] and activations [Q, D], got {weights.shape} and "
                          f"{activations.shape}.")
    return np.argsort(-(np.abs(weights) * activations.std(axis=0)), kind="stable")
