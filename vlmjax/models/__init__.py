"""Model families on one skeleton (`vlm.py`: the forward, the decode step and the functional API every family
shares). Each family file provides only what differs, under the same names, so the API, converter and CLI are
generic:

- `Model`: its Flax NNX top-level module (a `vlm.VisionLanguageModel`: vision tower, projector, merge and rotary)
- `config_from_hf(hf_config)` -> frozen config dataclass (hashable: a static jit argument)
- `KEY_ROWS` -> HF key table (see converters/keymaps.py; rows may map layers, given the config) and `conv_kernel_shape(cfg)` -> HF shape of its patch conv
- `prepare_batch(cfg, inputs, dtype)` -> (batch of numpy arrays, VisualTokens): checks processor outputs
- `decode_start(batch)` -> (prefill batch, first decode positions): HF's generation positions
- `num_layers(cfg)` -> {"blocks": L, "vision.blocks": Lv} (InstructBLIP also "qformer.blocks": Lq); optionally `check_dtype(cfg, dtype)`

Shared building blocks: `layers.py` (parameter modules, attention with sites, rotary, the layer scan),
`decoder.py` (the Llama-family decoder), `clip.py` (the CLIP vision tower).
"""

from __future__ import annotations

import importlib

from vlmjax.errors import VlmJaxError

FAMILIES = {
    "llava": "vlmjax.models.llava",
    "llava_next": "vlmjax.models.llava_next",
    "qwen2_vl": "vlmjax.models.qwen2_vl",
    "qwen2_5_vl": "vlmjax.models.qwen2_5_vl",
    "paligemma": "vlmjax.models.paligemma",
    "instructblip": "vlmjax.models.instructblip",
}


def family(model_type: str):
    """The family module for an HF model_type, with a clear error for one vlmjax does not implement."""
    if model_type not in FAMILIES:
        raise VlmJaxError(f"Unsupported model_type {model_type!r}. vlmjax implements {sorted(FAMILIES)}; check "
                          "config.json's model_type or open an issue for the family you need.")
    try:
        return importlib.import_module(FAMILIES[model_type])
    except ModuleNotFoundError as e:
        if e.name == FAMILIES[model_type]:
            raise VlmJaxError(f"model_type {model_type!r} is planned but not implemented yet in this version.") from None
        raise


def from_hf(hf_config):
    """The vlmjax config of an HF config object."""
    return family(getattr(hf_config, "model_type", None)).config_from_hf(hf_config)
