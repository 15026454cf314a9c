"""Seed 003: visual heads (docs/methods.md §4) — per-head attention weight on the image (and on the question's box),
concentration, the head detection score, the logit lens at the top heads, the cost of masking a stage's top-k heads
vs k random other heads, and the correlation of head scores with a second model.

One query position throughout: the prompt's last token, the position that generates the answer (its first token is
what every masked run scores; the paper's attention vector of "input length + 1" counts the start token). Phase 1,
per question at that query: every head's image weight `w` and concentration `c`, its weight on the visual tokens
inside the question's box (counting questions, whose box is in the text), and the logit-lens rank of the model's own
answer token (its final top-1) after every layer. Scores `w * c * f(l)` use the data-set means (f(l) = 1 / log(l +
e)). Phase 2, on the questions of `masking_families` (POPE, as in the paper): for each stage (early / mid / late, the
paper's [0, 10), [10, 20), [20, 32) of 32 layers scaled to the model) and each k (the paper's 10, 20, 30, 50 of a
7B stage's 320 heads, scaled to the stage's head count and capped at half of it), the top-k heads of the stage are
masked and, as the control, k heads drawn from all the stage's other heads under each random seed ("uniform": the
head attends uniformly to the keys it may see); every configuration runs in one compiled sweep per batch. Top vs
random: bootstrap CI of the accuracy difference and a paired sign-flip permutation test over questions.
With `compare_model` (a path or builtin:NAME of the same layer x head grid; by default
builtin:llava-shapes-deep-variant, the organism fine-tuned further on another seed's data), phase 1 runs on it too
and the Pearson correlation of the two models' head scores is reported (the paper: > 0.8 between a base model and
its variants, < 0.1 across families). Records are appended per phase (resumable; the second model's records only
with the weights that wrote them, fingerprinted beside them); summary.json, the heatmaps, masking curves and lens
ranks (visual_heads.png) and TensorBoard scalars come from them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
from PIL import Image

import vlmjax
from converters.hf import read_hf_config
from experiments.common import (VISUAL_TOKENS, AnswerScorer, accuracy_by_group, compare_to_random, figure, log_curves,
                                main_with_config, run_phase, save_figure, setup, swept_answers)
from vlmjax import fingerprint, models
from vlmjax.builtin import resolve as resolve_builtin
from vlmjax import interventions as iv
from vlmjax.errors import VlmJaxError
from vlmjax.eval.stats import pearson
from vlmjax.metrics import box_to_token_mask
from vlmjax.models.decoder import unembed_matrix
from vlmjax.probes import LogitLens, VisualHeadAttention, head_detection_scores
from vlmjax.sweep import make_sweep

CONFIG = Path(__file__).with_suffix(".json")
PAPER_STAGE_HEADS = 320  # 10 layers x 32 heads: a stage of LLaVA-1.5-7B
TOP_HEADS = 10  # the top heads listed in the summary, with their logit-lens ranks
COMPARE_RECORDS = "records_heads_compare.jsonl"  # phase 1 on compare_model
QUERY = ("the prompt's last token, the position that generates the answer: head statistics, the logit lens and every "
         "masked run's first-token answer are all read there")
REGION = ("the visual tokens whose patch centre lies in the counting question's box (the box in the generated "
          "image's pixels, the image's patch grid laid over it)")
LENS_TARGET = ("the model's own first answer token (its final top-1), ranked among the vocabulary by each layer's "
               "resid_post through the final norm and unembedding (0 = top-1)")


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


def box_regions(chunk, meta) -> np.ndarray:
    """[B, N] bool: each counting question's box as visual tokens (REGION); all False for questions without one."""
    region = np.zeros(np.asarray(meta.mask).shape, bool)
    if not any(q.region for q in chunk):
        return region
    rows, cols, grid = meta.single_patch_grid("The box region weight")
    for b, q in enumerate(chunk):
        if q.region is not None:
            width, height = Image.open(q.image_path).size
            region[b] = box_to_token_mask(q.region, (height, width), rows[b], cols[b], grid)
    return region


