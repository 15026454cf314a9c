"""Decoding with a KV cache: one jitted prefill, then one jitted scan over the new tokens (no recompile per step),
both on the VLM skeleton (vlmjax.models.vlm): its forward for the prompt, its `decode_step` for each new token.

The cache is itself a hook: prefill captures every layer's rotated keys and values (sites `attn.rot_k`, `attn.v`);
each decode step's `KVCache` hook writes the new token's key and value into the cache at the step's index and hands
attention the whole cache, with the mask computed from the cache's valid positions. User hooks (interventions,
metrics) compose with it in prefill and in every step. Greedy decoding matches HF `generate` token for token
(each family's `decode_start` and its module's `step_rotary` give HF's positions: the mask's cumulative sum for
LLaVA-style models, the rope index plus `rope_deltas` for Qwen2-VL's M-RoPE).
"""

from __future__ import annotations

import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from vlmjax import dola
from vlmjax.api import jit_per_model, ordered
from vlmjax.checks import check_hooks
from vlmjax.errors import VlmJaxError
from vlmjax.hooks import Capture, Hook
from vlmjax.models import decoder, vlm
from vlmjax.probes.residual import paired_inputs

_PREFILL = "_kv_prefill"
_CACHE = "_kv_cache"
_DOLA = "_dola_candidates"


class KVCache(Hook):
    """Per-layer key/value cache [L, B, S, KVH, hd]; writes this step's keys/values at `index`."""

    query_blocks: ClassVar[bool] = True

    k: jax.Array
    v: jax.Array
    index: jax.Array
    per_layer = ("k", "v")

    def __call__(self, site, value, ctx):
        if site not in ("attn.rot_k", "attn.v"):
            return value, None
        cache = self.k if site == "attn.rot_k" else self.v
        cache = jax.lax.dynamic_update_slice_in_dim(cache, value.astype(cache.dtype), self.index, axis=1)
        return cache, cache


