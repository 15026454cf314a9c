"""The VLM skeleton: the one forward every family runs, and its functional (params-in) form.

`VisionLanguageModel` is the base of each family's top-level Flax NNX module and the only code that embeds tokens,
gets image features, merges them into the sequence, builds rotary tables, runs the decoder and takes a cached
decode step. A family subclass builds its modules in `__init__` (`self.text`, a `Decoder`, plus its vision tower
and projector) and overrides only what differs: `image_features` (always), `merge_images` (default: HF's
masked scatter of the features, in order, over the image tokens), `rotary` / `step_rotary` (default: Llama's 1-D
rotary tables), `attention_mask` (default: causal with the config's sliding window).

Functional API. A model's parameters are a plain nested dict (`model.params`: the pytree that jit, vmap, grad,
orbax, the converters' key tables and the sharding rules use, e.g. params["text"]["layers"]["q"]["kernel"] stacked
[L, ...]). Its key paths are exactly the module tree's attribute paths, so the dict is the module's `nnx.Param`
state as a pure dict (`nnx.to_pure_dict(nnx.state(module))`). `graphdef(cfg)` is split once from an abstract module
(`nnx.eval_shape`, no weights allocated); `forward(params, batch, cfg, hooks)` merges it with the params inside the
traced function (`nnx.merge(graphdef, params)`) and calls the module, so it stays a pure function of
(params, batch, hooks). `bind(cfg, params)` gives the module itself (e.g. for `nnx.display`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from vlmjax import models
from vlmjax.hooks import Capture, Context, SiteRunner
from vlmjax.models.layers import additive_mask, causal_allowed, rope_inv_freq, rope_tables

HF_HIDDEN = "_hf_hidden_states"
HF_ATTENTIONS = "_hf_attentions"


class VisionLanguageModel(nnx.Module):
    """Image features written over the image tokens of a Llama-family decoder (`self.text`)."""

    def image_features(self, batch: dict, hooks, site: SiteRunner, equal_images: int | None) -> jax.Array:
        """The projected image features of the batch's images, in the order their tokens appear."""
        raise NotImplementedError

    def merge_images(self, x: jax.Array, batch: dict, features: jax.Array) -> jax.Array:
        """Write the image features, in order, over the image-token positions (HF's masked_scatter)."""
        b, n, d = x.shape
        is_image = (batch["input_ids"] == self.cfg.image_token_id).reshape(-1)
        flat = features.reshape(-1, d).astype(x.dtype)
        index = jnp.clip(jnp.cumsum(is_image) - 1, 0, flat.shape[0] - 1)
        return jnp.where(is_image[:, None], flat[index], x.reshape(-1, d)).reshape(b, n, d)

    def rotary(self, batch: dict, dtype) -> tuple[jax.Array, jax.Array]:
        """Llama-style rotary tables from 1-D position ids (HF's default: 0..N-1)."""
        input_ids = batch["input_ids"]
        positions = batch.get("position_ids")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        return rope_tables(rope_inv_freq(self.cfg.text.rope, self.cfg.text.head_dim), positions, dtype)

    def step_rotary(self, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
        """Rotary tables [B, 1, hd] for one decode step at positions [B]."""
        return rope_tables(rope_inv_freq(self.cfg.text.rope, self.cfg.text.head_dim), positions[:, None], dtype)

    def __call__(self, batch: dict, hooks=None, *, output_hidden_states: bool = False,
                 output_attentions: bool = False, logits: str | None = "all", start_layer: int = 0,
                 stop_layer: int | None = None, resid=None, equal_images: int | None = None) -> dict:
        """The forward: a dict of named intermediates ("logits", "last_hidden_state", "resid_final",
        "image_features", "hooks": {hook name: {site: record}}, HF-style "hidden_states" / "attentions" on request).

        `logits`: "all" (HF's [B, N, V]), "last" ([B, 1, V]) or None (no vocabulary projection). `stop_layer` /
        `start_layer` + `resid` split the decoder: a run stopped at layer l returns the residual entering layer l
        under "resid", and a run started at l from that residual skips the vision side and the layers before l (a
        sweep computes the part its values share once; see vlmjax.sweep). `equal_images` (static): the batch's
        images all have the same patch grid, so the vision tower may run image by image under `vmap` (Qwen2-VL's
        packed tower otherwise attends over all images' patches at once; LLaVA's runs per image anyway)."""
        hooks = output_hooks(hooks, output_hidden_states, output_attentions)
        input_ids = batch["input_ids"]
        key_padding = batch.get("attention_mask")
        key_padding = jnp.ones_like(input_ids, bool) if key_padding is None else key_padding.astype(bool)
        visual_mask = input_ids == self.cfg.image_token_id
        site = SiteRunner(hooks, Context(stack="", visual_mask=visual_mask, key_padding=key_padding))
        out = {}
        if resid is None:
            x = self.text.embed_tokens(jnp.where(visual_mask, 0, input_ids))
            if batch.get("pixel_values") is not None:
                out["image_features"] = self.image_features(batch, hooks, site, equal_images)
                x = self.merge_images(x, batch, out["image_features"])
            x = site("embed", x)
        else:
            x = resid
        cos, sin = self.rotary(batch, x.dtype)
        out.update(self.decode(x, cos, sin, key_padding, visual_mask, hooks, site, logits, start_layer=start_layer,
                               stop_layer=stop_layer, batch=batch))
        return out

    def decode_step(self, token, position, key_valid, visual_keys, index, hooks) -> dict:
        """One cached decode step for tokens [B] at rotary positions [B] and sequence index `index`; the KV cache
        is a hook (see vlmjax.generate), `key_valid` / `visual_keys` [B, S] cover the cache's positions."""
        x = self.text.embed_tokens(token)[:, None]
        cos, sin = self.step_rotary(position, x.dtype)
        site = SiteRunner(hooks, Context(stack="", visual_mask=visual_keys, key_padding=key_valid))
        return self.decode(site("embed", x), cos, sin, key_valid, visual_keys, hooks, site, "all",
                           query_offset=index)

    def attention_mask(self, key_padding, num_queries: int, dtype, query_offset=0, batch: dict | None = None):
        """The additive mask [B, 1, Nq, Nk] the decoder layers add to their scores: causal, padding and the config's
        sliding window. `batch` is the prompt's (None in a cached decode step)."""
        return additive_mask(causal_allowed(key_padding, num_queries, self.text.cfg.sliding_window, query_offset),
                             dtype)

    def decode(self, x, cos, sin, key_padding, visual_mask, hooks, site: SiteRunner, logits: str | None,
               query_offset=0, start_layer: int = 0, stop_layer: int | None = None, batch: dict | None = None) -> dict:
        """The decoder on input embeddings x (after the "embed" site): layers, final norm, logits and outputs.
        `query_offset` is the absolute index of the first query (keys then span the KV cache)."""
        text = self.text
        layers = text.cfg.num_layers
        stop_layer = layers if stop_layer is None else stop_layer
        mask_add = self.attention_mask(key_padding, x.shape[1], x.dtype, query_offset, batch)
        ctx = Context(stack="blocks", visual_mask=visual_mask, key_padding=key_padding)
        x, layer_records = text.run_layers(x, cos, sin, mask_add, hooks, ctx, start_layer, stop_layer)
        site.add_records(layer_records)
        if stop_layer < layers:
            return {"resid": x, "hooks": site.records}
        last_hidden = site("final_norm", text.final_norm(x))
        out = {"last_hidden_state": last_hidden, "resid_final": x}
        if logits is not None:
            out["logits"] = site("logits", text.unembed(last_hidden[:, -1:] if logits == "last" else last_hidden))
        records = dict(site.records)
        if HF_HIDDEN in records:
            r = records.pop(HF_HIDDEN)
            per_layer = r["resid_post"]
            out["hidden_states"] = (r["embed"], *[per_layer[i] for i in range(layers - 1)], r["final_norm"])
        if HF_ATTENTIONS in records:
            pattern = records.pop(HF_ATTENTIONS)["attn.pattern"]
            out["attentions"] = tuple(pattern[i] for i in range(layers))
        out["hooks"] = records
        return out


def output_hooks(hooks, output_hidden_states: bool, output_attentions: bool) -> dict:
    """The user's hooks plus the captures that HF-style `output_hidden_states` / `output_attentions` need."""
    hooks = dict(hooks or {})
    if output_hidden_states:
        hooks[HF_HIDDEN] = Capture(sites=frozenset({"embed", "resid_post", "final_norm"}))
    if output_attentions:
        hooks[HF_ATTENTIONS] = Capture(sites=frozenset({"attn.pattern"}))
    return hooks


def num_layers(cfg) -> dict[str, int]:
    """The depth of each layer stack of a decoder + vision tower family (its `num_layers`, unless it has more)."""
    return {"blocks": cfg.text.num_layers, "vision.blocks": cfg.vision.num_layers}


# -- functional API ------------------------------------------------------------------------------------------------


def model_class(cfg) -> type[VisionLanguageModel]:
    return models.family(cfg.model_type).Model


@functools.lru_cache(maxsize=None)
def _abstract(cfg) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0))))


def graphdef(cfg) -> nnx.GraphDef:
    """The module structure of a config's model (no weights): what `nnx.merge` combines with the params."""
    return _abstract(cfg)[0]


def param_shapes(cfg) -> dict:
    """The params' nested dict of shapes (the pytree the converter fills and checks)."""
    return jax.tree.map(lambda a: tuple(a.shape), nnx.to_pure_dict(_abstract(cfg)[1]))


def init_params(cfg, rngs: nnx.Rngs) -> dict:
    """Freshly initialised params (normal(0, 0.02) matrices and embeddings, zero biases, unit norm scales)."""
    return nnx.to_pure_dict(nnx.state(model_class(cfg)(cfg, rngs=rngs)))


def bind(cfg, params: dict) -> VisionLanguageModel:
    """The family's NNX module holding `params` (inside a traced function, the params may be tracers)."""
    return nnx.merge(graphdef(cfg), params)


def forward(params: dict, batch: dict, cfg, hooks=None, **options) -> dict:
    """The pure forward (see `VisionLanguageModel.__call__` for the options)."""
    return bind(cfg, params)(batch, hooks, **options)
