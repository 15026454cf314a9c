"""POPE scoring exactly as docs/methods.md §6 defines it: the official answer parser, the confusion-matrix metrics with
the yes-ratio of the PREDICTIONS, and first-token calibration (p_yes, Brier score, ECE).

Conventions
- "yes" is the positive class. Precision is NaN when nothing is predicted "yes", recall is NaN when no label is "yes",
  F1 is NaN when either is NaN (the official script would divide by zero).
- A first-token prediction is "yes" when ``p_yes >= 0.5``; its confidence is ``max(p_yes, 1 - p_yes)``.
- ECE uses 10 equal-width bins over [0, 1] (the usual convention of Guo et al. 2017), right-closed: with edges
  ``np.linspace(0, 1, 11)``, bin k holds confidences in ``(edges[k], edges[k+1]]`` and bin 0 also holds 0. Since
  confidence is at least 0.5, only the upper half is ever populated; ``(0.4, 0.5]`` holds the undecided p_yes = 0.5.
  ECE = sum over bins of ``(n_bin / n) * |accuracy_bin - mean_confidence_bin|``.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

POPE_SPLIT_ORDER = ("random", "popular", "adversarial")
_NEGATION_WORDS = ("No", "not", "no")


def parse_yes_no(answer: str) -> str:
    """POPE's official parser: keep the text before the first '.', drop commas, split on single spaces; "no" if any
    word is exactly "No", "not" or "no", else "yes" (so "Nope", "NO" and an empty answer all count as "yes")."""
    first_sentence = answer.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if any(word in _NEGATION_WORDS for word in words) else "yes"


def _as_label(value: str) -> str:
    label = value.strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f'label {value!r} is not "yes" or "no"')
    return label


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio (of the predictions) from parsed "yes"/"no" lists, plus counts."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not predictions:
        raise ValueError("no predictions to score")
    pred = np.array([_as_label(p) == "yes" for p in predictions])
    gold = np.array([_as_label(g) == "yes" for g in labels])
    tp, fp = int(np.sum(pred & gold)), int(np.sum(pred & ~gold))
    tn, fn = int(np.sum(~pred & ~gold)), int(np.sum(~pred & gold))
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    if math.isnan(precision) or math.isnan(recall):
        f1 = math.nan
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": len(pred), "accuracy": (tp + tn) / len(pred), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / len(pred), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def says_yes(p_yes) -> np.ndarray:
    """The first-token decision, the one place it is made: "yes" (True) where ``p_yes >= 0.5``."""
    return np.asarray(p_yes, dtype=np.float64) >= 0.5


def first_token_correct(p_yes, labels: Sequence[str]) -> np.ndarray:
    """bool [..., Q]: whether each first-token decision (``says_yes``) matches its "yes"/"no" label; ``p_yes`` may
    carry leading axes (conditions of a sweep) before the question axis."""
    truth = np.array([_as_label(label) == "yes" for label in labels])
    return says_yes(p_yes) == truth


def yes_probability(logits, yes_token_ids: Sequence[int], no_token_ids: Sequence[int]) -> np.ndarray:
    """``p_yes = P(yes) / (P(yes) + P(no))`` from first-decode-step logits or log-probs of shape (..., vocab).

    P(yes) sums the probabilities of all ``yes_token_ids`` (e.g. "yes", "Yes", "▁yes") via logsumexp, likewise
    P(no); the softmax normaliser cancels, so logits and log-probs give the same result. Returns shape (...).
    """
    yes_ids, no_ids = sorted(set(map(int, yes_token_ids))), sorted(set(map(int, no_token_ids)))
    if not yes_ids or not no_ids:
        raise ValueError("yes_token_ids and no_token_ids must each hold at least one token id")
    if set(yes_ids) & set(no_ids):
        raise ValueError(f"token ids {sorted(set(yes_ids) & set(no_ids))} are in both the yes and the no list")
    scores = np.asarray(logits, dtype=np.float64)
    vocab = scores.shape[-1]
    if max(yes_ids + no_ids) >= vocab or min(yes_ids + no_ids) < -vocab:
        raise ValueError(f"token ids {yes_ids + no_ids} out of range for a vocabulary of {vocab}")
    log_yes = _logsumexp(scores[..., yes_ids])
    log_no = _logsumexp(scores[..., no_ids])
    return 1.0 / (1.0 + np.exp(log_no - log_yes))


def candidate_probabilities(logits, candidate_token_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """[..., C]: the first-token probability of each of C candidate answers renormalised over the candidates, each
    candidate's score the logsumexp of its spellings' first tokens (``yes_probability`` for more than two answers)."""
    scores = np.asarray(logits, dtype=np.float64)
    per_candidate = np.stack([_logsumexp(scores[..., sorted(set(map(int, ids)))]) for ids in candidate_token_ids], -1)
    weights = np.exp(per_candidate - per_candidate.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


def _logsumexp(values: np.ndarray) -> np.ndarray:
    peak = np.max(values, axis=-1, keepdims=True)
    return np.squeeze(peak, -1) + np.log(np.sum(np.exp(values - peak), axis=-1))


def _probabilities_and_truth(p_yes, labels) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(p_yes, dtype=np.float64).ravel()
    truth = np.array([_as_label(label) == "yes" for label in labels], dtype=np.float64)
    if probs.shape != truth.shape:
        raise ValueError(f"{probs.size} probabilities but {truth.size} labels")
    if probs.size == 0:
        raise ValueError("no probabilities to score")
    if np.any((probs < 0) | (probs > 1)) or np.any(np.isnan(probs)):
        raise ValueError("p_yes values must lie in [0, 1]")
    return probs, truth


def brier_score(p_yes, labels: Sequence[str]) -> float:
    """``mean((p_yes - gt)^2)`` with gt = 1 for "yes", 0 for "no"."""
    probs, truth = _probabilities_and_truth(p_yes, labels)
    return float(np.mean((probs - truth) ** 2))


def expected_calibration_error(p_yes, labels: Sequence[str], n_bins: int = 10) -> float:
    """ECE of the first-token yes/no decision over ``n_bins`` equal-width confidence bins (see module docstring)."""
    probs, truth = _probabilities_and_truth(p_yes, labels)
    confidence = np.maximum(probs, 1.0 - probs)
    correct = (says_yes(probs) == (truth == 1.0)).astype(np.float64)
    inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    bins = np.searchsorted(inner_edges, confidence, side="left")  # edges[k] < confidence <= edges[k + 1]
    ece = 0.0
    for b in np.unique(bins):
        members = bins == b
        ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def _score_group(records: list[Mapping]) -> dict:
    predictions = [parse_yes_no(r["prediction"]) for r in records]
    labels = [r["label"] for r in records]
    scores = pope_metrics(predictions, labels)
    with_p = [r.get("p_yes") is not None for r in records]
    if all(with_p):
        p_yes = [r["p_yes"] for r in records]
        scores["brier"] = brier_score(p_yes, labels)
        scores["ece"] = expected_calibration_error(p_yes, labels)
    elif any(with_p):
        raise ValueError(f"{sum(with_p)} of {len(records)} records have p_yes; give it for all records or for none")
    return scores


def score_pope(records: Iterable[Mapping]) -> dict[str, dict]:
    """Score records ``{"prediction": raw answer text, "label": "yes"/"no", "split"?: str, "p_yes"?: float}``.

    Returns ``{split: metrics}`` for each split (in POPE's order, then alphabetical; records without a split go to
    "all") and ``"overall"`` pooled over every record. Brier and ECE are included when records carry ``p_yes``.
    """
    records = list(records)
    if not records:
        raise ValueError("no records to score")
    groups: dict[str, list[Mapping]] = {}
    for record in records:
        groups.setdefault(record.get("split") or "all", []).append(record)
    order = sorted(groups, key=lambda s: (POPE_SPLIT_ORDER.index(s) if s in POPE_SPLIT_ORDER else 99, s))
    table = {split: _score_group(groups[split]) for split in order}
    table["overall"] = _score_group(records)
    return table


def format_table(table: Mapping[str, Mapping]) -> str:
    """Readable fixed-width table of ``score_pope`` output: percentages for rates, three decimals for Brier/ECE."""
    columns = [("n", "n", "{:d}"), ("accuracy", "acc", "{:.1f}"), ("precision", "prec", "{:.1f}"),
               ("recall", "rec", "{:.1f}"), ("f1", "F1", "{:.1f}"), ("yes_ratio", "yes%", "{:.1f}"),
               ("brier", "Brier", "{:.3f}"), ("ece", "ECE", "{:.3f}")]
    percent = {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    shown = [c for c in columns if any(c[0] in row for row in table.values())]
    width = max([len("split")] + [len(s) for s in table])
    lines = [f"{'split':<{width}}" + "".join(f"{title:>8}" for _, title, _ in shown)]
    for split, row in table.items():
        cells = []
        for key, _, fmt in shown:
            value = row.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append(f"{'-':>8}")
            else:
                cells.append(f"{fmt.format(value * 100 if key in percent else value):>8}")
        lines.append(f"{split:<{width}}" + "".join(cells))
    return "\n".join(lines)
