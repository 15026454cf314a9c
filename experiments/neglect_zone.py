"""Seed 000: the visual neglect zone, VIAR and the language-prior readout (docs/methods.md §1), on any VLM.

Per question, in one compiled forward over (real image, null image) pairs: the per-layer visual fraction (the
U-curve), text-to-visual mass (all text queries and the last one), block mean and the residual-update cosine between
the real and the null image; then one compiled VIAR sweep over the bias values (bias on the visual keys of the zone's
layers; default layers 8-16 of 32 scaled to the model's depth), which runs the vision tower and the layers before the
zone once, giving each bias's first-token answer scores. A third phase takes the gradient visual importance on the
first `gradient_questions` yes/no questions. Records are appended per question and phase (a killed run resumes);
summary.json, neglect_zone.png and TensorBoard scalars (tensorboard/) come from the records.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import (LAST_QUERY, TEXT_AFTER_IMAGE, VISUAL_TOKENS, AnswerScorer, accuracy_by_group,
                                figure, log_curves, main_with_config, run_phase, save_figure, score_rows, setup)
from vlmjax import interventions as iv
from vlmjax import probes
from vlmjax.eval.pope import brier_score, says_yes
from vlmjax.eval.run import answer_token_ids
from vlmjax.eval.stats import bootstrap_ci, mcnemar, point_biserial
from vlmjax.sweep import make_sweep

CONFIG = Path(__file__).with_suffix(".json")


def scaled(layer_of_32: float, num_layers: int) -> int:
    return int(round(layer_of_32 * num_layers / 32))


def zone_layers(num_layers: int, zone) -> list[int]:
    """The intervened layers: given, or LLaVA-1.5-7B's neglect zone (layers 8-16 of 32) scaled to the model's depth."""
    return list(zone) if zone else list(range(num_layers // 4, num_layers // 2 + 1))


def bias_values(biases) -> np.ndarray:
    """The swept biases, with 0 (no intervention, where correctness is read) added if the config leaves it out."""
    values = [float(b) for b in biases]
    return np.asarray(values if 0.0 in values else [0.0] + values, np.float32)


def run(config: dict) -> dict:
    model, processor, questions, out = setup(config)
    num_layers = model.num_layers["blocks"]
    zone = zone_layers(num_layers, config["zone"])
    biases = bias_values(config["biases"])
    flags = jnp.asarray(iv.layer_flags(num_layers, zone), jnp.float32)
    sweep = make_sweep(model, lambda b: {"viar": iv.AttentionBias(b * flags)}, first_layer=zone[0], chunk=1)
    hooks = {"visual": probes.VisualAttention(), "collapse": probes.ResidualUpdateCosine()}
    profile = jax.jit(lambda params, batch: model.forward(params, batch, hooks, logits=None)["hooks"])
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    scorer = AnswerScorer(processor.tokenizer, questions)

    def measure(chunk, inputs, _):
        null = iv.null_image(inputs["pixel_values"], config["null_image"], mean, std)
        measured = jax.device_get(profile(model.params, model.prepare(probes.paired_inputs(inputs, null))[0]))
        scores = scorer(np.asarray(sweep(model.params, model.prepare(inputs)[0], biases)["logits"])[:, :, -1], chunk)
        visual = measured["visual"]["attn.pattern"]
        return [{"visual_fraction": visual["visual_fraction"][:, i].tolist(),
                 "mass": visual["mass"][:, i].mean(-1).tolist(),
                 "last_query_mass": visual["last_query_mass"][:, i].mean(-1).tolist(),
                 "block_mean": visual["block_mean"][:, i].tolist(),
                 "collapse_cosine": measured["collapse"]["resid_post"][:, i].tolist(),
                 "by_bias": score_rows(scores, i)} for i in range(len(chunk))]

    records = run_phase(model, out / "records.jsonl", processor, questions, config["batch_size"], "neglect zone", measure)
    yes_id = answer_token_ids(processor.tokenizer, "yes")[0]
    gradient_set = [q for q in questions if q.yes_no][: config["gradient_questions"]]

    def gradients(chunk, inputs, _):
        importance = np.asarray(probes.visual_gradient_importance(model, inputs, [yes_id] * len(chunk)))
        return [{"gradient_importance": importance[:, i].tolist()} for i in range(len(chunk))]

    grads = run_phase(model, out / "records_gradient.jsonl", processor, gradient_set, config["batch_size"],
                      "gradient importance", gradients) if gradient_set else []
    summary = summarise(records, grads, questions, biases, zone, config)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log_curves(out, {"neglect/visual_fraction": summary["visual_fraction"],
                     "neglect/collapse_cosine": summary["collapse_cosine"],
                     "neglect/gradient_importance": summary["gradient_importance"],
                     "viar/accuracy": [v["accuracy"] for v in summary["viar"]],
                     "viar/yes_ratio": [v["yes_ratio"] for v in summary["viar"]]})
    plot(summary, out / "neglect_zone.png")
    return summary


def summarise(records, grads, questions, biases, zone: list[int], config: dict) -> dict:
    """The U-curve and its zone contrast (bootstrap CIs over questions), masses, collapse cosine, gradient importance;
    per bias: accuracy, yes-ratio, Brier (yes/no questions), with McNemar tests against bias 0 at the VIAR bias; the
    point-biserial correlation of correctness (at bias 0) with neglect depth, overall and per layer."""
    by_id = {q.question_id: q for q in questions}
    num_layers = len(records[0]["visual_fraction"])
    plain = int(np.flatnonzero(biases == 0)[0])  # correctness without intervention: the bias-0 run
    correct = np.array([r["by_bias"]["correct"] for r in records])  # [Q, K]
    yes_no = np.array([by_id[r["id"]].yes_no for r in records])
    labels = [by_id[r["id"]].answer for r in records if by_id[r["id"]].yes_no]
    p_yes = np.array([r["by_bias"]["p_yes"] for r in records if by_id[r["id"]].yes_no]).reshape(-1, len(biases))
    fraction = np.array([r["visual_fraction"] for r in records])  # [Q, L]
    block = np.array([r["block_mean"] for r in records])
    early = list(range(scaled(2, num_layers), zone[0]))
    late = list(range(zone[-1] + 1, max(zone[-1] + 1, scaled(31, num_layers))))
    contrast = lambda side: (asdict(bootstrap_ci((fraction[:, side].mean(1) - fraction[:, zone].mean(1)),
                                          seed=config["bootstrap_seed"])) if side else None)
    per_bias = []
    for k, b in enumerate(biases):
        row = {"bias": float(b), "accuracy": float(correct[:, k].mean())}
        if len(labels):
            decided = says_yes(p_yes[:, k])
            row.update(accuracy_yes_no=float(correct[yes_no, k].mean()), yes_ratio=float(decided.mean()),
                       brier=brier_score(p_yes[:, k], labels))
            if k != plain:
                row["mcnemar_accuracy_p"] = mcnemar(correct[:, plain], correct[:, k]).p_value
                row["mcnemar_yes_ratio_p"] = mcnemar(says_yes(p_yes[:, plain]), decided).p_value
        per_bias.append(row)
    depth = block[:, zone].mean(axis=1)
    r_all, p_all = point_biserial(correct[:, plain], depth)
    per_layer = [point_biserial(correct[:, plain], block[:, layer]) for layer in range(num_layers)]
    mean = lambda key: np.mean([r[key] for r in records], axis=0).tolist()
    gradient = np.mean([g["gradient_importance"] for g in grads], axis=0).tolist() if grads else []
    return {
        "model": config["model"], "questions": len(records), "images": len({q.image_path for q in questions}),
        "tokens": {"visual": VISUAL_TOKENS, "text": TEXT_AFTER_IMAGE,
                   "query": f"mass, visual fraction, block mean: every query of T; last_query_mass and the answer: "
                            f"{LAST_QUERY}; collapse cosine: the queries of T, real vs {config['null_image']} image"},
        "zone": zone, "early_layers": early, "late_layers": late, "bias_layers": zone,
        "visual_fraction": mean("visual_fraction"), "early_minus_zone": contrast(early), "late_minus_zone": contrast(late),
        "mass": mean("mass"), "last_query_mass": mean("last_query_mass"), "collapse_cosine": mean("collapse_cosine"),
        "collapse_cosine_last_layer": asdict(bootstrap_ci(np.array([r["collapse_cosine"][-1] for r in records]),
                                                          seed=config["bootstrap_seed"])),
        "gradient_importance": gradient, "gradient_questions": len(grads),
        "accuracy": accuracy_by_group(records, correct[:, plain], by_id),
        "viar": per_bias, "viar_bias": float(config["viar_bias"]),
        "neglect_depth_correlation": {"r": float(r_all), "p": float(p_all)},
        "per_layer_correlation": [{"r": float(r), "p": float(p)} for r, p in per_layer],
    }


def plot(summary: dict, path: Path) -> None:
    fig, axes = figure(1, 3, size=(14, 3.8))
    layers = np.arange(len(summary["visual_fraction"]))
    zone = summary["zone"]
    axes[0].plot(layers, summary["visual_fraction"], marker="o", label="visual fraction")
    axes[0].axvspan(zone[0] - 0.5, zone[-1] + 0.5, alpha=0.15, label="neglect zone (VIAR layers)")
    axes[0].set(xlabel="layer", ylabel="m_v / (m_v + m_t)", title="U-curve")
    axes[0].legend(fontsize=8)
    axes[1].plot(layers, summary["collapse_cosine"], marker="o", color="C2", label="cos(update real, update null)")
    if summary["gradient_importance"]:
        twin = axes[1].twinx()
        twin.plot(layers, summary["gradient_importance"], marker="s", color="C3", label="gradient importance")
        twin.set_ylabel("gradient importance", color="C3")
    axes[1].axvspan(zone[0] - 0.5, zone[-1] + 0.5, alpha=0.1)
    axes[1].set(xlabel="layer", ylabel="cosine", title="language-prior readout")
    viar = [v for v in summary["viar"] if "yes_ratio" in v]
    biases = [v["bias"] for v in viar]
    for key, marker in (("yes_ratio", "o"), ("accuracy_yes_no", "s")):
        axes[2].plot(biases, [v[key] for v in viar], marker=marker, label=key.replace("_", " "))
    n = max(1, summary["accuracy"].get("family=pope", summary["accuracy"]["all"])["n"])
    for key in ("yes_ratio", "accuracy_yes_no"):  # 95% binomial interval of each point
        values = np.array([v[key] for v in viar])
        half = 1.96 * np.sqrt(values * (1 - values) / n)
        axes[2].fill_between(biases, values - half, values + half, alpha=0.15)
    axes[2].set(xlabel="VIAR bias b", title="VIAR sweep (95% CI)")
    axes[2].legend(fontsize=8)
    save_figure(fig, path, f"{summary['model']}: {summary['questions']} questions, {summary['images']} images")


def main(argv=None) -> int:
    return main_with_config(run, CONFIG, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
