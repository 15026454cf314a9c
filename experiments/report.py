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
QUICK = {"n_images": 60, "questions": 8, "noise_repeats": 2, "gradient_questions": 8, "open_ended_per_kind": 8}
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
    low, high = s["bands"]["zone"]["visual_fraction_range"]
    measured = (f"visual fraction: zone (layers {s['zone'][0]}-{s['zone'][-1]}) {low:.3f}-{high:.3f}, mean "
                f"{s['bands']['zone']['visual_fraction']:.3f}; early-minus-zone "
                f"{early['estimate'] if early else float('nan'):.3f}, late-minus-zone "
                f"{late['estimate'] if late else float('nan'):.3f}")
    if not early or not late:
        return Verdict(measured, "-", NOT_APPLICABLE, f"the model's {len(s['visual_fraction'])} layers leave no "
                       "early or no late layers around the scaled zone")
    stat = f"early: {ci(early)}; late: {ci(late)}"
    ok = early["low"] > 0 and late["low"] > 0
    return Verdict(measured, stat, REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "an interval reaches 0 or below: the zone is not below both sides")


def versus_text(v) -> str:
    """A condition against the baseline (the study's `versus`): McNemar, Cohen's h, power, N80, posterior."""
    m, d = v["mcnemar"], v["difference"]
    chi2 = f"chi2 = {m['statistic']:.3g}, " if m["method"] == "chi2" else "exact, "
    test = f"McNemar ({m['only_a_correct']} vs {m['only_b_correct']} discordant; {chi2}p = {m['p_value']:.3g})"
    return (f"{test}; h = {v['cohens_h']:.3f}, power {v['power']:.2f}, N80 = {v['n_for_80_power']:.3g}; "
            f"P(greater) = {pct(v['p_greater'])}, 95% credible [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] points")


def viar_row(s):
    plain = next(v for v in s["viar"] if v["bias"] == 0.0)
    at = [v for v in s["viar"] if v["bias"] == s["viar_bias"]]
    return plain, (at[0] if at else None)


def viar_yes_ratio(s):
    plain, at = viar_row(s)
    if at is None or "yes_ratio" not in at:
        return Verdict("-", "-", NOT_APPLICABLE, f"bias {s['viar_bias']} not swept, or no yes/no questions")
    v = at["vs_baseline"]["yes_ratio"]
    measured = f"yes-ratio {pct(plain['yes_ratio'])} -> {pct(at['yes_ratio'])} (b = {at['bias']})"
    toward = abs(at["yes_ratio"] - 0.5) < abs(plain["yes_ratio"] - 0.5)
    ok = v["mcnemar"]["p_value"] < ALPHA and toward
    why = "the shift is not significant" if v["mcnemar"]["p_value"] >= ALPHA else "the yes-ratio moves away from 50%"
    return Verdict(measured, versus_text(v), REPRODUCED if ok else NOT_REPRODUCED, "" if ok else why)


def viar_accuracy(s):
    plain, at = viar_row(s)
    if at is None or "vs_baseline" not in at:
        return Verdict("-", "-", NOT_APPLICABLE, f"bias {s['viar_bias']} not swept, or no yes/no questions")
    v = at["vs_baseline"]["accuracy"]
    measured = f"yes/no accuracy {pct(v['baseline'])} -> {pct(v['value'])} ({v['n']} questions)"
    p = v["mcnemar"]["p_value"]
    return Verdict(measured, versus_text(v), REPRODUCED if p >= ALPHA else NOT_REPRODUCED,
                   "" if p >= ALPHA else "VIAR changes accuracy significantly on this model")


def vcd_shift(s):
    vcd = s["vcd"]
    if "vs_baseline" not in vcd:
        return Verdict("-", "-", NOT_APPLICABLE, "no yes/no questions")
    acc, yes = vcd["vs_baseline"]["accuracy"], vcd["vs_baseline"]["yes_ratio"]
    measured = (f"accuracy {pct(acc['baseline'])} -> {pct(acc['value'])}, yes-ratio {pct(yes['baseline'])} -> "
                f"{pct(yes['value'])} (a = {vcd['alpha']:g}, beta = {vcd['beta']:g}, noise step {vcd['noise_step']})")
    ok = yes["value"] > yes["baseline"] and yes["mcnemar"]["p_value"] < ALPHA and acc["value"] < acc["baseline"]
    return Verdict(measured, f"yes-ratio: {versus_text(yes)}; accuracy: {versus_text(acc)}",
                   REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "VCD does not both raise the yes-ratio significantly and lower accuracy here")


