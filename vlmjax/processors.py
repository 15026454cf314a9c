"""HF processors of the models vlmjax runs: loading a checkpoint's processor, and the pieces the built-in models'
processors are made of (a word-level tokenizer; Qwen2-VL's processor for images and text only).

`load_processor("builtin:llava-shapes" | path)` is what every entry point (README, `vlmjax eval`, `verify`, the
studies) uses to get the processor beside a checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Word-level tokenizer of the tiny and built-in models: special tokens, the LLaVA image token, then words.
WORDS = ("the a an is are there in on of image picture what how many color colour yes no red green blue yellow "
         "circle square triangle star cross diamond small large box left right top bottom and or not user "
         "assistant describe object objects shape shapes ? . , : USER ASSISTANT").split()
SPECIAL = ("<unk>", "<s>", "</s>", "<pad>")
IMAGE_TOKEN = "<image>"

# Qwen2-VL's vision tokens; a chat template writes IMAGE_PROMPT for one image.
VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"
IMAGE_PROMPT = VISION_START + IMAGE_PAD + VISION_END


def load_processor(path: str | os.PathLike):
    """The HF processor saved beside a checkpoint (`AutoProcessor`), for a directory or a shipped model
    ("builtin:NAME"). Qwen2-VL's and Qwen2.5-VL's stock processors also build a video processor that needs
    torchvision; where torchvision is missing, the image-and-text-only processor (`load_qwen2_vl_processor`, the same
    for both: Qwen2.5-VL uses Qwen2-VL's image processor) is used instead."""
    from transformers import AutoProcessor

    from vlmjax.builtin import resolve

    path = Path(resolve(path))
    try:
        return AutoProcessor.from_pretrained(str(path))
    except ImportError:
        if json.loads((path / "config.json").read_text()).get("model_type") not in ("qwen2_vl", "qwen2_5_vl"):
            raise
        return load_qwen2_vl_processor(path)


def build_tokenizer(out_dir: str | Path | None = None, extra_words=()):
    """A word-level fast tokenizer with the LLaVA special tokens (image token included), left padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate((*SPECIAL, IMAGE_TOKEN, *dict.fromkeys((*WORDS, *extra_words))))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def build_qformer_tokenizer(extra_words=()):
    """A BERT-style fast tokenizer for InstructBLIP's Q-Former (lower-cased words, [CLS] text [SEP], [PAD] = 0,
    right padding), over the same words as `build_tokenizer`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    words = dict.fromkeys(w.lower() for w in (*WORDS, *extra_words))
    vocab = {t: i for i, t in enumerate((*special, *words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", padding_side="right")


def _image_qwen2_vl_processor_class():
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


def build_qwen2_vl_processor(image_processor, extra_words=()):
    """A Qwen2-VL processor for images and text: the word-level tokenizer (plus `extra_words`) with the Qwen2-VL
    vision tokens as special tokens, left padding, and the given image processor (`Qwen2VLImageProcessorPil`)."""
    vision_tokens = [VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD]
    tokenizer = build_tokenizer(extra_words=(*extra_words, *vision_tokens))
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, *vision_tokens]})
    return _image_qwen2_vl_processor_class()(image_processor=image_processor, tokenizer=tokenizer)


def save_qwen2_vl_processor(processor, out_dir: str | Path) -> None:
    """Write the tokenizer and image-processor files, which `load_processor` (and, with torchvision, the stock
    `AutoProcessor`) reads back."""
    processor.tokenizer.save_pretrained(str(out_dir))
    processor.image_processor.save_pretrained(str(out_dir))


def load_qwen2_vl_processor(path: str | Path):
    """The image-and-text Qwen2-VL processor from a checkpoint's tokenizer and image-processor files."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    return _image_qwen2_vl_processor_class()(image_processor=Qwen2VLImageProcessorPil.from_pretrained(str(path)),
                                             tokenizer=AutoTokenizer.from_pretrained(str(path)))
