"""``python -m vlmjax.train``: a preset's settings, overridden by flags, then ``report.run``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Sequence

from vlmjax.train.presets import FAMILIES, PRESETS, TASKS, TrainConfig
from vlmjax.train.report import run


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m vlmjax.train", description="Train a small VLM on the shapes world (JAX, CPU) and save it as an "
                                                 "HF checkpoint directory. Flags override the preset's settings.")
    parser.add_argument("--out", required=True, help="output directory (HF format)")
    parser.add_argument("--preset", default="llava-shapes", choices=sorted(PRESETS),
                        help="the settings of a built-in model (default: llava-shapes)")
    field_help = {
        "family": "model family: llava (CLIP tower, MLP projector, Llama) or qwen2_vl (Qwen2-VL tower and merger, "
                  "Qwen2 with M-RoPE)",
        "seed": "seed of the images, questions, initialisation and batch order",
        "init_from": "a trained model (path or builtin:NAME) to continue training instead of initialising one; it "
                     "must be the architecture and vocabulary the settings describe (alignment is skipped with "
                     "--alignment-steps 0)",
        "n_images": "shapes-world images to generate (train and held-out test together)",
        "test_fraction": "fraction of the images held out as the test split",
        "image_size": "image side in pixels",
        "patch_size": "vision patch side in pixels (Qwen2-VL merges 2x2 patches into one visual token)",
        "tasks": f"question families to train on, a comma-separated subset of {TASKS}",
        "vision_hidden": "vision tower width",
        "vision_layers": "vision tower layers",
        "text_hidden": "decoder width",
        "text_layers": "decoder layers",
        "text_mlp_ratio": "decoder MLP width as a multiple of the decoder width",
        "heads": "attention heads of the vision tower and of the decoder",
        "steps": "instruction-tuning steps",
        "batch_size": "sequences (alignment: images) per step",
        "learning_rate": "peak AdamW learning rate of instruction tuning (warmup, then cosine decay)",
        "alignment_learning_rate": "peak AdamW learning rate of the alignment stage",
        "warmup_fraction": "fraction of each stage's steps spent warming the learning rate up",
        "weight_decay": "AdamW weight decay",
        "grad_clip": "global gradient-norm clip",
        "grounding_weight": "weight of the grounding loss added to the reply loss in instruction tuning",
        "label_objects": "objects per visual token in the grounding target",
        "label_min_fraction": "smallest share of a token's pixels an object needs to be in its grounding target",
        "alignment_steps": "steps of the alignment stage (vision tower and projector towards the word embeddings)",
        "balance_answers": "weight yes/no replies so that every category is as often 'yes' as 'no'",
        "vision_heads": "attention heads of the vision tower (default: --heads)",
        "checkpoint_every": "optimiser steps between orbax checkpoints (a rerun into the same --out resumes)",
    }
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag, help_text = "--" + field.name.replace("_", "-"), field_help[field.name] + " (default: the preset's)"
        if field.name == "tasks":
            parser.add_argument(flag, help=help_text)
        elif field.name == "family":
            parser.add_argument(flag, choices=FAMILIES, help=help_text)
        elif isinstance(field.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kinds = [t for t in typing.get_args(hints[field.name]) if t is not type(None)] or [hints[field.name]]
            parser.add_argument(flag, type=kinds[0], help=help_text)  # `int | None` fields parse as int
    args = vars(parser.parse_args(argv))
    out, preset = args.pop("out"), PRESETS[args.pop("preset")]
    if args["tasks"] is not None:
        args["tasks"] = tuple(t for t in args["tasks"].split(",") if t)
        unknown = set(args["tasks"]) - set(TASKS)
        if unknown:
            parser.error(f"unknown tasks {sorted(unknown)}; choose from {TASKS}")
    try:
        cfg = dataclasses.replace(preset, **{k: v for k, v in args.items() if v is not None})
    except ValueError as error:
        parser.error(str(error))
    report = run(cfg, out)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1))
    return report
