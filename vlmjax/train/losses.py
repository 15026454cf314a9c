"""The two losses: grounding (visual tokens towards the words of what they show) and the reply cross-entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlmjax.train.data import model_batch


def grounding_loss(params, image_features: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean over labelled visual tokens of the cross-entropy between softmax(feature . word embeddings) and the
    target putting, for each object the token shows, its pixel share half on its colour word and half on its shape
    word: it aligns each visual token with the embeddings of what it shows (LLaVA's projector alignment, with the
    vision tower trained too). ``labels`` [images, tokens, objects, 2] and ``weights`` [images, tokens, objects] as
    ``patch_labels`` gives them; ``image_features`` holds those images' tokens in order (Qwen2-VL's packed rows may
    end in padding rows, which are dropped)."""
    images, tokens = labels.shape[:2]
    features = image_features.reshape(-1, image_features.shape[-1])[:images * tokens].reshape(images, tokens, -1)
    log_probs = jax.nn.log_softmax(features.astype(jnp.float32) @ params["text"]["embed"].T)
    picked = jnp.take_along_axis(log_probs[:, :, None, :], jnp.maximum(labels, 0), axis=-1)  # [I, T, K, 2]
    nll = -(picked.mean(-1) * weights).sum(-1)
    labelled = weights.sum(-1) > 0
    return jnp.sum(nll) / jnp.maximum(jnp.sum(labelled), 1)



def training_forward(model, params, batch: dict, logits: str | None) -> dict:
    """``model.forward`` on a training batch, whose images all have the same size: for Qwen2-VL the vision tower
    then runs image by image under ``vmap`` (the skeleton's ``equal_images``), the same numbers as the packed
    block-diagonal attention without its cost quadratic in the batch's total patch count."""
    return model.forward(params, model_batch(batch), logits=logits, equal_images=batch["patch_labels"].shape[0])


def training_loss(model, params, batch, grounding_weight: float) -> tuple[jax.Array, dict]:
    """Answer loss (cross-entropy of the reply tokens given everything before them, averaged with the batch's
    ``loss_weights``) plus ``grounding_weight`` x ``grounding_loss``; returns (total, {"answer": ..., "grounding":
    ...})."""
    out = training_forward(model, params, batch, logits="all")
    log_probs = jax.nn.log_softmax(out["logits"][:, :-1].astype(jnp.float32))
    targets, mask = batch["input_ids"][:, 1:], batch["loss_weights"][:, 1:]
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    answer = jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1)
    grounding = grounding_loss(params, out["image_features"], batch["patch_labels"], batch["patch_weights"])
    return answer + grounding_weight * grounding, {"answer": answer, "grounding": grounding}


def alignment_loss(model, params, batch) -> tuple[jax.Array, dict]:
    """``grounding_loss`` alone, on prompts of visual tokens only (the decoder's outputs are unused, so jit drops
    the decoder): the first stage, which trains the vision tower and projector."""
    out = training_forward(model, params, batch, logits=None)
    grounding = grounding_loss(params, out["image_features"], batch["patch_labels"], batch["patch_weights"])
    return grounding, {"grounding": grounding}
