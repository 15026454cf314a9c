"""Seed 004: does attention predict reliability? (docs/methods.md §5) — attention-map structure vs correctness,
top-30% patch masking, linear probes on hidden states, and ablation of the probe's top residual dimensions.

Phase 1, one compiled forward per batch: each question's first-token answer, every layer's last-token residual
(`HiddenStates`) and last-query visual map; then the top `top_fraction` patches of the map at `map_layer` (default the
middle layer) are removed from attention at every layer and the answer is scored again.
Phase 2, on the records: spatial entropy and cluster count of each layer's map, their point-biserial correlation
with correctness; per layer, a logistic-regression probe (L2, standardised features, 80/20 stratified split,
seeded) predicting correctness, its test AUROC with a bootstrap CI, and a shuffled-label control.
Phase 3: at the best probe layer, the `ablate_neurons` residual dimensions with the largest probe weights, and as
many random ones under each random seed, are zeroed (one compiled sweep) and accuracy is measured.
The set mixes POPE with the harder families (counting in a box, attributes; occluded and cluttered images are
tagged), so the model is wrong often enough to probe. Records are appended per question per phase (resumable);
summary.json, reliability_probes.png (probe ROC curves, AUROC per layer) and TensorBoard scalars come from them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import minimize
from scipy.stats import rankdata

from experiments.common import (LAST_QUERY, VISUAL_TOKENS, AnswerScorer, accuracy_by_group, figure, log_curves,
                                main_with_config, run_phase, save_figure, score_rows, setup)
from vlmjax import interventions as iv
from vlmjax.eval.stats import bootstrap_ci, mcnemar, point_biserial
from vlmjax.probes import HiddenStates, LastQueryVisualMap, map_statistics
from vlmjax.sweep import make_sweep

CONFIG = Path(__file__).with_suffix(".json")


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN without both classes."""
    positives, negatives = labels.sum(), (~labels).sum()
    if not positives or not negatives:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def stratified_split(labels: np.ndarray, seed: int, test_fraction: float = 0.2):
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for value in (False, True):
        members = rng.permutation(np.flatnonzero(labels == value))
        test[members[: max(1, round(test_fraction * len(members)))] if len(members) > 1 else []] = True
    return ~test, test


