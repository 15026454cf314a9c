"""What every study shares: the default model, the study set (POPE and the harder question families of the shapes
world), resumable fixed-shape phases, first-token answer scoring, TensorBoard scalars and figures, the command line."""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

import vlmjax
from vlmjax import fingerprint
from vlmjax.checks import nearest, positive_int, writable_dir
from vlmjax.errors import VlmJaxError
from vlmjax.eval.batches import padded_batches
from vlmjax.eval.pope import candidate_probabilities, first_token_correct, yes_probability
from vlmjax.eval.records import ResultsWriter, ScalarLogger
from vlmjax.eval.stats import bootstrap_ci, mcnemar, paired_permutation_test
from vlmjax.eval.run import answer_token_ids, shapes_dataset, shapes_image_size

DEFAULT_MODEL = "builtin:llava-shapes-deep"  # the model organism: 12 decoder layers x 8 heads (README)

# The token sets every study uses (docs/methods.md notation), stated in each summary.
VISUAL_TOKENS = "V: the positions holding the config's image token id, per sample (from the input ids)"
TEXT_AFTER_IMAGE = "T: the real tokens after the sample's last visual token"
LAST_QUERY = ("the sample's last real token (the prompt ends with 'ASSISTANT:', to which PaliGemma's processor adds a "
              "newline; left padding), which predicts the answer")

# Config keys that do not change a question's numbers (the fingerprint leaves them out: the model and the data have
# fingerprints of their own, n_images only makes the data), and keys naming decoder layers.
NOT_SETTINGS = ("model", "data", "out", "n_images", "batch_size", "overwrite")
LAYER_KEYS = ("zone", "fusion_layers", "review_layer", "map_layer", "dola_layers", "vicrop_layer")
NULLABLE_TYPES = {"model": str, "data": str, "compare_model": str, "zone": list, "fusion_layers": list,
                  "num_fusion_layers": int, "review_layer": int, "map_layer": int, "dola_layers": list,
                  "vicrop_layer": int}


# ---------------------------------------------------------------------------------------------------------------------
# The study set


@dataclass(frozen=True)
class StudyQuestion:
    """One question of a study set, scored by its first answer token among `candidates` (methods §6)."""

    question_id: int
    image_path: str
    text: str
    answer: str
    family: str  # the question file's family: "pope", "count", "attribute", ...
    split: str  # the POPE split, or the family for the other files
    candidates: tuple[str, ...]  # ("yes", "no") for yes/no questions
    occluded: bool  # the image holds a partly hidden object
    clutter: bool  # the image holds clutter marks
    region: tuple[int, int, int, int] | None = None  # counting questions: the box (x0, y0, x1, y1) in image pixels

    @property
    def yes_no(self) -> bool:
        return self.candidates == ("yes", "no")

    def load_image(self) -> Image.Image:
        return Image.open(self.image_path).convert("RGB")


def read_study_set(root: Path, files: dict[str, int], seed: int) -> list[StudyQuestion]:
    """From a shapes-world dataset: `files` maps a question-file stem (e.g. "pope_test_adversarial", "count_test")
    to how many of its questions to take, a seeded sample spread over all of its images (0: all). Candidates: yes/no
    for POPE-format files; else the answers the file gives to questions of the same kind (same family and target
    attribute)."""
    from vlmjax.data.shapes import Scene, read_questions

    scenes = {s["image"]: Scene.from_json(s) for s in map(json.loads, (root / "scenes.jsonl").open()) if s}
    chosen = []
    for stem, count in files.items():
        path = root / f"{stem}.jsonl"
        if not path.is_file():
            raise VlmJaxError(f"No {path.name} in {root}; choose among "
                              f"{sorted(p.stem for p in root.glob('*_test*.jsonl'))}.")
        samples = read_questions(str(path))
        if count and count < len(samples):
            rows = np.sort(np.random.default_rng([seed, len(chosen)]).choice(len(samples), count, replace=False))
            samples = [samples[i] for i in rows]
        kinds = collections.defaultdict(set)
        for q in samples:
            kinds[q.question_type, q.target.get("attribute")].add(q.answer)
        for q in samples:
            yes_no = q.answer in ("yes", "no") and kinds[q.question_type, q.target.get("attribute")] <= {"yes", "no"}
            candidates = ("yes", "no") if yes_no else tuple(sorted(kinds[q.question_type, q.target.get("attribute")]))
            scene = scenes[q.image]
            chosen.append(StudyQuestion(q.question_id, str(root / "images" / q.image), q.question, q.answer,
                                        q.question_type, q.split or q.question_type, candidates,
                                        any(o.visible_fraction < 1 for o in scene.objects), scene.n_clutter > 0,
                                        q.region))
    return chosen


