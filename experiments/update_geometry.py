"""Seed 002: information geometry of residual updates and noise substitution (docs/methods.md §3), on any VLM.

For each condition — the plain model, Noise-Δ (the attention update replaced by Gaussian noise of its RMS) and
Noise-QKV (Q/K/V computed with Gaussian weights of each matrix's std), each in three scopes: every token, the visual
query positions ("_visual") and the attention to visual keys ("_visual_keys") — one compiled forward per batch
records, per layer and question: eRank before and after, RID and MixIG of the attention update and of the MLP update
(over the question's real tokens), and the first-token answer; the plain run also records the RoPE baseline on the
tensor of the attention RID (RID(resid_mid | resid_mid without rotary), `probes.ResidualRopeBaseline`) and on the
keys (`probes.RopeBaseline`). Noise is drawn fresh for every batch and every repeat (the key folds in the batch's
first question id and the repeat; the noise is a traced argument, so one compile serves every draw); each noised
condition runs `noise_repeats` times. Records are appended per question (resumable). summary.json holds the paper's
Table 1 (RID and MixIG of the attention, FFN, Noise-Δ and Noise-QKV updates: mean, std over questions, bootstrap CI,
per-repeat means and their std), the RoPE baselines, the accuracy under each noise kind and scope (difference from
the plain model with a bootstrap CI, McNemar per repeat), the energy threshold and the TME normalisation;
update_geometry.png (Table 1 and the accuracies as bar charts with error bars) and TensorBoard scalars come with it.
"""

from __future__ import annotations

import collections
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import jax
import numpy as np

from experiments.common import (VISUAL_TOKENS, AnswerScorer, figure, log_curves, main_with_config, run_phase,
                                save_figure, score_rows, setup)
from vlmjax import interventions as iv
from vlmjax.errors import VlmJaxError
from vlmjax.eval.stats import bootstrap_ci, mcnemar
from vlmjax.hooks import validate_hooks
from vlmjax.probes import ResidualRopeBaseline, RopeBaseline, UpdateGeometry

CONFIG = Path(__file__).with_suffix(".json")
NOISE_KINDS = ("noise_delta", "noise_qkv")
SCOPE_SUFFIXES = {"all": "", "visual": "_visual", "visual_keys": "_visual_keys"}
CONDITIONS = ("plain", *(kind + suffix for kind in NOISE_KINDS for suffix in SCOPE_SUFFIXES.values()))
TABLE_ROWS = {"attention": ("plain", "attention"), "ffn": ("plain", "mlp"), "noise_delta": ("noise_delta", "attention"),
              "noise_qkv": ("noise_qkv", "attention")}  # the paper's Table 1: row -> (condition, update measured)
TME = ("TME(X) = mean over the sample's real tokens t of H(P_t) in nats, P_tj = (x~_t . x~_j + 1) / 2 normalised "
       "over j, x~ = x / ||x|| (no centring, no temperature); MixIG = TME(X') - TME(X). Under this formula TME lies "
       "in [log S - log 2, log S], so |MixIG| <= log 2")
RANK_RULE = ("RID's rank r: the smallest rank holding `energy` of X's squared singular values (capped at the "
             "numerical rank)")


def scope_of(name: str) -> tuple[str, str]:
    """(noise kind, scope) of a noised condition name."""
    kind = next(k for k in NOISE_KINDS if name.startswith(k))
    return kind, next(scope for scope, suffix in SCOPE_SUFFIXES.items() if name == kind + suffix)


def condition_hooks(name: str, model, key) -> dict:
    if name == "plain":
        return {}
    kind, scope = scope_of(name)
    if kind == "noise_delta":
        return {"noise": iv.NoiseAttentionOutput.on_layers(model.num_layers["blocks"], key, scope=scope)}
    return {"noise": iv.NoiseQKV.from_params(model.params["text"], key, scope=scope)}