def head_statistics(model, processor, questions, path: Path, batch_size: int, desc: str) -> list[dict]:
    """Phase 1 for one model: per question, [L][H] image weight, concentration and region weight (None without a
    box), and the logit-lens rank [L] of the model's answer token, all at the QUERY."""
    eps = model.config.text.rms_norm_eps

    @model.jit
    def measure(params, batch, region):
        answer = model.forward(params, batch, {}, logits="last")["logits"][:, -1].argmax(-1)
        text = params["text"]
        lens = LogitLens(text["final_norm"]["scale"], unembed_matrix(text), None, answer[:, None], k=1, eps=eps)
        hooks = {"heads": VisualHeadAttention(region_mask=region), "lens": lens}
        return model.forward(params, batch, hooks, logits=None)["hooks"], answer

    def compute(chunk, inputs, _):
        batch, meta = model.prepare(inputs)
        region = box_regions(chunk, meta)
        hooks, answer = jax.device_get(measure(model.params, batch, region))
        heads, ranks = hooks["heads"]["attn.pattern"], hooks["lens"]["resid_post"]["target_rank"][:, :, 0]
        return [{"image_weight": heads["image_weight"][:, i].tolist(),
                 "concentration": heads["concentration"][:, i].tolist(),
                 "region_weight": heads["region_weight"][:, i].tolist() if region[i].any() else None,
                 "box_tokens": float(region[i].sum() / np.asarray(meta.mask)[i].sum()) if region[i].any() else None,
                 "lens_rank": ranks[:, i].tolist(), "answer_token": int(answer[i])} for i in range(len(chunk))]

    return run_phase(model, path, processor, questions, batch_size, desc, compute)


def head_scores(rows: list[dict]) -> np.ndarray:
    stacked = {key: np.stack([r[key] for r in rows], axis=1) for key in ("image_weight", "concentration")}
    return np.asarray(head_detection_scores(stacked))  # [L, H]


def lens_summary(ranks: np.ndarray) -> dict:
    """Logit-lens ranks [Q, L] -> mean rank and top-1 fraction per layer, and the layer from which the answer stays
    top-1 for at least half of the questions (the paper's "stabilises": early on POPE, late on counting)."""
    top1 = (ranks == 0).mean(0)
    unsettled = np.flatnonzero(top1 < 0.5)
    return {"mean_rank": ranks.mean(0).tolist(), "top1_fraction": top1.tolist(),
            "settles_at_layer": int(unsettled[-1] + 1) if len(unsettled) else 0}


