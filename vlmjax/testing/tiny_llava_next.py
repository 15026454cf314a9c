"""Tiny randomly initialised LLaVA-NeXT checkpoints with a locally built tokenizer and PIL processor.

As `vlmjax.testing.tiny` for LLaVA: a real `LlavaNextForConditionalGeneration` saved by `save_pretrained`, with every
parameter perturbed so each one matters, and an image grid small enough that crops, unpadding and newline tokens
all occur on images a few dozen pixels wide. Needs the `reference` extra (torch).
"""

from __future__ import annotations

from pathlib import Path

from vlmjax.processors import IMAGE_TOKEN, build_tokenizer
from vlmjax.testing.tiny import clip_config, random_model, save, text_config

# The two text decoders LLaVA-NeXT ships with: Vicuna (Llama) and Mistral (sliding window shorter than the prompts).
VARIANTS = {
    "vicuna": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=16),
}
IMAGE_SIZE = 28
PATCH_SIZE = 7  # 4 x 4 patches per crop, so unpadding removes whole rows or columns of the mosaic
PINPOINTS = [[28, 56], [56, 28], [56, 56]]


def make_tiny_llava_next(out_dir: str | Path, variant: str = "vicuna", seed: int = 0, vocab_size: int = 128,
                         text_layers: int = 3, vision_layers: int = 3):
    """Build, save and return (model, processor) of a tiny random LLaVA-NeXT with a working processor."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil
    from transformers import LlavaNextProcessor

    tokenizer = build_tokenizer()
    cfg = LlavaNextConfig(vision_config=clip_config(vision_layers, IMAGE_SIZE, PATCH_SIZE),
                          text_config=text_config(text_layers, vocab_size, **VARIANTS[variant]),
                          image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                          image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
                          vision_feature_select_strategy="default")
    model = random_model(LlavaNextForConditionalGeneration, cfg, seed)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                                 crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                 image_grid_pinpoints=PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                                   vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                   image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    return save(out_dir, model, processor)
