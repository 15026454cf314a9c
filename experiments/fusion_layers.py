"""Seed 001: fusion layers, the review layer and contrastive-attention refinement (docs/methods.md §2), on any VLM.

Phase 1, layer-wise visual masking: for every layer l, the visual hidden states are zeroed at l's input (one
compiled sweep over the one-hot layer vectors, the vision tower run once per batch) and each question's first-token
answer is scored. The accuracy drop per layer (McNemar against no masking) picks the fusion layers (the largest
significant drops in the first two thirds, unless given) and the review layer (the largest significant drop in the
last third, unless given; none when no layer there significantly lowers accuracy, and then no refinement is run).
Phase 2, refinement: each question's last-query attention maps of every layer give the pre-integrated layer
i* = argmax over fusion layers of H(A_i, A_post) (A_post: the layer before the review layer; the review layer itself
when it is layer 0), the contrast C = |A_post - A_i*|, and the visual tokens below C's 20th percentile, which are
scaled by s at the review layer. Records are appended per question per phase (resumable); summary.json,
fusion_layers.png and TensorBoard scalars come from them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import (LAST_QUERY, VISUAL_TOKENS, AnswerScorer, accuracy_by_group, figure, log_curves,
                                main_with_config, run_phase, save_figure, score_rows, setup)
from vlmjax import interventions as iv
from vlmjax.eval.stats import mcnemar
from vlmjax.probes import LastQueryVisualMap, contrastive_mask
from vlmjax.sweep import make_sweep

CONFIG = Path(__file__).with_suffix(".json")


def run(config: dict) -> dict:
    model, processor, questions, out = setup(config)
    num_layers = model.num_layers["blocks"]
    scorer = AnswerScorer(processor.tokenizer, questions)
    knockouts = np.concatenate([np.zeros((1, num_layers), bool), np.eye(num_layers, dtype=bool)])  # row 0: none
    masking = make_sweep(model, lambda onehot: {"ko": iv.ZeroVisualStates(onehot)}, first_layer=0, chunk=1)

    def mask_layers(chunk, inputs, _):
        logits = np.asarray(masking(model.params, model.prepare(inputs)[0], knockouts)["logits"])[:, :, -1]
        scores = scorer(logits, chunk)
        return [score_rows(scores, i) for i in range(len(chunk))]

    masked = run_phase(model, out / "records_masking.jsonl", processor, questions, config["batch_size"], "layer-wise masking",
                       mask_layers)
    correct = np.array([r["correct"] for r in masked])  # [Q, 1 + L]
    tests = [mcnemar(correct[:, 0], correct[:, 1 + layer]) for layer in range(num_layers)]
    fusion, review = choose_layers(correct[:, 0].mean() - correct[:, 1:].mean(0), [t.p_value for t in tests], config)
    refined = None
    if review is not None and fusion:
        post = max(review - 1, 0)
        review_flags = jnp.asarray(iv.layer_flags(num_layers, [review]))
        scale = jnp.float32(config["soft_mask_scale"])
        maps_fn = jax.jit(lambda params, batch: model.forward(params, batch, {"maps": LastQueryVisualMap()},
                                                              logits=None)["hooks"]["maps"]["attn.pattern"])
        refined_fn = jax.jit(lambda params, batch, mask: model.forward(
            params, batch, {"soft": iv.ScaleVisualStates(mask, scale, review_flags)}, logits="last")["logits"][:, -1])

        def refine(chunk, inputs, _):
            batch, meta = model.prepare(inputs)
            maps = np.asarray(maps_fn(model.params, batch))
            chosen, _, suppress = contrastive_mask(maps, meta.mask, fusion, post, config["percentile"])
            scores = scorer(np.asarray(refined_fn(model.params, batch, jnp.asarray(suppress))), chunk)
            return [{"pre_integrated_layer": int(chosen[i]), **score_rows(scores, i)} for i in range(len(chunk))]

        refined = run_phase(model, out / "records_refined.jsonl", processor, questions, config["batch_size"],
                            "contrastive refinement", refine)
    by_id = {q.question_id: q for q in questions}
    summary = {
        "model": config["model"], "questions": len(masked), "images": len({q.image_path for q in questions}),
        "tokens": {"visual": VISUAL_TOKENS, "masked": "the hidden states of V at the input of one layer",
                   "query": f"answer and attention maps: {LAST_QUERY}"},
        "accuracy": accuracy_by_group(masked, correct[:, 0], by_id),
        "accuracy_masked_at_layer": correct[:, 1:].mean(0).tolist(),
        "mcnemar_p_at_layer": [t.p_value for t in tests], "significance": config["significance"],
        "fusion_layers": fusion, "review_layer": review,
        "refinement": None if refined is None else {
            "post_layer": max(review - 1, 0), "scale": config["soft_mask_scale"], "percentile": config["percentile"],
            "accuracy": float(np.mean([r["correct"] for r in refined])),
            "mcnemar_p": mcnemar(correct[:, 0], np.array([r["correct"] for r in refined])).p_value,
            "pre_integrated_layer_counts": np.bincount([r["pre_integrated_layer"] for r in refined],
                                                       minlength=num_layers).tolist()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log_curves(out, {"fusion/accuracy_masked_at_layer": summary["accuracy_masked_at_layer"],
                     "fusion/mcnemar_p_at_layer": summary["mcnemar_p_at_layer"]})
    plot(summary, out / "fusion_layers.png")
    return summary


def choose_layers(drop: np.ndarray, p_values, config: dict) -> tuple[list[int], int | None]:
    """Fusion layers: the configured ones, or the `num_fusion_layers` (default 6 of 32, scaled) largest accuracy
    drops in the first two thirds among those significant at `significance` (McNemar); review layer: the configured
    one (layer 0 included), or the largest significant drop in the last third, or None where no layer there
    significantly lowers accuracy."""
    n = len(drop)
    split = max(1, 2 * n // 3)
    lowers = [(p < config["significance"]) and d > 0 for d, p in zip(drop, p_values)]
    if config["fusion_layers"] is not None:
        fusion = list(config["fusion_layers"])
    else:
        k = config["num_fusion_layers"] or max(1, round(6 * n / 32))
        ranked = [int(i) for i in np.argsort(-drop[:split], kind="stable") if lowers[i]]
        fusion = sorted(ranked[:k])
    if config["review_layer"] is not None:
        return fusion, int(config["review_layer"])
    late = [layer for layer in range(split, n) if lowers[layer]]
    return fusion, (max(late, key=lambda layer: drop[layer]) if late else None)


def plot(summary: dict, path: Path) -> None:
    fig, ax = figure()
    acc = summary["accuracy_masked_at_layer"]
    n = summary["questions"]
    half = 1.96 * np.sqrt(np.array(acc) * (1 - np.array(acc)) / n)
    ax.errorbar(range(len(acc)), acc, yerr=half, marker="o", capsize=2, label="visual states zeroed at layer (95% CI)")
    ax.axhline(summary["accuracy"]["all"]["accuracy"], color="k", ls="--", label="no masking")
    if summary["refinement"]:
        ax.axhline(summary["refinement"]["accuracy"], color="C2", ls=":", label="contrastive refinement")
    for layer in summary["fusion_layers"]:
        ax.axvline(layer, color="C1", alpha=0.25)
    if summary["review_layer"] is not None:
        ax.axvline(summary["review_layer"], color="C3", alpha=0.4, label="review layer")
    ax.set(xlabel="layer", ylabel="accuracy", title="layer-wise visual masking (orange: fusion layers)")
    ax.legend(fontsize=8)
    save_figure(fig, path, f"{summary['model']}: {summary['questions']} questions, {summary['images']} images")


def main(argv=None) -> int:
    return main_with_config(run, CONFIG, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
