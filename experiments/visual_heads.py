"""Seed 003: visual heads (docs/methods.md §4) — per-head attention weight on the image and concentration at the
answer's query, the head detection score, and the cost of masking a stage's top-k heads vs k random other heads.

Phase 1: each question is run with its greedy first answer token appended, so the last position is the answer's
query (the decode step whose key length is the prompt length + 1); `VisualHeadAttention` records the image weight
and concentration of every head there. Scores `w * c * f(l)` use the data-set means (f(l) = 1 / log(l + e)).
Phase 2: for each stage (early / mid / late, the paper's [0, 10), [10, 20), [20, 32) of 32 layers scaled to the
model) and each k (capped at half the stage's heads), the top-k heads of the stage by score and k random other heads
of the same stage (seeded) are masked ("uniform": the head attends uniformly to the keys it may see) — every
configuration in one compiled sweep per batch — and first-token accuracy is recorded.

Usage: python -m experiments.visual_heads [--config experiments/visual_heads.json] [--model DIR] [--out DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from experiments.common import batches, main_with_config, p_yes_of, setup
from vlmjax import interventions as iv
from vlmjax.eval.records import ResultsWriter
from vlmjax.probes import VisualHeadAttention, head_detection_scores
from vlmjax.sweep import make_sweep

CONFIG = Path(__file__).with_suffix(".json")


def with_answer_token(model, params, batch):
    """The batch with each sample's greedy first answer token appended (its position is the answer's query). Under
    Qwen2-VL's M-RoPE (position_ids [3, B, N]) the token sits where decoding puts it: all three axes at the prompt's
    largest position + 1; LLaVA-style models number positions from the attention mask."""
    first = model.forward(params, batch, {}, logits="last")["logits"][:, -1].argmax(-1)
    extended = dict(batch)
    extended["input_ids"] = jnp.concatenate([batch["input_ids"], first[:, None].astype(jnp.int32)], axis=1)
    extended["attention_mask"] = jnp.concatenate([batch["attention_mask"], jnp.ones_like(first[:, None], bool)], 1)
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


def masks_for(scores: np.ndarray, config: dict) -> tuple[list[dict], np.ndarray]:
    """The masking configurations: (descriptions, keep masks [K, L, H]); row 0 masks nothing."""
    num_layers, num_heads = scores.shape
    rng = np.random.default_rng(config["random_seed"])
    described, keeps = [{"stage": None, "k": 0, "heads": "none"}], [np.ones_like(scores)]
    for name, layers in stages(num_layers, config["stages_of_32"]).items():
        cells = [(l, h) for l in layers for h in range(num_heads)]
        ranked = sorted(cells, key=lambda c: -scores[c])
        for k in sorted({min(k, len(cells) // 2) for k in config["top_k"]} - {0}):
            top = ranked[:k]
            others = ranked[k:]
            random = [others[i] for i in rng.choice(len(others), size=k, replace=False)]
            for kind, heads in (("top", top), ("random", random)):
                keep = np.ones_like(scores)
                keep[tuple(np.array(heads).T)] = 0.0
                described.append({"stage": name, "k": k, "heads": kind})
                keeps.append(keep)
    return described, np.stack(keeps).astype(np.float32)


def run(config: dict) -> dict:
    model, processor, records, out = setup(config)
    ids = [r.question_id for r in records]

    @jax.jit
    def head_stats(params, batch):
        extended = with_answer_token(model, params, batch)
        return model.forward(params, extended, {"heads": VisualHeadAttention()}, logits=None)["hooks"]["heads"]

    with ResultsWriter(str(out / "records_heads.jsonl"), id_key="id") as writer:
        for chunk, real, inputs in tqdm(batches(processor, records, set(writer.pending(ids)), config["batch_size"]),
                                        desc="head statistics", unit="batch"):
            stats = jax.device_get(head_stats(model.params, model.prepare(inputs)[0])["attn.pattern"])
            for i, r in enumerate(chunk[:real]):
                writer.write({"id": r.question_id, "image_weight": stats["image_weight"][:, i].tolist(),
                              "concentration": stats["concentration"][:, i].tolist()})
        heads = [r for r in writer.records if r["id"] in set(ids)]
    record = {key: jnp.asarray(np.stack([r[key] for r in heads], axis=1)) for key in ("image_weight", "concentration")}
    scores = np.asarray(head_detection_scores(record))  # [L, H]

    described, keeps = masks_for(scores, config)
    mode = config["mask_mode"]
    masking = make_sweep(model, lambda keep: {"heads": iv.HeadMask(keep, mode)}, first_layer=0, chunk=1)
    with ResultsWriter(str(out / "records_masking.jsonl"), id_key="id") as writer:
        for chunk, real, inputs in tqdm(batches(processor, records, set(writer.pending(ids)), config["batch_size"]),
                                        desc="head masking", unit="batch"):
            batch, _ = model.prepare(inputs)
            p_yes = p_yes_of(processor, np.asarray(masking(model.params, batch, keeps)["logits"])[:, :, -1])
            for i, r in enumerate(chunk[:real]):
                writer.write({"id": r.question_id, "label": r.label, "p_yes": p_yes[:, i].tolist()})
        masked = [r for r in writer.records if r["id"] in set(ids)]
    truth = np.array([r["label"] == "yes" for r in masked])
    accuracy = ((np.array([r["p_yes"] for r in masked]) >= 0.5) == truth[:, None]).mean(axis=0)
    summary = {"model": config["model"], "questions": len(masked), "scores": scores.tolist(),
               "top_heads": [list(map(int, np.unravel_index(i, scores.shape))) for i in np.argsort(-scores, None)[:10]],
               "masking": [{**d, "accuracy": float(a)} for d, a in zip(described, accuracy)]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> int:
    return main_with_config(run, CONFIG, argv)


if __name__ == "__main__":
    sys.exit(main())