def threshold_equivalence(s):
    m = s["threshold_matching_viar"]
    if m is None:
        return Verdict("-", "-", NOT_APPLICABLE, f"bias {s['viar_bias']} not swept, or no yes/no questions")
    measured = (f"closest yes-logit shift c = {m['shift']:g} (yes-ratio {m['yes_ratio_gap']:+.3f} from VIAR's); "
                f"accuracy threshold {pct(m['accuracy']['baseline'])}, VIAR {pct(m['accuracy']['value'])}")
    if abs(m["yes_ratio_gap"]) > 0.02:
        return Verdict(measured, "-", NOT_APPLICABLE, "no swept shift matches VIAR's yes-ratio within 2 points "
                       "(widen yes_logit_shifts; a negative c raises the yes-ratio)")
    p = m["accuracy"]["mcnemar"]["p_value"]
    return Verdict(measured, versus_text(m["accuracy"]), REPRODUCED if p >= ALPHA else NOT_REPRODUCED,
                   "" if p >= ALPHA else "VIAR's accuracy differs significantly from the matched threshold's")


def collapse(s):
    last = s["collapse_cosine_last_layer"]
    ok = last["estimate"] >= 0.9
    return Verdict(f"cos at the last layer {last['estimate']:.3f}", ci(last), REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "the last layer's update depends on the image")


def gradient_fall(s):
    fall, zone = s["gradient_zone_fall"], s["zone"]
    if fall is None:
        return Verdict("-", "-", NOT_APPLICABLE, "no gradient questions, or zero importance at the zone's end")
    ratio = fall["estimate"]
    return Verdict(f"importance at layer {zone[0]} / layer {zone[-1]} = {ratio:.2f}x ({s['gradient_questions']} "
                   "questions)", ci(fall, 2), REPRODUCED if ratio >= 2.5 else NOT_REPRODUCED,
                   "" if ratio >= 2.5 else "the importance does not fall several-fold through the zone")


def depth_overall(s):
    c = s["neglect_depth_correlation"]
    if not np.isfinite(c["p"]):
        return Verdict(f"r = {c['r']:.3f}", "-", NOT_APPLICABLE, "correctness or depth is constant: r is undefined")
    ok = not c["p"] < ALPHA
    return Verdict(f"r = {c['r']:.3f}", f"p = {c['p']:.3g}", REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "neglect depth correlates significantly with correctness overall")


def depth_transition(s):
    layers = [l for l in scaled_layers(len(s["per_layer_correlation"]), 14, 17) if l < len(s["per_layer_correlation"])]
    rows = {l: s["per_layer_correlation"][l] for l in layers}
    best = min(rows, key=lambda l: rows[l]["p"] if np.isfinite(rows[l]["p"]) else 2.0)
    r, p = rows[best]["r"], rows[best]["p"]
    if not np.isfinite(p):
        return Verdict(f"layers {layers}", "-", NOT_APPLICABLE, "correctness or depth is constant: r is undefined")
    ok = r < 0 and p < ALPHA
    return Verdict(f"layers {layers}: strongest at layer {best}, r = {r:.3f}", f"p = {p:.3g}",
                   REPRODUCED if ok else NOT_REPRODUCED, "" if ok else "no significant negative correlation there")


# ---------------------------------------------------------------------------------------------------------------------
# Seed 001


def fusion_found(s):
    fusion, drops = s["fusion_layers"], s["drop_at_layer"]
    largest = int(np.argmax([d["estimate"] for d in drops]))
    measured = f"fusion layers {fusion}; largest drop {pct(drops[largest]['estimate'])} at layer {largest}"
    stat = "; ".join(f"L{l}: drop {ci(drops[l])}, McNemar p = {s['mcnemar_p_at_layer'][l]:.3g}" for l in fusion) or "-"
    return Verdict(measured, stat, REPRODUCED if fusion else NOT_REPRODUCED,
                   "" if fusion else "no layer in the first two thirds significantly lowers accuracy when masked")


def review_found(s):
    review = s["review_layer"]
    if review is None:
        return Verdict("none", "-", NOT_REPRODUCED, "no layer in the last third significantly lowers accuracy")
    drop = s["drop_at_layer"][review]
    return Verdict(f"layer {review} of {len(s['drop_at_layer'])}, drop {pct(drop['estimate'])}",
                   f"{ci(drop)}; McNemar p = {s['mcnemar_p_at_layer'][review]:.3g}", REPRODUCED)


