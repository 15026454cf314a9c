"""Tiny randomly initialised Qwen2.5-VL checkpoints with a locally built tokenizer and a PIL image processor.

Built by `vlmjax.testing.tiny_qwen2_vl.build` (Qwen2.5-VL's processor is Qwen2-VL's for images and text): a real
`Qwen2_5_VLForConditionalGeneration` saved by `save_pretrained` beside its processor files. The vision tower has
windowed and full-attention layers (`fullatt_block_indexes`), and windows of 2x2 merged tokens (`window_size` = 56
pixels), so the tiny processor's grids (4x4 to 64 patches) split into one to six windows, some of them ragged.
Needs the `reference` extra (torch).
"""

from __future__ import annotations

from pathlib import Path

from vlmjax.testing import tiny_qwen2_vl


def make_tiny_qwen2_5_vl(out_dir: str | Path, variant: str = "gqa", seed: int = 0, text_layers: int = 3,
                         vision_layers: int = 3, full_attention_layers=(1,), overrides: dict | None = None):
    """Build, save and return (model, processor) of a tiny random Qwen2.5-VL with a working processor."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(depth=vision_layers, hidden_size=32, intermediate_size=48, num_heads=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                  fullatt_block_indexes=list(full_attention_layers), hidden_act="silu")
    return tiny_qwen2_vl.build(out_dir, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, vision,
                               "out_hidden_size", variant, seed, text_layers, overrides)
