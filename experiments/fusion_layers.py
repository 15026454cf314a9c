"""Seed 001: fusion layers, the review layer and contrastive-attention refinement (docs/methods.md §2), on any VLM,
against its two baselines, DoLa and ViCrop-style cropping (methods §6, §2).

Phase 1, layer-wise visual masking: for every layer l, the visual hidden states are zeroed at l's input (one
compiled sweep over the one-hot layer vectors, the vision tower run once per batch) and each question's first-token
answer is scored. Each layer's accuracy drop gets a bootstrap CI (the questions resampled together for every layer)
and a McNemar test against no masking. The selection rule (`SELECTION_RULE`, stated in the summary) picks the
fusion layers and the review layer unless the config gives them; with no review layer, no refinement is run.
Phase 2, refinement: each question's last-query attention maps of every layer give the pre-integrated layer
i* = argmax over fusion layers of H(A_i, A_post) (A_post: the layer before the review layer; the review layer itself
when it is layer 0), the contrast C = |A_post - A_i*|, and the visual tokens below C's 20th percentile, which are
scaled by s at the review layer; the first-token answers are scored again.
Phase 3, open-ended comparison: the shapes world's open-ended questions (what colour / what shape / how many in a
box, `open_ended_per_kind` of each), answered greedily by the plain model, by the method (the same soft mask applied
in prefill), by DoLa (`generate(..., dola_layers=...)`) and by ViCrop (the image cropped around the peak of a
layer's last-query map, asked again), each scored with the official VQA accuracy (`vlmjax.eval.vqa`) and compared
with the plain model on the same questions (bootstrap CI of the mean difference, paired sign-flip permutation test).
Records are appended per question per phase (resumable); summary.json, fusion_layers.png and TensorBoard scalars
come from them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from experiments.common import (LAST_QUERY, VISUAL_TOKENS, AnswerScorer, accuracy_by_group, figure, log_curves,
                                main_with_config, run_phase, save_figure, score_rows, setup,
                                swept_answers)
from vlmjax import interventions as iv
from vlmjax.eval.batches import prompt_texts
from vlmjax.eval.stats import bootstrap_ci, bootstrap_differences, mcnemar, paired_permutation_test
from vlmjax.eval.vicrop import attention_maps, crop_boxes
from vlmjax.eval.vqa import ANNOTATORS, open_ended_questions, score_open_ended, vqa_accuracy
from vlmjax.generate import generate
from vlmjax.probes import LastQueryVisualMap, contrastive_mask
from vlmjax.sweep import make_sweep

CONFIG = Path(__file__).with_suffix(".json")
SELECTION_RULE = ("A layer lowers accuracy when its masked accuracy is below the unmasked one and the McNemar test "
                  "against no masking gives p < significance (per layer, uncorrected). Fusion layers: the "
                  "num_fusion_layers (default 6 of 32, scaled to the depth) largest such drops in the first two "
                  "thirds of the layers; review layer: the largest such drop in the last third, none when no layer "
                  "there lowers accuracy. Layers given in the config are used as given.")
SYSTEMS = ("plain", "method", "dola", "vicrop")


@dataclass(frozen=True)
class OpenQuestion:
    """An open-ended question as `run_phase` batches it (the prompt text, the image) with its answer and kind."""

    question_id: int
    image_path: str
    text: str
    answer: str
    kind: str

    def load_image(self) -> Image.Image:
        return Image.open(self.image_path).convert("RGB")


def run(config: dict) -> dict:
    model, processor, questions, out = setup(config)
    num_layers = model.num_layers["blocks"]
    scorer = AnswerScorer(processor.tokenizer, questions)
    knockouts = np.concatenate([np.zeros((1, num_layers), bool), np.eye(num_layers, dtype=bool)])  # row 0: none
    masking = make_sweep(model, lambda onehot: {"ko": iv.ZeroVisualStates(onehot)}, first_layer=0, chunk=1)

    masked = run_phase(model, out / "records_masking.jsonl", processor, questions, config["batch_size"],
                       "layer-wise masking", swept_answers(model, masking, knockouts, scorer))
    correct = np.array([r["correct"] for r in masked])  # [Q, 1 + L]
    tests = [mcnemar(correct[:, 0], correct[:, 1 + layer]) for layer in range(num_layers)]
    drops = bootstrap_differences(correct[:, 0], correct[:, 1:].T, seed=0)
    fusion, review = choose_layers(np.array([d.estimate for d in drops]), [t.p_value for t in tests], config)
    post = None if review is None else max(review - 1, 0)
    soft_mask = None
    if review is not None and fusion:
        review_flags = jnp.asarray(iv.layer_flags(num_layers, [review]))
        scale = jnp.float32(config["soft_mask_scale"])
        soft_mask = lambda suppress: {"soft": iv.ScaleVisualStates(jnp.asarray(suppress), scale, review_flags)}
    refined = None
    if soft_mask is not None:
        maps_fn = model.jit(lambda params, batch: model.forward(params, batch, {"maps": LastQueryVisualMap()},
                                                              logits=None)["hooks"]["maps"]["attn.pattern"])
        refined_fn = model.jit(lambda params, batch, mask: model.forward(
            params, batch, soft_mask(mask), logits="last")["logits"][:, -1])

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
        "drop_at_layer": [asdict(d) for d in drops],
        "mcnemar_p_at_layer": [t.p_value for t in tests], "significance": config["significance"],
        "selection_rule": SELECTION_RULE,
        "lowers_accuracy_at_layer": [bool(t.p_value < config["significance"] and d.estimate > 0)
                                     for t, d in zip(tests, drops)],
        "fusion_layers": fusion, "review_layer": review,
        "refinement": None if refined is None else {
            "post_layer": post, "scale": config["soft_mask_scale"], "percentile": config["percentile"],
            "accuracy": float(np.mean([r["correct"] for r in refined])),
            "mcnemar_p": mcnemar(correct[:, 0], np.array([r["correct"] for r in refined])).p_value,
            "pre_integrated_layer_counts": np.bincount([r["pre_integrated_layer"] for r in refined],
                                                       minlength=num_layers).tolist()},
        "open_ended": open_ended(model, processor, config, out, fusion, post, soft_mask),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    systems = summary["open_ended"]["systems"]
    log_curves(out, {"fusion/accuracy_masked_at_layer": summary["accuracy_masked_at_layer"],
                     "fusion/drop_at_layer": [d["estimate"] for d in summary["drop_at_layer"]],
                     "fusion/drop_ci_low": [d["low"] for d in summary["drop_at_layer"]],
                     "fusion/drop_ci_high": [d["high"] for d in summary["drop_at_layer"]],
                     "fusion/mcnemar_p_at_layer": summary["mcnemar_p_at_layer"],
                     "fusion/open_ended_vqa_accuracy": [systems[s]["accuracy"] if systems.get(s) else None
                                                        for s in SYSTEMS]})
    plot(summary, out / "fusion_layers.png")
    return summary


def choose_layers(drop: np.ndarray, p_values, config: dict) -> tuple[list[int], int | None]:
    """The layers `SELECTION_RULE` states, from each layer's accuracy drop and McNemar p-value."""
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