def setup(config: dict):
    """(model, processor, study set, output dir) for a study config: model (None: DEFAULT_MODEL, written back into
    the config), data (None: a set generated under out/data from n_images and seed), question_files, out. Records
    already in `out` must come from the same model, settings and data (`vlmjax.fingerprint`, kept in
    out/fingerprint.json); config["overwrite"] discards them."""
    from vlmjax import load_processor

    check_values(config)
    config["model"] = config.get("model") or DEFAULT_MODEL
    out = writable_dir(config["out"], "out")
    model = vlmjax.load(config["model"], progress=False)
    check_layers(config, model.num_layers["blocks"])
    processor = load_processor(model.path)
    processor.tokenizer.padding_side = "left"
    data = shapes_dataset(config.get("data"), out, config["n_images"], config["seed"],
                          shapes_image_size(model, processor), config.get("overwrite", False))
    questions = read_study_set(data, config["question_files"], config["seed"])
    if config.get("overwrite"):
        for old in out.glob("*.jsonl"):
            old.unlink()
    settings = {k: v for k, v in config.items() if k not in NOT_SETTINGS}
    fingerprint.claim(out / "fingerprint.json", {"model": fingerprint.of_model(model), "settings": settings,
                                                 "data": fingerprint.of_data(data)},
                      any(out.glob("*.jsonl")), f"The records in {out}")
    return model, processor, questions, out


def check_config(config: dict, defaults: dict) -> None:
    """A study config has exactly the default config's keys, each of the default's type (a list not empty)."""
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise VlmJaxError(f"Unknown config key {unknown[0]!r}.{nearest(unknown[0], sorted(defaults), 'keys')}")
    missing = sorted(set(defaults) - set(config))
    if missing:
        raise VlmJaxError(f"The config lacks the required key(s) {missing}; copy them from the study's default "
                          "config (experiments/NAME.json).")
    for key, default in defaults.items():
        value = config[key]
        if value is None and (default is None or key in LAYER_KEYS):
            continue
        if default is None:  # null by default (the default model, a generated dataset, layers chosen by the study)
            wanted = NULLABLE_TYPES.get(key, object)
            if not isinstance(value, wanted) or isinstance(value, bool):
                raise VlmJaxError(f"Config key {key!r} must be a {wanted.__name__} or null, got {value!r}.")
            continue
        wanted = (int, float) if isinstance(default, float) else type(default)
        if not isinstance(value, wanted) or isinstance(value, bool) != isinstance(default, bool):
            raise VlmJaxError(f"Config key {key!r} must be a {type(default).__name__} like {default!r}, got {value!r}.")
        if isinstance(default, list) and not value:
            raise VlmJaxError(f"Config key {key!r} is an empty list; give at least one value, e.g. {default!r}.")


def check_values(config: dict) -> None:
    """Every number finite (JSON parses NaN and Infinity), every count positive."""
    def walk(key, value):
        if isinstance(value, float) and not math.isfinite(value):
            raise VlmJaxError(f"Config key {key!r} holds {value}, not a finite number.")
        for item in value if isinstance(value, list) else ():
            walk(key, item)

    for key, value in config.items():
        walk(key, value)
    for key in ("batch_size", "n_images"):
        if key in config and (not isinstance(config[key], int) or config[key] < 1):
            raise VlmJaxError(f"Config key {key!r} must be a positive integer, got {config[key]!r}.")


