"""Seed 000: the visual neglect zone, VIAR and the language-prior readout (docs/methods.md §1), on any VLM.

Per question, in one compiled forward over (real image, null image) pairs: the per-layer visual fraction (the
U-curve) and its per-head map, text-to-visual mass (all text queries and the last one), block mean and the
residual-update cosine between the real and the null image; then one compiled VIAR sweep over the bias values (bias
on the zone's layers at the visual keys, or at the first 576 key columns as the original code did: config
`bias_keys`; default layers 8-16 of 32 scaled to the model's depth), which runs the vision tower and the layers
before the zone once, giving each bias's first-token answer scores; and VCD's first-token scores (real and
diffusion-noised image contrasted, `vlmjax.generate`). A third phase takes the gradient visual importance on the
first `gradient_questions` yes/no questions. The yes-logit threshold sweep (c subtracted from the yes logit) is read
from the bias-0 scores. Every condition (each bias, VCD, each threshold) is compared with the baseline (bias 0) on
the yes/no questions, for accuracy and yes-ratio: McNemar, Cohen's h, power and N80, Beta-posterior P(greater).
Records are appended per question and phase (a killed run resumes); summary.json, neglect_zone.png,
neglect_heads.png and TensorBoard scalars (tensorboard/) come from the records.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import expit, logit

from experiments.common import (LAST_QUERY, TEXT_AFTER_IMAGE, VISUAL_TOKENS, AnswerScorer, accuracy_by_group,
                                figure, log_curves, main_with_config, run_phase, save_figure, score_rows, setup)
from vlmjax import interventions as iv
from vlmjax import probes
from vlmjax.checks import nearest
from vlmjax.errors import VlmJaxError
from vlmjax.eval.pope import brier_score, first_token_correct, says_yes
from vlmjax.eval.run import answer_token_ids
from vlmjax.eval.stats import (beta_posterior_comparison, bootstrap_ci, cohens_h, mcnemar, n_for_power,
                               point_biserial, power_two_proportions)
from vlmjax.generate import generate
from vlmjax.sweep import make_sweep

CONFIG = Path(__file__).with_suffix(".json")
# The key columns VIAR biases, by name: the visual keys V (the paper's formula), or the original code's first 576 key
# columns whatever they hold (BOS and some text included; methods §1) to reproduce a published number.
BIAS_KEYS = {"visual": None, "first_576_columns": 576}
CUT_LOGIT = -1e30  # a token VCD's plausibility cut removed (-inf): probability 0, yet finite for the scorer


def scaled(layer_of_32: float, num_layers: int) -> int:
    return int(round(layer_of_32 * num_layers / 32))


def zone_layers(num_layers: int, zone) -> list[int]:
    """The intervened layers: given, or LLaVA-1.5-7B's neglect zone (layers 8-16 of 32) scaled to the model's depth."""
    return list(zone) if zone else list(range(num_layers // 4, num_layers // 2 + 1))


def bias_values(biases) -> np.ndarray:
    """The swept biases, with 0 (no intervention, where correctness is read) added if the config leaves it out."""
    values = [float(b) for b in biases]
    return np.asarray(values if 0.0 in values else [0.0] + values, np.float32)


def bias_columns(name: str) -> int | None:
    """`AttentionBias.first_columns` for a config's `bias_keys` name."""
    if name not in BIAS_KEYS:
        raise VlmJaxError(f"Config key 'bias_keys' must name one of {sorted(BIAS_KEYS)}, got {name!r}."
                          f"{nearest(name, sorted(BIAS_KEYS), 'names')}")
    return BIAS_KEYS[name]


def contrast_images(model, inputs: dict, chunk, config: dict) -> np.ndarray:
    """VCD's distorted images of a batch (methods §6: diffusion noise at `vcd_noise_step`), each question's noise
    drawn from its own key (`vcd_seed`, its id), so it does not depend on the batch the question fell in. Packed
    patches (Qwen2-VL) are split per image and noised as the image before patching."""
    pixels = np.asarray(inputs["pixel_values"])
    packed = pixels.ndim == 2
    sizes = np.prod(inputs["image_grid_thw"], -1) if packed else np.ones(len(chunk), int)
    layout = (model.config.vision.in_channels, model.config.vision.temporal_patch_size) if packed else None
    base = jax.random.key(config["vcd_seed"])
    return np.concatenate([np.asarray(iv.vcd_noise(part, jax.random.fold_in(base, q.question_id),
                                                   config["vcd_noise_step"], layout))
                           for part, q in zip(np.split(pixels, np.cumsum(sizes)[:-1]), chunk)])


