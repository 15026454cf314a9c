"""HF checkpoint key <-> vlmjax parameter path tables, one per model family.

Each row is (HF key template in the newest layout, vlmjax path, transform). `{i}` is a layer index: those rows
fill one slot of a stacked [L, ...] array. Older layouts are rewritten to the newest by `CANONICAL_PREFIXES`
before lookup, so both `language_model.model.*` (transformers < 4.52) and `model.language_model.*` load.
Transforms: "linear" (torch [out, in] <-> [in, out]), "conv" (Conv2d [D, C, p, p] <-> [C*p*p, D], and
Conv3d [D, C, T, p, p] <-> [C*T*p*p, D]), "none".
"""

from __future__ import annotations

import re

# (old prefix regex, new prefix), applied in order; the newest layout passes through unchanged.
CANONICAL_PREFIXES = (
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^image_newline$", "model.image_newline"),
    (r"^model\.vision_tower\.vision_model\.", "model.vision_tower."),
    # Qwen2-VL's flat layout (what transformers writes for it): model.{embed_tokens,layers,norm}.*, visual.*
    (r"^model\.(embed_tokens|layers|norm)\.", r"model.language_model.\1."),
    (r"^visual\.", "model.visual."),
)

# Buffers some checkpoints carry that are not parameters.
IGNORED_KEYS = (r"\.position_ids$", r"rotary_emb\.inv_freq$")

_V = "model.vision_tower."
_T = "model.language_model."
CLIP_ROWS = (
    (_V + "embeddings.patch_embedding.weight", "vision/patch_embed/kernel", "conv"),
    (_V + "embeddings.class_embedding", "vision/class_embed", "none"),
    (_V + "embeddings.position_embedding.weight", "vision/pos_embed", "none"),
    (_V + "pre_layrnorm.weight", "vision/pre_norm/scale", "none"),
    (_V + "pre_layrnorm.bias", "vision/pre_norm/bias", "none"),
    (_V + "post_layernorm.weight", "vision/post_norm/scale", "none"),
    (_V + "post_layernorm.bias", "vision/post_norm/bias", "none"),
    *[
        (_V + f"encoder.layers.{{i}}.{hf}.{w}", f"vision/layers/{ours}/{'kernel' if w == 'weight' else 'bias'}",
         "linear" if w == "weight" else "none")
        for hf, ours in (("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v"),
                         ("self_attn.out_proj", "o"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"))
        for w in ("weight", "bias")
    ],
    *[
        (_V + f"encoder.layers.{{i}}.{hf}.{w}", f"vision/layers/{ours}/{'scale' if w == 'weight' else 'bias'}", "none")
        for hf, ours in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"))
        for w in ("weight", "bias")
    ],
)

DECODER_ROWS = (
    (_T + "embed_tokens.weight", "text/embed", "none"),
    (_T + "norm.weight", "text/final_norm/scale", "none"),
    ("lm_head.weight", "text/lm_head/kernel", "linear"),
    (_T + "layers.{i}.input_layernorm.weight", "text/layers/input_norm/scale", "none"),
    (_T + "layers.{i}.post_attention_layernorm.weight", "text/layers/post_attn_norm/scale", "none"),
    *[
        (_T + f"layers.{{i}}.{hf}.{w}", f"text/layers/{ours}/{'kernel' if w == 'weight' else 'bias'}",
         "linear" if w == "weight" else "none")
        for hf, ours in (("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v"),
                         ("self_attn.o_proj", "o"), ("mlp.gate_proj", "gate"), ("mlp.up_proj", "up"),
                         ("mlp.down_proj", "down"))
        for w in ("weight", "bias")
    ],
)

LLAVA_ROWS = (
    *CLIP_ROWS,
    *[
        (f"model.multi_modal_projector.linear_{n}.{w}", f"projector/linear_{n}/{'kernel' if w == 'weight' else 'bias'}",
         "linear" if w == "weight" else "none")
        for n in (1, 2)
        for w in ("weight", "bias")
    ],
    *DECODER_ROWS,
)

def canonical_key(key: str) -> str:
    for old, new in CANONICAL_PREFIXES:
        key = re.sub(old, new, key)
    return key


def is_ignored(key: str) -> bool:
    return any(re.search(p, key) for p in IGNORED_KEYS)


class KeyMap:
    """Lookup both ways for one family's table."""

    def __init__(self, rows):
        self.rows = rows
        self._patterns = [
            (re.compile("^" + re.escape(t).replace(r"\{i\}", r"(\d+)") + "$"), path, tr) for t, path, tr in rows
        ]

    def lookup(self, hf_key: str):
        """(path, layer or None, transform) for an HF key in any supported layout, or None if unknown."""
        key = canonical_key(hf_key)
        for pattern, path, transform in self._patterns:
            m = pattern.match(key)
            if m:
                return path, (int(m.group(1)) if m.groups() else None), transform
        return None

    def hf_keys(self, path: str, num_layers: int | None):
        """The HF keys (newest layout) of one vlmjax path: one per layer for stacked paths."""
        for template, p, transform in self.rows:
            if p == path:
                if "{i}" in template:
                    return [(template.format(i=i), i, transform) for i in range(num_layers)]
                return [(template, None, transform)]
        raise KeyError(path)


# -- LLaVA-NeXT: LLaVA plus the learned newline vector that ends each row of the crop mosaic ---------------------
LLAVA_NEXT_ROWS = (*LLAVA_ROWS, ("model.image_newline", "image_newline", "none"))


# -- Qwen2-VL: native-resolution ViT (fused qkv, Conv3d patch embedding) + patch merger, Qwen2 decoder --------------
_QV = "model.visual."
QWEN2_VL_ROWS = (
    (_QV + "patch_embed.proj.weight", "vision/patch_embed/kernel", "conv"),  # Conv3d [D, C, T, p, p]
    *[
        (_QV + f"blocks.{{i}}.{hf}.{w}", f"vision/layers/{ours}/{'kernel' if w == 'weight' else 'bias'}",
         "linear" if w == "weight" else "none")
        for hf, ours in (("attn.qkv", "qkv"), ("attn.proj", "proj"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"))
        for w in ("weight", "bias")
    ],
    *[
        (_QV + f"blocks.{{i}}.{norm}.{w}", f"vision/layers/{norm}/{'scale' if w == 'weight' else 'bias'}", "none")
        for norm in ("norm1", "norm2")
        for w in ("weight", "bias")
    ],
    (_QV + "merger.ln_q.weight", "merger/norm/scale", "none"),
    (_QV + "merger.ln_q.bias", "merger/norm/bias", "none"),
    *[
        (_QV + f"merger.mlp.{hf}.{w}", f"merger/{ours}/{'kernel' if w == 'weight' else 'bias'}",
         "linear" if w == "weight" else "none")
        for hf, ours in (("0", "fc1"), ("2", "fc2"))
        for w in ("weight", "bias")
    ],
    *DECODER_ROWS,
)