def check_layers(config: dict, num_layers: int) -> None:
    """Layer-valued keys (a zone, fusion / review / map layers) name layers of this model."""
    for key in LAYER_KEYS:
        value = config.get(key)
        for layer in value if isinstance(value, list) else [] if value is None else [value]:
            if not isinstance(layer, int) or not 0 <= layer < num_layers:
                raise VlmJaxError(f"Config key {key!r} holds layer {layer!r}, outside this model's decoder layers "
                                  f"0..{num_layers - 1}.")


# ---------------------------------------------------------------------------------------------------------------------
# Scoring


class NonFiniteLogits(VlmJaxError):
    """A batch's scored logits hold NaN or inf (`run_phase` then locates the first site with `locate_nonfinite`)."""


def locate_nonfinite(model, inputs: dict, ids) -> None:
    """Raise naming the first site, layer and sample where the plain forward of the batch stops being finite
    (`model(..., check_finite=True)`), or, if it is finite, that the study's intervention made the logits overflow."""
    try:
        model(**inputs, logits="last", check_finite=True)
    except VlmJaxError as error:
        raise VlmJaxError(f"{error} (questions {ids})") from None
    raise VlmJaxError(f"The logits under this study's intervention are not finite (questions {ids}), though the plain "
                      "forward's are: the intervention's settings make them overflow.")


class AnswerScorer:
    """First-token answer scoring (methods §6) for a study set: yes/no questions by `p_yes = P(yes) / (P(yes) +
    P(no))` and the shared decision rule (`vlmjax.eval.pope.first_token_correct`); the other families by the
    softmax over their candidates' first-token scores (each candidate: logsumexp over its spellings' first tokens),
    right when the answer's candidate scores highest. Per question: p_answer (probability of the right answer among
    the candidates), correct, and p_yes (NaN for non-yes/no questions)."""

    def __init__(self, tokenizer, questions: Sequence[StudyQuestion]):
        words = sorted({c for q in questions for c in q.candidates})
        self.ids = {word: answer_token_ids(tokenizer, word) for word in words}
        for q in {q.candidates for q in questions}:
            firsts = [i for c in q for i in self.ids[c]]
            if len(firsts) != len(set(firsts)):
                raise VlmJaxError(f"The answers {list(q)} share first tokens; first-token scoring cannot tell them "
                                  "apart.")

    def __call__(self, logits, questions: Sequence[StudyQuestion]) -> dict[str, np.ndarray]:
        """`logits` [..., B, V] (last position) for the batch's questions -> arrays [..., B]."""
        logits = np.asarray(logits, np.float64)
        if not np.isfinite(logits).all():
            raise NonFiniteLogits("The model's logits are not finite (NaN or inf) for this batch.")
        p_answer, correct, p_yes = (np.full(logits.shape[:-1], np.nan) for _ in range(3))
        for b, q in enumerate(questions):
            row = logits[..., b, :]
            if q.yes_no:
                p = yes_probability(row, self.ids["yes"], self.ids["no"])
                p_yes[..., b] = p
                p_answer[..., b] = p if q.answer == "yes" else 1 - p
                correct[..., b] = first_token_correct(p[..., None], [q.answer])[..., 0]
            else:
                probs = candidate_probabilities(row, [self.ids[c] for c in q.candidates])
                index = q.candidates.index(q.answer)
                p_answer[..., b] = probs[..., index]
                correct[..., b] = probs.argmax(-1) == index
        return {"p_answer": p_answer, "correct": correct.astype(bool), "p_yes": p_yes}


