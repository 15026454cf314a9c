"""Tiny randomly initialised Qwen2.5-VL checkpoints with a locally built tokenizer and a PIL image processor.

Like `vlmjax.testing.tiny_qwen2_vl` (Qwen2.5-VL's processor is Qwen2-VL's for images and text): a real
`Qwen2_5_VLForConditionalGeneration` saved by `save_pretrained` beside its processor files. The vision tower has
windowed and full-attention layers (`fullatt_block_indexes`), and windows of 2x2 merged tokens (`window_size` = 56
pixels), so the tiny processor's grids (4x4 to 64 patches) split into one to six windows, some of them ragged.
Needs the `reference` extra (torch).
"""

from __future__ import annotations

from pathlib import Path

from vlmjax.processors import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, build_qwen2_vl_processor
from vlmjax.processors import save_qwen2_vl_processor
from vlmjax.testing.tiny import random_model
from vlmjax.testing.tiny_qwen2_vl import MAX_PIXELS, MIN_PIXELS

VARIANTS = {
    "gqa": dict(text=dict(num_attention_heads=4, num_key_value_heads=2)),
    "tied": dict(text=dict(num_attention_heads=4, num_key_value_heads=4), tie_word_embeddings=True),
}


def make_tiny_qwen2_5_vl(out_dir: str | Path, variant: str = "gqa", seed: int = 0, text_layers: int = 3,
                         vision_layers: int = 3, full_attention_layers=(1,), overrides: dict | None = None):
    """Build, save and return (model, processor) of a tiny random Qwen2.5-VL with a working processor."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

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
    vision = dict(depth=vision_layers, hidden_size=32, intermediate_size=48, num_heads=4,
                  out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=56, fullatt_block_indexes=list(full_attention_layers), hidden_act="silu")
    vision.update(spec.get("vision", {}))
    top = {k: v for k, v in spec.items() if k not in ("text", "vision")}
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids, **top)
    model = random_model(Qwen2_5_VLForConditionalGeneration, cfg, seed)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    save_qwen2_vl_processor(processor, out_dir)
    return model, processor
