"""Tiny randomly initialised InstructBLIP (Vicuna) checkpoints with a locally built processor.

Like `vlmjax.testing.tiny` for LLaVA: a real `InstructBlipForConditionalGeneration` (BLIP-2 ViT, Q-Former, language
projection, Llama decoder) saved by `save_pretrained`, every parameter perturbed so each one matters (the ViT's key
bias and the learned queries included), beside an `InstructBlipProcessor` made of `BlipImageProcessorPil`, the
word-level LLM tokenizer (`vlmjax.processors.build_tokenizer`) and a BERT-style Q-Former tokenizer
(`vlmjax.processors.build_qformer_tokenizer`). The Q-Former has 3 layers with cross-attention every 2 (layers 0 and
2), so both kinds of layer occur. Needs the `reference` extra (torch).
"""

from __future__ import annotations

from pathlib import Path

from vlmjax.processors import IMAGE_TOKEN, build_qformer_tokenizer, build_tokenizer
from vlmjax.testing.tiny import random_model, save, text_config

IMAGE_SIZE, PATCH_SIZE = 28, 7  # 4 x 4 patches + CLS = 17 vision tokens
NUM_QUERY_TOKENS = 8


def make_tiny_instructblip(out_dir: str | Path, seed: int = 0, vocab_size: int = 128, text_layers: int = 3,
                           vision_layers: int = 2, qformer_layers: int = 3, cross_attention_frequency: int = 2):
    """Build, save and return (model, processor) of a tiny random InstructBLIP with a working processor."""
    from transformers import (BlipImageProcessorPil, InstructBlipConfig, InstructBlipForConditionalGeneration,
                              InstructBlipProcessor)

    tokenizer = build_tokenizer()
    text = text_config(text_layers, vocab_size, num_key_value_heads=4, tie_word_embeddings=False)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    qformer_tokenizer = build_qformer_tokenizer()
    qformer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=qformer_layers, num_attention_heads=4,
                   vocab_size=len(qformer_tokenizer), max_position_embeddings=1024,
                   cross_attention_frequency=cross_attention_frequency)
    cfg = InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=text.to_dict(),
                             num_query_tokens=NUM_QUERY_TOKENS,
                             image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    model = random_model(InstructBlipForConditionalGeneration, cfg, seed)
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = InstructBlipProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                      qformer_tokenizer=qformer_tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    return save(out_dir, model, processor)
