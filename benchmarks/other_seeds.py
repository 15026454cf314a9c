"""Accuracy of a model on POPE-style sets generated with other seeds (other category priors), with real and with
black images, by split: `python benchmarks/other_seeds.py builtin:llava-shapes OUT.json`."""

import json
import sys
import tempfile
from pathlib import Path

import vlmjax
from vlmjax.data.shapes import generate_dataset
from vlmjax.eval.pope import score_pope
from vlmjax.eval.run import evaluate_pope, load_shapes_pope
from vlmjax import load_processor

SETS = {1234: 300, 4321: 150, 777: 300}  # seed: images (1234/300 is `vlmjax eval`'s default)


def main(model_dir: str, out_path: str) -> dict:
    model = vlmjax.load(model_dir, progress=False)
    processor = load_processor(model.path)
    results = {}
    for seed, n_images in SETS.items():
        with tempfile.TemporaryDirectory() as root:
            generate_dataset(root, n_images, seed, image_size=64)
            records = load_shapes_pope(Path(root))
            for kind in ("real", "black"):
                scored = score_pope(evaluate_pope(model, processor, records, Path(root) / f"{kind}.jsonl",
                                                  batch_size=64, progress=False,
                                                  image_kind=None if kind == "real" else kind))
                results[f"{seed}/{kind}"] = {**{split: round(s["accuracy"], 4) for split, s in scored.items()},
                                            "yes_ratio": round(scored["overall"]["yes_ratio"], 3),
                                            "n": len(records)}
                print(seed, kind, results[f"{seed}/{kind}"], flush=True)
    Path(out_path).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(*sys.argv[1:3])
