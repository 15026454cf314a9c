"""The user-facing model object: `model = vlmjax.load(path)`, `out = model(**processor_outputs)`."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vlmjax import config as vconfig
from vlmjax.errors import VlmJaxError
from vlmjax.visual import VisualTokens, llava_visual_tokens

ACCEPTED_INPUTS = ("input_ids", "attention_mask", "pixel_values", "position_ids")
IGNORED_INPUTS = ("token_type_ids",)  # returned by some tokenizers, unused by these models


class ModelOutput(dict):
    """A dict of named intermediates with attribute access (`out.logits`), like HF's ModelOutput."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"This output has no {name!r}; it has {sorted(self)}.") from None


def _to_numpy(x):
    if x is None:
        return None
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


class VLM:
    """A loaded model: its config, parameters (a plain pytree) and the pure forward function of its family."""

    def __init__(self, cfg, params, hf_config, path: Path | None = None):
        self.config = cfg
        self.params = params
        self.hf_config = hf_config
        self.path = path
        from converters.hf import model_module

        self.module = model_module(cfg)

    @property
    def dtype(self):
        return jax.tree.leaves(self.params)[0].dtype

    @property
    def num_layers(self) -> dict[str, int]:
        return {"blocks": self.config.text.num_layers, "vision.blocks": self.config.vision.num_layers}

    def __repr__(self):
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
        return f"VLM({self.config.model_type}, {n / 1e6:.2f}M params, {self.dtype}, from {self.path})"

    # -- inputs -------------------------------------------------------------------------------------------------
    def prepare(self, inputs: Mapping[str, Any]) -> tuple[dict, VisualTokens]:
        """Check and convert processor outputs (numpy or torch) into the batch the forward takes, with metadata."""
        unknown = sorted(set(inputs) - set(ACCEPTED_INPUTS) - set(IGNORED_INPUTS))
        if unknown:
            raise VlmJaxError(f"Unexpected input(s) {unknown} for {self.config.model_type}; accepted: "
                              f"{list(ACCEPTED_INPUTS)}.")
        if inputs.get("input_ids") is None:
            raise VlmJaxError("input_ids is required (the processor's output for the prompt).")
        ids = _to_numpy(inputs["input_ids"])
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise VlmJaxError(f"input_ids must be an integer array [batch, length], got {ids.dtype} {ids.shape}.")
        cfg = self.config
        text_ids = ids[ids != cfg.image_token_id]
        if text_ids.size and (text_ids.min() < 0 or text_ids.max() >= cfg.text.vocab_size):
            raise VlmJaxError(f"input_ids hold token ids outside the vocabulary [0, {cfg.text.vocab_size}): "
                              f"min {text_ids.min()}, max {text_ids.max()}. Use this model's tokenizer.")
        batch = {"input_ids": ids.astype(np.int32)}
        mask = _to_numpy(inputs.get("attention_mask"))
        if mask is not None:
            mask = mask[None] if mask.ndim == 1 else mask
            if mask.shape != ids.shape:
                raise VlmJaxError(f"attention_mask has shape {mask.shape} but input_ids has {ids.shape}.")
            batch["attention_mask"] = mask.astype(bool)
        else:
            batch["attention_mask"] = np.ones(ids.shape, bool)
        if inputs.get("position_ids") is not None:
            batch["position_ids"] = _to_numpy(inputs["position_ids"]).astype(np.int32).reshape(ids.shape)
        pixels = _to_numpy(inputs.get("pixel_values"))
        vc = cfg.vision
        if pixels is not None:
            want = (vc.num_channels, vc.image_size, vc.image_size)
            if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
                raise VlmJaxError(f"pixel_values must have shape [images, {want[0]}, {want[1]}, {want[2]}] for this "
                                  f"model, got {tuple(pixels.shape)}. Preprocess images with the model's processor.")
            batch["pixel_values"] = pixels.astype(np.dtype(self.dtype))
        meta = llava_visual_tokens(ids, cfg.image_token_id, vc.grid_size, cfg.vision_feature_select_strategy == "full",
                                   num_images=0 if pixels is None else pixels.shape[0])
        return batch, meta

    # -- forward ------------------------------------------------------------------------------------------------
    @functools.cached_property
    def _jitted(self):
        @functools.partial(jax.jit, static_argnames=("output_hidden_states", "output_attentions", "logits"))
        def run(params, batch, hooks, output_hidden_states, output_attentions, logits):
            return self.module.forward(params, batch, self.config, hooks, output_hidden_states=output_hidden_states,
                                       output_attentions=output_attentions, logits=logits)

        return run

    def forward(self, params, batch, hooks=None, **options):
        """The pure forward of this model's family with its config bound (use inside your own jit / vmap / grad)."""
        return self.module.forward(params, batch, self.config, hooks, **options)

    def __call__(self, *, output_hidden_states: bool = False, output_attentions: bool = False, hooks=None,
                 logits: str | None = "all", params=None, **inputs) -> ModelOutput:
        batch, meta = self.prepare(inputs)
        from vlmjax.hooks import check_per_layer

        check_per_layer(hooks or {}, self.num_layers)
        out = self._jitted(self.params if params is None else params, batch, hooks or {},
                           output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                           logits=logits)
        out = ModelOutput(out)
        out["visual"] = meta
        return out


def load(path: str | os.PathLike, dtype=None, progress: bool = True) -> VLM:
    """Load an HF checkpoint directory or a `vlmjax convert` output directory. `dtype` defaults to the stored one
    for converted checkpoints and to float32 for HF directories."""
    from converters import hf as hf_conv
    from converters import orbax_io

    path = Path(path)
    hf_config = hf_conv.read_hf_config(path)
    cfg = vconfig.from_hf(hf_config)
    if orbax_io.is_converted(path):
        dtype = dtype or orbax_io.stored_dtype(path)
        shapes = hf_conv.model_module(cfg).param_shapes(cfg)
        abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype)), shapes,
                                is_leaf=lambda x: isinstance(x, tuple))
        params = orbax_io.restore(path, abstract)
    else:
        params = hf_conv.load_params(path, cfg, dtype or jnp.float32, progress=progress)
    return VLM(cfg, jax.tree.map(jnp.asarray, params), hf_config, path)
