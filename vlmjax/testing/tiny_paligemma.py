"""Tiny randomly initialised PaliGemma checkpoints (Gemma or Gemma 2 decoder) with a locally built processor.

As `vlmjax.testing.tiny` for LLaVA: a real `PaliGemmaForConditionalGeneration` saved by `save_pretrained`, every
parameter perturbed so each one matters (Gemma's norm weights then sit near 0, so a missing (1 + w) shows), beside a
`PaliGemmaProcessor` made of the word-level tokenizer (`vlmjax.processors.build_tokenizer`; the processor adds
PaliGemma's <loc>/<seg> tokens) and a `SiglipImageProcessorPil`. Gemma 2's switches are set where a tiny model
shows them: soft-caps small enough to bend the scores and logits, a sliding window shorter than the test prompts,
query_pre_attn_scalar and head_dim apart from hidden_size / heads. Needs the `reference` extra (torch).
"""

from __future__ import annotations

from pathlib import Path

from vlmjax.processors import build_tokenizer
from vlmjax.testing.tiny import random_model, save

IMAGE_SIZE, PATCH_SIZE = 28, 7  # 4 x 4 patches: 16 visual tokens per image
VARIANTS = {  # text configs: PaliGemma 1 (Gemma) and 2 (Gemma 2)
    "gemma": dict(model_type="gemma", hidden_act="gelu_pytorch_tanh"),
    "gemma2": dict(model_type="gemma2", hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=20,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0, sliding_window=8),
}


def make_tiny_paligemma(out_dir: str | Path, variant: str = "gemma2", seed: int = 0, text_layers: int = 3,
                        vision_layers: int = 2, overrides: dict | None = None):
    """Build, save and return (model, processor) of a tiny random PaliGemma with a working processor."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers import SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                              image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2)
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=build_tokenizer())
    tokenizer = processor.tokenizer
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=24, vocab_size=len(tokenizer), max_position_embeddings=2048,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, **VARIANTS[variant])
    text.update((overrides or {}).get("text", {}))
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=vision_layers, num_attention_heads=4, image_size=IMAGE_SIZE,
                  patch_size=PATCH_SIZE, layer_norm_eps=1e-5, vision_use_head=False)
    top = {k: v for k, v in (overrides or {}).items() if k != "text"}
    cfg = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                          projection_dim=text["hidden_size"], hidden_size=text["hidden_size"],
                          vocab_size=len(tokenizer), **top)
    return save(out_dir, random_model(PaliGemmaForConditionalGeneration, cfg, seed), processor)
