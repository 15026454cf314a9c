"""Seed 003: visual heads (docs/methods.md §4) — per-head attention weight on the image and concentration at the
answer's query, the head detection score, and the cost of masking a stage's top-k heads vs k random other heads.

Phase 1: each question is run with its greedy first answer token appended, so the last position is the answer's
query (the decode step whose key length is the prompt length + 1); `VisualHeadAttention` records the image weight
and concentration of every head there. Scores `w * c * f(l)` use the data-set means (f(l) = 1 / log(l + e)).
Phase 2: for each stage (early / mid / late, the paper's [0, 10), [10, 20), [20, 32) of 32 layers scaled to the
model) and each k (the paper's 10, 20, 30, 50 of a 7B stage's 320 heads, scaled to the stage's head count and capped
at half of it), the top-k heads of the stage by score are masked, and, as the control, k heads drawn from all the
stage's other heads under each of the random seeds ("uniform": the head attends uniformly to the keys it may see);
every configuration runs in one compiled sweep per batch and each question's first-token answer is scored.
Records are appended per phase (resumable); summary.json, the per-head heatmaps and the masking curves
(visual_heads.png) and TensorBoard scalars come from them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import (VISUAL_TOKENS, AnswerScorer, accuracy_by_group, figure, log_curves,
                                main_with_config, run_phase, save_figure, score_rows, setup)
from vlmjax import interventions as iv
from vlmjax.eval.stats import bootstrap_ci, mcnemar
from vlmjax.probes import VisualHeadAttention, head_detection_scores
from vlmjax.sweep import make_sweep

CONFIG = Path(__file__).with_suffix(".json")
PAPER_STAGE_HEADS = 320  # 10 layers x 32 heads: a stage of LLaVA-1.5-7B


def with_answer_token(model, params, batch):
    """The batch with each sample's greedy first answer token appended (its position is the answer's query). Under
    Qwen2-VL's M-RoPE (position_ids [3, B, N]) the token sits where decoding puts it: all three axes at the prompt's
    largest position + 1; LLaVA-style models number positions from the attention mask. PaliGemma's token_type_ids
    mark it as suffix (1), causal as a decoded token is, so the prompt does not see it."""
    first = model.forward(params, batch, {}, logits="last")["logits"][:, -1].argmax(-1)
    extended = dict(batch)
    extended["input_ids"] = jnp.concatenate([batch["input_ids"], first[:, None].astype(jnp.int32)], axis=1)
    extended["attention_mask"] = jnp.concatenate([batch["attention_mask"], jnp.ones_like(first[:, None], bool)], 1)
    own = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
    for key, value in batch.items():  # other per-token inputs (LLaVA-NeXT's image_feature_index): the new token is
        if key not in own and getattr(value, "shape", ())[:2] == batch["input_ids"].shape:  # text, so any value
            extended[key] = jnp.concatenate([value, value[:, -1:]], axis=1)  # serves; repeat the last column
    if "token_type_ids" in batch:
        answer_type = jnp.ones_like(first[:, None], batch["token_type_ids"].dtype)
        extended["token_type_ids"] = jnp.concatenate([batch["token_type_ids"], answer_type], axis=1)
    positions = batch.get("position_ids")
    if positions is not None and positions.ndim == 3:
        following = jnp.broadcast_to(positions.max(axis=(0, 2))[None, :, None] + 1, positions.shape[:2] + (1,))
        extended["position_ids"] = jnp.concatenate([positions, following.astype(positions.dtype)], axis=2)
    elif positions is not None:
        extended["position_ids"] = jnp.concatenate([positions, positions[:, -1:] + 1], axis=1)
    return extended


def stages(num_layers: int, stages_of_32) -> dict[str, range]:
    scale = lambda x: round(x * num_layers / 32)
    names = ("early", "mid", "late")
    return {name: range(scale(a), scale(b)) for name, (a, b) in zip(names, stages_of_32) if scale(b) > scale(a)}


def stage_ks(stage_heads: int, ks_of_320) -> list[int]:
    """The paper's k (of a 320-head stage) scaled to a stage of `stage_heads` heads, at least 1, at most half."""
    return sorted({min(max(1, round(k * stage_heads / PAPER_STAGE_HEADS)), stage_heads // 2) for k in ks_of_320} - {0})


def masks_for(scores: np.ndarray, config: dict) -> tuple[list[dict], np.ndarray]:
    """The masking configurations: (descriptions, keep masks [K, L, H]); row 0 masks nothing. Random controls draw
    k heads without replacement from all of the stage's non-top-k heads, one draw per seed."""
    num_layers, num_heads = scores.shape
    described, keeps = [{"stage": None, "k": 0, "heads": "none", "seed": None}], [np.ones_like(scores)]

    def add(description, heads):
        keep = np.ones_like(scores)
        keep[tuple(np.array(heads).T)] = 0.0
        described.append(description)
        keeps.append(keep)

    for name, layers in stages(num_layers, config["stages_of_32"]).items():
        cells = [(l, h) for l in layers for h in range(num_heads)]
        ranked = sorted(cells, key=lambda c: -scores[c])
        for k in stage_ks(len(cells), config["top_k_of_320"]):
            add({"stage": name, "k": k, "heads": "top", "seed": None}, ranked[:k])
            for seed in config["random_seeds"]:
                others = ranked[k:]
                draw = np.random.default_rng([seed, len(cells), k]).choice(len(others), size=k, replace=False)
                add({"stage": name, "k": k, "heads": "random", "seed": seed}, [others[i] for i in draw])
    return described, np.stack(keeps).astype(np.float32)


def run(config: dict) -> dict:
    model, processor, questions, out = setup(config)
    scorer = AnswerScorer(processor.tokenizer, questions)

    @jax.jit
    def head_stats(params, batch):
        extended = with_answer_token(model, params, batch)
        return model.forward(params, extended, {"heads": VisualHeadAttention()}, logits=None)["hooks"]["heads"]

    def measure_heads(chunk, inputs, _):
        stats = jax.device_get(head_stats(model.params, model.prepare(inputs)[0])["attn.pattern"])
        return [{"image_weight": stats["image_weight"][:, i].tolist(),
                 "concentration": stats["concentration"][:, i].tolist()} for i in range(len(chunk))]

    heads = run_phase(model, out / "records_heads.jsonl", processor, questions, config["batch_size"], "head statistics",
                      measure_heads)
    record = {key: jnp.asarray(np.stack([r[key] for r in heads], axis=1)) for key in ("image_weight", "concentration")}
    scores = np.asarray(head_detection_scores(record))  # [L, H]

    described, keeps = masks_for(scores, config)
    masking = make_sweep(model, lambda keep: {"heads": iv.HeadMask(keep, config["mask_mode"])}, first_layer=0,
                         chunk=1)

    def mask_heads(chunk, inputs, _):
        logits = np.asarray(masking(model.params, model.prepare(inputs)[0], keeps)["logits"])[:, :, -1]
        scores_k = scorer(logits, chunk)
        return [score_rows(scores_k, i) for i in range(len(chunk))]

    masked = run_phase(model, out / "records_masking.jsonl", processor, questions, config["batch_size"], "head masking",
                       mask_heads)
    correct = np.array([r["correct"] for r in masked])  # [Q, K]
    by_id = {q.question_id: q for q in questions}
    summary = {"model": config["model"], "questions": len(masked), "images": len({q.image_path for q in questions}),
               "tokens": {"visual": VISUAL_TOKENS,
                          "query": "the answer's query: the greedy first answer token appended to the prompt (the "
                                   "decode step whose key length is the prompt length + 1); the masked runs score the "
                                   "answer at the prompt's last token"},
               "accuracy": accuracy_by_group(masked, correct[:, 0], by_id),
               "image_weight": np.asarray(record["image_weight"]).mean(1).tolist(),
               "concentration": np.asarray(record["concentration"]).mean(1).tolist(), "scores": scores.tolist(),
               "top_heads": [list(map(int, np.unravel_index(i, scores.shape))) for i in np.argsort(-scores, None)[:10]],
               "masking": masking_table(described, correct, config)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log_curves(out, {f"heads/{row['stage']}_{kind}": [r[kind] for r in summary["masking"] if r["stage"] == row["stage"]]
                     for row in summary["masking"] for kind in ("top_accuracy", "random_mean_accuracy")})
    plot(summary, out / "visual_heads.png")
    return summary


def masking_table(described: list[dict], correct: np.ndarray, config: dict) -> list[dict]:
    """Per stage and k: accuracy with the top-k heads masked (McNemar against no masking), the random controls'
    accuracies (mean, std over seeds), and the bootstrap CI of top minus random-mean accuracy over questions."""
    rows = []
    for i, d in enumerate(described):
        if d["heads"] != "top":
            continue
        random = [j for j, e in enumerate(described) if e["heads"] == "random" and (e["stage"], e["k"]) == (d["stage"], d["k"])]
        random_acc = correct[:, random].mean(0)
        gap = bootstrap_ci((correct[:, i].astype(float), correct[:, random].mean(1)), lambda a, b: np.mean(a - b),
                           seed=0)
        rows.append({"stage": d["stage"], "k": d["k"], "top_accuracy": float(correct[:, i].mean()),
                     "top_mcnemar_p": mcnemar(correct[:, 0], correct[:, i]).p_value,
                     "random_accuracies": random_acc.tolist(), "random_mean_accuracy": float(random_acc.mean()),
                     "random_std_accuracy": float(random_acc.std(ddof=1)) if len(random) > 1 else 0.0,
                     "top_minus_random": {"estimate": gap.estimate, "low": gap.low, "high": gap.high}})
    return rows


def plot(summary: dict, path: Path) -> None:
    fig, axes = figure(1, 4, size=(17, 3.8))
    for ax, key, title in ((axes[0], "image_weight", "image weight w"), (axes[1], "concentration", "concentration c"),
                           (axes[2], "scores", "head detection score")):
        image = ax.imshow(np.array(summary[key]).T, aspect="auto", origin="lower", cmap="viridis")
        ax.set(xlabel="layer", ylabel="head", title=title)
        fig.colorbar(image, ax=ax)
    for stage, colour in zip(("early", "mid", "late"), ("C0", "C1", "C2")):
        rows = [r for r in summary["masking"] if r["stage"] == stage]
        if not rows:
            continue
        ks = [r["k"] for r in rows]
        axes[3].plot(ks, [r["top_accuracy"] for r in rows], marker="o", color=colour, label=f"{stage} top-k")
        axes[3].errorbar(ks, [r["random_mean_accuracy"] for r in rows], yerr=[r["random_std_accuracy"] for r in rows],
                         marker="x", ls="--", color=colour, capsize=2, label=f"{stage} random (mean ± sd)")
    axes[3].axhline(summary["accuracy"]["all"]["accuracy"], color="k", ls=":", label="no masking")
    axes[3].set(xlabel="heads masked k", ylabel="accuracy", title="head masking")
    axes[3].legend(fontsize=7)
    save_figure(fig, path, f"{summary['model']}: {summary['questions']} questions, {summary['images']} images")


def main(argv=None) -> int:
    return main_with_config(run, CONFIG, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