def vcd_scores(scorer: AnswerScorer, logits, chunk) -> tuple[dict, np.ndarray]:
    """First-token scores from VCD's contrasted logits, whose plausibility cut set some tokens to -inf (probability
    0). Where it cut every spelling of every candidate (the top token was none of them), the candidates count as
    equally likely (one spelling each at 0): p_yes = 1/2, read as "yes", as the official POPE parse reads an answer
    without "no". Also returns which questions those were."""
    logits = np.asarray(logits, np.float64)
    cut = np.isneginf(logits)
    spellings = [[scorer.ids[c] for c in q.candidates] for q in chunk]
    all_cut = np.array([cut[b, sum(ids, [])].all() for b, ids in enumerate(spellings)])
    logits = np.where(cut, CUT_LOGIT, logits)
    for b in np.flatnonzero(all_cut):
        logits[b, [ids[0] for ids in spellings[b]]] = 0.0
    with np.errstate(over="ignore"):  # a cut answer's odds overflow to inf: its probability, exactly 0
        return scorer(logits, chunk), all_cut


def run(config: dict) -> dict:
    columns = bias_columns(config["bias_keys"])
    model, processor, questions, out = setup(config)
    num_layers = model.num_layers["blocks"]
    zone = zone_layers(num_layers, config["zone"])
    biases = bias_values(config["biases"])
    flags = jnp.asarray(iv.layer_flags(num_layers, zone), jnp.float32)
    sweep = make_sweep(model, lambda b: {"viar": iv.AttentionBias(b * flags, columns)}, first_layer=zone[0], chunk=1)
    hooks = {"visual": probes.VisualAttention(), "collapse": probes.ResidualUpdateCosine()}
    profile = model.jit(lambda params, batch: model.forward(params, batch, hooks, logits=None)["hooks"])
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    scorer = AnswerScorer(processor.tokenizer, questions)

    def measure(chunk, inputs, _):
        null = iv.null_image(inputs["pixel_values"], config["null_image"], mean, std)
        measured = jax.device_get(profile(model.params, model.prepare(probes.paired_inputs(inputs, null))[0]))
        scores = scorer(np.asarray(sweep(model.params, model.prepare(inputs)[0], biases)["logits"])[:, :, -1], chunk)
        _, vcd = generate(model, inputs, 1, contrast_pixel_values=contrast_images(model, inputs, chunk, config),
                          alpha=config["vcd_alpha"], beta=config["vcd_beta"], return_first_logits=True)
        vcd, all_cut = vcd_scores(scorer, vcd, chunk)
        visual = measured["visual"]["attn.pattern"]
        return [{"visual_fraction": visual["visual_fraction"][:, i].tolist(),
                 "visual_fraction_per_head": visual["visual_fraction_per_head"][:, i].tolist(),
                 "mass": visual["mass"][:, i].mean(-1).tolist(),
                 "last_query_mass": visual["last_query_mass"][:, i].mean(-1).tolist(),
                 "block_mean": visual["block_mean"][:, i].tolist(),
                 "collapse_cosine": measured["collapse"]["resid_post"][:, i].tolist(),
                 "by_bias": score_rows(scores, i), "vcd": {**score_rows(vcd, i), "all_answers_cut": bool(all_cut[i])}}
                for i in range(len(chunk))]

    records = run_phase(model, out / "records.jsonl", processor, questions, config["batch_size"], "neglect zone",
                        measure)
    yes_id = answer_token_ids(processor.tokenizer, "yes")[0]
    gradient_set = [q for q in questions if q.yes_no][: config["gradient_questions"]]

    def gradients(chunk, inputs, _):
        importance = np.asarray(probes.visual_gradient_importance(model, inputs, [yes_id] * len(chunk)))
        return [{"gradient_importance": importance[:, i].tolist()} for i in range(len(chunk))]

    grads = run_phase(model, out / "records_gradient.jsonl", processor, gradient_set, config["batch_size"],
                      "gradient importance", gradients) if gradient_set else []
    summary = summarise(records, grads, questions, biases, zone, config)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log_curves(out, curves(summary))
    plot(summary, out / "neglect_zone.png")
    plot_heads(summary, out / "neglect_heads.png")
    return summary


