"""Seed 002: information geometry of residual updates and noise substitution (docs/methods.md §3), on any VLM.

For each condition — the plain model, Noise-Δ (every attention update replaced by Gaussian noise of its per-token
RMS) and Noise-QKV (Q/K/V computed with Gaussian weights of each matrix's std), each on all tokens or on visual
tokens only — one compiled forward per batch records, per layer and question: eRank before and after, RID and MixIG
of the attention update and of the MLP update (over the question's real tokens), the RoPE baseline eps_RoPE, and the
first-token answer. Noise is drawn fresh for every batch and every repeat (the key folds in the batch's first
question id and the repeat; the noise is a traced argument, so one compile serves every draw); each noised condition
runs `noise_repeats` times. Records are appended per question (resumable); summary.json holds the means per condition
(the paper's table: attention vs MLP RID / MixIG, the noised rows) with bootstrap CIs, and each condition's accuracy
with its McNemar test against the plain model; update_geometry.png and TensorBoard scalars come with it.
"""

from __future__ import annotations

import collections
import json
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
from vlmjax.probes import RopeBaseline, UpdateGeometry

CONFIG = Path(__file__).with_suffix(".json")
CONDITIONS = ("plain", "noise_delta", "noise_delta_visual", "noise_qkv", "noise_qkv_visual")


def condition_hooks(name: str, model, key) -> dict:
    num_layers = model.num_layers["blocks"]
    visual = name.endswith("_visual")
    if name == "plain":
        return {}
    if name.startswith("noise_delta"):
        return {"noise": iv.NoiseAttentionOutput.on_layers(num_layers, key, visual_only=visual)}
    return {"noise": iv.NoiseQKV.from_params(model.params["text"], key, visual_only=visual)}


def run(config: dict) -> dict:
    model, processor, questions, out = setup(config)
    scorer = AnswerScorer(processor.tokenizer, questions)
    measures = {"geometry": UpdateGeometry(energy=config["energy"]), "rope": RopeBaseline(energy=config["energy"])}
    base_key = jax.random.key(config["noise_seed"])
    conditions = {}
    unknown = set(config["conditions"]) - set(CONDITIONS)
    if unknown or "plain" not in config["conditions"]:
        raise VlmJaxError(f"conditions must include 'plain' and come from {CONDITIONS}; got {config['conditions']}.")
    for name in config["conditions"]:
        # noise first: the geometry sees the noised update; an OrderedDict keeps that order under jit
        hooks_for = lambda key, name=name: collections.OrderedDict({**condition_hooks(name, model, key), **measures})
        forward = jax.jit(lambda params, batch, hooks: _measure(model, params, batch, hooks))

        def measure(chunk, inputs, repeat, hooks_for=hooks_for, forward=forward):
            key = jax.random.fold_in(jax.random.fold_in(base_key, repeat), chunk[0].question_id)
            hooks = hooks_for(key)
            batch, meta = model.prepare(inputs)
            validate_hooks(hooks, meta)
            measured, logits = jax.device_get(forward(model.params, batch, hooks))
            scores = scorer(logits, chunk)
            rows = []
            for i in range(len(chunk)):
                row = {"rope_baseline": measured["rope"]["attn.rot_k"][:, i].tolist(), **score_rows(scores, i)}
                for site, part in (("resid_mid", "attention"), ("resid_post", "mlp")):
                    for metric, values in measured["geometry"][site].items():
                        row[f"{part}_{metric}"] = values[:, i].tolist()
                rows.append(row)
            return rows

        repeats = 1 if name == "plain" else config["noise_repeats"]
        conditions[name] = run_phase(model, out / f"records_{name}.jsonl", processor, questions, config["batch_size"], name,
                                     measure, repeats=repeats)
    summary = summarise(conditions, len(questions), config)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log_curves(out, {f"geometry/{name}_attention_rid": row["attention_rid_per_layer"]
                     for name, row in summary["conditions"].items()})
    plot(summary, out / "update_geometry.png")
    return summary


def summarise(conditions: dict, n_questions: int, config: dict) -> dict:
    """Per condition: means over questions (and repeats) of each metric over layers, with bootstrap CIs; accuracy,
    averaged over repeats, and McNemar of each repeat's correctness against the plain model (the largest p)."""
    plain = np.array([r["correct"] for r in conditions["plain"]])
    table = {}
    for name, records in conditions.items():
        correct = np.array([r["correct"] for r in records]).reshape(-1, n_questions)  # [repeats, Q]
        row = {"repeats": len(correct), "accuracy": float(correct.mean()),
               "accuracy_per_repeat": correct.mean(1).tolist()}
        if name != "plain":
            row["mcnemar_p_max"] = max(mcnemar(plain, c).p_value for c in correct)
        for part in ("attention", "mlp"):
            for metric in ("rid", "mix_ig"):
                values = np.array([np.mean(r[f"{part}_{metric}"]) for r in records])
                row[f"{part}_{metric}"] = float(values.mean())
                row[f"{part}_{metric}_ci"] = asdict(bootstrap_ci(values, seed=0, n_resamples=2000))
        row["rope_baseline"] = float(np.mean([r["rope_baseline"] for r in records]))
        row["attention_rid_per_layer"] = np.mean([r["attention_rid"] for r in records], axis=0).tolist()
        row["mlp_rid_per_layer"] = np.mean([r["mlp_rid"] for r in records], axis=0).tolist()
        table[name] = row
    return {"model": config["model"], "questions": n_questions,
            "tokens": {"visual": VISUAL_TOKENS, "measured": "every real token of the sample (X: [S, D] per update)",
                       "noised": "all positions, or V only (the _visual conditions)",
                       "query": "the answer: the sample's last real token"},
            "conditions": table}


def plot(summary: dict, path: Path) -> None:
    fig, axes = figure(1, 2, size=(12, 3.8))
    names = list(summary["conditions"])
    for part, marker in (("attention", "o"), ("mlp", "s")):
        rid = [summary["conditions"][n][f"{part}_rid"] for n in names]
        mix = [summary["conditions"][n][f"{part}_mix_ig"] for n in names]
        axes[0].scatter(rid, mix, marker=marker, label=part)
        for n, x, y in zip(names, rid, mix):
            axes[0].annotate(n, (x, y), fontsize=7)
    axes[0].axvline(summary["conditions"]["plain"]["rope_baseline"], color="k", ls=":", label="eps_RoPE")
    axes[0].set(xlabel="RID", ylabel="MixIG", title="updates: innovation vs reconfiguration")
    axes[0].legend(fontsize=8)
    for n in names:
        axes[1].plot(summary["conditions"][n]["attention_rid_per_layer"], marker=".", label=n)
    axes[1].set(xlabel="layer", ylabel="attention RID", title="attention RID per layer")
    axes[1].legend(fontsize=7)
    save_figure(fig, path, f"{summary['model']}: {summary['questions']} questions")


def _measure(model, params, batch, hooks):
    out = model.forward(params, batch, hooks, logits="last")
    return {"geometry": out["hooks"]["geometry"], "rope": out["hooks"]["rope"]}, out["logits"][:, -1]


def main(argv=None) -> int:
    return main_with_config(run, CONFIG, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
