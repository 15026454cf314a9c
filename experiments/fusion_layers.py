"""Seed 001: fusion layers, the review layer and contrastive-attention refinement (docs/methods.md §2), on any VLM.

Phase 1, layer-wise visual masking: for every layer l, the visual hidden states are zeroed at l's input (one
compiled sweep over the one-hot layer vectors, the vision tower run once per batch) and first-token p(yes) is
recorded. The accuracy drop per layer picks the fusion layers (the largest drops in the first two thirds, unless
given) and the review layer (the largest drop in the last third, unless given).
Phase 2, refinement: each question's last-query attention maps of every layer give the pre-integrated layer
i* = argmax over fusion layers of H(A_i, A_post) (A_post: the layer before the review layer), the contrast
C = |A_post - A_i*|, and the visual tokens below C's 20th percentile, which are scaled by s at the review layer.
Records are appended per question per phase (resumable); summary.json and fusion_layers.png come from them.

Usage: python -m experiments.fusion_layers [--config experiments/fusion_layers.json] [--model DIR] [--out DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from experiments.common import batches, main_with_config, p_yes_of, setup
from vlmjax import interventions as iv
from vlmjax.eval.records import ResultsWriter
from vlmjax.probes import LastQueryVisualMap, contrastive_mask
from vlmjax.sweep import make_sweep

CONFIG = Path(__file__).with_suffix(".json")


def run(config: dict) -> dict:
    model, processor, records, out = setup(config)
    num_layers = model.num_layers["blocks"]
    ids = [r.question_id for r in records]
    knockouts = np.concatenate([np.zeros((1, num_layers), bool), np.eye(num_layers, dtype=bool)])  # row 0: none
    masking = make_sweep(model, lambda onehot: {"ko": iv.ZeroVisualStates(onehot)}, first_layer=0, chunk=1)
    with ResultsWriter(str(out / "records_masking.jsonl"), id_key="id") as writer:
        for chunk, real, inputs in tqdm(batches(processor, records, set(writer.pending(ids)), config["batch_size"]),
                                        desc="layer-wise masking", unit="batch"):
            batch, _ = model.prepare(inputs)
            p_yes = p_yes_of(processor, np.asarray(masking(model.params, batch, knockouts)["logits"])[:, :, -1])
            for i, r in enumerate(chunk[:real]):
                writer.write({"id": r.question_id, "label": r.label, "p_yes_plain": float(p_yes[0, i]),
                              "p_yes_masked": p_yes[1:, i].tolist()})
        masked = [r for r in writer.records if r["id"] in set(ids)]
    truth = np.array([r["label"] == "yes" for r in masked])
    plain_acc = float(((np.array([r["p_yes_plain"] for r in masked]) >= 0.5) == truth).mean())
    masked_acc = ((np.array([r["p_yes_masked"] for r in masked]) >= 0.5) == truth[:, None]).mean(axis=0)
    fusion, review = choose_layers(plain_acc - masked_acc, config)

    post = review - 1
    review_flags = jnp.asarray(iv.layer_flags(num_layers, [review]))
    scale = jnp.float32(config["soft_mask_scale"])
    maps_fn = jax.jit(lambda params, batch: model.forward(params, batch, {"maps": LastQueryVisualMap()},
                                                          logits=None)["hooks"]["maps"]["attn.pattern"])
    refined_fn = jax.jit(lambda params, batch, mask: model.forward(
        params, batch, {"soft": iv.ScaleVisualStates(mask, scale, review_flags)}, logits="last")["logits"][:, -1])
    with ResultsWriter(str(out / "records_refined.jsonl"), id_key="id") as writer:
        for chunk, real, inputs in tqdm(batches(processor, records, set(writer.pending(ids)), config["batch_size"]),
                                        desc="contrastive refinement", unit="batch"):
            batch, meta = model.prepare(inputs)
            maps = np.asarray(maps_fn(model.params, batch))
            chosen, _, suppress = contrastive_mask(maps, meta.mask, fusion, post, config["percentile"])
            p_yes = p_yes_of(processor, np.asarray(refined_fn(model.params, batch, jnp.asarray(suppress))))
            for i, r in enumerate(chunk[:real]):
                writer.write({"id": r.question_id, "label": r.label, "pre_integrated_layer": int(chosen[i]),
                              "p_yes_refined": float(p_yes[i])})
        refined = {r["id"]: r for r in writer.records}
    refined_acc = float(np.mean([(refined[r["id"]]["p_yes_refined"] >= 0.5) == (r["label"] == "yes")
                                 for r in masked]))
    summary = {"model": config["model"], "questions": len(masked), "accuracy": plain_acc,
               "accuracy_masked_at_layer": masked_acc.tolist(), "fusion_layers": fusion, "review_layer": review,
               "refined_accuracy": refined_acc,
               "pre_integrated_layer_counts": np.bincount([refined[i]["pre_integrated_layer"] for i in ids],
                                                          minlength=num_layers).tolist()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / "fusion_layers.png")
    return summary


def choose_layers(drop: np.ndarray, config: dict) -> tuple[list[int], int]:
    """Fusion layers: the configured ones, or the `num_fusion_layers` largest accuracy drops in the first two thirds
    (default: 6 of 32 layers as in the paper, scaled); review layer: configured, or the largest drop in the last
    third (never layer 0: the refinement reads the layer before it)."""
    n = len(drop)
    split = max(1, 2 * n // 3)
    k = config["num_fusion_layers"] or max(1, round(6 * n / 32))
    fusion = config["fusion_layers"] or sorted(int(i) for i in np.argsort(-drop[:split], kind="stable")[:k])
    review = config["review_layer"] or int(split + np.argmax(drop[split:]))
    return list(fusion), max(1, review)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = summary["accuracy_masked_at_layer"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(range(len(acc)), acc, marker="o", label="visual states zeroed at layer")
    ax.axhline(summary["accuracy"], color="k", ls="--", label="no masking")
    ax.axhline(summary["refined_accuracy"], color="C2", ls=":", label="contrastive refinement")
    for layer in summary["fusion_layers"]:
        ax.axvline(layer, color="C1", alpha=0.25)
    ax.axvline(summary["review_layer"], color="C3", alpha=0.4, label="review layer")
    ax.set(xlabel="layer", ylabel="accuracy", title=f"{summary['model']} — {summary['questions']} questions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    return main_with_config(run, CONFIG, argv)


if __name__ == "__main__":
    sys.exit(main())