def refinement(s):
    r = s["refinement"]
    if r is None:
        return Verdict("-", "-", NOT_APPLICABLE, "no review layer or no fusion layers, so no refinement was run")
    base = s["accuracy"]["all"]["accuracy"]
    ok = r["accuracy"] > base and r["mcnemar_p"] < ALPHA
    return Verdict(f"first-token accuracy {pct(base)} -> {pct(r['accuracy'])}", f"McNemar p = {r['mcnemar_p']:.3g}",
                   REPRODUCED if ok else NOT_REPRODUCED, "" if ok else "no significant gain on this model's set")


def open_ended_gain(system, other, higher=True):
    """`system` has a higher (or, with higher=False, not a different) open-ended VQA accuracy than `other`."""
    def judge(s):
        o = s["open_ended"]
        row, compared = o["systems"].get(system), f"minus_{other}"
        if row is None or compared not in row:
            return Verdict("-", "-", NOT_APPLICABLE, f"{system} was not run (no review layer, no fusion layers, or "
                           "no DoLa candidates) or there are no open-ended questions")
        d, p = row[compared]["difference"], row[compared]["permutation_p"]
        measured = (f"VQA accuracy {pct(o['systems'][other]['accuracy'])} ({other}) vs {pct(row['accuracy'])} "
                    f"({system}), {o['questions']} open-ended questions")
        stat = f"difference {ci(d)}; permutation p = {p:.3g}"
        if higher:
            ok = d["low"] > 0 and p < ALPHA
            return Verdict(measured, stat, REPRODUCED if ok else NOT_REPRODUCED,
                           "" if ok else f"{system} is not significantly above {other}")
        ok = p >= ALPHA
        return Verdict(measured, stat, REPRODUCED if ok else NOT_REPRODUCED,
                       "" if ok else f"{system} differs significantly from {other}")
    return judge


# ---------------------------------------------------------------------------------------------------------------------
# Seed 002


def table_row(s, row):
    return s["table1"].get(row)


def rid_order(s):
    a, m = table_row(s, "attention")["rid"], table_row(s, "ffn")["rid"]
    ok = a["ci"]["high"] < m["ci"]["low"]
    return Verdict(f"RID attention {a['mean']:.3f} (sd {a['std']:.3f}), FFN {m['mean']:.3f} (sd {m['std']:.3f})",
                   f"attention {ci(a['ci'])}; FFN {ci(m['ci'])}", REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "the intervals do not separate attention below the FFN")


def mix_order(s):
    a, m = table_row(s, "attention")["mix_ig"], table_row(s, "ffn")["mix_ig"]
    ok = a["ci"]["low"] > m["ci"]["high"]
    return Verdict(f"MixIG attention {a['mean']:.4f}, FFN {m['mean']:.4f} (|MixIG| <= log 2 under the stated TME)",
                   f"attention {ci(a['ci'], 4)}; FFN {ci(m['ci'], 4)}", REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "the intervals do not separate attention above the FFN")


def rope_baseline(s):
    a, eps = table_row(s, "attention")["rid"]["mean"], s["rope_baseline"]["resid_mid"]["mean"]
    ratio = a / eps if eps > 0 else float("inf")
    ok = 1 / 1.5 <= ratio <= 1.5
    return Verdict(f"attention RID {a:.3f}, eps_RoPE on resid_mid {eps:.3f} (ratio {ratio:.2f}; on the keys "
                   f"{s['rope_baseline']['keys']['mean']:.3f})",
                   f"attention RID - eps_RoPE {ci(s['rope_baseline']['attention_rid_minus_eps'])}",
                   REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "attention RID is not within a factor 1.5 of the RoPE baseline")


def noise_geometry(name):
    def judge(s):
        n = table_row(s, name)
        if n is None:
            return Verdict("-", "-", NOT_APPLICABLE, f"condition {name} not run")
        a = table_row(s, "attention")
        spread = n["rid"]["std_over_repeats"]
        ok = n["rid"]["ci"]["low"] > a["rid"]["ci"]["high"] and n["mix_ig"]["ci"]["high"] < 0
        return Verdict(f"RID {n['rid']['mean']:.3f} (attention {a['rid']['mean']:.3f}), MixIG {n['mix_ig']['mean']:.4f}"
                       + ("" if spread is None else f"; RID sd over {len(n['rid']['per_repeat'])} draws {spread:.3f}"),
                       f"RID {ci(n['rid']['ci'])}; MixIG {ci(n['mix_ig']['ci'], 4)}",
                       REPRODUCED if ok else NOT_REPRODUCED,
                       "" if ok else "noise does not raise RID above the attention interval with MixIG CI below 0")
    return judge