def _next_token(logits, key, do_sample: bool, temperature: float, top_p: float):
    """Greedy argmax, or sampling after temperature then nucleus (top-p) filtering, as HF orders them."""
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)  # ascending, as HF's TopPLogitsWarper
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = cumulative <= 1 - top_p
        remove_sorted = remove_sorted.at[..., -1].set(False)  # keep at least the most probable token
        remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
        logits = jnp.where(remove, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def contrastive_logits(real, distorted, alpha, beta):
    """VCD (docs/methods.md §6): (1 + a) l(v) - a l(v'), with tokens below log(beta) + max l(v) cut to -inf."""
    cutoff = jnp.log(beta) + jnp.max(real, axis=-1, keepdims=True)
    return jnp.where(real < cutoff, -jnp.inf, (1 + alpha) * real - alpha * distorted)


@jit_per_model(static_argnames=("max_new_tokens", "do_sample", "temperature", "top_p",
                                             "contrastive", "dola_layers", "dola_trace"))
def _generate(model, params, batch, position, hooks, key, eos, pad, max_new_tokens, do_sample, temperature, top_p,
              contrastive=False, alpha=1.0, beta=0.1, dola_layers=None, dola_trace=False):
    cfg = model.config
    net = vlm.bind(cfg, params)
    b, n = batch["input_ids"].shape
    if dola_layers:
        hooks = {**hooks, _DOLA: dola.LastResidual(only_layers=dola_layers)}
    prefill_hooks = {**hooks, _PREFILL: Capture(sites=frozenset({"attn.rot_k", "attn.v"}))}
    out = net(batch, prefill_hooks, logits="last")
    captured = out["hooks"][_PREFILL]
    grow = lambda c: jnp.pad(c, ((0, 0), (0, 0), (0, max_new_tokens), (0, 0), (0, 0)))
    cache_k, cache_v = grow(captured["attn.rot_k"]), grow(captured["attn.v"])
    key_valid = jnp.pad(batch["attention_mask"].astype(bool), ((0, 0), (0, max_new_tokens)))
    visual_keys = jnp.pad(batch["input_ids"] == cfg.image_token_id, ((0, 0), (0, max_new_tokens)))

    def scores(logits, records):
        """(the logits the token comes from, DoLa's premature layer [B] or None)."""
        if contrastive:
            half = logits.shape[0] // 2
            return contrastive_logits(logits[:half], logits[half:], alpha, beta), None
        if dola_layers:
            text = params["text"]
            contrast, premature = dola.dola_scores(logits, records[_DOLA]["resid_post"], text["final_norm"]["scale"],
                                                   decoder.unembed_matrix(text), cfg.text.rms_norm_eps,
                                                   norm_offset=cfg.text.norm_offset,
                                                   softcap=cfg.text.final_logit_softcap)
            return contrast, jnp.asarray(dola_layers, jnp.int32)[premature]
        return logits, None

    def choose(logits, key):
        """One token per stream; with `contrastive`, rows [:B/2] (real) and [B/2:] (distorted) share it."""
        token = _next_token(logits, key, do_sample, temperature, top_p)
        return jnp.concatenate([token, token]) if contrastive else token

    key, sub = jax.random.split(key)
    first_logits, first_layer = scores(out["logits"][:, -1], out["hooks"])
    first = choose(first_logits, sub)
    finished = jnp.zeros((b,), bool)

    def step(carry, _):
        token, cache_k, cache_v, key_valid, position, index, finished, key = carry
        token = jnp.where(finished, pad, token)
        finished = finished | (token == eos)
        key_valid = key_valid.at[:, index].set(True)
        hooks_now = {_CACHE: KVCache(k=cache_k, v=cache_v, index=index), **hooks}
        res = net.decode_step(token, position, key_valid, visual_keys, index, hooks_now)
        cache = res["hooks"][_CACHE]
        key, sub = jax.random.split(key)
        logits, premature = scores(res["logits"][:, -1], res["hooks"])
        nxt = choose(logits, sub)
        carry = (nxt, cache["attn.rot_k"], cache["attn.v"], key_valid, position + 1, index + 1, finished, key)
        return carry, (token, (premature, logits if dola_trace else None))

    carry = (first, cache_k, cache_v, key_valid, position, jnp.asarray(n, jnp.int32), finished, key)
    _, (tokens, (premature, step_scores)) = jax.lax.scan(step, carry, None, length=max_new_tokens)
    if contrastive:
        tokens = tokens[:, : b // 2]
    trace = None
    if dola_layers:  # the step that chose token t ran at step t - 1 (the first token came from the prefill)
        trace = {"premature_layer": jnp.concatenate([first_layer[None], premature[:-1]]).T}
        if dola_trace:
            trace["scores"] = jnp.concatenate([first_logits[None], step_scores[:-1]]).transpose(1, 0, 2)
    return tokens.T, first_logits, trace


def generate(model, inputs: dict, max_new_tokens: int = 20, *, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, key=None, eos_token_id: int | None = None, pad_token_id: int | None = None,
             hooks=None, return_first_logits: bool = False, contrast_pixel_values=None, alpha: float = 1.0,
             beta: float = 0.1, dola_layers=None, return_dola: bool = False):
    """[B, N + max_new_tokens] token ids: the prompt followed by the generated tokens (pad after an EOS), like
    HF `generate(..., max_new_tokens=...)` with a fixed length. `hooks` apply in prefill and in every step.
    With `return_first_logits`, also the first decode step's logits [B, V] (for first-token scoring).

    With `contrast_pixel_values` (the same images distorted, e.g. `vcd_noise`, in the family's layout: Qwen2-VL's
    packed patches too), decodes VCD-style: the real and the distorted streams run together as one batch of 2B and
    each step's token comes from `contrastive_logits(real, distorted, alpha, beta)`; the returned first logits are
    the contrasted ones.

    With `dola_layers` (decoder layer indices whose resid_post are the candidate premature layers), decodes
    DoLa-style (`vlmjax.dola`): each token comes from the contrast of the final layer with the candidate most
    different from it by JSD, with the plausibility cut at 0.1; the returned first logits are the contrast scores.
    `return_dola` adds a dict after the tokens (and first logits): "premature_layer" [B, T], the layer chosen for
    each new token, and "scores" [B, T, V], each token's contrast scores."""
    if do_sample and key is None:
        raise VlmJaxError("Sampling needs an explicit PRNG key: generate(..., do_sample=True, key=jax.random.key(0)).")
    if temperature <= 0 or not 0 < top_p <= 1:
        raise VlmJaxError(f"temperature must be > 0 and top_p in (0, 1], got {temperature} and {top_p}.")
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise VlmJaxError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    vocab = model.config.text.vocab_size
    for name, token in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if token is not None and not 0 <= token < vocab:
            raise VlmJaxError(f"{name} {token} is outside the vocabulary [0, {vocab}); use the tokenizer's.")
    contrastive = contrast_pixel_values is not None
    if contrastive:  # one batch of 2B: the prompts twice, real images then distorted ones (every family's layout)
        if inputs.get("pixel_values") is None:
            raise VlmJaxError("contrast_pixel_values (VCD) needs images: the inputs hold no pixel_values.")
        real = np.asarray(inputs["pixel_values"])
        distorted = np.asarray(contrast_pixel_values, real.dtype)
        if distorted.shape != real.shape:
            raise VlmJaxError(f"contrast_pixel_values has shape {distorted.shape}, the images {real.shape}.")
        inputs = paired_inputs(inputs, distorted)
    batch, _ = model.prepare(inputs)
    check_hooks(hooks or {}, model, batch)
    if return_dola and dola_layers is None:
        raise VlmJaxError("return_dola needs DoLa decoding: pass dola_layers=[...] too.")
    if dola_layers is not None:
        dola_layers = tuple(sorted({int(layer) for layer in dola_layers}))
        last = model.config.text.num_layers - 1
        if not dola_layers or not all(0 <= layer < last for layer in dola_layers) or contrastive:
            raise VlmJaxError(f"dola_layers must be a non-empty set of premature layers in 0..{last - 1} (layer "
                              f"{last} is the mature one), without contrast_pixel_values; got {dola_layers}.")
    batch, position = model.module.decode_start(batch)
    eos = -1 if eos_token_id is None else eos_token_id
    pad = (eos if eos >= 0 else 0) if pad_token_id is None else pad_token_id
    key = jax.random.key(0) if key is None else key
    new, first_logits, trace = _generate(model, model.params, batch, position, ordered(hooks), key, eos, pad,
                                         max_new_tokens, do_sample, float(temperature), float(top_p), contrastive,
                                         alpha, beta, dola_layers, return_dola)
    prompt = batch["input_ids"][: new.shape[0]]
    tokens = np.concatenate([prompt, np.asarray(new)], axis=1)
    extras = ([np.asarray(first_logits)] if return_first_logits else []) + (
        [jax.tree.map(np.asarray, trace)] if return_dola else [])
    return (tokens, *extras) if extras else tokens
