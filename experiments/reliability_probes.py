"""Seed 004: does attention predict reliability? (docs/methods.md §5) — attention-map structure vs correctness,
top-30% patch removal against random patches, self-consistency, linear probes on hidden states, and ablation of the
probe's top MLP neurons and residual dimensions against random ones.

Phase 1, per batch: each question's first-token answer, every layer's last-token residual (`HiddenStates`) and
last-query visual map; then the top `top_fraction` patches of the map at `map_layer` (default the middle layer), and
as the control as many random patches of the same image, are removed from attention at every layer and the answer
is scored again (McNemar between the two removals, question by question).
Phase 2, on the records: spatial entropy and cluster count of each layer's map, their point-biserial correlation
with correctness (Fisher-z 95% CI); per layer, a logistic-regression probe (L2, standardised features, 80/20
stratified split, seeded) predicting correctness, its test AUROC with a stratified bootstrap CI, and `label_shuffles`
probes trained on shuffled labels (their AUROC distribution and the permutation p of the real one). A split with
fewer than `min_probe_errors` wrong (or right) answers is refused with the reason in the summary, and so is the
ablation that needs the probe.
Phase 3, at the best probe layer: the MLP neurons there are captured and probed the same way; units are ranked by
`vlmjax.probes.rank_units` (|w_i| * std_i, the logit change per standard deviation of the unit, which does not
favour low-variance units as |w_i| on raw activations does); the top `ablate_neurons` MLP neurons, as many residual
dimensions, and the top `ablate_residual_fraction` of the residual dimensions are zeroed, each against as many
uniformly random units of the layer under every seed of `random_neuron_seeds` (one compiled sweep).
Phase 4: self-consistency on a seeded sample of `consistency_questions` questions: K = 10 answers sampled at T = 0.7,
top-p 0.9 (`vlmjax.eval.consistency`), the majority answer's frequency (the agreement rate) correlated with the
first-token correctness (point-biserial). Sampling K answers costs K rows per question, hence its own question count
(default 300: about 0.03 s of CPU per question on the 3-layer built-in model).
The set mixes POPE with the harder families (counting in a box, attributes; occluded and cluttered images are
tagged), so the model is wrong often enough to probe. Records are appended per question per phase (resumable);
summary.json, reliability_probes.png (probe ROC curves, AUROC per layer with the shuffled-label band, the causal
tests, agreement vs correctness) and TensorBoard scalars come from them.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import minimize

from experiments.common import (LAST_QUERY, VISUAL_TOKENS, AnswerScorer, accuracy_by_group, compare_to_random,
                                figure, log_curves, main_with_config, run_phase, save_figure, score_rows, setup)
from vlmjax import interventions as iv
from vlmjax.errors import VlmJaxError
from vlmjax.eval.batches import prompt_length, prompt_texts
from vlmjax.eval.consistency import SAMPLES, TEMPERATURE, TOP_P, self_consistency
from vlmjax.eval.pope import parse_yes_no
from vlmjax.eval.stats import (auroc, bootstrap_auroc, bootstrap_ci, correlation_interval, mcnemar, point_biserial)
from vlmjax.eval.vqa import normalize_answer
from vlmjax.probes import HiddenStates, LastQueryVisualMap, map_statistics, rank_units
from vlmjax.sweep import make_sweep

CONFIG = Path(__file__).with_suffix(".json")
RANKING = ("|w_i| * std_i: the probe's coefficient on the raw unit times the unit's standard deviation on the "
           "training questions (vlmjax.probes.rank_units), i.e. |weight| of the probe on standardised units")
RANDOM_UNITS = "as many units drawn uniformly from all of the layer's units, one draw per seed"


class ProbeRefused(VlmJaxError):
    """A split holds too few wrong (or right) answers to train or score a probe."""


def stratified_split(labels: np.ndarray, seed: int, test_fraction: float = 0.2):
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for value in (False, True):
        members = rng.permutation(np.flatnonzero(labels == value))
        test[members[: max(1, round(test_fraction * len(members)))] if len(members) > 1 else []] = True
    return ~test, test


def probe_split(correct: np.ndarray, seed: int, minimum: int) -> tuple[np.ndarray, np.ndarray]:
    """The 80/20 stratified split, refused (ProbeRefused) when either part holds fewer than `minimum` wrong or right
    answers: a probe cannot be trained, or its AUROC estimated, from a handful of one class."""
    train, test = stratified_split(correct, seed)
    for name, part in (("training", train), ("test", test)):
        wrong, right = int((~correct[part]).sum()), int(correct[part].sum())
        if min(wrong, right) < minimum:
            raise ProbeRefused(
                f"The probe's {name} split holds {wrong} wrong and {right} right answers of {len(correct)} questions; "
                f"training and scoring a probe needs at least {minimum} of each (min_probe_errors). Add questions or "
                "harder families (count_test, attribute_test) to question_files, or lower min_probe_errors.")
    return train, test


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


def probe_layer(features: np.ndarray, correct: np.ndarray, train: np.ndarray, test: np.ndarray, config: dict) -> dict:
    """A probe on one layer's features [Q, D]: test AUROC with its stratified bootstrap CI; `label_shuffles` probes
    fit on shuffled training labels (their test AUROCs, and the permutation p = (1 + #shuffled >= real) / (1 + n));
    the weights on the raw features, for `rank_units`."""
    mean, std = features[train].mean(0), features[train].std(0) + 1e-6
    x = (features - mean) / std
    score = lambda w: x[test] @ w[:-1] + w[-1]
    w = fit_probe(x[train], correct[train].astype(float), config["l2"])
    scores, labels = score(w), correct[test]
    interval = bootstrap_auroc(labels, scores, seed=config["bootstrap_seed"])
    rng = np.random.default_rng(config["split_seed"] + 1)
    shuffled = [auroc(labels, score(fit_probe(x[train], rng.permutation(correct[train]).astype(float), config["l2"])))
                for _ in range(config["label_shuffles"])]
    return {"auroc": interval.estimate, "auroc_ci": [interval.low, interval.high], "auroc_shuffled": shuffled,
            "shuffle_p": (1 + sum(s >= interval.estimate for s in shuffled)) / (1 + len(shuffled)),
            "test_scores": scores.tolist(), "test_labels": labels.tolist(), "weights": (w[:-1] / std).tolist()}


def correlation(correct: np.ndarray, values: np.ndarray) -> dict:
    """Point-biserial r of correctness with `values`, its p-value and Fisher-z 95% CI (NaN for constant values)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on constant input and returns NaN
        r, p = point_biserial(correct, values)
    interval = correlation_interval(r, len(correct))
    return {"r": r, "p": p, "low": interval.low, "high": interval.high}


def ablation_sets(ranked: dict[str, np.ndarray], counts: dict[str, list[int]], seeds) -> list[dict]:
    """Per unit kind ("mlp_neurons", "residual_dims") and count k: the top-k ranked units, then k random units of the
    layer under each seed (RANDOM_UNITS)."""
    sets = []
    for kind, order in ranked.items():
        for k in counts[kind]:
            sets.append({"units": kind, "count": k, "choice": "top", "seed": None, "indices": order[:k].tolist()})
            sets += [{"units": kind, "count": k, "choice": "random", "seed": seed,
                      "indices": np.sort(np.random.default_rng([seed, k]).choice(len(order), k, False)).tolist()}
                     for seed in seeds]
    return sets


def run(config: dict) -> dict:
    for key, least in (("min_probe_errors", 1), ("label_shuffles", 0), ("consistency_questions", 0)):
        if config[key] < least:
            raise VlmJaxError(f"Config key {key!r} must be at least {least}, got {config[key]}.")
    model, processor, questions, out = setup(config)
    num_layers = model.num_layers["blocks"]
    scorer = AnswerScorer(processor.tokenizer, questions)
    map_layer = config["map_layer"] if config["map_layer"] is not None else num_layers // 2
    hooks = {"hidden": HiddenStates(), "maps": LastQueryVisualMap()}
    measure_fn = model.jit(lambda params, batch: model.forward(params, batch, hooks, logits="last"))
    masked_fn = model.jit(lambda params, batch, hook: model.forward(params, batch, {"remove": hook}, logits="last"))

    def measure(chunk, inputs, _):
        batch, meta = model.prepare(inputs)
        res = jax.device_get(measure_fn(model.params, batch))
        maps = res["hooks"]["maps"]["attn.pattern"]  # [L, B, N]
        stats = map_statistics(maps, meta, config["top_fraction"])
        visual = np.asarray(meta.mask)
        noise = np.stack([np.random.default_rng([config["seed"], q.question_id]).random(visual.shape[1]) for q in chunk])
        removed = {}
        for name, visual_map in (("top_removed", maps[map_layer]), ("random_removed", np.where(visual, noise, 0))):
            remove = iv.RemoveVisualTokens.top_attended(num_layers, visual_map, meta, config["top_fraction"])
            removed[name] = scorer(np.asarray(masked_fn(model.params, batch, remove)["logits"][:, -1]), chunk)
        plain = scorer(res["logits"][:, -1], chunk)
        hidden = res["hooks"]["hidden"]["resid_post"][:, :, 0]  # [L, B, D]
        return [{**score_rows(plain, i), **{name: score_rows(s, i) for name, s in removed.items()},
                 "hidden": hidden[:, i].tolist(), "spatial_entropy": stats["spatial_entropy"][:, i].tolist(),
                 "clusters": stats["clusters"][:, i].tolist()} for i in range(len(chunk))]

    done = run_phase(model, out / "records.jsonl", processor, questions, config["batch_size"], "probing", measure)
    correct = np.array([r["correct"] for r in done])
    hidden = np.array([r["hidden"] for r in done])  # [Q, L, D]
    try:
        train, test = probe_split(correct, config["split_seed"], config["min_probe_errors"])
    except ProbeRefused as refusal:
        probes, ablation = None, {"not_run": str(refusal)}
        print(f"reliability_probes: {refusal}", file=sys.stderr)
    else:
        probes = [probe_layer(hidden[:, layer], correct, train, test, config) for layer in range(num_layers)]
        ablation = ablate(model, processor, questions, out, config, scorer, probes, hidden, correct, train, test)
    consistency = self_consistency_phase(model, processor, questions, out, config)
    index = {r["id"]: i for i, r in enumerate(done)}
    consistency_correct = correct[[index[r["id"]] for r in consistency]]
    summary = summarise(done, correct, probes, ablation, consistency, consistency_correct, map_layer, questions, model,
                        config)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log_curves(out, {"reliability/probe_auroc": summary["probe_auroc"],
                     "reliability/probe_auroc_shuffled": summary["probe_auroc_shuffled"],
                     "reliability/probe_shuffle_p": summary["probe_shuffle_p"],
                     "reliability/entropy_correctness_r": [c["r"] for c in summary["entropy_correctness"]],
                     "reliability/clusters_correctness_r": [c["r"] for c in summary["clusters_correctness"]]})
    plot(summary, probes, consistency, consistency_correct, out / "reliability_probes.png")
    return summary


def ablate(model, processor, questions, out, config, scorer, probes, hidden, correct, train, test) -> dict:
    """Phase 3 at the best probe layer: capture and probe its MLP neurons, rank both unit kinds, run the ablation
    sweep; per ablation set, compare_to_random against the plain answers."""
    num_layers = model.num_layers["blocks"]
    aurocs = np.array([p["auroc"] for p in probes])
    best = int(np.nanargmax(aurocs)) if not np.isnan(aurocs).all() else 0
    capture = HiddenStates(site="mlp.hidden", only_layers=(best,))
    capture_fn = model.jit(lambda params, batch: model.forward(params, batch, {"mlp": capture}, stop_layer=best + 1,
                                                             logits=None)["hooks"]["mlp"]["mlp.hidden"])

    def neurons(chunk, inputs, _):
        values = np.asarray(capture_fn(model.params, model.prepare(inputs)[0]))[0, :, 0]  # [B, F]
        return [{"mlp_hidden": values[i].tolist()} for i in range(len(chunk))]

    mlp = np.array([r["mlp_hidden"] for r in run_phase(model, out / "records_mlp.jsonl", processor, questions,
                                                         config["batch_size"], "MLP neurons", neurons)])
    mlp_probe = probe_layer(mlp, correct, train, test, {**config, "label_shuffles": 0})
    width = {"mlp_neurons": mlp.shape[1], "residual_dims": hidden.shape[-1]}
    ranked = {"mlp_neurons": rank_units(mlp_probe["weights"], mlp[train]),
              "residual_dims": rank_units(probes[best]["weights"], hidden[train, best])}
    k, fraction = config["ablate_neurons"], config["ablate_residual_fraction"]
    counts = {"mlp_neurons": [min(k, width["mlp_neurons"])],
              "residual_dims": sorted({min(k, width["residual_dims"]), max(1, round(fraction * width["residual_dims"]))})}
    sets = ablation_sets(ranked, counts, config["random_neuron_seeds"])
    keeps = {kind: np.ones((len(sets), num_layers, w), np.float32) for kind, w in width.items()}
    for row, s in enumerate(sets):
        keeps[s["units"]][row, best, s["indices"]] = 0.0
    sites = {"mlp_neurons": "mlp.hidden", "residual_dims": "resid_post"}
    zeros = {kind: jnp.zeros((num_layers, w), jnp.float32) for kind, w in width.items()}
    sweep = make_sweep(model, lambda keep: {kind: iv.NeuronAblation(keep[kind], zeros[kind], sites[kind])
                                            for kind in width}, first_layer=best, chunk=1)

    def run_sets(chunk, inputs, _):
        logits = np.asarray(sweep(model.params, model.prepare(inputs)[0], keeps)["logits"])[:, :, -1]
        return [score_rows(scorer(logits, chunk), i) for i in range(len(chunk))]

    ablated = np.array([r["correct"] for r in run_phase(model, out / "records_ablation.jsonl", processor, questions,
                                                        config["batch_size"], "neuron ablation", run_sets)])
    table = []
    for row, s in enumerate(sets):
        if s["choice"] == "top":
            random = [j for j, t in enumerate(sets) if t["choice"] == "random" and
                      (t["units"], t["count"]) == (s["units"], s["count"])]
            table.append({"units": s["units"], "site": sites[s["units"]], "count": s["count"],
                          "fraction": s["count"] / width[s["units"]], "top_units": s["indices"],
                          **compare_to_random(correct, ablated[:, row], ablated[:, random],
                                              seed=config["bootstrap_seed"])})
    return {"layer": best, "ranking": RANKING, "random_units": RANDOM_UNITS,
            "mlp_probe": {"auroc": mlp_probe["auroc"], "auroc_ci": mlp_probe["auroc_ci"], "width": width["mlp_neurons"]},
            "sets": table}


def self_consistency_phase(model, processor, questions, out, config) -> list[dict]:
    """Phase 4: K sampled answers for a seeded sample of `consistency_questions` questions (in study order), each
    question under its own key (fold_in(seed, question id)) and every prompt padded to one length (one compile)."""
    count = min(config["consistency_questions"], len(questions))
    if not count:
        return []
    rows = np.sort(np.random.default_rng([config["seed"], 4]).choice(len(questions), count, replace=False))
    chosen = [questions[i] for i in rows]
    length = prompt_length(processor, chosen[0], prompt_texts(processor, chosen))
    key = jax.random.key(config["consistency_seed"])

    def sample(chunk, inputs, _):
        found = {}
        for q in chunk:
            if q.question_id not in found:
                canonical = parse_yes_no if q.yes_no else normalize_answer
                [result] = self_consistency(model, processor, [q.load_image()], [q.text],
                                            jax.random.fold_in(key, q.question_id), batch_size=1,
                                            max_new_tokens=config["consistency_max_new_tokens"], canonical=canonical,
                                            pad_to=length)
                found[q.question_id] = {**result, "majority_correct": result["majority"] == canonical(q.answer)}
        return [found[q.question_id] for q in chunk]

    return run_phase(model, out / "records_consistency.jsonl", processor, chosen, config["batch_size"],
                     "self-consistency", sample)


def summarise(done, correct, probes, ablation, consistency, consistency_correct, map_layer, questions, model,
              config) -> dict:
    num_layers = model.num_layers["blocks"]
    removed = {name: np.array([r[name]["correct"] for r in done]) for name in ("top_removed", "random_removed")}
    per_layer = lambda key: [correlation(correct, np.array([r[key][l] for r in done])) for l in range(num_layers)]
    drop = lambda name: asdict(bootstrap_ci((correct.astype(float), removed[name].astype(float)),
                                            lambda a, b: np.mean(a - b), seed=config["bootstrap_seed"]))
    top_vs_random = bootstrap_ci((removed["random_removed"].astype(float), removed["top_removed"].astype(float)),
                                 lambda a, b: np.mean(a - b), seed=config["bootstrap_seed"])
    by_id = {q.question_id: q for q in questions}
    summary = {
        "model": config["model"], "family": model.config.model_type, "questions": len(done),
        "images": len({q.image_path for q in questions}),
        "tokens": {"visual": VISUAL_TOKENS, "query": f"answer, map and probed hidden state: {LAST_QUERY}",
                   "map": "the head-mean attention row of the query over V, renormalised, on the image's patch grid",
                   "removed": f"the top {config['top_fraction']:.0%} patches of the map at layer {map_layer}, "
                              "removed from attention at every layer; control: as many patches of the same image "
                              "drawn at random (seeded per question)"},
        "accuracy": accuracy_by_group(done, correct, by_id),
        "map_layer": map_layer, "accuracy_top_patches_removed": float(removed["top_removed"].mean()),
        "top_patches_removed_drop": drop("top_removed"),
        "top_patches_removed_mcnemar_p": mcnemar(correct, removed["top_removed"]).p_value,
        "accuracy_random_patches_removed": float(removed["random_removed"].mean()),
        "random_patches_removed_drop": drop("random_removed"),
        "top_minus_random_patches_drop": asdict(top_vs_random),
        "top_vs_random_patches_mcnemar_p": mcnemar(removed["random_removed"], removed["top_removed"]).p_value,
        "entropy_correctness": per_layer("spatial_entropy"), "clusters_correctness": per_layer("clusters"),
        "correlation": "point-biserial r with correctness, two-sided p, Fisher-z 95% CI",
        "probe_refused": ablation.get("not_run") if probes is None else None,
        "min_probe_errors": config["min_probe_errors"], "label_shuffles": config["label_shuffles"],
        "probe_auroc": [], "probe_auroc_ci": [], "probe_auroc_shuffled": [], "probe_auroc_shuffled_q95": [],
        "probe_shuffle_p": [], "best_probe_layer": None, "probe_test_errors": None, "best_probe_by_family": None,
        "ablation": ablation, "self_consistency": consistency_summary(consistency, consistency_correct, config),
    }
    if probes is not None:
        shuffled = [np.array(p["auroc_shuffled"]) for p in probes]
        best = ablation["layer"]
        summary.update({
            "probe_auroc": [p["auroc"] for p in probes], "probe_auroc_ci": [p["auroc_ci"] for p in probes],
            "probe_auroc_shuffled": [float(s.mean()) if len(s) else None for s in shuffled],
            "probe_auroc_shuffled_q95": [float(np.quantile(s, 0.95)) if len(s) else None for s in shuffled],
            "probe_shuffle_p": [p["shuffle_p"] for p in probes], "best_probe_layer": best,
            "probe_test_errors": int((~np.array(probes[best]["test_labels"], bool)).sum()),
            "best_probe_by_family": probe_by_family(probes[best], done, correct, by_id, config)})
    return summary


def probe_by_family(probe: dict, done, correct, by_id, config) -> dict:
    """The best probe's test AUROC (bootstrap CI) on each family's test questions (the paper's figure is POPE's);
    a family whose test questions hold fewer than min_probe_errors of a class is marked, not scored."""
    _, test = stratified_split(correct, config["split_seed"])
    families = np.array([by_id[r["id"]].family for r in done])[test]
    scores, labels = np.array(probe["test_scores"]), np.array(probe["test_labels"], bool)
    table = {}
    for family in sorted(set(families)):
        part = families == family
        wrong, right = int((~labels[part]).sum()), int(labels[part].sum())
        if min(wrong, right) < config["min_probe_errors"]:
            table[family] = {"not_scored": f"{wrong} wrong and {right} right test answers (< {config['min_probe_errors']})"}
            continue
        interval = bootstrap_auroc(labels[part], scores[part], seed=config["bootstrap_seed"])
        table[family] = {"auroc": interval.estimate, "low": interval.low, "high": interval.high, "wrong": wrong}
    return table


def consistency_summary(consistency: list[dict], labels: np.ndarray, config) -> dict:
    if not consistency:
        return {"not_run": "consistency_questions is 0"}
    agreement = np.array([r["agreement"] for r in consistency])
    return {"questions": len(consistency), "k": SAMPLES, "temperature": TEMPERATURE, "top_p": TOP_P,
            "max_new_tokens": config["consistency_max_new_tokens"],
            "predicts": "the first-token answer's correctness (the probes' label)",
            "mean_agreement": float(agreement.mean()),
            "majority_accuracy": float(np.mean([r["majority_correct"] for r in consistency])),
            "agreement_correctness": correlation(labels, agreement)}


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) over every threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="stable")
    labels = labels[order].astype(bool)
    tpr = np.concatenate([[0], np.cumsum(labels) / max(1, labels.sum())])
    fpr = np.concatenate([[0], np.cumsum(~labels) / max(1, (~labels).sum())])
    return fpr, tpr


