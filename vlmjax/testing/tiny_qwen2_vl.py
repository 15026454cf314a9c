"""Tiny randomly initialised Qwen2-VL checkpoints with a locally built tokenizer and a PIL image processor.

Like `vlmjax.testing.tiny` for LLaVA: a real `Qwen2VLForConditionalGeneration` saved by `save_pretrained` beside its
processor files (`vlmjax.processors.build_qwen2_vl_processor`: the word-level tokenizer with the Qwen2-VL vision
tokens, and `Qwen2VLImageProcessorPil` with a small pixel budget, so test images give grids of a few patches),
loaded back through the path a real checkpoint takes (`vlmjax.load_processor`). `build` serves the family's other
members too (`vlmjax.testing.tiny_qwen2_5_vl`). Needs the `reference` extra (torch).
"""

from __future__ import annotations

from pathlib import Path

from vlmjax.processors import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, build_qwen2_vl_processor
from vlmjax.processors import save_qwen2_vl_processor
from vlmjax.testing.tiny import random_model

MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16  # processor budget: grids of 4x4 to 64 patches (1 to 16 tokens)

VARIANTS = {
    "gqa": dict(text=dict(num_attention_heads=4, num_key_value_heads=2)),
    "tied": dict(text=dict(num_attention_heads=4, num_key_value_heads=4), tie_word_embeddings=True),
}


def build(out_dir: str | Path, config_class, model_class, vision: dict, width_field: str, variant: str, seed: int,
          text_layers: int, overrides: dict | None):
    """Build, save and return (model, processor) of a tiny random Qwen2-VL-family model (HF `config_class` and
    `model_class`) with the vision config `vision`, whose field `width_field` (the merger's output) gets the
    decoder's hidden size; `overrides` changes the text ("text"), vision ("vision") or top-level fields."""
    from transformers import Qwen2VLImageProcessorPil

    spec = {**VARIANTS[variant], **(overrides or {})}
    processor = build_qwen2_vl_processor(Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS))
    tokenizer = processor.tokenizer
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", IMAGE_PAD), ("video_token_id", VIDEO_PAD), ("vision_start_token_id", VISION_START),
        ("vision_end_token_id", VISION_END))}
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers, vocab_size=len(tokenizer),
                max_position_embeddings=2048, rms_norm_eps=1e-6, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    text.update(spec.get("text", {}))
    vision = {**vision, width_field: text["hidden_size"], **spec.get("vision", {})}
    top = {k: v for k, v in spec.items() if k not in ("text", "vision")}
    model = random_model(model_class, config_class(text_config=text, vision_config=vision, **ids, **top), seed)
    model.save_pretrained(str(out_dir))
    save_qwen2_vl_processor(processor, out_dir)
    return model, processor


def make_tiny_qwen2_vl(out_dir: str | Path, variant: str = "gqa", seed: int = 0, text_layers: int = 3,
                       vision_layers: int = 2, overrides: dict | None = None):
    """Build, save and return (model, processor) of a tiny random Qwen2-VL with a working processor."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=vision_layers, embed_dim=32, num_heads=4, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    return build(out_dir, Qwen2VLConfig, Qwen2VLForConditionalGeneration, vision, "hidden_size", variant, seed,
                 text_layers, overrides)
