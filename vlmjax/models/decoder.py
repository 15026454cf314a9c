"""Llama-family causal decoder (Llama / Vicuna, Mistral with sliding window, Qwen2 with q/k/v biases) as Flax NNX
modules.

Params (`Decoder`): embed [V, D], layers (one `DecoderBlock` holding every layer, stacked [L, ...]: input_norm, q,
k, v, o, post_attn_norm, gate, up, down), final_norm, lm_head.kernel [D, V] (absent when the embeddings are tied).
Rotary tables and the mask are inputs, so a model with its own position scheme (Qwen2-VL's multimodal RoPE) reuses
the block unchanged. The forward that runs it (embedding, merge, rotary, logits, decode steps) is `models/vlm.py`.
"""

from __future__ import annotations

import jax
from flax import nnx

from vlmjax.config import DecoderConfig
from vlmjax.hooks import SiteRunner
from vlmjax.models.layers import (Linear, RMSNorm, activation, apply_rope, attention, key_rows, scan_stack,
                                  softcap, weight)

_T = "model.language_model."
KEY_ROWS = (
    (_T + "embed_tokens.weight", "text/embed", "none"),
    (_T + "norm.weight", "text/final_norm/scale", "none"),
    ("lm_head.weight", "text/lm_head/kernel", "linear"),
    *key_rows(_T + "layers.{i}.", "text/layers/", (("input_layernorm", "input_norm"),
                                                   ("post_attention_layernorm", "post_attn_norm")), "norm", False),
    *key_rows(_T + "layers.{i}.", "text/layers/", (("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"),
                                                   ("self_attn.v_proj", "v"), ("self_attn.o_proj", "o"),
                                                   ("mlp.gate_proj", "gate"), ("mlp.up_proj", "up"),
                                                   ("mlp.down_proj", "down"))),
)


class DecoderBlock(nnx.Module):
    """All L decoder layers, parameters stacked [L, ...]; called on one layer's slice (see `scan_stack`)."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        d, hd, L, i = cfg.hidden_size, cfg.head_dim, (cfg.num_layers,), cfg.intermediate_size
        self.cfg = cfg
        self.input_norm = RMSNorm(d, cfg.rms_norm_eps, offset=cfg.norm_offset, layers=L)
        self.q = Linear(d, cfg.num_heads * hd, bias=cfg.attention_bias, layers=L, rngs=rngs)
        self.k = Linear(d, cfg.num_kv_heads * hd, bias=cfg.attention_bias, layers=L, rngs=rngs)
        self.v = Linear(d, cfg.num_kv_heads * hd, bias=cfg.attention_bias, layers=L, rngs=rngs)
        self.o = Linear(cfg.num_heads * hd, d, bias=cfg.o_bias, layers=L, rngs=rngs)
        self.post_attn_norm = RMSNorm(d, cfg.rms_norm_eps, offset=cfg.norm_offset, layers=L)
        self.gate = Linear(d, i, bias=cfg.mlp_bias, layers=L, rngs=rngs)
        self.up = Linear(d, i, bias=cfg.mlp_bias, layers=L, rngs=rngs)
        self.down = Linear(i, d, bias=cfg.mlp_bias, layers=L, rngs=rngs)

    def self_attention(self, h: jax.Array, run: SiteRunner, cos, sin, mask_add, scale: float,
                       logit_cap: float | None = None) -> jax.Array:
        """Per-head mixed values [B, N, H, hd] of normed h: q, k, v, rotary, attention, with their sites."""
        cfg, (b, n, _) = self.cfg, h.shape
        hd = cfg.head_dim
        q = run("attn.q", self.q(h).reshape(b, n, cfg.num_heads, hd))
        k = run("attn.k", self.k(h).reshape(b, n, cfg.num_kv_heads, hd))
        v = run("attn.v", self.v(h).reshape(b, n, cfg.num_kv_heads, hd))
        q, k = apply_rope(q, cos, sin), run("attn.rot_k", apply_rope(k, cos, sin))
        return attention(q, k, v, mask_add, run, scale, logit_cap)

    def __call__(self, x: jax.Array, run: SiteRunner, cos, sin, mask_add) -> jax.Array:
        cfg, (b, n, _) = self.cfg, x.shape
        x = run("resid_pre", x)
        z = self.self_attention(run("attn.input", self.input_norm(x)), run, cos, sin, mask_add, cfg.head_dim**-0.5)
        x = x + run("attn.out", self.o(z.reshape(b, n, cfg.num_heads * cfg.head_dim)))
        x = run("resid_mid", x)
        h = self.post_attn_norm(x)
        h = run("mlp.hidden", activation(cfg.hidden_act)(self.gate(h)) * self.up(h))
        x = x + run("mlp.out", self.down(h))
        return run("resid_post", x)


class Decoder(nnx.Module):
    Block = DecoderBlock  # the stacked layers' module (a family with other layers subclasses Decoder)

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = weight(rngs, cfg.vocab_size, cfg.hidden_size)
        self.layers = self.Block(cfg, rngs=rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=cfg.norm_offset)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False,
                                                                   rngs=rngs)

    def run_layers(self, x, cos, sin, mask_add, hooks, ctx, start: int, stop: int):
        """Layers [start, stop) under the layer scan: (x, records stacked over those layers)."""
        return scan_stack(self.layers, lambda layer, h, run: layer(h, run, cos, sin, mask_add), x, hooks, ctx,
                          start, stop)

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        """Input embeddings [..., D] of token ids."""
        return self.embed[...][ids]

    def unembed(self, h: jax.Array) -> jax.Array:
        """Logits of normed hidden states h [..., D] (soft-capped where the config says so)."""
        logits = h @ unembed_matrix(nnx.to_pure_dict(nnx.state(self))).astype(h.dtype)
        return softcap(logits, self.cfg.final_logit_softcap)


def unembed_matrix(text_params: dict) -> jax.Array:
    """[D, V] from the decoder's parameters: the LM head, or the transposed embeddings when tied."""
    return text_params["lm_head"]["kernel"] if "lm_head" in text_params else text_params["embed"].T
