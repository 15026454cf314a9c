"""One report from one command: run the five studies (each resumes where it stopped) and write REPORT.md with their
figures. For each paper (docs/methods.md §1-§5), every claim gets the value measured on the model, the study's
confidence interval or p-value, and a verdict decided by the rule written beside the claim below, never tuned to
the outcome: "reproduced", "not reproduced" (with the measured evidence) or "not applicable" (with the reason).

Usage: python -m experiments.report --out runs/report [--model M] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from experiments import common, fusion_layers, neglect_zone, reliability_probes, update_geometry, visual_heads

STUDIES = {"neglect_zone": neglect_zone, "fusion_layers": fusion_layers, "update_geometry": update_geometry,
           "visual_heads": visual_heads, "reliability_probes": reliability_probes}
PAPERS = {
    "neglect_zone": "Seed 000 — the visual neglect zone and VIAR (methods §1)",
    "fusion_layers": "Seed 001 — fusion layers, the review layer, contrastive attention (methods §2)",
    "update_geometry": "Seed 002 — information geometry of residual updates, noise substitution (methods §3)",
    "visual_heads": "Seed 003 — visual heads (methods §4)",
    "reliability_probes": "Seed 004 — does attention predict reliability? (methods §5)",
}
QUICK = {"n_images": 60, "questions": 8, "noise_repeats": 2, "gradient_questions": 8}
ALPHA = 0.05  # the significance level of every test-based verdict
REPRODUCED, NOT_REPRODUCED, NOT_APPLICABLE = "reproduced", "not reproduced", "not applicable"


@dataclass
class Verdict:
    measured: str
    statistic: str
    verdict: str
    evidence: str = ""


@dataclass
class Claim:
    study: str
    claim: str
    reported: str
    rule: str  # the verdict rule, in words; `judge` implements it
    judge: Callable[[dict], Verdict]


def pct(x) -> str:
    return f"{100 * x:.1f}%"


def ci(interval: dict, digits: int = 3) -> str:
    return f"95% CI [{interval['low']:.{digits}f}, {interval['high']:.{digits}f}]"


def scaled_layers(num_layers: int, a: int, b: int) -> list[int]:
    """Layers [a, b] of a 32-layer model scaled to `num_layers`."""
    return list(range(neglect_zone.scaled(a, num_layers), neglect_zone.scaled(b, num_layers) + 1))


# ---------------------------------------------------------------------------------------------------------------------
# Seed 000


def u_curve(s):
    early, late = s["early_minus_zone"], s["late_minus_zone"]
    measured = (f"visual fraction: zone (layers {s['zone'][0]}-{s['zone'][-1]}) "
                f"{np.mean([s['visual_fraction'][l] for l in s['zone']]):.3f}; early-minus-zone "
                f"{early['estimate'] if early else float('nan'):.3f}, late-minus-zone "
                f"{late['estimate'] if late else float('nan'):.3f}")
    if not early or not late:
        return Verdict(measured, "-", NOT_APPLICABLE, f"the model's {len(s['visual_fraction'])} layers leave no "
                       "early or no late layers around the scaled zone")
    stat = f"early: {ci(early)}; late: {ci(late)}"
    ok = early["low"] > 0 and late["low"] > 0
    return Verdict(measured, stat, REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "an interval reaches 0 or below: the zone is not below both sides")


def viar_row(s):
    plain = next(v for v in s["viar"] if v["bias"] == 0.0)
    at = [v for v in s["viar"] if v["bias"] == s["viar_bias"]]
    return plain, (at[0] if at else None)


def viar_yes_ratio(s):
    plain, at = viar_row(s)
    if at is None or "yes_ratio" not in at:
        return Verdict("-", "-", NOT_APPLICABLE, f"bias {s['viar_bias']} not swept, or no yes/no questions")
    measured = f"yes-ratio {pct(plain['yes_ratio'])} -> {pct(at['yes_ratio'])} (b = {at['bias']})"
    toward = abs(at["yes_ratio"] - 0.5) < abs(plain["yes_ratio"] - 0.5)
    ok = at["mcnemar_yes_ratio_p"] < ALPHA and toward
    why = "the shift is not significant" if at["mcnemar_yes_ratio_p"] >= ALPHA else "the yes-ratio moves away from 50%"
    return Verdict(measured, f"McNemar p = {at['mcnemar_yes_ratio_p']:.3g}", REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else why)


def viar_accuracy(s):
    plain, at = viar_row(s)
    if at is None:
        return Verdict("-", "-", NOT_APPLICABLE, f"bias {s['viar_bias']} not swept")
    measured = f"accuracy {pct(plain['accuracy'])} -> {pct(at['accuracy'])}"
    p = at["mcnemar_accuracy_p"]
    return Verdict(measured, f"McNemar p = {p:.3g}", REPRODUCED if p >= ALPHA else NOT_REPRODUCED,
                   "" if p >= ALPHA else "VIAR changes accuracy significantly on this model")


def collapse(s):
    last = s["collapse_cosine_last_layer"]
    ok = last["estimate"] >= 0.9
    return Verdict(f"cos at the last layer {last['estimate']:.3f}", ci(last), REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "the last layer's update depends on the image")


def gradient_fall(s):
    g, zone = s["gradient_importance"], s["zone"]
    if not g or g[zone[-1]] <= 0:
        return Verdict("-", "-", NOT_APPLICABLE, "no gradient questions, or zero importance at the zone's end")
    ratio = g[zone[0]] / g[zone[-1]]
    return Verdict(f"importance at layer {zone[0]} / layer {zone[-1]} = {ratio:.2f}x "
                   f"({s['gradient_questions']} questions)", "-", REPRODUCED if ratio >= 2.5 else NOT_REPRODUCED,
                   "" if ratio >= 2.5 else "the importance does not fall several-fold through the zone")


def depth_overall(s):
    c = s["neglect_depth_correlation"]
    ok = not c["p"] < ALPHA
    return Verdict(f"r = {c['r']:.3f}", f"p = {c['p']:.3g}", REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "neglect depth correlates significantly with correctness overall")


def depth_transition(s):
    layers = [l for l in scaled_layers(len(s["per_layer_correlation"]), 14, 17) if l < len(s["per_layer_correlation"])]
    rows = {l: s["per_layer_correlation"][l] for l in layers}
    best = min(rows, key=lambda l: rows[l]["p"] if np.isfinite(rows[l]["p"]) else 2.0)
    r, p = rows[best]["r"], rows[best]["p"]
    ok = r < 0 and p < ALPHA
    return Verdict(f"layers {layers}: strongest at layer {best}, r = {r:.3f}", f"p = {p:.3g}",
                   REPRODUCED if ok else NOT_REPRODUCED, "" if ok else "no significant negative correlation there")


# ---------------------------------------------------------------------------------------------------------------------
# Seed 001


def fusion_found(s):
    drops = [s["accuracy"]["all"]["accuracy"] - a for a in s["accuracy_masked_at_layer"]]
    fusion = s["fusion_layers"]
    measured = f"fusion layers {fusion}; largest drop {pct(max(drops))} at layer {int(np.argmax(drops))}"
    ps = ", ".join(f"L{l}: p = {s['mcnemar_p_at_layer'][l]:.3g}" for l in fusion) or "-"
    return Verdict(measured, ps, REPRODUCED if fusion else NOT_REPRODUCED,
                   "" if fusion else "no layer in the first two thirds significantly lowers accuracy when masked")


def review_found(s):
    review = s["review_layer"]
    if review is None:
        return Verdict("none", "-", NOT_REPRODUCED, "no layer in the last third significantly lowers accuracy")
    drop = s["accuracy"]["all"]["accuracy"] - s["accuracy_masked_at_layer"][review]
    return Verdict(f"layer {review} of {len(s['accuracy_masked_at_layer'])}, drop {pct(drop)}",
                   f"McNemar p = {s['mcnemar_p_at_layer'][review]:.3g}", REPRODUCED)


def refinement(s):
    r = s["refinement"]
    if r is None:
        return Verdict("-", "-", NOT_APPLICABLE, "no review layer or no fusion layers, so no refinement was run")
    base = s["accuracy"]["all"]["accuracy"]
    ok = r["accuracy"] > base and r["mcnemar_p"] < ALPHA
    return Verdict(f"accuracy {pct(base)} -> {pct(r['accuracy'])}", f"McNemar p = {r['mcnemar_p']:.3g}",
                   REPRODUCED if ok else NOT_REPRODUCED, "" if ok else "no significant gain on this model's set")


# ---------------------------------------------------------------------------------------------------------------------
# Seed 002


def rid_order(s):
    p = s["conditions"]["plain"]
    a, m = p["attention_rid_ci"], p["mlp_rid_ci"]
    ok = a["high"] < m["low"]
    return Verdict(f"RID attention {p['attention_rid']:.3f}, MLP {p['mlp_rid']:.3f}",
                   f"attention {ci(a)}; MLP {ci(m)}", REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "the intervals do not separate attention below the MLP")


def mix_order(s):
    p = s["conditions"]["plain"]
    a, m = p["attention_mix_ig_ci"], p["mlp_mix_ig_ci"]
    ok = a["low"] > m["high"]
    return Verdict(f"MixIG attention {p['attention_mix_ig']:.3f}, MLP {p['mlp_mix_ig']:.3f}",
                   f"attention {ci(a)}; MLP {ci(m)}", REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "the intervals do not separate attention above the MLP")


def rope_baseline(s):
    p = s["conditions"]["plain"]
    ratio = p["attention_rid"] / p["rope_baseline"]
    ok = 1 / 1.5 <= ratio <= 1.5
    return Verdict(f"attention RID {p['attention_rid']:.3f}, eps_RoPE {p['rope_baseline']:.3f} (ratio {ratio:.2f})",
                   ci(p["attention_rid_ci"]), REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "attention RID is not within a factor 1.5 of the RoPE baseline")


def noise_geometry(name):
    def judge(s):
        if name not in s["conditions"]:
            return Verdict("-", "-", NOT_APPLICABLE, f"condition {name} not run")
        p, n = s["conditions"]["plain"], s["conditions"][name]
        ok = n["attention_rid_ci"]["low"] > p["attention_rid_ci"]["high"] and n["attention_mix_ig"] < 0
        return Verdict(f"RID {n['attention_rid']:.3f} (plain {p['attention_rid']:.3f}), MixIG "
                       f"{n['attention_mix_ig']:.3f}", f"RID {ci(n['attention_rid_ci'])}",
                       REPRODUCED if ok else NOT_REPRODUCED,
                       "" if ok else "noise does not raise RID above the plain interval with negative MixIG")
    return judge


def noise_accuracy(name):
    def judge(s):
        if name not in s["conditions"]:
            return Verdict("-", "-", NOT_APPLICABLE, f"condition {name} not run")
        p, n = s["conditions"]["plain"], s["conditions"][name]
        lower = n["accuracy"] < p["accuracy"] and n["mcnemar_p_max"] < ALPHA
        return Verdict(f"accuracy {pct(p['accuracy'])} -> {pct(n['accuracy'])} over {n['repeats']} noise draws",
                       f"McNemar p (largest over draws) = {n['mcnemar_p_max']:.3g}",
                       NOT_REPRODUCED if lower else REPRODUCED, "noising visual attention significantly lowers "
                       "accuracy on every draw" if lower else "")
    return judge


# ---------------------------------------------------------------------------------------------------------------------
# Seed 003


def stage_row(s, stage, k_of_320=20):
    rows = [r for r in s["masking"] if r["stage"] == stage]
    if not rows:
        return None
    heads = len(s["scores"][0]) * len(visual_heads.stages(len(s["scores"]), [[0, 10], [10, 20], [20, 32]])[stage])
    want = visual_heads.stage_ks(heads, [k_of_320])[0]
    return min(rows, key=lambda r: abs(r["k"] - want))


def top_vs_random(r):
    """(measured, statistic) of a compare_to_random row."""
    return (f"top: {pct(r['top_accuracy'])}, random {pct(r['random_mean_accuracy'])} ± {pct(r['random_std_accuracy'])} "
            f"(sd over {len(r['random_accuracies'])} seeds)",
            f"top - random {ci(r['top_minus_random'])}, permutation p = {r['top_vs_random_p']:.3g}; top vs none "
            f"McNemar p = {r['top_mcnemar_p']:.3g}")


def early_top_vs_random(s):
    r = stage_row(s, "early")
    if r is None:
        return Verdict("-", "-", NOT_APPLICABLE, "the model has no early stage")
    measured, stat = top_vs_random(r)
    ok = r["top_minus_random"]["high"] < 0 and r["top_vs_random_p"] < ALPHA and r["top_mcnemar_p"] < ALPHA
    return Verdict(f"k = {r['k']}: {measured}", stat, REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "masking the top early heads does not cost significantly more than random heads")


def late_top_harmless(s):
    r = stage_row(s, "late")
    if r is None:
        return Verdict("-", "-", NOT_APPLICABLE, "the model has no late stage")
    ok = r["top_drop"] <= 0.05
    return Verdict(f"k = {r['k']}: accuracy drop {pct(r['top_drop'])}", f"McNemar p = {r['top_mcnemar_p']:.3g}",
                   REPRODUCED if ok else NOT_REPRODUCED, "" if ok else "late top heads cost more than 5 points")


def stage_order(s):
    rows = {stage: stage_row(s, stage) for stage in ("early", "mid", "late")}
    if any(r is None for r in rows.values()):
        return Verdict("-", "-", NOT_APPLICABLE, "the model lacks one of the three stages")
    drops = [rows[stage]["top_drop"] for stage in ("early", "mid", "late")]
    ok = drops[0] > drops[1] > drops[2]
    return Verdict("top-k drops: " + ", ".join(f"{stage} {pct(d)} (k = {rows[stage]['k']})"
                                               for stage, d in zip(rows, drops)),
                   "; ".join(f"{stage} McNemar p = {r['top_mcnemar_p']:.3g}" for stage, r in rows.items()),
                   REPRODUCED if ok else NOT_REPRODUCED, "" if ok else "the drops do not fall from early to late")


def early_monotone(s):
    rows = sorted([r for r in s["masking"] if r["stage"] == "early"], key=lambda r: r["k"])
    if len(rows) < 2:
        return Verdict("-", "-", NOT_APPLICABLE, "fewer than two k values fit the early stage")
    acc = [r["top_accuracy"] for r in rows]
    ok = all(b <= a for a, b in zip(acc, acc[1:])) and acc[-1] < acc[0]
    return Verdict(", ".join(f"k={r['k']}: {pct(r['top_accuracy'])}" for r in rows), "-",
                   REPRODUCED if ok else NOT_REPRODUCED, "" if ok else "accuracy does not fall as k grows")


def lens_settles(s):
    lens = s["logit_lens"]["by_family"]
    if not {"pope", "count"} <= set(lens):
        return Verdict("-", "-", NOT_APPLICABLE, "the study set lacks POPE or counting questions")
    pope, count = lens["pope"]["settles_at_layer"], lens["count"]["settles_at_layer"]
    ok = pope < count
    return Verdict(f"answer top-1 for >= half the questions from layer {pope} (POPE) vs {count} (counting) of "
                   f"{len(lens['pope']['mean_rank'])}", "-", REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "the POPE answer does not settle earlier than the counting answer")


def heads_correlate(s):
    c = s["model_comparison"]
    if "not_run" in c:
        return Verdict("-", "-", NOT_APPLICABLE, f"not run: {c['not_run']}")
    r, p = c["scores"]["r"], c["scores"]["p"]
    ok = r > 0.8 and p < ALPHA
    return Verdict(f"r = {r:.3f} over {c['heads']} heads with {c['compare_model']}; top-10 shared "
                   f"{pct(c['top_heads_shared'])}", f"p = {p:.3g}", REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "the head scores of the two models do not correlate above 0.8")


# ---------------------------------------------------------------------------------------------------------------------
# Seed 004


def uncorrelated(key, what):
    def judge(s):
        c = s[key][s["map_layer"]]
        ok = not c["p"] < ALPHA
        return Verdict(f"{what} vs correctness at layer {s['map_layer']}: R_pb = {c['r']:.3f}",
                       f"95% CI [{c['low']:.3f}, {c['high']:.3f}], p = {c['p']:.3g}",
                       REPRODUCED if ok else NOT_REPRODUCED, "" if ok else "the correlation is significant")
    return judge


def top_patches(s):
    d = s["top_patches_removed_drop"]
    ok = d["low"] > 0 and s["top_patches_removed_mcnemar_p"] < ALPHA
    return Verdict(f"accuracy drop {pct(d['estimate'])}", f"{ci(d)}; McNemar p = "
                   f"{s['top_patches_removed_mcnemar_p']:.3g}", REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "removing the top patches does not significantly lower accuracy")


def top_vs_random_patches(s):
    d, p = s["top_minus_random_patches_drop"], s["top_vs_random_patches_mcnemar_p"]
    ok = d["low"] > 0 and p < ALPHA
    return Verdict(f"accuracy with top patches removed {pct(s['accuracy_top_patches_removed'])}, random "
                   f"{pct(s['accuracy_random_patches_removed'])}", f"random - top {ci(d)}; McNemar p = {p:.3g}",
                   REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "the top patches do not cost significantly more than as many random ones")


def probe_auroc(s):
    if s["probe_refused"]:
        return Verdict("-", "-", NOT_APPLICABLE, s["probe_refused"])
    best = s["best_probe_layer"]
    auroc, (low, high) = s["probe_auroc"][best], s["probe_auroc_ci"][best]
    pope = s["best_probe_by_family"].get("pope", {})
    measured = (f"AUROC {auroc:.3f} at layer {best} ({s['probe_test_errors']} wrong answers in the test split; "
                f"POPE only: {pope['auroc']:.3f}" if "auroc" in pope else
                f"AUROC {auroc:.3f} at layer {best} ({s['probe_test_errors']} wrong answers in the test split; "
                f"POPE only: {pope.get('not_scored', 'no POPE questions')}") + ")"
    stat = (f"95% CI [{low:.3f}, {high:.3f}]; {s['label_shuffles']} label shuffles: mean "
            f"{s['probe_auroc_shuffled'][best]:.3f}, permutation p = {s['probe_shuffle_p'][best]:.3g}")
    ok = auroc > 0.95 and s["probe_shuffle_p"][best] < ALPHA
    return Verdict(measured, stat, REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "the best probe stays at or below 0.95, or does not beat its shuffled-label probes")


def ablation_set(s, units, top_count=True):
    sets = [r for r in s["ablation"].get("sets", []) if r["units"] == units]
    return (min(sets, key=lambda r: r["count"]) if top_count else max(sets, key=lambda r: r["count"])) if sets else None


def neuron_ablation(s):
    r = ablation_set(s, "mlp_neurons")
    if r is None:
        return Verdict("-", "-", NOT_APPLICABLE, f"not run: {s['ablation'].get('not_run')}")
    measured, stat = top_vs_random(r)
    ok = r["top_vs_random_p"] < ALPHA and r["top_mcnemar_p"] < ALPHA and r["top_minus_random"]["high"] < 0
    return Verdict(f"{r['count']} MLP neurons at layer {s['ablation']['layer']}: drop {pct(r['top_drop'])}; {measured}",
                   stat, REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "the top neurons do not cost significantly more than random ones")


def residual_half_tolerated(s):
    r = ablation_set(s, "residual_dims", top_count=False)
    if r is None:
        return Verdict("-", "-", NOT_APPLICABLE, f"not run: {s['ablation'].get('not_run')}")
    if s["family"] != "qwen2_vl":
        return Verdict(f"{r['count']} of the layer's dims: drop {pct(r['top_drop'])}", "-", NOT_APPLICABLE,
                       f"reported for early-fusion models (PaliGemma, Qwen2-VL); this model is {s['family']}")
    ok = r["top_drop"] <= 0.01 or r["top_mcnemar_p"] >= ALPHA
    return Verdict(f"{pct(r['fraction'])} of the dims at layer {s['ablation']['layer']}: drop {pct(r['top_drop'])}",
                   f"McNemar p = {r['top_mcnemar_p']:.3g}", REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "ablating half the dims costs more than a point, significantly")


def consistency_predicts(s):
    c = s["self_consistency"]
    if "not_run" in c:
        return Verdict("-", "-", NOT_APPLICABLE, f"not run: {c['not_run']}")
    r = c["agreement_correctness"]
    ok = r["r"] > 0 and r["p"] < ALPHA
    return Verdict(f"R_pb = {r['r']:.3f} over {c['questions']} questions (mean agreement {c['mean_agreement']:.2f})",
                   f"95% CI [{r['low']:.3f}, {r['high']:.3f}], p = {r['p']:.3g}", REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "agreement does not correlate positively and significantly with correctness")


def not_run(reason):
    return lambda s: Verdict("-", "-", NOT_APPLICABLE, reason)


CLAIMS = [
    Claim("neglect_zone", "Visual attention follows a U over depth: the middle layers (the neglect zone) give the "
          "image a smaller share than the early and the late layers", "LLaVA-1.5-7B: 0.173-0.210 in layers 8-16",
          "both bootstrap CIs (early minus zone, late minus zone, of the visual fraction) above 0", u_curve),
    Claim("neglect_zone", "VIAR (bias b = 2 on the zone's visual keys) shifts the yes-ratio toward 50%",
          "42.8% -> 50.0%; P(shift) = 99.95%", "McNemar p < 0.05 on the yes decisions and the ratio moves toward 50%",
          viar_yes_ratio),
    Claim("neglect_zone", "VIAR does not significantly change accuracy", "83.6% -> 84.4%, p = 0.132",
          "McNemar p >= 0.05", viar_accuracy),
    Claim("neglect_zone", "The last layer is a language-prior readout: its residual update is nearly the same with "
          "a null image", "cos 0.922 at layer 31", "mean cosine at the last layer >= 0.9", collapse),
    Claim("neglect_zone", "Gradient visual importance falls through the zone", "about 5x over layers 8-16",
          "importance at the zone's first layer / its last layer >= 2.5 (half the reported fall)", gradient_fall),
    Claim("neglect_zone", "Neglect depth does not predict correctness overall", "r = -0.023, n.s.",
          "point-biserial p >= 0.05", depth_overall),
    Claim("neglect_zone", "At the transition layers the per-sample correlation is negative and significant",
          "layer 14: r = -0.154, p = 0.0005", "some layer of 14-17 (of 32, scaled) with r < 0 and p < 0.05",
          depth_transition),
    Claim("neglect_zone", "The U is architecture-independent (LLaVA-Vicuna vs LLaVA-Mistral, r = 0.70) and absent "
          "in Q-Former models", "r = 0.70; InstructBLIP r = -0.005", "-",
          not_run("needs several models of different architectures; the report studies one")),
    Claim("fusion_layers", "Masking the visual states at a few shallow (fusion) layers sharply lowers accuracy",
          "LLaVA-1.5: layers {2, 4, 8, 11, 12, 13}", "at least one layer in the first two thirds whose masking "
          "lowers accuracy with McNemar p < 0.05", fusion_found),
    Claim("fusion_layers", "A review layer near the end: masking it lowers accuracy again", "layer 29 of 32",
          "a layer in the last third whose masking lowers accuracy with McNemar p < 0.05", review_found),
    Claim("fusion_layers", "Contrastive-attention refinement at the review layer raises accuracy",
          "+3.06 points (LLaVA-1.5, six VQA sets)", "refined accuracy higher with McNemar p < 0.05", refinement),
    Claim("update_geometry", "MLP updates bring new directions, attention updates barely do (RID)",
          "attention 0.06, MLP 0.21", "attention's bootstrap CI entirely below the MLP's", rid_order),
    Claim("update_geometry", "Attention reconfigures tokens, the MLP barely does (MixIG)", "attention 0.61, MLP 0.02",
          "attention's bootstrap CI entirely above the MLP's", mix_order),
    Claim("update_geometry", "Attention RID is about the RoPE baseline", "0.06 vs eps_RoPE 0.062",
          "attention RID within a factor 1.5 of eps_RoPE", rope_baseline),
    Claim("update_geometry", "Noise-Δ: high RID, negative MixIG", "0.61 / -0.80",
          "noised attention RID CI above the plain one and MixIG < 0", noise_geometry("noise_delta")),
    Claim("update_geometry", "Noise-QKV: high RID, negative MixIG", "0.44 / -0.50",
          "noised attention RID CI above the plain one and MixIG < 0", noise_geometry("noise_qkv")),
    Claim("update_geometry", "Replacing visual attention updates with noise (Noise-Δ on V) does not hurt",
          "Qwen2.5-VL-3B POPE 86.13 -> 87.58", "not (lower accuracy with McNemar p < 0.05 on every draw)",
          noise_accuracy("noise_delta_visual")),
    Claim("update_geometry", "Replacing visual Q/K/V with Gaussian weights (Noise-QKV on V) does not hurt",
          "(the paper's visual-attention row)", "not (lower accuracy with McNemar p < 0.05 on every draw)",
          noise_accuracy("noise_qkv_visual")),
    Claim("visual_heads", "Masking the early stage's top visual heads costs far more than masking random heads",
          "top-20: POPE about 85 -> 30; random 20: -3 points", "top minus random-mean CI below 0, permutation p < 0.05 "
          "and top vs none McNemar p < 0.05 (k scaled from 20 of 320 heads)", early_top_vs_random),
    Claim("visual_heads", "The late stage's top heads barely matter", "late top-20 barely moves POPE",
          "accuracy drop <= 5 points (k scaled from 20 of 320)", late_top_harmless),
    Claim("visual_heads", "Top heads matter less the later their stage", "top-20 drops 28.21 / 15.34 / 7.21 points",
          "early drop > mid drop > late drop (k scaled from 20 of 320)", stage_order),
    Claim("visual_heads", "In the early stage, more masked heads cost more", "near-linear fall up to 50 heads",
          "early top-k accuracy non-increasing in k and lower at the largest k", early_monotone),
    Claim("visual_heads", "Under the logit lens the answer settles in early layers on POPE, later on look-twice "
          "(counting) questions", "POPE: after the initial layers; Visual General: through the middle layers",
          "the layer from which the answer is top-1 for half the questions is earlier for POPE than for counting",
          lens_settles),
    Claim("visual_heads", "Head scores of a model and its variant correlate strongly", "Pearson > 0.8 (< 0.1 across "
          "families)", "Pearson r > 0.8 with p < 0.05 over heads, against compare_model", heads_correlate),
    Claim("reliability_probes", "Attention-map structure barely correlates with correctness: spatial entropy",
          "R_pb = 0.001, CI [-0.034, 0.036]", "point-biserial p >= 0.05 (spatial entropy at the map layer)",
          uncorrelated("entropy_correctness", "spatial entropy")),
    Claim("reliability_probes", "Attention-map structure barely correlates with correctness: cluster count",
          "R_pb = 0.001, CI [-0.034, 0.036]", "point-biserial p >= 0.05 (top-30% cluster count at the map layer)",
          uncorrelated("clusters_correctness", "cluster count")),
    Claim("reliability_probes", "Removing the top-30% attended patches lowers accuracy", "8.2-11.3 points, p < 0.001",
          "bootstrap CI of the drop above 0 and McNemar p < 0.05", top_patches),
    Claim("reliability_probes", "The top-30% patches matter more than as many random patches",
          "(attention is causally necessary)", "CI of (random - top) accuracy above 0 and McNemar p < 0.05",
          top_vs_random_patches),
    Claim("reliability_probes", "A single-layer linear probe predicts correctness", "AUROC > 0.95 (2 of 3 models)",
          "best layer's test AUROC > 0.95 and above its shuffled-label probes (permutation p < 0.05); n/a when a "
          "split has too few wrong answers", probe_auroc),
    Claim("reliability_probes", "Ablating the probe's top-5 MLP neurons lowers accuracy; random ones do not",
          "-8.3 points (LLaVA)", "top minus random CI below 0, permutation p < 0.05 and top vs none McNemar p < 0.05 "
          "(units ranked by |w| x std)", neuron_ablation),
    Claim("reliability_probes", "Early-fusion models tolerate ablating half the peak layer's hidden dimensions",
          "<= 1 point (PaliGemma, Qwen2-VL)", "drop <= 1 point or McNemar p >= 0.05 (Qwen2-VL family only)",
          residual_half_tolerated),
    Claim("reliability_probes", "Self-consistency (10 samples) predicts correctness", "R_pb = 0.43",
          "agreement rate's point-biserial r > 0 with p < 0.05", consistency_predicts),
]


# ---------------------------------------------------------------------------------------------------------------------


def run_all(out: Path, model: str | None, quick: bool) -> dict[str, dict]:
    """Each study's summary, its outputs under out/NAME, one shared data set under out/data (generated by the first
    study, from the configs' common n_images and seed)."""
    summaries = {}
    (out / "data").mkdir(parents=True, exist_ok=True)  # the first study generates the shared set into it
    for name, study in STUDIES.items():
        config = json.loads(study.CONFIG.read_text())
        config.update(out=str(out / name), data=str(out / "data"), model=model or config.get("model"))
        if quick:
            config.update({k: v for k, v in QUICK.items() if k in config and k != "questions"})
            config["question_files"] = {stem: QUICK["questions"] for stem in config["question_files"]}
        summaries[name] = study.run(config)
    return summaries


