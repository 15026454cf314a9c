"""Seed 002: information geometry of residual updates and noise substitution (docs/methods.md §3), on any VLM.

For each condition — the plain model, Noise-Δ (every attention update replaced by Gaussian noise of its per-token
RMS) and Noise-QKV (Q/K/V computed with Gaussian weights of each matrix's std), each on all tokens or on visual
tokens only — one compiled forward per batch records, per layer and question: eRank before and after, RID and MixIG
of the attention update and of the MLP update (over the question's real tokens), the RoPE baseline eps_RoPE, and
first-token p(yes). Records are appended per question (resumable); summary.json holds the means per condition (the
paper's table: attention vs MLP RID / MixIG, the noised rows) and each condition's accuracy.

Usage: python -m experiments.update_geometry [--config experiments/update_geometry.json] [--model DIR] [--out DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from experiments.common import batches, main_with_config, p_yes_of, setup
from vlmjax import interventions as iv
from vlmjax.eval.records import ResultsWriter
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
    model, processor, records, out = setup(config)
    ids = [r.question_id for r in records]
    key = jax.random.key(config["noise_seed"])
    measures = {"geometry": UpdateGeometry(energy=config["energy"]), "rope": RopeBaseline(energy=config["energy"])}
    summary = {"model": config["model"], "conditions": {}}
    for name in CONDITIONS:
        hooks = {**condition_hooks(name, model, key), **measures}  # noise first: the geometry sees the noised update
        forward = jax.jit(lambda params, batch, hooks=hooks: _measure(model, params, batch, hooks))
        with ResultsWriter(str(out / f"records_{name}.jsonl"), id_key="id") as writer:
            for chunk, real, inputs in tqdm(batches(processor, records, set(writer.pending(ids)),
                                                    config["batch_size"]), desc=name, unit="batch"):
                batch, meta = model.prepare(inputs)
                validate_hooks(hooks, meta)
                measured, logits = jax.device_get(forward(model.params, batch))
                p_yes = p_yes_of(processor, logits)
                for i, r in enumerate(chunk[:real]):
                    row = {"id": r.question_id, "label": r.label, "p_yes": float(p_yes[i]),
                           "rope_baseline": measured["rope"]["attn.rot_k"][:, i].tolist()}
                    for site, part in (("resid_mid", "attention"), ("resid_post", "mlp")):
                        for metric, values in measured["geometry"][site].items():
                            row[f"{part}_{metric}"] = values[:, i].tolist()
                    writer.write(row)
            done = [r for r in writer.records if r["id"] in set(ids)]
        truth = np.array([r["label"] == "yes" for r in done])
        mean = lambda k: float(np.mean([r[k] for r in done]))
        summary["conditions"][name] = {
            "accuracy": float(((np.array([r["p_yes"] for r in done]) >= 0.5) == truth).mean()),
            **{f"{part}_{m}": mean(f"{part}_{m}") for part in ("attention", "mlp") for m in ("rid", "mix_ig")},
            "rope_baseline": mean("rope_baseline"),
            "attention_rid_per_layer": np.mean([r["attention_rid"] for r in done], axis=0).tolist(),
        }
    summary["questions"] = len(ids)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _measure(model, params, batch, hooks):
    out = model.forward(params, batch, hooks, logits="last")
    return {"geometry": out["hooks"]["geometry"], "rope": out["hooks"]["rope"]}, out["logits"][:, -1]


def main(argv=None) -> int:
    return main_with_config(run, CONFIG, argv)


if __name__ == "__main__":
    sys.exit(main())