def compare_to_random(plain: np.ndarray, top: np.ndarray, random: np.ndarray, seed: int = 0) -> dict:
    """Knocking out chosen units (top heads, top neurons) against as many random ones, from per-question correctness:
    plain [Q] (nothing knocked out), top [Q], random [Q, S] (one column per random draw). Accuracy and drop of each;
    McNemar of top against plain; the bootstrap CI of top minus the random draws' mean accuracy, and the paired
    sign-flip permutation test of that difference, both over questions (each question's random value is the mean of
    its S draws, so the test asks whether the chosen units cost more than random ones on the same questions)."""
    plain, top, random = np.asarray(plain, bool), np.asarray(top, bool), np.asarray(random, float).reshape(len(plain), -1)
    random_accuracy = random.mean(0)
    gap = bootstrap_ci((top.astype(float), random.mean(1)), lambda a, b: np.mean(a - b), seed=seed)
    return {"top_accuracy": float(top.mean()), "top_drop": float(plain.mean() - top.mean()),
            "top_mcnemar_p": mcnemar(plain, top).p_value, "random_accuracies": random_accuracy.tolist(),
            "random_mean_accuracy": float(random_accuracy.mean()),
            "random_std_accuracy": float(random_accuracy.std(ddof=1)) if random.shape[1] > 1 else 0.0,
            "random_mean_drop": float(plain.mean() - random_accuracy.mean()),
            "top_minus_random": {"estimate": gap.estimate, "low": gap.low, "high": gap.high},
            "top_vs_random_p": paired_permutation_test(top, random.mean(1), seed=seed)[1]}


def swept_answers(model, sweep, values, scorer: AnswerScorer):
    """A `run_phase` step that answers each question of a batch under every value of a compiled `make_sweep`:
    one record per question whose lists run over the values (first-token scores at the prompt's last position)."""
    def step(chunk, inputs, _):
        logits = np.asarray(sweep(model.params, model.prepare(inputs)[0], values)["logits"])[:, :, -1]
        scores = scorer(logits, chunk)
        return [score_rows(scores, i) for i in range(len(chunk))]

    return step


def score_rows(scores: dict[str, np.ndarray], index) -> dict:
    """One question's scores (index into the batch axis, the last one) as JSON-ready lists or floats."""
    row = {key: value[..., index] for key, value in scores.items()}
    return {"p_answer": row["p_answer"].tolist(), "correct": row["correct"].tolist(),
            "p_yes": None if np.isnan(row["p_yes"]).all() else row["p_yes"].tolist()}


def accuracy_by_group(records: Sequence[dict], correct: np.ndarray, questions: dict) -> dict:
    """Accuracy overall and per question family, POPE split, occluded and cluttered image (the harder mix)."""
    groups = collections.defaultdict(list)
    for r, c in zip(records, correct):
        q = questions[r["id"]]
        for name in (f"family={q.family}", f"split={q.split}", f"occluded={q.occluded}", f"clutter={q.clutter}"):
            groups[name].append(c)
    table = {"all": {"n": len(correct), "accuracy": float(np.mean(correct)), "wrong": int(np.sum(~correct))}}
    table.update({name: {"n": len(v), "accuracy": float(np.mean(v)), "wrong": int(len(v) - np.sum(v))}
                  for name, v in sorted(groups.items())})
    return table


# ---------------------------------------------------------------------------------------------------------------------
# Resumable phases


