"""Llama-family causal decoder (Llama / Vicuna, Mistral with sliding window, Qwen2 with q/k/v biases).

Params: embed [V, D], layers (stacked [L, ...]: input_norm, q, k, v, o, post_attn_norm, gate, up, down),
final_norm, lm_head.kernel [D, V] (absent when the embeddings are tied). Rotary tables are inputs, so a model
with its own position scheme (Qwen2-VL's multimodal RoPE) reuses the block unchanged.
"""

from __future__ import annotations

import jax

from vlmjax.config import DecoderConfig
from vlmjax.hooks import Context, SiteRunner, scan_layers
from vlmjax.models.layers import activation, additive_mask, apply_rope, attention, causal_allowed, linear, rms_norm


def param_shapes(cfg: DecoderConfig) -> dict:
    d, L, hd = cfg.hidden_size, cfg.num_layers, cfg.head_dim

    def lin(n_in, n_out, bias):
        return {"kernel": (L, n_in, n_out), **({"bias": (L, n_out)} if bias else {})}

    shapes = {
        "embed": (cfg.vocab_size, d),
        "layers": {
            "input_norm": {"scale": (L, d)},
            "q": lin(d, cfg.num_heads * hd, cfg.attention_bias),
            "k": lin(d, cfg.num_kv_heads * hd, cfg.attention_bias),
            "v": lin(d, cfg.num_kv_heads * hd, cfg.attention_bias),
            "o": lin(cfg.num_heads * hd, d, cfg.o_bias),
            "post_attn_norm": {"scale": (L, d)},
            "gate": lin(d, cfg.intermediate_size, cfg.mlp_bias),
            "up": lin(d, cfg.intermediate_size, cfg.mlp_bias),
            "down": lin(cfg.intermediate_size, d, cfg.mlp_bias),
        },
        "final_norm": {"scale": (d,)},
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = {"kernel": (d, cfg.vocab_size)}
    return shapes


def attention_mask(cfg: DecoderConfig, key_padding: jax.Array, num_queries: int, dtype, query_offset=0):
    """Additive [B, 1, Nq, Nk] mask: causal, the sliding window if the config has one, and key padding."""
    allowed = causal_allowed(key_padding, num_queries, cfg.sliding_window, query_offset)
    return additive_mask(allowed, dtype)


def block(cfg: DecoderConfig, p: dict, x: jax.Array, run: SiteRunner, cos, sin, mask_add) -> jax.Array:
    b, n, _ = x.shape
    hd = cfg.head_dim
    x = run("resid_pre", x)
    h = run("attn.input", rms_norm(p["input_norm"], x, cfg.rms_norm_eps))
    q = run("attn.q", linear(p["q"], h).reshape(b, n, cfg.num_heads, hd))
    k = run("attn.k", linear(p["k"], h).reshape(b, n, cfg.num_kv_heads, hd))
    v = run("attn.v", linear(p["v"], h).reshape(b, n, cfg.num_kv_heads, hd))
    q, k = apply_rope(q, cos, sin), run("attn.rot_k", apply_rope(k, cos, sin))
    z = attention(q, k, v, mask_add, run, hd**-0.5)
    x = x + run("attn.out", linear(p["o"], z.reshape(b, n, cfg.num_heads * hd)))
    x = run("resid_mid", x)
    h = rms_norm(p["post_attn_norm"], x, cfg.rms_norm_eps)
    h = run("mlp.hidden", activation(cfg.hidden_act)(linear(p["gate"], h)) * linear(p["up"], h))
    x = x + run("mlp.out", linear(p["down"], h))
    return run("resid_post", x)


def run_layers(params, x, cos, sin, mask_add, hooks, ctx: Context, cfg: DecoderConfig, start=0, stop=None):
    """Layers [start, stop) under a scan: (x, records stacked over those layers)."""
    stop = cfg.num_layers if stop is None else stop
    return scan_layers(
        lambda p, h, r: block(cfg, p, h, r, cos, sin, mask_add), params["layers"], x, hooks, ctx, start, stop
    )


def unembed_matrix(params: dict) -> jax.Array:
    """[D, V]: the LM head, or the transposed embeddings when tied."""
    return params["lm_head"]["kernel"] if "lm_head" in params else params["embed"].T


HF_HIDDEN = "_hf_hidden_states"
HF_ATTENTIONS = "_hf_attentions"


def output_hooks(hooks, output_hidden_states: bool, output_attentions: bool) -> dict:
    """The user's hooks plus the captures that HF-style `output_hidden_states` / `output_attentions` need."""
    from vlmjax.hooks import Capture

    hooks = dict(hooks or {})
    if output_hidden_states:
        hooks[HF_HIDDEN] = Capture(sites=frozenset({"embed", "resid_post", "final_norm"}))
    if output_attentions:
        hooks[HF_ATTENTIONS] = Capture(sites=frozenset({"attn.pattern"}))
    return hooks


def forward_from_embeddings(
    params, x, cos, sin, key_padding, visual_mask, hooks, run_global, cfg: DecoderConfig, logits: str | None = "all",
    query_offset=0, start_layer=0, stop_layer=None, embed_site=True,
) -> dict:
    """Run the decoder on merged input embeddings and return the named intermediates.

    `run_global` is the SiteRunner of the global sites (it already holds the records of the vision side);
    `logits` is "all" (HF's [B, N, V]), "last" (the last position only, [B, 1, V]) or None (no vocabulary
    projection at all, for runs that only want hidden states or metrics). `query_offset` is the absolute index of
    the first query (decoding with a KV cache: keys are the cache's positions, `key_padding` and `visual_mask`
    cover them). With `start_layer` > 0, `x` is the residual entering that layer; with `stop_layer` < L, the run
    ends there and returns that layer's input residual under "resid" (no final norm, no logits). `embed_site`
    False: `x` is a residual resumed from an earlier run, whose "embed" site has already run."""
    stop_layer = cfg.num_layers if stop_layer is None else stop_layer
    if embed_site:
        x = run_global("embed", x)
    mask_add = attention_mask(cfg, key_padding, x.shape[1], x.dtype, query_offset)
    ctx = Context(stack="blocks", visual_mask=visual_mask, key_padding=key_padding)
    x, layer_records = run_layers(params, x, cos, sin, mask_add, hooks, ctx, cfg, start_layer, stop_layer)
    if stop_layer < cfg.num_layers:
        return {"resid": x, "hooks": _merged(run_global.records, layer_records)}
    last_hidden = run_global("final_norm", rms_norm(params["final_norm"], x, cfg.rms_norm_eps))
    out = {"last_hidden_state": last_hidden, "resid_final": x}
    if logits is not None:
        h = last_hidden[:, -1:] if logits == "last" else last_hidden
        out["logits"] = run_global("logits", h @ unembed_matrix(params).astype(h.dtype))
    records = _merged(run_global.records, layer_records)
    if HF_HIDDEN in records:
        r = records.pop(HF_HIDDEN)
        per_layer = r["resid_post"]
        out["hidden_states"] = (r["embed"], *[per_layer[i] for i in range(cfg.num_layers - 1)], r["final_norm"])
    if HF_ATTENTIONS in records:
        pattern = records.pop(HF_ATTENTIONS)["attn.pattern"]
        out["attentions"] = tuple(pattern[i] for i in range(cfg.num_layers))
    out["hooks"] = records
    return out


def _merged(global_records: dict, layer_records: dict) -> dict:
    """{hook name: {site: record}} from the global sites and the layer scan."""
    records = {name: dict(r) for name, r in global_records.items()}
    for name, r in layer_records.items():
        records.setdefault(name, {}).update(r)
    return records