def noise_accuracy(kind, scope):
    def judge(s):
        row = s["accuracy_under_noise"][kind].get(scope)
        if row is None:
            return Verdict("-", "-", NOT_APPLICABLE, f"condition {kind}{update_geometry.SCOPE_SUFFIXES[scope]} not run")
        d = row["accuracy_difference"]
        lower = d["high"] < 0 and row["mcnemar_p_max"] < ALPHA
        return Verdict(f"accuracy {pct(s['accuracy_under_noise']['plain'])} -> {pct(row['accuracy'])} over "
                       f"{len(row['mcnemar_p_per_repeat'])} noise draws",
                       f"difference {ci(d)}; McNemar p (largest over draws) = {row['mcnemar_p_max']:.3g}",
                       NOT_REPRODUCED if lower else REPRODUCED, "noising it significantly lowers accuracy on every "
                       "draw" if lower else "")
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
    measured = (f"r = {r:.3f} over {c['heads']} heads, {s['model']} vs {c['compare_model']}; top-10 shared "
                f"{pct(c['top_heads_shared'])}")
    if not c["variant_of_model"]:
        return Verdict(measured, f"p = {p:.3g}", NOT_APPLICABLE, f"{c['compare_model']} is not a fine-tuned variant "
                       f"of {s['model']} (its training report names no init_from with this model's weights)")
    ok = r > 0.8 and p < ALPHA
    return Verdict(measured, f"p = {p:.3g}", REPRODUCED if ok else NOT_REPRODUCED,
                   "" if ok else "the head scores of the model and its variant do not correlate above 0.8")