def run_phase(model, path: Path, processor, questions: Sequence[StudyQuestion], batch_size: int, desc: str,
              compute: Callable[[list, dict, int], list[dict]], repeats: int = 1) -> list[dict]:
    """Run `compute(questions of the batch, processor outputs, repeat) -> one dict per question of the batch` over
    the pending questions of `path` (a JSONL file a killed run resumes), in fixed-shape batches (the rows past the
    real ones repeat the last question and are dropped); returns the records of `questions` in their order. With
    `repeats` > 1 every question is run that many times (record ids "qid/r"), e.g. for fresh noise draws."""
    ids = [f"{q.question_id}/{r}" if repeats > 1 else q.question_id for r in range(repeats) for q in questions]
    with ResultsWriter(str(path), id_key="id") as writer:
        pending = set(writer.pending(ids))
        bar = tqdm(total=len(ids), initial=len(ids) - len(pending), desc=desc, unit="q")
        for repeat in range(repeats):
            todo = {q.question_id for q in questions if (f"{q.question_id}/{repeat}" if repeats > 1
                                                         else q.question_id) in pending}
            for chunk, real, inputs in padded_batches(processor, questions, batch_size, pending=todo):
                try:
                    rows = compute(chunk, inputs, repeat)
                except NonFiniteLogits:
                    locate_nonfinite(model, inputs, [q.question_id for q in chunk[:real]])
                for q, row in zip(chunk[:real], rows):
                    writer.write({"id": f"{q.question_id}/{repeat}" if repeats > 1 else q.question_id, **row})
                bar.update(real)
        bar.close()
        by_id = {r["id"]: r for r in writer.records}
    return [by_id[i] for i in ids]


# ---------------------------------------------------------------------------------------------------------------------
# Logging: TensorBoard scalars beside the records, PNG figures


def log_curves(out: Path, curves: dict[str, Sequence[float]]) -> None:
    """Each curve as a TensorBoard scalar series under out/tensorboard (tag = key, step = index: a layer, a bias
    index, a k), beside the records, as the evaluator logs its runs."""
    with ScalarLogger(str(out / "tensorboard")) as logger:
        for tag, values in curves.items():
            for step, value in enumerate(values):
                if value is not None and np.isfinite(value):
                    logger.log(step, **{tag: float(value)})


def figure(*shape, size=(7, 3.6)):
    """A matplotlib (figure, axes) on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*shape, figsize=size)


def save_figure(fig, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def read_config(path, defaults: dict) -> dict:
    """A study's JSON config, checked against its default config (`check_config`)."""
    path = Path(path)
    if not path.is_file():
        raise VlmJaxError(f"--config {path} is not a file; pass a study config JSON (e.g. the study's own .json).")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise VlmJaxError(f"--config {path} is not valid JSON ({error}).") from None
    if not isinstance(config, dict):
        raise VlmJaxError(f"--config {path} holds a {type(config).__name__}, not a JSON object of settings.")
    check_config(config, defaults)
    return config


def main_with_config(run, default_config: Path, argv=None, description: str = "") -> int:
    """Parse --config and the overrides every study shares, run, print the summary. A refused input prints
    `error: ...` and returns 2, as the vlmjax command does."""
    parser = argparse.ArgumentParser(prog=f"python -m {run.__module__}", description=description)
    parser.add_argument("--config", default=str(default_config), help="JSON config of the study (default: %(default)s)")
    parser.add_argument("--model", help=f"model path or builtin:NAME (default: {DEFAULT_MODEL})")
    parser.add_argument("--data", help="a shapes-world dataset directory (default: generate one under OUT/data)")
    parser.add_argument("--out", help="output directory: records, summary.json, figures, tensorboard/")
    parser.add_argument("--n-images", type=positive_int, help="images of the generated dataset (20%% of them test images)")
    parser.add_argument("--questions", type=int,
                        help="questions taken from each question file of the config (a seeded sample; 0: all)")
    parser.add_argument("--batch-size", type=positive_int, help="questions per compiled batch")
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="discard records in --out written by another model, settings or data (else refused)")
    args = parser.parse_args(argv)
    try:
        config = read_config(args.config, json.loads(Path(default_config).read_text()))
        config.update({k: v for k, v in vars(args).items() if k not in ("config", "questions") and v is not None})
        if args.questions is not None:
            if args.questions < 0:
                raise VlmJaxError(f"--questions must be 0 (all) or a positive count, got {args.questions}.")
            config["question_files"] = {stem: args.questions for stem in config["question_files"]}
        summary = run(config)
    except VlmJaxError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1)[:4000])
    return 0
