"""Seed 000: the visual neglect zone, VIAR and the language-prior readout (docs/methods.md §1), on any VLM.

Per POPE-style question, in one compiled forward over (real image, null image) pairs: the per-layer visual fraction
(the U-curve), text-to-visual mass (all text queries and the last one) and the residual-update cosine between the
real and the null image; then one compiled VIAR sweep over the bias values (bias on the visual keys of the zone's
layers; default layers 8-16 of 32 scaled to the model's depth), which runs the vision tower and the layers before the zone once, giving
first-token p(yes) per bias. Each question's record is appended to records.jsonl as soon as its batch is done (a
killed run resumes where it stopped); summary.json and neglect_zone.png are computed from the records.

Usage: python -m experiments.neglect_zone [--config experiments/neglect_zone.json] [--model DIR] [--out DIR] ...
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
from vlmjax.eval.pope import brier_score
from vlmjax.eval.records import ResultsWriter
from vlmjax.eval.stats import point_biserial
from vlmjax.probes import ResidualUpdateCosine, VisualAttention, paired_inputs
from vlmjax.sweep import make_sweep

CONFIG = Path(__file__).with_suffix(".json")


def zone_layers(num_layers: int, zone) -> list[int]:
    """The intervened layers: given, or LLaVA-1.5-7B's neglect zone (layers 8-16 of 32) scaled to the model's depth."""
    return list(zone) if zone else list(range(num_layers // 4, num_layers // 2 + 1))


def run(config: dict) -> dict:
    model, processor, records, out = setup(config)
    num_layers = model.num_layers["blocks"]
    zone = zone_layers(num_layers, config["zone"])
    biases = np.asarray(config["biases"], np.float32)
    flags = jnp.asarray(iv.layer_flags(num_layers, zone), jnp.float32)
    sweep = make_sweep(model, lambda b: {"viar": iv.AttentionBias(b * flags)}, first_layer=zone[0], chunk=1)
    hooks = {"visual": VisualAttention(), "collapse": ResidualUpdateCosine()}
    profile = jax.jit(lambda params, batch: model.forward(params, batch, hooks, logits=None)["hooks"])
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    with ResultsWriter(str(out / "records.jsonl"), id_key="id") as writer:
        pending = set(writer.pending([r.question_id for r in records]))
        for chunk, real, inputs in tqdm(batches(processor, records, pending, config["batch_size"]),
                                        desc="neglect zone", unit="batch"):
            null = iv.null_image(inputs["pixel_values"], config["null_image"], mean, std)
            paired, _ = model.prepare(paired_inputs(inputs, null))
            measured = jax.device_get(profile(model.params, paired))
            batch, _ = model.prepare(inputs)
            p_yes = p_yes_of(processor, np.asarray(sweep(model.params, batch, biases)["logits"])[:, :, -1])  # [K, B]
            visual = measured["visual"]["attn.pattern"]
            for i, r in enumerate(chunk[:real]):
                writer.write({
                    "id": r.question_id, "label": r.label, "split": r.extra.get("split"),
                    "visual_fraction": visual["visual_fraction"][:, i].tolist(),
                    "mass": visual["mass"][:, i].mean(-1).tolist(),
                    "last_query_mass": visual["last_query_mass"][:, i].mean(-1).tolist(),
                    "block_mean": visual["block_mean"][:, i].tolist(),
                    "collapse_cosine": measured["collapse"]["resid_post"][:, i].tolist(),
                    "p_yes_by_bias": p_yes[:, i].tolist(),
                })
        done = [r for r in writer.records if r["id"] in {q.question_id for q in records}]
    summary = summarise(done, biases, zone, config)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / "neglect_zone.png")
    return summary


def summarise(records: list[dict], biases, zone: list[int], config: dict) -> dict:
    """Means over questions: the U-curve, masses, collapse cosine; per bias: accuracy, yes-ratio, Brier; the
    point-biserial correlation of correctness (no bias) with neglect depth, overall and per layer."""
    truth = np.array([r["label"] == "yes" for r in records])
    p_yes = np.array([r["p_yes_by_bias"] for r in records])  # [Q, K]
    block = np.array([r["block_mean"] for r in records])  # [Q, L]
    correct = (p_yes[:, 0] >= 0.5) == truth
    depth = block[:, zone].mean(axis=1)
    labels = ["yes" if t else "no" for t in truth]
    per_bias = []
    for k, b in enumerate(biases):
        predicted = p_yes[:, k] >= 0.5
        per_bias.append({"bias": float(b), "accuracy": float((predicted == truth).mean()),
                         "yes_ratio": float(predicted.mean()), "brier": brier_score(p_yes[:, k], labels)})
    mean = lambda key: np.mean([r[key] for r in records], axis=0).tolist()
    r_all, p_all = point_biserial(correct, depth)
    per_layer_r = [float(point_biserial(correct, block[:, l])[0]) for l in range(block.shape[1])]
    return {"model": config["model"], "questions": len(records), "zone": zone, "visual_fraction": mean("visual_fraction"),
            "mass": mean("mass"), "last_query_mass": mean("last_query_mass"), "collapse_cosine": mean("collapse_cosine"),
            "viar": per_bias, "neglect_depth_correlation": {"r": float(r_all), "p": float(p_all)},
            "per_layer_correlation": per_layer_r}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    layers = np.arange(len(summary["visual_fraction"]))
    axes[0].plot(layers, summary["visual_fraction"], marker="o")
    axes[0].axvspan(summary["zone"][0] - 0.5, summary["zone"][-1] + 0.5, alpha=0.15, label="VIAR zone")
    axes[0].set(xlabel="layer", ylabel="visual fraction m_v / (m_v + m_t)", title="U-curve")
    axes[0].legend()
    axes[1].plot(layers, summary["collapse_cosine"], marker="o", color="C2")
    axes[1].set(xlabel="layer", ylabel="cos(update real, update null)", title="language-prior readout")
    biases = [v["bias"] for v in summary["viar"]]
    axes[2].plot(biases, [v["yes_ratio"] for v in summary["viar"]], marker="o", label="yes-ratio")
    axes[2].plot(biases, [v["accuracy"] for v in summary["viar"]], marker="s", label="accuracy")
    axes[2].set(xlabel="VIAR bias b", title="VIAR sweep")
    axes[2].legend()
    fig.suptitle(f"{summary['model']} — {summary['questions']} questions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    return main_with_config(run, CONFIG, argv)


if __name__ == "__main__":
    sys.exit(main())