def run(config: dict) -> dict:
    model, processor, questions, out = setup(config)
    scorer = AnswerScorer(processor.tokenizer, questions)
    geometry = {"geometry": UpdateGeometry(energy=config["energy"])}
    rope = {"rope_keys": RopeBaseline(energy=config["energy"]),
            "rope_resid": ResidualRopeBaseline.from_model(model, energy=config["energy"])}
    base_key = jax.random.key(config["noise_seed"])
    conditions = {}
    unknown = set(config["conditions"]) - set(CONDITIONS)
    if unknown or "plain" not in config["conditions"]:
        raise VlmJaxError(f"conditions must include 'plain' and come from {CONDITIONS}; got {config['conditions']}.")
    for name in config["conditions"]:
        # noise first: the geometry sees the noised update; an OrderedDict keeps that order under jit
        measures = {**geometry, **(rope if name == "plain" else {})}
        hooks_for = lambda key, name=name, measures=measures: collections.OrderedDict(
            {**condition_hooks(name, model, key), **measures})
        forward = model.jit(lambda params, batch, hooks: _measure(model, params, batch, hooks))

        def measure(chunk, inputs, repeat, hooks_for=hooks_for, forward=forward):
            key = jax.random.fold_in(jax.random.fold_in(base_key, repeat), chunk[0].question_id)
            hooks = hooks_for(key)
            batch, meta = model.prepare(inputs)
            validate_hooks(hooks, meta)
            measured, logits = jax.device_get(forward(model.params, batch, hooks))
            scores = scorer(logits, chunk)
            rows = []
            for i in range(len(chunk)):
                row = score_rows(scores, i)
                if "rope_keys" in measured:
                    row["rope_baseline_keys"] = measured["rope_keys"]["attn.rot_k"][:, i].tolist()
                    row["rope_baseline_resid_mid"] = measured["rope_resid"]["resid_mid"][:, i].tolist()
                for site, part in (("resid_mid", "attention"), ("resid_post", "mlp")):
                    for metric, values in measured["geometry"][site].items():
                        row[f"{part}_{metric}"] = values[:, i].tolist()
                rows.append(row)
            return rows

        repeats = 1 if name == "plain" else config["noise_repeats"]
        conditions[name] = run_phase(model, out / f"records_{name}.jsonl", processor, questions, config["batch_size"],
                                     name, measure, repeats=repeats)
    summary = summarise(conditions, len(questions), config)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    curves = {f"geometry/{name}_attention_rid": row["attention_rid_per_layer"]
              for name, row in summary["conditions"].items()}
    curves.update({f"geometry/table1_{metric}": [summary["table1"][r][metric]["mean"] if r in summary["table1"]
                                                 else None for r in TABLE_ROWS] for metric in ("rid", "mix_ig")})
    curves["geometry/rope_baseline_resid_mid_per_layer"] = summary["rope_baseline"]["resid_mid"]["per_layer"]
    curves["geometry/accuracy_by_condition"] = [row["accuracy"] for row in summary["conditions"].values()]
    log_curves(out, curves)
    plot(summary, out / "update_geometry.png")
    return summary


def spread(values: np.ndarray) -> dict:
    """values [repeats, Q]: mean, std over questions, bootstrap CI over questions (repeats averaged per question),
    each repeat's mean and their std (null with one repeat)."""
    per_question = values.mean(0)
    per_repeat = values.mean(1)
    return {"mean": float(values.mean()), "std": float(per_question.std(ddof=1)) if len(per_question) > 1 else 0.0,
            "ci": asdict(bootstrap_ci(per_question, seed=0, n_resamples=2000)), "per_repeat": per_repeat.tolist(),
            "std_over_repeats": float(per_repeat.std(ddof=1)) if len(per_repeat) > 1 else None}