def default_dola_layers(num_layers: int) -> list[int]:
    """DoLa's lower bucket: the even layers of the first half (the DoLa paper's candidates for 32-layer models are
    [0, 16) in steps of 2), premature layers only (below the last)."""
    return [layer for layer in range(0, num_layers // 2, 2) if layer < num_layers - 1]


def open_ended(model, processor, config: dict, out: Path, fusion, post, soft_mask) -> dict:
    """Phase 3: the four systems on the open-ended questions, VQA accuracy, paired comparisons with the plain model
    (and the method with each baseline)."""
    num_layers = model.num_layers["blocks"]
    root = Path(config["data"]) if config.get("data") else out / "data"
    questions = [OpenQuestion(r.question_id, r.image_path, r.question, r.answer, r.extra["kind"])
                 for r in open_ended_questions(root, "test", limit=config["open_ended_per_kind"])]
    dola_layers = config["dola_layers"] or default_dola_layers(num_layers)
    vicrop_layer = num_layers // 2 if config["vicrop_layer"] is None else config["vicrop_layer"]
    tokenizer = processor.tokenizer
    options = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    answer = lambda inputs, **kw: [a.strip() for a in tokenizer.batch_decode(
        generate(model, inputs, config["max_new_tokens"], **options, **kw)[:, inputs["input_ids"].shape[1]:],
        skip_special_tokens=True)]

    def compare(chunk, inputs, _):
        batch, meta = model.prepare(inputs)
        maps = np.asarray(attention_maps(model, model.params, model.module.decode_start(batch)[0]))
        images = [q.load_image() for q in chunk]
        predictions = {"plain": answer(inputs)}
        chosen = None
        if soft_mask is not None:
            chosen, _, suppress = contrastive_mask(maps, meta.mask, fusion, post, config["percentile"])
            predictions["method"] = answer(inputs, hooks=soft_mask(suppress))
        if dola_layers:
            predictions["dola"] = answer(inputs, dola_layers=dola_layers)
        boxes = crop_boxes(model, processor, maps[vicrop_layer], meta, images, config["vicrop_window"])
        texts = prompt_texts(processor, chunk)
        crops = processor(images=[image.crop(box) for image, box in zip(images, boxes)],
                          text=[texts[q.question_id] for q in chunk], return_tensors="np", padding=True)
        predictions["vicrop"] = answer(dict(crops))  # the crop alone, resized by the processor (the zoom)
        return [{"kind": q.kind, "answer": q.answer, "box": list(boxes[i]),
                 "pre_integrated_layer": None if chosen is None else int(chosen[i]),
                 "predictions": {s: p[i] for s, p in predictions.items()},
                 "accuracy": {s: vqa_accuracy(p[i], [q.answer] * ANNOTATORS) for s, p in predictions.items()}}
                for i, q in enumerate(chunk)]

    records = run_phase(model, out / "records_open_ended.jsonl", processor, questions, config["batch_size"],
                        "open-ended: plain, method, DoLa, ViCrop", compare) if questions else []
    accuracy = {s: np.array([r["accuracy"][s] for r in records]) for s in SYSTEMS
                if records and s in records[0]["accuracy"]}
    systems = {s: None for s in SYSTEMS}
    for s, values in accuracy.items():
        systems[s] = {"accuracy": float(values.mean()), "ci": asdict(bootstrap_ci(values, seed=0)),
                      "by_kind": score_open_ended({"kind": r["kind"], "accuracy": r["accuracy"][s]} for r in records)}
        others = {"plain": accuracy["plain"]} if s != "plain" else {}
        if s == "method":
            others.update({b: accuracy[b] for b in ("dola", "vicrop") if b in accuracy})
        for other, reference in others.items():
            _, p = paired_permutation_test(values, reference)
            systems[s][f"minus_{other}"] = {"difference": asdict(bootstrap_differences(values, [reference])[0]),
                                            "permutation_p": p}
    return {"questions": len(records), "per_kind": config["open_ended_per_kind"],
            "kinds": sorted({q.kind for q in questions}), "max_new_tokens": config["max_new_tokens"],
            "scoring": "official VQA accuracy: lower-case, punctuation and articles stripped, number words to digits, "
                       "min(#matching annotators / 3, 1) (the single shapes-world answer given by all ten)",
            "test": "bootstrap CI (10k) of the mean per-question difference; paired sign-flip permutation test",
            "method": None if soft_mask is None else {"fusion_layers": fusion, "post_layer": post,
                                                      "scale": config["soft_mask_scale"],
                                                      "applied": "in prefill (the prompt's visual states)"},
            "dola_layers": dola_layers or None, "vicrop": {"layer": vicrop_layer, "window": config["vicrop_window"]},
            "systems": systems,
            "pre_integrated_layer_counts": None if soft_mask is None else np.bincount(
                [r["pre_integrated_layer"] for r in records], minlength=num_layers).tolist()}


def plot(summary: dict, path: Path) -> None:
    fig, axes = figure(1, 2, size=(12, 3.8))
    ax = axes[0]
    drops = summary["drop_at_layer"]
    estimate = np.array([d["estimate"] for d in drops])
    error = np.array([estimate - [d["low"] for d in drops], [d["high"] for d in drops] - estimate])
    ax.errorbar(range(len(drops)), estimate, yerr=error, marker="o", capsize=2,
                label="accuracy drop, visual states zeroed at the layer (95% bootstrap CI)")
    ax.axhline(0, color="k", lw=0.5)
    if summary["refinement"]:
        ax.axhline(summary["accuracy"]["all"]["accuracy"] - summary["refinement"]["accuracy"], color="C2", ls=":",
                   label="contrastive refinement (drop)")
    for layer in summary["fusion_layers"]:
        ax.axvline(layer, color="C1", alpha=0.25)
    if summary["review_layer"] is not None:
        ax.axvline(summary["review_layer"], color="C3", alpha=0.4, label="review layer")
    ax.set(xlabel="layer", ylabel="accuracy drop", title="layer-wise visual masking (orange: fusion layers)")
    ax.legend(fontsize=7)
    systems = {s: v for s, v in summary["open_ended"]["systems"].items() if v}
    ax = axes[1]
    if systems:
        means = np.array([v["accuracy"] for v in systems.values()])
        error = np.array([means - [v["ci"]["low"] for v in systems.values()],
                          [v["ci"]["high"] for v in systems.values()] - means])
        ax.bar(list(systems), means, yerr=error, capsize=4, color=["C0", "C2", "C4", "C5"][:len(systems)])
    ax.set(ylabel="VQA accuracy", title=f"open-ended questions ({summary['open_ended']['questions']}, 95% CI)")
    save_figure(fig, path, f"{summary['model']}: {summary['questions']} questions, {summary['images']} images")


def main(argv=None) -> int:
    return main_with_config(run, CONFIG, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