def versus(baseline, other, seed: int) -> dict:
    """`other` against `baseline` on paired 0/1 outcomes of the same questions (correct, or says yes): both rates,
    McNemar, Cohen's h (other minus baseline), the power of a two-proportion test at this n and the n per group for
    80% power (N80), and the Beta(1 + k, 1 + n - k) posterior P(other's rate > baseline's) with the credible
    interval of the difference."""
    baseline, other = np.asarray(baseline, bool), np.asarray(other, bool)
    n, k_base, k_other = len(baseline), int(baseline.sum()), int(other.sum())
    h = cohens_h(k_other / n, k_base / n)
    posterior = beta_posterior_comparison(k_other, n, k_base, n, seed=seed)
    return {"n": n, "baseline": k_base / n, "value": k_other / n, "mcnemar": asdict(mcnemar(baseline, other)),
            "cohens_h": h, "power": power_two_proportions(h, n), "n_for_80_power": n_for_power(h),
            "p_greater": posterior.prob_first_greater, "difference": asdict(posterior.difference)}


def shifted_p_yes(p_yes, shift: float) -> np.ndarray:
    """p(yes) with `shift` subtracted from the yes logit: sigmoid(logit(p_yes) - c), as the log-odds of yes
    against no is the yes logit minus the no logit (each summed over spellings)."""
    return expit(logit(np.asarray(p_yes, np.float64)) - shift)


def yes_no_row(p_yes, labels, baseline_p_yes, seed: int) -> dict:
    """A condition's yes/no scores: accuracy, yes-ratio, Brier and, given the baseline's p(yes), both compared with
    the baseline's (`versus`)."""
    correct, says = first_token_correct(p_yes, labels), says_yes(p_yes)
    row = {"accuracy_yes_no": float(correct.mean()), "yes_ratio": float(says.mean()),
           "brier": brier_score(p_yes, labels)}
    if baseline_p_yes is not None:
        row["vs_baseline"] = {"accuracy": versus(first_token_correct(baseline_p_yes, labels), correct, seed),
                              "yes_ratio": versus(says_yes(baseline_p_yes), says, seed)}
    return row


def answer_conditions(records, by_id: dict, biases: np.ndarray, config: dict) -> dict:
    """Per bias and for VCD: accuracy over every question; per bias, for VCD and per yes-logit shift, on the yes/no
    questions, `yes_no_row` against the baseline (bias 0); VIAR (at `viar_bias`) against the shift whose yes-ratio
    is closest to VIAR's (does VIAR do more than move the threshold?)."""
    seed = config["bootstrap_seed"]
    plain = int(np.flatnonzero(biases == 0)[0])
    correct = np.array([r["by_bias"]["correct"] for r in records])  # [Q, K]
    per_bias = [{"bias": float(b), "accuracy": float(correct[:, k].mean())} for k, b in enumerate(biases)]
    vcd = {"alpha": config["vcd_alpha"], "beta": config["vcd_beta"], "noise_step": config["vcd_noise_step"],
           "all_answers_cut": sum(r["vcd"]["all_answers_cut"] for r in records),
           "accuracy": float(np.mean([r["vcd"]["correct"] for r in records]))}
    answered = [r for r in records if by_id[r["id"]].yes_no]
    if not answered:
        return {"viar": per_bias, "vcd": vcd, "yes_logit_threshold": [], "threshold_matching_viar": None}
    labels = [by_id[r["id"]].answer for r in answered]
    p_yes = np.array([r["by_bias"]["p_yes"] for r in answered])  # [Q, K]
    baseline = p_yes[:, plain]
    row = lambda p, compared=True: yes_no_row(p, labels, baseline if compared else None, seed)
    for k, values in enumerate(per_bias):
        values.update(row(p_yes[:, k], k != plain))
    vcd.update(row(np.array([r["vcd"]["p_yes"] for r in answered])))
    thresholds = [{"shift": float(c), **row(shifted_p_yes(baseline, c), c != 0)} for c in config["yes_logit_shifts"]]
    matched = None
    at = np.flatnonzero(biases == config["viar_bias"])
    if len(at):
        viar = per_bias[at[0]]
        closest = min(thresholds, key=lambda t: abs(t["yes_ratio"] - viar["yes_ratio"]))
        matched = {"shift": closest["shift"], "yes_ratio_gap": closest["yes_ratio"] - viar["yes_ratio"],
                   "accuracy": versus(first_token_correct(shifted_p_yes(baseline, closest["shift"]), labels),
                                      first_token_correct(p_yes[:, at[0]], labels), seed)}
    return {"viar": per_bias, "vcd": vcd, "yes_logit_threshold": thresholds, "threshold_matching_viar": matched}