def fit_probe(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """Logistic regression weights [D + 1] (last: bias) by L-BFGS on the mean log-loss plus l2 |w|^2 / n."""
    xb = np.concatenate([x, np.ones((len(x), 1))], axis=1)

    def loss(w):
        z = xb @ w
        value = np.mean(np.logaddexp(0, z) - y * z) + l2 * w[:-1] @ w[:-1] / len(x)
        grad = xb.T @ (1 / (1 + np.exp(-z)) - y) / len(x)
        grad[:-1] += 2 * l2 * w[:-1] / len(x)
        return value, grad

    return minimize(loss, np.zeros(xb.shape[1]), jac=True, method="L-BFGS-B").x


def probe_layer(hidden: np.ndarray, correct: np.ndarray, config: dict) -> dict:
    train, test = stratified_split(correct, config["split_seed"])
    mean, std = hidden[train].mean(0), hidden[train].std(0) + 1e-6
    x = (hidden - mean) / std
    w = fit_probe(x[train], correct[train].astype(float), config["l2"])
    shuffled = np.random.default_rng(config["split_seed"] + 1).permutation(correct[train])
    w_control = fit_probe(x[train], shuffled.astype(float), config["l2"])
    score = lambda weights: x[test] @ weights[:-1] + weights[-1]
    scores, labels = score(w), correct[test]
    rng = np.random.default_rng(config["bootstrap_seed"])  # resamples missing a class give NaN and are skipped
    resampled = [auroc(scores[i], labels[i]) for i in rng.integers(0, len(labels), (1000, len(labels)))]
    ci = np.nanpercentile(resampled, [2.5, 97.5]).tolist() if not np.isnan(resampled).all() else [np.nan, np.nan]
    return {"auroc": auroc(scores, labels), "auroc_ci": ci,
            "auroc_shuffled_labels": auroc(score(w_control), labels), "test_scores": scores.tolist(),
            "test_labels": labels.tolist(), "weights": (w[:-1] / std).tolist()}


def run(config: dict) -> dict:
    model, processor, questions, out = setup(config)
    num_layers = model.num_layers["blocks"]
    scorer = AnswerScorer(processor.tokenizer, questions)
    map_layer = config["map_layer"] if config["map_layer"] is not None else num_layers // 2
    hooks = {"hidden": HiddenStates(), "maps": LastQueryVisualMap()}
    measure_fn = jax.jit(lambda params, batch: model.forward(params, batch, hooks, logits="last"))
    masked_fn = jax.jit(lambda params, batch, hook: model.forward(params, batch, {"remove": hook}, logits="last"))

    def measure(chunk, inputs, _):
        batch, meta = model.prepare(inputs)
        res = jax.device_get(measure_fn(model.params, batch))
        maps = res["hooks"]["maps"]["attn.pattern"]  # [L, B, N]
        stats = map_statistics(maps, meta, config["top_fraction"])
        remove = iv.RemoveVisualTokens.top_attended(num_layers, maps[map_layer], meta, config["top_fraction"])
        removed = scorer(np.asarray(masked_fn(model.params, batch, remove)["logits"][:, -1]), chunk)
        plain = scorer(res["logits"][:, -1], chunk)
        hidden = res["hooks"]["hidden"]["resid_post"][:, :, 0]  # [L, B, D]
        return [{**score_rows(plain, i), "top_removed": score_rows(removed, i), "hidden": hidden[:, i].tolist(),
                 "spatial_entropy": stats["spatial_entropy"][:, i].tolist(),
                 "clusters": stats["clusters"][:, i].tolist()} for i in range(len(chunk))]

    done = run_phase(model, out / "records.jsonl", processor, questions, config["batch_size"], "probing", measure)
    correct = np.array([r["correct"] for r in done])
    hidden = np.array([r["hidden"] for r in done])  # [Q, L, D]
    probes = [probe_layer(hidden[:, layer], correct, config) for layer in range(num_layers)]
    aurocs = [p["auroc"] for p in probes]
    best = int(np.nanargmax(aurocs)) if not np.isnan(aurocs).all() else 0
    width = hidden.shape[-1]
    k = config["ablate_neurons"]
    top = np.argsort(-np.abs(probes[best]["weights"]))[:k]
    keeps = np.ones((1 + len(config["random_neuron_seeds"]), num_layers, width), np.float32)
    keeps[0, best, top] = 0.0
    for row, seed in enumerate(config["random_neuron_seeds"], start=1):
        keeps[row, best, np.random.default_rng(seed).choice(np.setdiff1d(np.arange(width), top), k, False)] = 0.0
    zeros = jnp.zeros((num_layers, width), jnp.float32)
    ablate = make_sweep(model, lambda keep: {"ablate": iv.NeuronAblation(keep, zeros, "resid_post")},
                        first_layer=best, chunk=1)

    def ablation(chunk, inputs, _):
        scores = scorer(np.asarray(ablate(model.params, model.prepare(inputs)[0], keeps)["logits"])[:, :, -1], chunk)
        return [score_rows(scores, i) for i in range(len(chunk))]

    ablated = np.array([r["correct"] for r in run_phase(model, out / "records_ablation.jsonl", processor, questions,
                                                        config["batch_size"], "neuron ablation", ablation)])
    summary = summarise(done, correct, probes, best, top, ablated, map_layer, questions, config)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log_curves(out, {"reliability/probe_auroc": summary["probe_auroc"],
                     "reliability/probe_auroc_shuffled": summary["probe_auroc_shuffled"],
                     "reliability/entropy_correctness_r": [c["r"] for c in summary["entropy_correctness"]]})
    plot(summary, probes, out / "reliability_probes.png")
    return summary


def summarise(done, correct, probes, best, top, ablated, map_layer, questions, config) -> dict:
    num_layers = len(probes)
    removed = np.array([r["top_removed"]["correct"] for r in done])
    entropy = np.array([r["spatial_entropy"] for r in done])
    clusters = np.array([r["clusters"] for r in done])
    correlations = lambda values: [dict(zip(("r", "p"), map(float, point_biserial(correct, values[:, layer]))))
                                   for layer in range(num_layers)]
    drop = bootstrap_ci((correct.astype(float), removed.astype(float)), lambda a, b: np.mean(a - b),
                        seed=config["bootstrap_seed"])
    random_acc = ablated[:, 1:].mean(0)
    return {
        "model": config["model"], "questions": len(done), "images": len({q.image_path for q in questions}),
        "tokens": {"visual": VISUAL_TOKENS, "query": f"answer, map and probed hidden state: {LAST_QUERY}",
                   "map": "the head-mean attention row of the query over V, renormalised, on the image's patch grid",
                   "removed": f"the top {config['top_fraction']:.0%} patches of the map at layer {map_layer}, "
                              "removed from attention at every layer"},
        "accuracy": accuracy_by_group(done, correct, {q.question_id: q for q in questions}),
        "map_layer": map_layer, "accuracy_top_patches_removed": float(removed.mean()),
        "top_patches_removed_drop": asdict(drop), "top_patches_removed_mcnemar_p": mcnemar(correct, removed).p_value,
        "entropy_correctness": correlations(entropy), "clusters_correctness": correlations(clusters),
        "probe_auroc": [p["auroc"] for p in probes], "probe_auroc_ci": [p["auroc_ci"] for p in probes],
        "probe_auroc_shuffled": [p["auroc_shuffled_labels"] for p in probes], "best_probe_layer": best,
        "probe_test_errors": int((~np.array(probes[best]["test_labels"], bool)).sum()),
        "ablated_dims": top.tolist(), "accuracy_top_dims_ablated": float(ablated[:, 0].mean()),
        "top_dims_ablated_mcnemar_p": mcnemar(correct, ablated[:, 0]).p_value,
        "accuracy_random_dims_ablated": random_acc.tolist(),
        "random_dims_ablated_mean": float(random_acc.mean()), "random_dims_ablated_std": float(random_acc.std(ddof=1))
        if len(random_acc) > 1 else 0.0,
    }


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) over every threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="stable")
    labels = labels[order].astype(bool)
    tpr = np.concatenate([[0], np.cumsum(labels) / max(1, labels.sum())])
    fpr = np.concatenate([[0], np.cumsum(~labels) / max(1, (~labels).sum())])
    return fpr, tpr