def heads_across_families(s):
    return Verdict("-", "-", NOT_APPLICABLE, "not measured: the study compares the model with one compare_model, by "
                   "default its fine-tuned variant (same family); the one shipped model of another family, "
                   "builtin:qwen2-vl-shapes, has 3 layers x 4 heads, the organism 12 x 8, and a correlation over heads "
                   "needs one grid")


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
          "42.8% -> 50.0%; h = 0.049, P(shift) = 99.95%, credible +1.0 to +3.8 points",
          "McNemar p < 0.05 on the yes decisions and the ratio moves toward 50%", viar_yes_ratio),
    Claim("neglect_zone", "VIAR does not significantly change accuracy",
          "83.6% -> 84.4%, p = 0.132; h = 0.007, N80 > 325K, P(better) = 67.8%", "McNemar p >= 0.05",
          viar_accuracy),
    Claim("neglect_zone", "VCD (a = 1) over-corrects: it raises the yes-ratio and lowers accuracy",
          "83.6% / 42.8% -> 79.0% / 62.2%", "yes-ratio higher with McNemar p < 0.05 and accuracy lower than the "
          "baseline's", vcd_shift),
    Claim("neglect_zone", "VIAR's behavioural effect is that of a yes-logit threshold at a matched yes-ratio",
          "equivalent at matched yes-ratios (9K POPE threshold sweep)", "the swept shift c of closest yes-ratio is "
          "within 2 points of VIAR's and VIAR vs it McNemar p >= 0.05 (n/a if none is that close)",
          threshold_equivalence),
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
          "lowers accuracy with McNemar p < 0.05 (the study's selection rule)", fusion_found),
    Claim("fusion_layers", "A review layer near the end: masking it lowers accuracy again", "layer 29 of 32",
          "a layer in the last third whose masking lowers accuracy with McNemar p < 0.05", review_found),
    Claim("fusion_layers", "Contrastive-attention refinement at the review layer raises accuracy (first-token "
          "answers)", "+3.06 points (LLaVA-1.5, six VQA sets)", "refined accuracy higher with McNemar p < 0.05",
          refinement),
    Claim("fusion_layers", "Contrastive attention raises open-ended VQA accuracy", "55.19 -> 58.25 (LLaVA-1.5 "
          "average)", "method minus plain: bootstrap CI above 0 and permutation p < 0.05",
          open_ended_gain("method", "plain")),
    Claim("fusion_layers", "Contrastive attention beats DoLa", "58.25 vs 55.04", "method minus DoLa: bootstrap CI "
          "above 0 and permutation p < 0.05", open_ended_gain("method", "dola")),
    Claim("fusion_layers", "Contrastive attention beats ViCrop", "58.25 vs 56.52", "method minus ViCrop: bootstrap "
          "CI above 0 and permutation p < 0.05", open_ended_gain("method", "vicrop")),
    Claim("fusion_layers", "DoLa barely changes VQA accuracy", "55.19 -> 55.04", "DoLa vs plain: permutation "
          "p >= 0.05", open_ended_gain("dola", "plain", higher=False)),
    Claim("fusion_layers", "ViCrop raises VQA accuracy", "55.19 -> 56.52", "ViCrop minus plain: bootstrap CI above "
          "0 and permutation p < 0.05", open_ended_gain("vicrop", "plain")),
    Claim("update_geometry", "FFN updates bring new directions, attention updates barely do (RID, Table 1)",
          "attention 0.06, FFN 0.21", "attention's bootstrap CI entirely below the FFN's", rid_order),
    Claim("update_geometry", "Attention reconfigures tokens, the FFN barely does (MixIG, Table 1)",
          "attention 0.61, FFN 0.02", "attention's bootstrap CI entirely above the FFN's", mix_order),
    Claim("update_geometry", "Attention RID is about the RoPE baseline", "0.06 vs eps_RoPE 0.062",
          "attention RID within a factor 1.5 of eps_RoPE on the same tensor (resid_mid)", rope_baseline),
    Claim("update_geometry", "Noise-Δ: high RID, negative MixIG (Table 1)", "0.61 / -0.80",
          "Noise-Δ RID CI above the attention's and MixIG CI below 0", noise_geometry("noise_delta")),
    Claim("update_geometry", "Noise-QKV: high RID, negative MixIG (Table 1)", "0.44 / -0.50",
          "Noise-QKV RID CI above the attention's and MixIG CI below 0", noise_geometry("noise_qkv")),
    Claim("update_geometry", "Replacing the visual tokens' attention updates with noise (Noise-Δ at visual query "
          "positions) does not hurt", "Qwen2.5-VL-3B POPE 86.13 -> 87.58", "not (difference CI below 0 and McNemar "
          "p < 0.05 on every draw)", noise_accuracy("noise_delta", "visual")),
    Claim("update_geometry", "Replacing what attention reads from the image with noise (Noise-Δ on visual keys) "
          "does not hurt", "(the paper's visual-attention row)", "not (difference CI below 0 and McNemar p < 0.05 "
          "on every draw)", noise_accuracy("noise_delta", "visual_keys")),
    Claim("update_geometry", "Replacing the visual tokens' Q/K/V with Gaussian weights (Noise-QKV at visual "
          "positions) does not hurt", "(the paper's visual-attention row)", "not (difference CI below 0 and "
          "McNemar p < 0.05 on every draw)", noise_accuracy("noise_qkv", "visual")),
    Claim("update_geometry", "Noise keys and values for the image (Noise-QKV on visual keys) do not hurt",
          "(the paper's visual-attention row)", "not (difference CI below 0 and McNemar p < 0.05 on every draw)",
          noise_accuracy("noise_qkv", "visual_keys")),
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
    Claim("visual_heads", "Head scores of a base model and its fine-tuned variant correlate strongly", "Pearson > 0.8",
          "Pearson r > 0.8 with p < 0.05 over heads, against compare_model (default: builtin:llava-shapes-deep-variant,"
          " the organism fine-tuned further on another seed's data); n/a unless compare_model was trained from the "
          "model", heads_correlate),
    Claim("visual_heads", "Head scores of models of different families do not correlate", "Pearson < 0.1",
          "Pearson r < 0.1 over heads between the model and one of another family with the same head grid",
          heads_across_families),
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


def write_report(out: Path, summaries: dict[str, dict], quick: bool, not_run_studies: dict[str, str] | None = None) -> str:
    """REPORT.md from the studies' summaries; a study in `not_run_studies` ({name: why}) is listed with every claim
    marked "not run" and the reason, never judged."""
    not_run_studies = not_run_studies or {}
    lines = ["# vlmjax: the five papers' claims on one model", "",
             f"Model: `{next(iter(summaries.values()))['model']}`{' (quick run: small sets)' if quick else ''}. "
             "Generated by `python -m experiments.report`; each verdict follows the rule in its row (written in "
             f"`experiments/report.py` before any run), significance level {ALPHA}.", ""]
    counts = {}
    for name, title in PAPERS.items():
        if name in not_run_studies:
            lines += [f"## {title}", "", f"Not run: {not_run_studies[name]}", "",
                      "| claim | reported | verdict |", "|---|---|---|"]
            for claim in (c for c in CLAIMS if c.study == name):
                counts["not run"] = counts.get("not run", 0) + 1
                lines.append(f"| {claim.claim} | {claim.reported} | **not run** |")
            lines.append("")
            continue
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
