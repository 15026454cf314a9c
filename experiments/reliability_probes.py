"""Seed 004: does attention predict reliability? (docs/methods.md §5) — attention-map structure vs correctness,
top-30% patch masking, linear probes on hidden states, and ablation of the probe's top residual dimensions.

Phase 1, one compiled forward per batch: first-token p(yes), every layer's last-token residual (`HiddenStates`)
and last-query visual map; then the top `top_fraction` patches of the map at `map_layer` (default the middle
layer) are removed from attention at every layer and p(yes) is measured again.
Phase 2, on the records: spatial entropy and cluster count of each layer's map, their point-biserial correlation
with correctness; per layer, a logistic-regression probe (L2, standardised features, 80/20 stratified split,
seeded) predicting correctness, its test AUROC and a shuffled-label control.
Phase 3: at the best probe layer, the `ablate_neurons` residual dimensions with the largest probe weights, and as
many random ones (seeded), are zeroed (one compiled sweep) and accuracy is measured.
Records are appended per question per phase (resumable); summary.json holds the results.

Usage: python -m experiments.reliability_probes [--config experiments/reliability_probes.json] [--model DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import minimize
from scipy.stats import rankdata
from tqdm.auto import tqdm

from experiments.common import batches, main_with_config, p_yes_of, setup
from vlmjax import interventions as iv
from vlmjax.eval.records import ResultsWriter
from vlmjax.eval.stats import point_biserial
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
    return {"auroc": auroc(score(w), correct[test]), "auroc_shuffled_labels": auroc(score(w_control), correct[test]),
            "weights": (w[:-1] / std).tolist()}


def run(config: dict) -> dict:
    model, processor, records, out = setup(config)
    ids = [r.question_id for r in records]
    num_layers = model.num_layers["blocks"]
    map_layer = config["map_layer"] if config["map_layer"] is not None else num_layers // 2
    hooks = {"hidden": HiddenStates(), "maps": LastQueryVisualMap()}
    measure = jax.jit(lambda params, batch: model.forward(params, batch, hooks, logits="last"))
    masked = jax.jit(lambda params, batch, hook: model.forward(params, batch, {"remove": hook}, logits="last"))
    with ResultsWriter(str(out / "records.jsonl"), id_key="id") as writer:
        for chunk, real, inputs in tqdm(batches(processor, records, set(writer.pending(ids)), config["batch_size"]),
                                        desc="probing", unit="batch"):
            batch, meta = model.prepare(inputs)
            res = jax.device_get(measure(model.params, batch))
            maps = res["hooks"]["maps"]["attn.pattern"]  # [L, B, N]
            stats = map_statistics(maps, meta, config["top_fraction"])
            remove = iv.RemoveVisualTokens.top_attended(num_layers, maps[map_layer], meta, config["top_fraction"])
            p_masked = p_yes_of(processor, np.asarray(masked(model.params, batch, remove)["logits"][:, -1]))
            p_yes = p_yes_of(processor, res["logits"][:, -1])
            hidden = res["hooks"]["hidden"]["resid_post"][:, :, 0]  # [L, B, D]
            for i, r in enumerate(chunk[:real]):
                writer.write({"id": r.question_id, "label": r.label, "p_yes": float(p_yes[i]),
                              "p_yes_top_removed": float(p_masked[i]), "hidden": hidden[:, i].tolist(),
                              "spatial_entropy": stats["spatial_entropy"][:, i].tolist(),
                              "clusters": stats["clusters"][:, i].tolist()})
        done = [r for r in writer.records if r["id"] in set(ids)]
    truth = np.array([r["label"] == "yes" for r in done])
    correct = (np.array([r["p_yes"] for r in done]) >= 0.5) == truth
    hidden = np.array([r["hidden"] for r in done])  # [Q, L, D]
    entropy = np.array([r["spatial_entropy"] for r in done])
    probes = [probe_layer(hidden[:, layer], correct, config) for layer in range(num_layers)]
    best = int(np.nanargmax([p["auroc"] for p in probes])) if not all(np.isnan(p["auroc"]) for p in probes) else 0
    width = hidden.shape[-1]
    k = config["ablate_neurons"]
    top = np.argsort(-np.abs(probes[best]["weights"]))[:k]
    random = np.random.default_rng(config["split_seed"] + 2).choice(np.setdiff1d(np.arange(width), top), k, False)
    keeps = np.ones((3, num_layers, width), np.float32)
    keeps[1, best, top] = 0.0
    keeps[2, best, random] = 0.0
    zeros = jnp.zeros((num_layers, width), jnp.float32)
    ablate = make_sweep(model, lambda keep: {"ablate": iv.NeuronAblation(keep, zeros, "resid_post")},
                        first_layer=best, chunk=1)
    with ResultsWriter(str(out / "records_ablation.jsonl"), id_key="id") as writer:
        for chunk, real, inputs in tqdm(batches(processor, records, set(writer.pending(ids)), config["batch_size"]),
                                        desc="neuron ablation", unit="batch"):
            batch, _ = model.prepare(inputs)
            p_yes = p_yes_of(processor, np.asarray(ablate(model.params, batch, keeps)["logits"])[:, :, -1])
            for i, r in enumerate(chunk[:real]):
                writer.write({"id": r.question_id, "label": r.label, "p_yes": p_yes[:, i].tolist()})
        ablated = {r["id"]: r["p_yes"] for r in writer.records}
    acc = ((np.array([ablated[r["id"]] for r in done]) >= 0.5) == truth[:, None]).mean(axis=0)
    removed_acc = float(((np.array([r["p_yes_top_removed"] for r in done]) >= 0.5) == truth).mean())
    summary = {
        "model": config["model"], "questions": len(done), "accuracy": float(correct.mean()),
        "map_layer": map_layer, "accuracy_top_patches_removed": removed_acc,
        "entropy_correctness_r": [float(point_biserial(correct, entropy[:, l])[0]) for l in range(num_layers)],
        "probe_auroc": [p["auroc"] for p in probes], "probe_auroc_shuffled": [p["auroc_shuffled_labels"] for p in probes],
        "best_probe_layer": best, "ablated_dims": top.tolist(),
        "accuracy_top_dims_ablated": float(acc[1]), "accuracy_random_dims_ablated": float(acc[2]),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> int:
    return main_with_config(run, CONFIG, argv)


if __name__ == "__main__":
    sys.exit(main())