def plot(summary: dict, probes: list[dict], path: Path) -> None:
    fig, axes = figure(1, 3, size=(15, 3.8))
    for layer, probe in enumerate(probes):
        fpr, tpr = roc_curve(np.array(probe["test_scores"]), np.array(probe["test_labels"]))
        best = layer == summary["best_probe_layer"]
        axes[0].plot(fpr, tpr, lw=2 if best else 0.8, alpha=1 if best else 0.5,
                     label=f"layer {layer} (AUROC {probe['auroc']:.2f})" if best or len(probes) <= 6 else None)
    axes[0].plot([0, 1], [0, 1], "k:", lw=0.8)
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate", title="probe ROC (test split)")
    axes[0].legend(fontsize=7)
    layers = np.arange(len(probes))
    ci = np.array(summary["probe_auroc_ci"], float)
    axes[1].plot(layers, summary["probe_auroc"], marker="o", label="probe")
    axes[1].fill_between(layers, ci[:, 0], ci[:, 1], alpha=0.2)
    axes[1].plot(layers, summary["probe_auroc_shuffled"], marker="x", ls="--", label="shuffled labels")
    axes[1].set(xlabel="layer", ylabel="test AUROC (95% CI)", title="linear probes")
    axes[1].legend(fontsize=8)
    bars = {"plain": summary["accuracy"]["all"]["accuracy"], "top patches removed": summary["accuracy_top_patches_removed"],
            "top dims ablated": summary["accuracy_top_dims_ablated"], "random dims": summary["random_dims_ablated_mean"]}
    axes[2].bar(range(len(bars)), list(bars.values()), yerr=[0, 0, 0, summary["random_dims_ablated_std"]], capsize=3)
    axes[2].set_xticks(range(len(bars)), list(bars), fontsize=8, rotation=15)
    axes[2].set(ylabel="accuracy", title="causal tests")
    save_figure(fig, path, f"{summary['model']}: {summary['questions']} questions, {summary['images']} images")


def main(argv=None) -> int:
    return main_with_config(run, CONFIG, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