def plot(summary: dict, probes, consistency, consistency_correct, path: Path) -> None:
    fig, axes = figure(1, 4, size=(20, 3.8))
    if probes is None:
        for ax in axes[:2]:
            ax.text(0.5, 0.5, "probe refused:\ntoo few wrong answers", ha="center", va="center", transform=ax.transAxes)
    else:
        for layer, probe in enumerate(probes):
            fpr, tpr = roc_curve(np.array(probe["test_scores"]), np.array(probe["test_labels"]))
            best = layer == summary["best_probe_layer"]
            axes[0].plot(fpr, tpr, lw=2 if best else 0.8, alpha=1 if best else 0.5,
                         label=f"layer {layer} (AUROC {probe['auroc']:.2f})" if best or len(probes) <= 6 else None)
        axes[0].plot([0, 1], [0, 1], "k:", lw=0.8)
        axes[0].legend(fontsize=7)
        layers = np.arange(len(probes))
        ci = np.array(summary["probe_auroc_ci"], float)
        axes[1].plot(layers, summary["probe_auroc"], marker="o", label="probe (95% CI)")
        axes[1].fill_between(layers, ci[:, 0], ci[:, 1], alpha=0.2)
        if summary["label_shuffles"]:
            axes[1].plot(layers, summary["probe_auroc_shuffled"], marker="x", ls="--", label="shuffled labels (mean)")
            axes[1].plot(layers, summary["probe_auroc_shuffled_q95"], ls=":", color="C1", label="shuffled, 95th pct")
        axes[1].legend(fontsize=8)
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate", title="probe ROC (test split)")
    axes[1].set(xlabel="layer", ylabel="test AUROC", title="linear probes")
    bars = {"plain": (summary["accuracy"]["all"]["accuracy"], 0),
            "top patches": (summary["accuracy_top_patches_removed"], 0),
            "random patches": (summary["accuracy_random_patches_removed"], 0)}
    for s in summary["ablation"].get("sets", []):
        name = f"{s['units'].split('_')[0]} {s['count']}"
        bars[f"top {name}"] = (s["top_accuracy"], 0)
        bars[f"random {name}"] = (s["random_mean_accuracy"], s["random_std_accuracy"])
    axes[2].bar(range(len(bars)), [v for v, _ in bars.values()], yerr=[e for _, e in bars.values()], capsize=3)
    axes[2].set_xticks(range(len(bars)), list(bars), fontsize=7, rotation=30, ha="right")
    axes[2].set(ylabel="accuracy", title="causal tests: top vs random (sd over seeds)")
    if consistency:
        agreement = np.array([r["agreement"] for r in consistency])
        for value, colour, label in ((True, "C2", "answer right"), (False, "C3", "answer wrong")):
            axes[3].hist(agreement[consistency_correct == value], bins=np.linspace(0, 1, 11), alpha=0.6, color=colour, label=label)
        c = summary["self_consistency"]["agreement_correctness"]
        axes[3].set(title=f"self-consistency (R_pb {c['r']:.2f} with first-token correctness)")
        axes[3].legend(fontsize=8)
    axes[3].set(xlabel=f"agreement rate ({SAMPLES} samples)", ylabel="questions")
    save_figure(fig, path, f"{summary['model']}: {summary['questions']} questions, {summary['images']} images")


def main(argv=None) -> int:
    return main_with_config(run, CONFIG, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