def band(layers: list[int], curves: dict) -> dict | None:
    """One band of layers (early, zone, late): each curve's mean over its layers ([] curves: None), and the
    visual fraction's range."""
    if not layers:
        return None
    row = {"layers": layers, **{k: float(np.mean(np.asarray(v)[layers])) if v else None for k, v in curves.items()}}
    fraction = np.asarray(curves["visual_fraction"])[layers]
    return {**row, "visual_fraction_range": [float(fraction.min()), float(fraction.max())]}


def summarise(records, grads, questions, biases, zone: list[int], config: dict) -> dict:
    """The U-curve, its per-head map and its zone contrast (bootstrap CIs over questions), early / zone / late band
    means, masses, collapse cosine, gradient importance and its fall through the zone (bootstrap CI of the ratio of
    the zone's first to last layer's mean; None where the last has a zero), the answer conditions
    (`answer_conditions`), the point-biserial correlation of correctness (at bias 0) with neglect depth, overall
    and per layer."""
    by_id = {q.question_id: q for q in questions}
    seed = config["bootstrap_seed"]
    num_layers = len(records[0]["visual_fraction"])
    plain_correct = np.array([r["by_bias"]["correct"][int(np.flatnonzero(biases == 0)[0])] for r in records])
    fraction = np.array([r["visual_fraction"] for r in records])  # [Q, L]
    block = np.array([r["block_mean"] for r in records])
    early = list(range(scaled(2, num_layers), zone[0]))
    late = list(range(zone[-1] + 1, max(zone[-1] + 1, scaled(31, num_layers))))
    contrast = lambda side: (asdict(bootstrap_ci((fraction[:, side].mean(1) - fraction[:, zone].mean(1)),
                                                 seed=seed)) if side else None)
    r_all, p_all = point_biserial(plain_correct, block[:, zone].mean(axis=1))  # neglect depth
    per_layer = [point_biserial(plain_correct, block[:, layer]) for layer in range(num_layers)]
    mean = lambda key, rows=records: np.mean([r[key] for r in rows], axis=0).tolist() if rows else []
    gradient = np.array([g["gradient_importance"] for g in grads])  # [G, L]
    fall = (asdict(bootstrap_ci((gradient[:, zone[0]], gradient[:, zone[-1]]), lambda a, b: a.mean() / b.mean(),
                                seed=seed)) if len(grads) and (gradient[:, zone[-1]] > 0).all() else None)
    layer_curves = {"visual_fraction": mean("visual_fraction"), "mass": mean("mass"),
                    "last_query_mass": mean("last_query_mass"),
                    "gradient_importance": mean("gradient_importance", grads)}
    columns = BIAS_KEYS[config["bias_keys"]]
    return {
        "model": config["model"], "questions": len(records), "images": len({q.image_path for q in questions}),
        "tokens": {"visual": VISUAL_TOKENS, "text": TEXT_AFTER_IMAGE,
                   "query": f"mass, visual fraction (per layer and per head), block mean: every query of T; "
                            f"last_query_mass and every answer (each bias, VCD, each yes-logit shift): {LAST_QUERY}, "
                            f"first-token scores; collapse cosine: the queries of T, real vs {config['null_image']} "
                            "image; gradient importance: the yes logit at that query, norms at V",
                   "bias_keys": f"{config['bias_keys']}: " + ("the visual keys V" if columns is None else
                                f"key columns 0..{columns - 1} whatever they hold (the original code's convention)")},
        "baseline": "bias 0 (no intervention); comparisons on the yes/no questions, paired by question",
        "zone": zone, "early_layers": early, "late_layers": late, "bias_layers": zone,
        **layer_curves, "visual_fraction_per_head": mean("visual_fraction_per_head"),
        "bands": {name: band(layers, layer_curves) for name, layers in (("early", early), ("zone", zone),
                                                                        ("late", late))},
        "early_minus_zone": contrast(early), "late_minus_zone": contrast(late),
        "collapse_cosine": mean("collapse_cosine"),
        "collapse_cosine_last_layer": asdict(bootstrap_ci(np.array([r["collapse_cosine"][-1] for r in records]),
                                                          seed=seed)),
        "gradient_questions": len(grads), "gradient_zone_fall": fall,
        "accuracy": accuracy_by_group(records, plain_correct, by_id),
        **answer_conditions(records, by_id, biases, config), "viar_bias": float(config["viar_bias"]),
        "neglect_depth_correlation": {"r": float(r_all), "p": float(p_all)},
        "per_layer_correlation": [{"r": float(r), "p": float(p)} for r, p in per_layer],
    }


