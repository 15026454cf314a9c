"""Checks of processor outputs shared by every family: clear errors instead of wrong numbers or deep JAX traces."""

from __future__ import annotations

import numpy as np

from vlmjax.errors import VlmJaxError

IGNORED_INPUTS = ("token_type_ids",)  # returned by some tokenizers, unused by these models


def text_batch(inputs: dict, vocab_size: int, image_token_ids: tuple[int, ...], accepted: tuple[str, ...]) -> dict:
    """input_ids [B, N] int32, attention_mask [B, N] bool and position_ids if given, checked."""
    unknown = sorted(set(inputs) - set(accepted) - set(IGNORED_INPUTS))
    if unknown:
        raise VlmJaxError(f"Unexpected input(s) {unknown}; this model accepts {list(accepted)}.")
    if inputs.get("input_ids") is None:
        raise VlmJaxError("input_ids is required (the processor's output for the prompt).")
    ids = np.asarray(inputs["input_ids"])
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise VlmJaxError(f"input_ids must be an integer array [batch, length], got {ids.dtype} {ids.shape}.")
    text_ids = ids[~np.isin(ids, image_token_ids)]
    if text_ids.size and (text_ids.min() < 0 or text_ids.max() >= vocab_size):
        raise VlmJaxError(f"input_ids hold token ids outside the vocabulary [0, {vocab_size}): min {text_ids.min()}, "
                          f"max {text_ids.max()}. Use this model's tokenizer.")
    batch = {"input_ids": ids.astype(np.int32)}
    mask = inputs.get("attention_mask")
    if mask is not None:
        mask = np.asarray(mask)
        mask = mask[None] if mask.ndim == 1 else mask
        if mask.shape != ids.shape:
            raise VlmJaxError(f"attention_mask has shape {mask.shape} but input_ids has {ids.shape}.")
        batch["attention_mask"] = mask.astype(bool)
    else:
        batch["attention_mask"] = np.ones(ids.shape, bool)
    if inputs.get("position_ids") is not None:
        batch["position_ids"] = np.asarray(inputs["position_ids"]).astype(np.int32)
    return batch


def image_placeholder(processor) -> str:
    """What a prompt writes for one image: the processor's image token (LLaVA's ``<image>``), wrapped for Qwen2-VL in
    ``<|vision_start|>`` ... ``<|vision_end|>`` as its chat template does (its M-RoPE positions find images by the
    vision-start token); nothing for InstructBLIP, whose processor puts the image's tokens before the prompt."""
    if hasattr(processor, "qformer_tokenizer"):
        return ""
    token = getattr(processor, "image_token", "<image>")
    if token == "<|image_pad|>":
        return "<|vision_start|>" + token + "<|vision_end|>"
    return token



def with_image(processor, prompt: str) -> str:
    """A one-image prompt written with ``<image>`` (e.g. "USER: <image> {question} ASSISTANT:") as the processor's
    model takes it: ``<image>`` becomes `image_placeholder`, and for PaliGemma it moves to the front (its processor
    then adds BOS after the image tokens, so the image leads the prefix, the layout PaliGemma was trained on)."""
    placeholder = image_placeholder(processor)
    if type(processor).__name__ == "PaliGemmaProcessor":
        return placeholder + " ".join(prompt.replace("<image>", " ").split())
    return prompt.replace("<image>", placeholder)
