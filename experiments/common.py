"""What every study shares: the model and its processor, the question set, and resumable fixed-shape batches."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

import vlmjax
from vlmjax import fingerprint
from vlmjax.checks import nearest, positive_int, writable_dir
from vlmjax.errors import VlmJaxError
from vlmjax.eval.pope import yes_probability
from vlmjax.inputs import image_placeholder
from vlmjax.eval.run import (DEFAULT_PROMPT, answer_token_ids, load_shapes_pope, prompt_length, shapes_dataset,
                             shapes_image_size)


# Config keys that do not change a question's numbers (the fingerprint leaves them out; n_images and seed only
# make the data, whose own fingerprint covers them), and keys naming decoder layers.
NOT_SETTINGS = ("model", "data", "out", "n_images", "seed", "splits", "limit_per_split", "batch_size", "overwrite")
LAYER_KEYS = ("zone", "fusion_layers", "review_layer", "map_layer")


def setup(config: dict):
    """(model, processor, POPE-style records, output dir) for a study config (model, data or n_images + seed,
    splits, limit_per_split, out). Records already in `out` must come from the same model, settings and data
    (`vlmjax.fingerprint`, kept in out/fingerprint.json); config["overwrite"] discards them."""
    from vlmjax import load_processor

    check_values(config)
    out = writable_dir(config["out"], "out")
    model = vlmjax.load(config["model"], progress=False)
    check_layers(config, model.num_layers["blocks"])
    processor = load_processor(model.path)
    processor.tokenizer.padding_side = "left"
    data = shapes_dataset(config.get("data"), out, config["n_images"], config["seed"],
                          shapes_image_size(model, processor), config.get("overwrite", False))
    records = load_shapes_pope(data, splits=config["splits"], limit=config["limit_per_split"])
    if config.get("overwrite"):
        for old in out.glob("*.jsonl"):
            old.unlink()
    settings = {k: v for k, v in config.items() if k not in NOT_SETTINGS}
    fingerprint.claim(out / "fingerprint.json", {"model": fingerprint.of_model(model), "settings": settings,
                                                 "data": fingerprint.of_data(data)},
                      any(out.glob("*.jsonl")), f"The records in {out}")
    return model, processor, records, out


def check_config(config: dict, defaults: dict) -> None:
    """A study config has exactly the default config's keys, each of the default's type (a list not empty)."""
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise VlmJaxError(f"Unknown config key {unknown[0]!r}.{nearest(unknown[0], sorted(defaults), 'keys')}")
    missing = sorted(set(defaults) - set(config))
    if missing:
        raise VlmJaxError(f"The config lacks the required key(s) {missing}; copy them from the study's default "
                          "config (experiments/NAME.json).")
    for key, default in defaults.items():
        value = config[key]
        if default is None or (value is None and key in LAYER_KEYS):
            continue
        wanted = (int, float) if isinstance(default, float) else type(default)
        if not isinstance(value, wanted) or isinstance(value, bool) != isinstance(default, bool):
            raise VlmJaxError(f"Config key {key!r} must be a {type(default).__name__} like {default!r}, got {value!r}.")
        if isinstance(default, list) and not value:
            raise VlmJaxError(f"Config key {key!r} is an empty list; give at least one value, e.g. {default!r}.")


def check_values(config: dict) -> None:
    """Every number finite (JSON parses NaN and Infinity), every count positive."""
    def walk(key, value):
        if isinstance(value, float) and not math.isfinite(value):
            raise VlmJaxError(f"Config key {key!r} holds {value}, not a finite number.")
        for item in value if isinstance(value, list) else ():
            walk(key, item)

    for key, value in config.items():
        walk(key, value)
    for key in ("batch_size", "n_images", "limit_per_split"):
        if key in config and (not isinstance(config[key], int) or config[key] < 1):
            raise VlmJaxError(f"Config key {key!r} must be a positive integer, got {config[key]!r}.")


def check_layers(config: dict, num_layers: int) -> None:
    """Layer-valued keys (a zone, fusion / review / map layers) name layers of this model."""
    for key in LAYER_KEYS:
        value = config.get(key)
        for layer in value if isinstance(value, list) else [] if value is None else [value]:
            if not isinstance(layer, int) or not 0 <= layer < num_layers:
                raise VlmJaxError(f"Config key {key!r} holds layer {layer!r}, outside this model's decoder layers "
                                  f"0..{num_layers - 1}.")


def batches(processor, records, pending: set, size: int):
    """(records of the batch, how many are real, processor outputs) for the pending records, every batch padded
    to `size` rows and every prompt to one length, so each study compiles once."""
    texts = {r.question_id: DEFAULT_PROMPT.format(question=r.text).replace("<image>", image_placeholder(processor))
             for r in records}
    length = prompt_length(processor, records[0], texts)
    todo = [r for r in records if r.question_id in pending]
    for start in range(0, len(todo), size):
        chunk = todo[start:start + size]
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (size - real)
        inputs = dict(processor(images=[r.load_image() for r in chunk], text=[texts[r.question_id] for r in chunk],
                                return_tensors="np", padding="max_length", max_length=length))
        yield chunk, real, inputs


def p_yes_of(processor, logits):
    """First-token p(yes) from last-position logits [..., V]; non-finite logits are refused."""
    if not np.isfinite(np.asarray(logits)).all():
        raise VlmJaxError("The model's logits are not finite (NaN or inf) for this batch. Run model(**inputs, "
                          "check_finite=True) on it to find the first site, layer and sample where they stop being.")
    tok = processor.tokenizer
    return yes_probability(logits, answer_token_ids(tok, "yes"), answer_token_ids(tok, "no"))


def read_config(path, defaults: dict) -> dict:
    """A study's JSON config, checked against its default config (`check_config`)."""
    path = Path(path)
    if not path.is_file():
        raise VlmJaxError(f"--config {path} is not a file; pass a study config JSON (e.g. the study's own .json).")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise VlmJaxError(f"--config {path} is not valid JSON ({error}).") from None
    if not isinstance(config, dict):
        raise VlmJaxError(f"--config {path} holds a {type(config).__name__}, not a JSON object of settings.")
    check_config(config, defaults)
    return config


def main_with_config(run, default_config: Path, argv=None, **extra_flags):
    """Parse --config and overrides (--model, --data, --out, --n-images, --limit-per-split, --overwrite), run, print
    the summary. A refused input prints `error: ...` and returns 2, as the vlmjax command does."""
    import argparse

    parser = argparse.ArgumentParser(description=(run.__module__ or "").split(".")[-1])
    parser.add_argument("--config", default=str(default_config))
    for key in ("model", "data", "out"):
        parser.add_argument(f"--{key}")
    parser.add_argument("--limit-per-split", type=positive_int)
    parser.add_argument("--n-images", type=positive_int)
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="discard records in --out written by another model, settings or data")
    args = parser.parse_args(argv)
    try:
        config = read_config(args.config, json.loads(Path(default_config).read_text()))
        config.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
        summary = run(config)
    except VlmJaxError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1)[:4000])
    return 0
