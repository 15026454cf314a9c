"""What a training run is: its settings (``TrainConfig``), the presets of the shipped models, the shapes-world
vocabulary and processor, and the initial model (an HF directory from Flax initialisation, or a trained model to
continue: ``init_from``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vlmjax.data import shapes
from vlmjax.processors import IMAGE_TOKEN, build_tokenizer


PROMPT = "USER: {image} {question} ASSISTANT:"
FAMILIES = ("llava", "qwen2_vl")
TASKS = ("pope", "attribute", "count", "describe")
DESCRIBE_QUESTION = "Describe the image."


@dataclasses.dataclass
class TrainConfig:
    """Data, model and optimisation settings of one training run (the defaults train the built-in model)."""

    family: str = "llava"
    seed: int = 0
    init_from: str | None = None  # a trained model (path or builtin:NAME) to start from instead of a fresh init
    n_images: int = 30000
    test_fraction: float = 0.05
    image_size: int = 64
    patch_size: int = 8  # Qwen2-VL merges 2x2 patches, so one visual token covers 2 * patch_size pixels
    tasks: tuple[str, ...] = ("pope", "describe")
    vision_hidden: int = 96
    vision_layers: int = 3
    text_hidden: int = 128
    text_layers: int = 3
    text_mlp_ratio: int = 2
    heads: int = 4
    vision_heads: int | None = None  # attention heads of the vision tower (default: ``heads``)
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 3e-3
    alignment_learning_rate: float = 3e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    grounding_weight: float = 1.0
    label_objects: int = 1  # objects per visual token in the grounding target (see patch_labels)
    label_min_fraction: float = 0.125
    alignment_steps: int = 3000
    balance_answers: bool = True  # weight yes/no replies so each category is as often "yes" as "no" (answer_weights)
    checkpoint_every: int = 250  # optimiser steps between orbax checkpoints of a stage (a rerun resumes there)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.steps < 1 or self.alignment_steps < 0:
            raise ValueError(f"steps must be at least 1 and alignment_steps at least 0, got steps={self.steps}, "
                             f"alignment_steps={self.alignment_steps}")


# The settings each shipped model was trained with (``vlmjax/builtin/NAME``).
PRESETS = {
    "llava-shapes": TrainConfig(),
    # 2x2-merged tokens of 16 pixels often show parts of several objects: each gets its share of the target.
    # Without answer balancing: with it, this architecture reached 90.8% held-out (random split 85.3%) instead of
    # 94.5% (benchmarks/training/qwen2-vl-shapes-balanced.json); black images give chance either way.
    "qwen2-vl-shapes": TrainConfig(family="qwen2_vl", label_objects=3, label_min_fraction=0.05,
                                   balance_answers=False),
    # The model organism of the studies: deep enough for layer-wise findings (12 decoder layers of 8 heads, a
    # 4-layer vision tower), trained on the harder question mix too (attributes, counting in a box), so that it is
    # wrong often enough for error analysis.
    "llava-shapes-deep": TrainConfig(tasks=("pope", "attribute", "count", "describe"), text_layers=12, heads=8,
                                     vision_layers=4, vision_heads=4, steps=2000, learning_rate=2e-3,
                                     alignment_steps=2000, checkpoint_every=100),
}
# The organism's "variant", as the visual-heads paper compares a base model with its fine-tuned variants: the shipped
# organism trained further, without alignment, for 150 decoder steps at a quarter of its learning rate on another
# seed's shapes world (other images, questions and category priors; 10,000 images are more than 150 batches of 32
# conversations draw from). 150 steps: about half an hour on 2 shared cores.
PRESETS["llava-shapes-deep-variant"] = dataclasses.replace(
    PRESETS["llava-shapes-deep"], init_from="builtin:llava-shapes-deep", seed=1, n_images=10000, alignment_steps=0,
    steps=150, learning_rate=5e-4, checkpoint_every=50)


def shapes_vocabulary(image_size: int) -> list[str]:
    """Every word the shapes-world questions and answers use (numbers up to the image side, for boxes and counts)."""
    words = ["Is", "What", "How", "Describe", "there", "a", "an", "in", "the", "image", "many", "are", "box", "color", "shape",
             "object", "is", "yes", "no", "?", "[", "]", ","]
    words += [*shapes.SHAPES, *shapes.SHAPE_PLURALS.values(), *shapes.COLOURS]
    words += [str(n) for n in range(image_size + 1)]
    return words


def build_processor(cfg: TrainConfig):
    """Word-level tokenizer covering the shapes vocabulary plus the family's HF processor: ``LlavaProcessor`` with
    CLIP preprocessing, or the Qwen2-VL processor with a pixel budget that keeps ``image_size`` images unresized."""
    if cfg.family == "qwen2_vl":
        from transformers import Qwen2VLImageProcessorPil

        from vlmjax.processors import build_qwen2_vl_processor as qwen_processor

        side = cfg.image_size
        image_processor = Qwen2VLImageProcessorPil(patch_size=cfg.patch_size, merge_size=2, temporal_patch_size=2,
                                                   min_pixels=side * side, max_pixels=side * side)
        return qwen_processor(extra_words=shapes_vocabulary(side), image_processor=image_processor)
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tokenizer = build_tokenizer(extra_words=shapes_vocabulary(cfg.image_size))
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": cfg.image_size},
                                            crop_size={"height": cfg.image_size, "width": cfg.image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1)


def token_side(cfg: TrainConfig) -> int:
    """Pixels per side of the image square one visual token shows."""
    return 2 * cfg.patch_size if cfg.family == "qwen2_vl" else cfg.patch_size


def hf_config(cfg: TrainConfig, tokenizer):
    """The HF config of the model to train: tied word embeddings (the grounding loss reads visual tokens through
    them), ``heads`` attention heads in the decoder and ``vision_heads`` (default the same) in the vision tower."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2VLConfig

    text = dict(hidden_size=cfg.text_hidden, intermediate_size=cfg.text_mlp_ratio * cfg.text_hidden,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    if cfg.family == "qwen2_vl":
        from vlmjax.processors import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

        pairs = cfg.text_hidden // cfg.heads // 2  # rotary pairs split as in Qwen2-VL: 1/4 time, 3/8 row, 3/8 col
        section = [pairs // 4, (pairs - pairs // 4) // 2, pairs - pairs // 4 - (pairs - pairs // 4) // 2]
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
        vision = dict(depth=cfg.vision_layers, embed_dim=cfg.vision_hidden, hidden_size=cfg.text_hidden,
                      num_heads=cfg.vision_heads or cfg.heads, mlp_ratio=4, patch_size=cfg.patch_size, spatial_merge_size=2,
                      temporal_patch_size=2)
        ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
            ("image_token_id", IMAGE_PAD), ("video_token_id", VIDEO_PAD), ("vision_start_token_id", VISION_START),
            ("vision_end_token_id", VISION_END))}
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads or cfg.heads,
                              image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.vision_hidden)
    return LlavaConfig(vision_config=vision, text_config=LlamaConfig(**text),
                       image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
                       vision_feature_select_strategy="default", tie_word_embeddings=True,
                       image_seq_length=(cfg.image_size // cfg.patch_size) ** 2)


def initial_model(cfg: TrainConfig, processor, scratch_dir: str | Path):
    """The model training starts from: ``cfg.init_from`` loaded (refused unless it is the architecture and
    vocabulary ``cfg`` describes), or a fresh initialisation saved into ``scratch_dir`` (``init_hf_model``)."""
    import vlmjax

    if cfg.init_from is None:
        init_hf_model(cfg, processor, scratch_dir)
        return vlmjax.load(scratch_dir, progress=False)
    model = vlmjax.load(cfg.init_from, progress=False)
    check_initial_model(cfg, model, processor)
    return model


def check_initial_model(cfg: TrainConfig, model, processor) -> None:
    """Refuse a model to start from whose architecture (vlmjax config) or vocabulary differs from what ``cfg``
    builds: the run's settings would not describe the model it trains."""
    from vlmjax import fingerprint, load_processor, models
    from vlmjax.errors import VlmJaxError

    expected, found = (dataclasses.asdict(c) for c in (models.from_hf(hf_config(cfg, processor.tokenizer)),
                                                         model.config))
    differing = fingerprint.differences(found, expected, ("there", "in the settings"))
    if processor.tokenizer.get_vocab() != load_processor(model.path).tokenizer.get_vocab():
        differing.append("the tokenizer's vocabulary")
    if differing:
        raise VlmJaxError(f"init_from {cfg.init_from} is not the model these settings build ({'; '.join(differing)})."
                          f" Train it with the settings it was made with (the preset or the config in its "
                          f"training_report.json), changing only the data and optimisation settings.")


def init_hf_model(cfg: TrainConfig, processor, out_dir: str | Path):
    """Save a randomly initialised model of the configured family and size (Flax initialisation, ``nnx.Rngs(seed)``:
    see ``vlmjax.models.vlm.init_params``) as an HF checkpoint directory with the processor files."""
    from flax import nnx

    from converters.hf import save_hf
    from vlmjax import models
    from vlmjax.models import vlm

    config = hf_config(cfg, processor.tokenizer)
    model_cfg = models.from_hf(config)
    save_hf(vlm.init_params(model_cfg, nnx.Rngs(cfg.seed)), model_cfg, config, out_dir)
    if cfg.family == "qwen2_vl":
        from vlmjax.processors import save_qwen2_vl_processor as save_processor

        save_processor(processor, out_dir)
    else:
        processor.save_pretrained(str(out_dir))
