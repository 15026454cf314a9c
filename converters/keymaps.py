"""HF checkpoint key <-> vlmjax parameter path lookup over a family's key table (`KEY_ROWS` in its model file).

Each row is (HF key template, vlmjax path, transform), the template in the layout the family's HF class writes
(the newest where there are several). `{i}` is a layer index: those rows fill one slot of a stacked [L, ...] array,
slot i; a row may add a fourth entry, `layers(cfg)` -> the HF layer numbers of its slots, for a path stacked over
some layers only (InstructBLIP's Q-Former cross-attention, every `cross_attention_frequency`-th layer). Keys and
templates are both rewritten by `CANONICAL_PREFIXES` before they are compared, so both `language_model.model.*`
(transformers < 4.52) and `model.language_model.*` load.
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
    """Lookup both ways for one family's table (`cfg` gives the HF layer numbers of rows that name them)."""

    def __init__(self, rows, cfg=None):
        if cfg is None and any(len(row) > 3 for row in rows):
            raise ValueError("This key table stacks some paths over chosen layers: pass the model config to KeyMap.")
        self.rows = tuple(row[:3] for row in rows)
        self._hf_layers = {row[1]: tuple(row[3](cfg)) for row in rows if len(row) > 3}  # path -> HF layer per slot
        self._patterns = [
            (re.compile("^" + re.escape(canonical_key(t)).replace(r"\{i\}", r"(\d+)") + "$"), path, tr)
            for t, path, tr in self.rows
        ]

    def lookup(self, hf_key: str):
        """(path, layer slot or None, transform) for an HF key in any supported layout, or None if unknown."""
        key = canonical_key(hf_key)
        for pattern, path, transform in self._patterns:
            m = pattern.match(key)
            if m:
                if not m.groups():
                    return path, None, transform
                layer = int(m.group(1))
                if path not in self._hf_layers:
                    return path, layer, transform
                if layer in self._hf_layers[path]:
                    return path, self._hf_layers[path].index(layer), transform
        return None

    def hf_layer(self, path: str, slot: int) -> int:
        """The HF layer number of a stacked path's slot."""
        return self._hf_layers[path][slot] if path in self._hf_layers else slot

    def hf_keys(self, path: str, num_layers: int | None):
        """The HF keys of one vlmjax path: one per layer slot for stacked paths, as (key, slot, transform)."""
        for template, p, transform in self.rows:
            if p == path:
                if "{i}" in template:
                    layers = self._hf_layers.get(path, range(num_layers))
                    return [(template.format(i=hf), slot, transform) for slot, hf in enumerate(layers)]
                return [(template, None, transform)]
        raise KeyError(path)
