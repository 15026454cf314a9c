"""Tiny randomly initialised Qwen2-VL checkpoints with a locally built tokenizer and a PIL image processor.

Like `vlmjax.tiny` for LLaVA: a real `Qwen2VLForConditionalGeneration` saved by `save_pretrained` beside its
tokenizer (word-level, with the Qwen2-VL vision tokens) and `Qwen2VLImageProcessorPil` (a small pixel budget, so test
images give grids of a few patches), loaded back through the path a real checkpoint takes. transformers'
`Qwen2VLProcessor` cannot be built without torchvision (its video processor needs it, even unused), so prompts go
through `ImageQwen2VLProcessor`, the same processor minus the video processor; with torchvision installed,
`AutoProcessor.from_pretrained` on the saved directory gives the stock one. Needs the `reference` extra (torch).
"""

from __future__ import annotations

from pathlib import Path

from vlmjax.tiny import IMAGE_TOKEN as LLAVA_IMAGE_TOKEN
from vlmjax.tiny import build_tokenizer, random_model

VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"
IMAGE_PROMPT = VISION_START + IMAGE_PAD + VISION_END  # what a chat template writes for one image
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16  # processor budget: grids of 4x4 to 64 patches (1 to 16 tokens)

VARIANTS = {
    "gqa": dict(text=dict(num_attention_heads=4, num_key_value_heads=2)),
    "tied": dict(text=dict(num_attention_heads=4, num_key_value_heads=4), tie_word_embeddings=True),
}


def _image_processor_class():
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageQwen2VLProcessor(Qwen2VLProcessor):
        """`Qwen2VLProcessor` without the video processor (which needs torchvision); images and text only."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = IMAGE_PAD, VIDEO_PAD
            self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
            self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageQwen2VLProcessor


def build_processor(extra_words=(), image_processor=None):
    """The processor of the tiny models: the LLaVA tiny tokenizer (plus `extra_words`) with the Qwen2-VL vision
    tokens as special tokens, left padding, and the PIL image processor (by default with a small pixel budget)."""
    from transformers import Qwen2VLImageProcessorPil

    vision_tokens = [VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD]
    tokenizer = build_tokenizer(extra_words=(*extra_words, *vision_tokens))
    tokenizer.add_special_tokens({"additional_special_tokens": [LLAVA_IMAGE_TOKEN, *vision_tokens]})
    if image_processor is None:
        image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return _image_processor_class()(image_processor=image_processor, tokenizer=tokenizer)


def save_processor(processor, out_dir: str | Path) -> None:
    """Write the tokenizer and image-processor files, which `load_processor` (and, with torchvision, the stock
    `AutoProcessor`) reads back."""
    processor.tokenizer.save_pretrained(str(out_dir))
    processor.image_processor.save_pretrained(str(out_dir))


def load_processor(path: str | Path):
    """The processor saved beside a tiny model (tokenizer + image processor files), without torchvision."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    return _image_processor_class()(image_processor=Qwen2VLImageProcessorPil.from_pretrained(str(path)),
                                    tokenizer=AutoTokenizer.from_pretrained(str(path)))


def make_tiny_qwen2_vl(out_dir: str | Path, variant: str = "gqa", seed: int = 0, text_layers: int = 3,
                       vision_layers: int = 2, overrides: dict | None = None):
    """Build, save and return (model, processor) of a tiny random Qwen2-VL with a working processor."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    spec = {**VARIANTS[variant], **(overrides or {})}
    processor = build_processor()
    tokenizer = processor.tokenizer
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", IMAGE_PAD), ("video_token_id", VIDEO_PAD), ("vision_start_token_id", VISION_START),
        ("vision_end_token_id", VISION_END))}
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers, vocab_size=len(tokenizer),
                max_position_embeddings=2048, rms_norm_eps=1e-6, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    text.update(spec.get("text", {}))
    vision = dict(depth=vision_layers, embed_dim=32, hidden_size=text["hidden_size"], num_heads=4, mlp_ratio=2,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    vision.update(spec.get("vision", {}))
    top = {k: v for k, v in spec.items() if k not in ("text", "vision")}
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **ids, **top)
    model = random_model(Qwen2VLForConditionalGeneration, cfg, seed)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    save_processor(processor, out_dir)
    return model, processor
