"""What every study shares: the default model, the study set (POPE and the harder question families of the shapes
world), resumable fixed-shape phases, first-token answer scoring, TensorBoard scalars and figures, the command line."""

from __future__ import annotations

import argparse
import collections
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

import vlmjax
from vlmjax.errors import VlmJaxError
from vlmjax.eval.batches import padded_batches
from vlmjax.eval.pope import candidate_probabilities, first_token_correct, yes_probability
from vlmjax.eval.records import ResultsWriter, ScalarLogger
from vlmjax.eval.run import answer_token_ids, shapes_image_size

DEFAULT_MODEL = "builtin:llava-shapes"  # the lead switches this to "builtin:llava-shapes-deep" when it ships

# The token sets every study uses (docs/methods.md notation), stated in each summary.
VISUAL_TOKENS = "V: the positions holding the config's image token id, per sample (from the input ids)"
TEXT_AFTER_IMAGE = "T: the real tokens after the sample's last visual token"
LAST_QUERY = "the sample's last real token (the prompt ends with 'ASSISTANT:'; left padding), which predicts the answer"


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
                                        any(o.visible_fraction < 1 for o in scene.objects), scene.n_clutter > 0))
    return chosen


def setup(config: dict):
    """(model, processor, study set, output dir) for a study config: model (None: DEFAULT_MODEL, written back into
    the config), data (None: a set generated under out/data from n_images and seed), question_files, out."""
    from vlmjax.data.shapes import generate_dataset
    from vlmjax.inputs import load_processor

    config["model"] = config.get("model") or DEFAULT_MODEL
    model = vlmjax.load(config["model"], progress=False)
    processor = load_processor(model.path)
    processor.tokenizer.padding_side = "left"
    out = Path(config["out"])
    data = Path(config["data"]) if config.get("data") else out / "data"
    if not (data / "dataset.json").is_file():
        generate_dataset(str(data), config["n_images"], config["seed"], image_size=shapes_image_size(model, processor))
    return model, processor, read_study_set(data, config["question_files"], config["seed"]), out


# ---------------------------------------------------------------------------------------------------------------------
# Scoring


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


def run_phase(path: Path, processor, questions: Sequence[StudyQuestion], batch_size: int, desc: str,
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
                for q, row in zip(chunk[:real], compute(chunk, inputs, repeat)):
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


def main_with_config(run, default_config: Path, argv=None, description: str = "") -> int:
    """Parse --config and the overrides every study shares, run, print the summary."""
    parser = argparse.ArgumentParser(prog=f"python -m {run.__module__}", description=description)
    parser.add_argument("--config", default=str(default_config), help="JSON config of the study (default: %(default)s)")
    parser.add_argument("--model", help=f"model path or builtin:NAME (default: {DEFAULT_MODEL})")
    parser.add_argument("--data", help="a shapes-world dataset directory (default: generate one under OUT/data)")
    parser.add_argument("--out", help="output directory: records, summary.json, figures, tensorboard/")
    parser.add_argument("--n-images", type=int, help="images of the generated dataset (20%% of them test images)")
    parser.add_argument("--questions", type=int,
                        help="questions taken from each question file of the config (a seeded sample; 0: all)")
    parser.add_argument("--batch-size", type=int, help="questions per compiled batch")
    args = parser.parse_args(argv)
    config = json.loads(Path(args.config).read_text())
    config.update({k: v for k, v in vars(args).items() if k not in ("config", "questions") and v is not None})
    if args.questions is not None:
        config["question_files"] = {stem: args.questions for stem in config["question_files"]}
    summary = run(config)
    print(json.dumps(summary, indent=1)[:4000])
    return 0
