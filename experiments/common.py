"""What every study shares: the model and its processor, the question set, and resumable fixed-shape batches."""

from __future__ import annotations

import json
from pathlib import Path

import vlmjax
from vlmjax.eval.pope import yes_probability
from vlmjax.inputs import image_placeholder
from vlmjax.eval.run import DEFAULT_PROMPT, answer_token_ids, load_shapes_pope, prompt_length, shapes_image_size


def setup(config: dict):
    """(model, processor, POPE-style records, output dir) for a study config (model, data or n_images + seed,
    splits, limit_per_split, out)."""
    from vlmjax import load_processor

    model = vlmjax.load(config["model"], progress=False)
    processor = load_processor(model.path)
    processor.tokenizer.padding_side = "left"
    out = Path(config["out"])
    data = Path(config["data"]) if config.get("data") else out / "data"
    if not (data / "dataset.json").is_file():
        from vlmjax.data.shapes import generate_dataset

        generate_dataset(str(data), config["n_images"], config["seed"], image_size=shapes_image_size(model, processor))
    records = load_shapes_pope(data, splits=config["splits"], limit=config["limit_per_split"])
    return model, processor, records, out


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
    """First-token p(yes) from last-position logits [..., V]."""
    tok = processor.tokenizer
    return yes_probability(logits, answer_token_ids(tok, "yes"), answer_token_ids(tok, "no"))


def main_with_config(run, default_config: Path, argv=None, **extra_flags):
    """Parse --config and overrides (--model, --data, --out, --n-images, --limit-per-split), run, print the summary."""
    import argparse

    parser = argparse.ArgumentParser(description=(run.__module__ or "").split(".")[-1])
    parser.add_argument("--config", default=str(default_config))
    for key in ("model", "data", "out"):
        parser.add_argument(f"--{key}")
    parser.add_argument("--limit-per-split", type=int)
    parser.add_argument("--n-images", type=int)
    args = parser.parse_args(argv)
    config = json.loads(Path(args.config).read_text())
    config.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    summary = run(config)
    print(json.dumps(summary, indent=1)[:4000])
    return 0
