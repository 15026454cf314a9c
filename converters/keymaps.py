"""HF checkpoint key <-> vlmjax parameter path lookup over a family's key table (`KEY_ROWS` in its model file).

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