def write_report(out: Path, summaries: dict[str, dict], quick: bool) -> str:
    lines = ["# vlmjax: the five papers' claims on one model", "",
             f"Model: `{next(iter(summaries.values()))['model']}`{' (quick run: small sets)' if quick else ''}. "
             "Generated by `python -m experiments.report`; each verdict follows the rule in its row (written in "
             f"`experiments/report.py` before any run), significance level {ALPHA}.", ""]
    counts = {}
    for name, title in PAPERS.items():
        s = summaries[name]
        lines += [f"## {title}", "", f"{s['questions']} questions. Token sets: " +
                  "; ".join(f"{k}: {v}" for k, v in s["tokens"].items()) + ".", ""]
        accuracy = s.get("accuracy", {}).get("all") if isinstance(s.get("accuracy"), dict) else None
        if accuracy:
            lines += [f"Accuracy without intervention: {pct(accuracy['accuracy'])} ({accuracy['wrong']} wrong of "
                      f"{accuracy['n']}).", ""]
        lines += ["| claim | reported | measured | CI / p | rule | verdict |", "|---|---|---|---|---|---|"]
        for claim in (c for c in CLAIMS if c.study == name):
            v = claim.judge(s)
            counts[v.verdict] = counts.get(v.verdict, 0) + 1
            verdict = f"**{v.verdict}**" + (f": {v.evidence}" if v.evidence else "")
            lines.append(f"| {claim.claim} | {claim.reported} | {v.measured} | {v.statistic} | {claim.rule} | "
                         f"{verdict} |")
        lines.append("")
        for png in sorted((out / name).glob("*.png")):
            lines += [f"![{name}]({name}/{png.name})", ""]
    lines[4:4] = [f"Verdicts: {', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}.", ""]
    text = "\n".join(lines)
    (out / "REPORT.md").write_text(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/report", help="output directory (default: %(default)s); a rerun "
                        "resumes every study where it stopped")
    parser.add_argument("--model", help=f"model path or builtin:NAME (default: {common.DEFAULT_MODEL})")
    parser.add_argument("--quick", action="store_true", help=f"small sets for a smoke run: {QUICK}")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, run_all(out, args.model, args.quick), args.quick)
    print(f"wrote {out / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