def run(config: dict) -> dict:
    model, processor, questions, out = setup(config)
    other, not_run = load_compare_model(config, model, out)
    heads = head_statistics(model, processor, questions, out / "records_heads.jsonl", config["batch_size"],
                            "head statistics")
    scores = head_scores(heads)
    masked_questions = [q for q in questions if q.family in config["masking_families"]]
    if not masked_questions:
        raise VlmJaxError(f"No question of the masking families {config['masking_families']} in the study set "
                          f"(families: {sorted({q.family for q in questions})}); add such a file to question_files "
                          "or change masking_families.")
    scorer = AnswerScorer(processor.tokenizer, masked_questions)

    described, keeps = masks_for(scores, config)
    masking = make_sweep(model, lambda keep: {"heads": iv.HeadMask(keep, config["mask_mode"])}, first_layer=0,
                         chunk=1)

    masked = run_phase(model, out / "records_masking.jsonl", processor, masked_questions, config["batch_size"],
                       "head masking", swept_answers(model, masking, keeps, scorer))
    correct = np.array([r["correct"] for r in masked])  # [Q, K]
    summary = summarise(config, questions, heads, scores, masked, correct, described)
    summary["model_comparison"] = not_run or compare_models(model, other, config, questions, summary, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    curves = {f"heads/{row['stage']}_{kind}": [r[kind] for r in summary["masking"] if r["stage"] == row["stage"]]
              for row in summary["masking"] for kind in ("top_accuracy", "random_mean_accuracy", "top_vs_random_p")}
    log_curves(out, {**curves, "heads/logit_lens_mean_rank": summary["logit_lens"]["all"]["mean_rank"],
                     "heads/logit_lens_top1_fraction": summary["logit_lens"]["all"]["top1_fraction"]})
    plot(summary, out / "visual_heads.png")
    return summary


def summarise(config, questions, heads, scores, masked, correct, described) -> dict:
    by_id = {q.question_id: q for q in questions}
    families = sorted({q.family for q in questions})
    mean = lambda key, rows: np.mean([r[key] for r in rows], axis=0).tolist()
    boxed = [r for r in heads if r["region_weight"] is not None]
    ranks = np.array([r["lens_rank"] for r in heads])  # [Q, L]
    lens = {"target": LENS_TARGET, "all": lens_summary(ranks),
            "by_family": {f: lens_summary(ranks[[by_id[r["id"]].family == f for r in heads]]) for f in families}}
    top = [tuple(map(int, np.unravel_index(i, scores.shape))) for i in np.argsort(-scores, None)[:TOP_HEADS]]
    return {
        "model": config["model"], "questions": len(heads), "masking_questions": len(masked),
        "images": len({q.image_path for q in questions}),
        "tokens": {"visual": VISUAL_TOKENS, "query": QUERY, "region": REGION},
        "accuracy": accuracy_by_group(masked, correct[:, 0], by_id),
        "image_weight": mean("image_weight", heads), "concentration": mean("concentration", heads),
        "scores": scores.tolist(), "score": "w * c * f(l), f(l) = 1 / log(l + e), w and c averaged over all questions",
        "image_weight_by_family": {f: mean("image_weight", [r for r in heads if by_id[r["id"]].family == f])
                                   for f in families},
        "region_questions": len(boxed),
        "region_weight": mean("region_weight", boxed) if boxed else None,
        "box_token_fraction": float(np.mean([r["box_tokens"] for r in boxed])) if boxed else None,
        "top_heads": [{"layer": l, "head": h, "score": float(scores[l, h]),
                       "lens_mean_rank": float(ranks[:, l].mean()), "lens_top1_fraction": float((ranks[:, l] == 0).mean())}
                      for l, h in top],
        "logit_lens": lens,
        "masking_families": config["masking_families"], "mask_mode": config["mask_mode"],
        "masking": masking_table(described, correct),
    }


def masking_table(described: list[dict], correct: np.ndarray) -> list[dict]:
    """Per stage and k: the top-k heads against the k-random controls of the same stage and k (compare_to_random:
    accuracies and drops, McNemar of top against no masking, top minus random-mean CI and permutation p)."""
    rows = []
    for i, d in enumerate(described):
        if d["heads"] == "top":
            random = [j for j, e in enumerate(described)
                      if e["heads"] == "random" and (e["stage"], e["k"]) == (d["stage"], d["k"])]
            rows.append({"stage": d["stage"], "k": d["k"],
                         **compare_to_random(correct[:, 0], correct[:, i], correct[:, random])})
    return rows


def load_compare_model(config: dict, model, out: Path):
    """(`compare_model` loaded, None), or (None, {"not_run": why}) when there is none or its layer x head grid is not
    `model`'s. Its records resume only with the weights that wrote them: their fingerprint (`vlmjax.fingerprint`),
    beside them, must equal the loaded model's, else the run is refused before any phase runs."""
    other_path = config["compare_model"]
    if other_path is None:
        return None, {"not_run": "no compare_model in the config (a second model's path or builtin:NAME, with the "
                                 "same layers and heads, e.g. builtin:llava-shapes-deep-variant, the organism "
                                 "fine-tuned further)"}
    other_cfg = models.from_hf(read_hf_config(resolve_builtin(other_path)))  # its grid, before any weight is read
    grid = (model.num_layers["blocks"], model.config.text.num_heads)
    other_grid = (models.family(other_cfg.model_type).num_layers(other_cfg)["blocks"], other_cfg.text.num_heads)
    if other_grid != grid:
        return None, {"compare_model": other_path, "not_run": f"its head grid is {other_grid[0]} layers x "
                      f"{other_grid[1]} heads, this model's {grid[0]} x {grid[1]}: a correlation over heads needs "
                      "the same grid"}
    other = vlmjax.load(other_path, progress=False)
    records = out / COMPARE_RECORDS
    fingerprint.claim(fingerprint.sidecar(records), {"model": fingerprint.of_model(other)}, records.is_file(),
                      f"The compare_model records {records}")
    return other, None


def compare_models(model, other, config: dict, questions, summary: dict, out: Path) -> dict:
    """Pearson correlation over heads of `model`'s detection scores (and of w and c) with those of `other` (the
    loaded `compare_model`, same head grid) on the same questions, and whether `other` is a fine-tuned variant of
    `model` (the comparison the paper's > 0.8 is about): its training_report.json says it was trained from weights
    with `model`'s fingerprint (`init_from_weights`, written by `python -m vlmjax.train --init-from`)."""
    scores = np.array(summary["scores"])
    processor = vlmjax.load_processor(other.path)
    processor.tokenizer.padding_side = "left"
    rows = head_statistics(other, processor, questions, out / COMPARE_RECORDS, config["batch_size"],
                           "head statistics (compare_model)")
    other_scores = head_scores(rows)
    correlate = lambda a, b: dict(zip(("r", "p"), pearson(np.ravel(a), np.ravel(b))))
    top = lambda s: set(np.argsort(-np.ravel(s), kind="stable")[:TOP_HEADS].tolist())
    report = Path(other.path) / "training_report.json"
    training = json.loads(report.read_text()) if report.is_file() else {}
    return {"compare_model": config["compare_model"], "trained_from": training.get("config", {}).get("init_from"),
            "variant_of_model": training.get("init_from_weights") == fingerprint.of_model(model)["weights"],
            "heads": int(scores.size), "scores": correlate(scores, other_scores),
            **{key: correlate(summary[key], np.mean([r[key] for r in rows], axis=0))
               for key in ("image_weight", "concentration")},
            "top_heads_shared": len(top(scores) & top(other_scores)) / min(TOP_HEADS, scores.size),
            "compare_scores": other_scores.tolist()}


def plot(summary: dict, path: Path) -> None:
    fig, axes = figure(2, 3, size=(16, 7.5))
    maps = (("image_weight", "image weight w"), ("concentration", "concentration c"), ("scores", "head detection score"),
            ("region_weight", f"weight in the box ({summary['region_questions']} counting questions)"))
    for ax, (key, title) in zip(axes.flat, maps):
        if summary[key] is None:
            ax.text(0.5, 0.5, "no counting questions with a box", ha="center", va="center", transform=ax.transAxes)
            ax.set(title=title, xticks=[], yticks=[])
            continue
        image = ax.imshow(np.array(summary[key]).T, aspect="auto", origin="lower", cmap="viridis")
        ax.set(xlabel="layer", ylabel="head", title=title)
        fig.colorbar(image, ax=ax)
    for l, h in ((t["layer"], t["head"]) for t in summary["top_heads"]):
        axes[0, 2].plot(l, h, "r+", ms=6)
    ax = axes[1, 1]
    for stage, colour in zip(("early", "mid", "late"), ("C0", "C1", "C2")):
        rows = [r for r in summary["masking"] if r["stage"] == stage]
        if not rows:
            continue
        ks = [r["k"] for r in rows]
        ax.plot(ks, [r["top_accuracy"] for r in rows], marker="o", color=colour, label=f"{stage} top-k")
        ax.errorbar(ks, [r["random_mean_accuracy"] for r in rows], yerr=[r["random_std_accuracy"] for r in rows],
                    marker="x", ls="--", color=colour, capsize=2, label=f"{stage} random (mean ± sd)")
    ax.axhline(summary["accuracy"]["all"]["accuracy"], color="k", ls=":", label="no masking")
    ax.set(xlabel="heads masked k", ylabel="accuracy", title="head masking: top-k vs random-k")
    ax.legend(fontsize=7)
    ax = axes[1, 2]
    for family, lens in {"all": summary["logit_lens"]["all"], **summary["logit_lens"]["by_family"]}.items():
        ax.plot(lens["top1_fraction"], marker="o", ms=3, label=family)
    for layer in sorted({t["layer"] for t in summary["top_heads"]}):
        ax.axvline(layer, color="r", lw=0.6, alpha=0.5)
    ax.set(xlabel="layer (red: layers of the top heads)", ylabel="answer top-1 under the lens",
           title="logit lens of the answer token")
    ax.legend(fontsize=7)
    save_figure(fig, path, f"{summary['model']}: {summary['questions']} questions, {summary['images']} images")


def main(argv=None) -> int:
    return main_with_config(run, CONFIG, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