def curves(summary: dict) -> dict:
    """The TensorBoard series: per layer, per band (early, zone, late: steps 0-2), per bias, per yes-logit shift;
    VCD at step 0."""
    heads = np.asarray(summary["visual_fraction_per_head"])
    bands = [summary["bands"][name] for name in ("early", "zone", "late")]
    series = {f"neglect/{key}": summary[key] for key in ("visual_fraction", "mass", "last_query_mass",
                                                           "collapse_cosine", "gradient_importance")}
    series["heads/visual_fraction_min"], series["heads/visual_fraction_max"] = heads.min(1), heads.max(1)
    for key in ("visual_fraction", "mass", "gradient_importance"):
        series[f"bands/{key}"] = [b[key] if b else None for b in bands]
    conditions = {"viar": summary["viar"], "threshold": summary["yes_logit_threshold"], "vcd": [summary["vcd"]]}
    for name, rows in conditions.items():
        for key in ("accuracy", "accuracy_yes_no", "yes_ratio", "brier"):
            series[f"{name}/{key}"] = [row.get(key) for row in rows]
    return series


def plot(summary: dict, path: Path) -> None:
    fig, axes = figure(1, 4, size=(18, 3.8))
    layers = np.arange(len(summary["visual_fraction"]))
    zone = summary["zone"]
    axes[0].plot(layers, summary["visual_fraction"], marker="o", label="visual fraction")
    for name, b in summary["bands"].items():
        if b:
            axes[0].hlines(b["visual_fraction"], b["layers"][0] - 0.4, b["layers"][-1] + 0.4, colors="C1",
                           linestyles="--", label="band means" if name == "early" else None)
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
    shifts = summary["yes_logit_threshold"]
    axes[3].plot([t["yes_ratio"] for t in shifts], [t["accuracy_yes_no"] for t in shifts], marker=".", color="C7",
                 label="yes-logit shift c = " + ", ".join(f"{t['shift']:g}" for t in shifts))
    axes[3].plot([v["yes_ratio"] for v in viar], [v["accuracy_yes_no"] for v in viar], marker="o", label="VIAR biases")
    if "yes_ratio" in summary["vcd"]:
        axes[3].plot([summary["vcd"]["yes_ratio"]], [summary["vcd"]["accuracy_yes_no"]], "D", color="C3",
                     label=f"VCD (a = {summary['vcd']['alpha']:g})")
    if viar:
        axes[3].plot([viar[0]["yes_ratio"]], [viar[0]["accuracy_yes_no"]], "k*", markersize=10, label="baseline")
    axes[3].set(xlabel="yes-ratio", ylabel="accuracy (yes/no)", title="VIAR vs threshold vs VCD")
    axes[3].legend(fontsize=7)
    save_figure(fig, path, f"{summary['model']}: {summary['questions']} questions, {summary['images']} images")


def plot_heads(summary: dict, path: Path) -> None:
    """The per-head visual fraction as a layers x heads heatmap, the zone's layers marked."""
    heads = np.asarray(summary["visual_fraction_per_head"])  # [L, H]
    fig, axes = figure(1, 1, size=(max(5, 0.25 * heads.shape[1] + 3), max(3.5, 0.22 * heads.shape[0] + 1.5)))
    image = axes.imshow(heads, aspect="auto", cmap="viridis", origin="lower")
    fig.colorbar(image, ax=axes, label="m_v / (m_v + m_t) per head")
    zone = summary["zone"]
    for edge in (zone[0] - 0.5, zone[-1] + 0.5):
        axes.axhline(edge, color="w", linestyle="--", linewidth=1)
    axes.set(xlabel="head", ylabel="layer", title="visual fraction per head (neglect zone between dashes)")
    save_figure(fig, path, f"{summary['model']}: {summary['questions']} questions")


def main(argv=None) -> int:
    return main_with_config(run, CONFIG, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
