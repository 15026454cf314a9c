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

import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.api import ordered
from vlmjax.errors import VlmJaxError
from vlmjax.hooks import Capture, Hook
from vlmjax.models import vlm

_PREFILL = "_kv_prefill"
_CACHE = "_kv_cache"


class KVCache(Hook):
    """Per-layer key/value cache [L, B, S, KVH, hd]; writes this step's keys/values at `index`."""

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


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "do_sample", "temperature", "top_p",
                                             "contrastive"))
def _generate(model, params, batch, position, hooks, key, eos, pad, max_new_tokens, do_sample, temperature, top_p,
              contrastive=False, alpha=1.0, beta=0.1):
    cfg = model.config
    net = vlm.bind(cfg, params)
    b, n = batch["input_ids"].shape
    prefill_hooks = {**hooks, _PREFILL: Capture(sites=frozenset({"attn.rot_k", "attn.v"}))}
    out = net(batch, prefill_hooks, logits="last")
    captured = out["hooks"][_PREFILL]
    grow = lambda c: jnp.pad(c, ((0, 0), (0, 0), (0, max_new_tokens), (0, 0), (0, 0)))
    cache_k, cache_v = grow(captured["attn.rot_k"]), grow(captured["attn.v"])
    key_valid = jnp.pad(batch["attention_mask"].astype(bool), ((0, 0), (0, max_new_tokens)))
    visual_keys = jnp.pad(batch["input_ids"] == cfg.image_token_id, ((0, 0), (0, max_new_tokens)))

    def choose(logits, key):
        """One token per stream; with `contrastive`, rows [:B/2] (real) and [B/2:] (distorted) share it."""
        if not contrastive:
            return _next_token(logits, key, do_sample, temperature, top_p)
        half = logits.shape[0] // 2
        token = _next_token(contrastive_logits(logits[:half], logits[half:], alpha, beta), key, do_sample,
                            temperature, top_p)
        return jnp.concatenate([token, token])

    key, sub = jax.random.split(key)
    first_logits = out["logits"][:, -1]
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
        nxt = choose(res["logits"][:, -1], sub)
        carry = (nxt, cache["attn.rot_k"], cache["attn.v"], key_valid, position + 1, index + 1, finished, key)
        return carry, token

    carry = (first, cache_k, cache_v, key_valid, position, jnp.asarray(n, jnp.int32), finished, key)
    _, tokens = jax.lax.scan(step, carry, None, length=max_new_tokens)
    if contrastive:
        half = b // 2
        first_logits = contrastive_logits(first_logits[:half], first_logits[half:], alpha, beta)
        tokens = tokens[:, :half]
    return tokens.T, first_logits


def generate(model, inputs: dict, max_new_tokens: int = 20, *, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, key=None, eos_token_id: int | None = None, pad_token_id: int | None = None,
             hooks=None, return_first_logits: bool = False, contrast_pixel_values=None, alpha: float = 1.0,
             beta: float = 0.1):
    """[B, N + max_new_tokens] token ids: the prompt followed by the generated tokens (pad after an EOS), like
    HF `generate(..., max_new_tokens=...)` with a fixed length. `hooks` apply in prefill and in every step.
    With `return_first_logits`, also the first decode step's logits [B, V] (for first-token scoring).

    With `contrast_pixel_values` (the same images distorted, e.g. `vcd_noise`), decodes VCD-style: the real and
    the distorted streams run together as one batch of 2B and each step's token comes from
    `contrastive_logits(real, distorted, alpha, beta)`; the returned first logits are the contrasted ones."""
    if do_sample and key is None:
        raise VlmJaxError("Sampling needs an explicit PRNG key: generate(..., do_sample=True, key=jax.random.key(0)).")
    if temperature <= 0 or not 0 < top_p <= 1:
        raise VlmJaxError(f"temperature must be > 0 and top_p in (0, 1], got {temperature} and {top_p}.")
    batch, _ = model.prepare(inputs)
    contrastive = contrast_pixel_values is not None
    if contrastive and model.config.model_type == "qwen2_vl":
        raise VlmJaxError("Contrastive (VCD) decoding is implemented for LLaVA-style families; Qwen2-VL's packed "
                          "patches are not supported yet.")
    if contrastive:
        distorted = np.asarray(contrast_pixel_values, batch["pixel_values"].dtype)
        if distorted.shape != batch["pixel_values"].shape:
            raise VlmJaxError(f"contrast_pixel_values has shape {distorted.shape}, the images {batch['pixel_values'].shape}.")
        batch = {k: np.concatenate([v, distorted if k == "pixel_values" else v]) for k, v in batch.items()}
    batch, position = model.module.decode_start(batch)
    eos = -1 if eos_token_id is None else eos_token_id
    pad = (eos if eos >= 0 else 0) if pad_token_id is None else pad_token_id
    key = jax.random.key(0) if key is None else key
    new, first_logits = _generate(model, model.params, batch, position, ordered(hooks), key, eos, pad, max_new_tokens, do_sample,
                                  float(temperature), float(top_p), contrastive, alpha, beta)
    prompt = batch["input_ids"][: new.shape[0]]
    tokens = np.concatenate([prompt, np.asarray(new)], axis=1)
    return (tokens, np.asarray(first_logits)) if return_first_logits else tokens
