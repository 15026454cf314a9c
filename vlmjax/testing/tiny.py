"""Tiny randomly initialised HF checkpoints with a locally built tokenizer and processor.

No model hub is reachable here, so the tests, the benchmarks and `vlmjax verify --tiny` build their models with
this module: a real `LlavaForConditionalGeneration` saved by `save_pretrained`, loaded back through the
same code path a user's real checkpoint takes. Its tokenizer is `vlmjax.processors.build_tokenizer`'s word-level one.
Needs the `reference` extra (torch).
"""

from __future__ import annotations

from pathlib import Path

from vlmjax.processors import IMAGE_TOKEN, build_tokenizer

# Configurations that differ in what matters for parity (issue 2).
VARIANTS = {
    "mha": dict(text=dict(num_attention_heads=4, num_key_value_heads=4)),
    "gqa": dict(text=dict(num_attention_heads=4, num_key_value_heads=2)),
    "mistral": dict(text=dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=16)),
    "full_last": dict(vision_feature_layer=-1, vision_feature_select_strategy="full"),
    "multi_layer": dict(vision_feature_layer=[-3, -1]),
    "tied": dict(text=dict(tie_word_embeddings=True), tie_word_embeddings=True),
    "rope_linear": dict(text=dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
}


def random_model(model_class, cfg, seed: int):
    """An HF model of `cfg` with seeded random weights, every parameter perturbed: HF's default init is near zero
    or one for norms and biases, so without it a parity test could miss a wrong norm or bias."""
    import torch

    torch.manual_seed(seed)
    model = model_class(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def text_config(layers: int, vocab_size: int, **changes):
    """The tiny decoder of the LLaVA-style builders: a Llama config, or a Mistral one with model_type="mistral"."""
    from transformers import LlamaConfig, MistralConfig

    spec = {**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=2048, pad_token_id=3,
                   bos_token_id=1, eos_token_id=2), **changes}
    model_type = spec.pop("model_type", "llama")
    return (MistralConfig if model_type == "mistral" else LlamaConfig)(**spec)


def clip_config(layers: int, image_size: int, patch_size: int, **changes):
    """The tiny CLIP vision tower of the LLaVA builders."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**{**dict(hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                                      num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                                      projection_dim=32), **changes})


def save(out_dir: str | Path, model, processor):
    """Save a tiny model and its processor into `out_dir` as a checkpoint directory; (model, processor)."""
    model.save_pretrained(str(out_dir))
    processor.save_pretrained(str(out_dir))
    return model, processor


def make_tiny_llava(out_dir: str | Path, variant: str = "gqa", seed: int = 0, vocab_size: int = 128,
                    image_size: int = 56, patch_size: int = 14, text_layers: int = 3, vision_layers: int = 3,
                    overrides: dict | None = None):
    """Build, save and return (model, processor) of a tiny random LLaVA with a working processor."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    spec = {**VARIANTS[variant], **(overrides or {})}
    tokenizer = build_tokenizer()
    top = {k: v for k, v in spec.items() if k not in ("text", "vision")}
    cfg = LlavaConfig(vision_config=clip_config(vision_layers, image_size, patch_size, **spec.get("vision", {})),
                      text_config=text_config(text_layers, vocab_size, **spec.get("text", {})),
                      image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                      **{"vision_feature_layer": -2, "vision_feature_select_strategy": "default", **top})
    model = random_model(LlavaForConditionalGeneration, cfg, seed)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                               image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    return save(out_dir, model, processor)