def summarise(conditions: dict, n_questions: int, config: dict) -> dict:
    """Per condition: means over questions (and repeats) of each metric over layers, with bootstrap CIs; accuracy,
    averaged over repeats, its difference from the plain model (bootstrap CI over questions) and McNemar of each
    repeat's correctness against the plain model. Then the Table 1 rows, the RoPE baselines and the accuracy table."""
    plain = np.array([r["correct"] for r in conditions["plain"]])
    table = {}
    layer_mean = {}  # (condition, part, metric) -> [repeats, Q] of per-question means over layers
    for name, records in conditions.items():
        correct = np.array([r["correct"] for r in records]).reshape(-1, n_questions)  # [repeats, Q]
        per_repeat = correct.mean(1)
        row = {"repeats": len(correct), "accuracy": float(correct.mean()), "accuracy_per_repeat": per_repeat.tolist(),
               "accuracy_std_over_repeats": float(per_repeat.std(ddof=1)) if len(correct) > 1 else None}
        if name != "plain":
            tests = [mcnemar(plain, c).p_value for c in correct]
            row.update(mcnemar_p_per_repeat=tests, mcnemar_p_max=max(tests), accuracy_difference=asdict(
                bootstrap_ci(correct.mean(0) - plain, seed=0, n_resamples=2000)))
        for part in ("attention", "mlp"):
            for metric in ("rid", "mix_ig"):
                values = np.array([np.mean(r[f"{part}_{metric}"]) for r in records])
                layer_mean[name, part, metric] = values.reshape(-1, n_questions)
                row[f"{part}_{metric}"] = float(values.mean())
                row[f"{part}_{metric}_ci"] = asdict(bootstrap_ci(values, seed=0, n_resamples=2000))
        row["attention_rid_per_layer"] = np.mean([r["attention_rid"] for r in records], axis=0).tolist()
        row["mlp_rid_per_layer"] = np.mean([r["mlp_rid"] for r in records], axis=0).tolist()
        row["attention_mix_ig_per_layer"] = np.mean([r["attention_mix_ig"] for r in records], axis=0).tolist()
        table[name] = row
    table1 = {row: {metric: spread(layer_mean[condition, part, metric]) for metric in ("rid", "mix_ig")}
              | {"measured": f"{part} update under {condition}"}
              for row, (condition, part) in TABLE_ROWS.items() if condition in conditions}
    rope = {}
    for tensor in ("resid_mid", "keys"):
        values = np.array([r[f"rope_baseline_{tensor}"] for r in conditions["plain"]])  # [Q, L]
        rope[tensor] = {"mean": float(values.mean()), "ci": asdict(bootstrap_ci(values.mean(1), seed=0,
                                                                                n_resamples=2000)),
                        "per_layer": values.mean(0).tolist()}
    attention_rid = layer_mean["plain", "attention", "rid"][0]
    rope["attention_rid_minus_eps"] = asdict(bootstrap_ci(
        attention_rid - np.array([np.mean(r["rope_baseline_resid_mid"]) for r in conditions["plain"]]), seed=0,
        n_resamples=2000))
    rope["tensor"] = ("resid_mid: X' = the residual after attention (the attention RID's X'), with rotary vs the "
                      "same layer's attention recomputed without rotary; keys: all heads' keys after vs before rotary")
    accuracy = {"plain": table["plain"]["accuracy"]}
    for kind in NOISE_KINDS:
        accuracy[kind] = {scope: {key: table[kind + suffix][key] for key in
                                  ("accuracy", "accuracy_std_over_repeats", "accuracy_difference",
                                   "mcnemar_p_per_repeat", "mcnemar_p_max")}
                          for scope, suffix in SCOPE_SUFFIXES.items() if kind + suffix in table}
    return {"model": config["model"], "questions": n_questions,
            "tokens": {"visual": VISUAL_TOKENS, "measured": "every real token of the sample (X: [S, D] per update)",
                       "noised": "all positions; the visual query positions (_visual); the attention to visual keys "
                                 "(_visual_keys: Noise-Δ the mixed values read from V, Noise-QKV the keys and values "
                                 "of V)",
                       "query": "the answer: the sample's last real token"},
            "energy": config["energy"], "rid_rank_rule": RANK_RULE, "tme_normalisation": TME,
            "mix_ig_bound": math.log(2), "noise_repeats": config["noise_repeats"],
            "table1": table1, "rope_baseline": rope, "accuracy_under_noise": accuracy, "conditions": table}


def plot(summary: dict, path: Path) -> None:
    fig, axes = figure(1, 3, size=(15, 3.8))
    rows = list(summary["table1"])
    for ax, metric in zip(axes[:2], ("rid", "mix_ig")):
        stats = [summary["table1"][r][metric] for r in rows]
        means = np.array([s["mean"] for s in stats])
        error = np.array([[s["mean"] - s["ci"]["low"] for s in stats], [s["ci"]["high"] - s["mean"] for s in stats]])
        ax.bar(rows, means, yerr=error, capsize=4, color=["C0", "C1", "C3", "C4"][:len(rows)])
        ax.axhline(0, color="k", lw=0.5)
        ax.set(ylabel=metric.replace("_", " ").upper(), title=f"Table 1: {metric} of each update (95% CI)")
    axes[0].axhline(summary["rope_baseline"]["resid_mid"]["mean"], color="k", ls=":", label="eps_RoPE (resid_mid)")
    axes[0].legend(fontsize=8)
    names = list(summary["conditions"])
    acc = [summary["conditions"][n]["accuracy"] for n in names]
    error = [[0 if n == "plain" else acc[i] - summary["accuracy_under_noise"]["plain"]
              - summary["conditions"][n]["accuracy_difference"]["low"] for i, n in enumerate(names)],
             [0 if n == "plain" else summary["conditions"][n]["accuracy_difference"]["high"]
              - acc[i] + summary["accuracy_under_noise"]["plain"] for i, n in enumerate(names)]]
    axes[2].bar(range(len(names)), acc, yerr=np.maximum(error, 0), capsize=3)
    axes[2].set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    axes[2].set(ylabel="accuracy", title="accuracy under noise (95% CI of the difference)")
    save_figure(fig, path, f"{summary['model']}: {summary['questions']} questions, energy {summary['energy']}")


def _measure(model, params, batch, hooks):
    out = model.forward(params, batch, hooks, logits="last")
    return {name: out["hooks"][name] for name in ("geometry", "rope_keys", "rope_resid") if name in hooks}, \
        out["logits"][:, -1]


def main(argv=None) -> int:
    return main_with_config(run, CONFIG, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
