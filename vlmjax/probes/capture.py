"""Captures by canonical site name: `capture(sites, num_layers)` records named sites (`blocks.3.attn.pattern`,
`logits`) and only the named layers; `read_captures` reads them back."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax

from vlmjax.errors import VlmJaxError
from vlmjax.hooks import Capture, Hook, QFormerCapture, VisionCapture, parse_site


def capture(sites: Iterable[str], num_layers: Mapping[str, int]) -> dict[str, Hook]:
    """Hooks recording the named sites, keyed by the names: global sites (`logits`), decoder block sites
    (`blocks.3.attn.pattern`, recorded at that layer only) and vision block sites (`vision.blocks.1.resid_post`;
    the vision tower's capture stacks every layer it runs; likewise InstructBLIP's `qformer.blocks.0.*`). Names are
    checked with `vlmjax.hooks.parse_site` (an unknown name gets the nearest valid ones). Read the values with `read_captures(out, hooks, num_layers)`."""
    hooks = {}
    for name in sites:
        stack, layer, site = parse_site(name, num_layers)
        if stack == "":
            hooks[name] = Capture(sites=frozenset({site}))
        elif stack == "blocks":
            hooks[name] = Capture(sites=frozenset({site}), only_layers=(layer,))
        else:  # the vision tower's or InstructBLIP's Q-Former's blocks: every layer they run
            hooks[name] = (QFormerCapture if stack == "qformer.blocks" else VisionCapture)(sites=frozenset({site}))
    return hooks


def read_captures(out: Mapping[str, Any], hooks: Mapping[str, Hook], num_layers: Mapping[str, int]
                  ) -> dict[str, jax.Array]:
    """{site name: value} for the hooks `capture(sites, num_layers)` built (block sites without their layer axis)."""
    values = {}
    for name in hooks:
        stack, layer, site = parse_site(name, num_layers)
        value = out["hooks"][name][site]
        if stack == "blocks":
            value = value[0]
        elif stack == "vision.blocks":
            if layer >= value.shape[0]:
                raise VlmJaxError(f"{name}: this model's vision tower stops after layer {value.shape[0] - 1} (the "
                                  "layers after the feature layer are never run).")
            value = value[layer]
        elif stack == "qformer.blocks":  # every Q-Former layer runs
            value = value[layer]
        values[name] = value
    return values
