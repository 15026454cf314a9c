"""One whole run (data, init, training, saving, evaluation) and its report: held-out POPE accuracy by split, with
black images, and first-token accuracy of the open questions."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from PIL import Image

from vlmjax.data import shapes
from vlmjax.eval.pope import first_token_correct, pope_metrics, says_yes, yes_probability
from vlmjax.eval.run import answer_token_ids
from vlmjax.eval.batches import padded_batches
from vlmjax.train.data import answer_weights, conversations, encode, shapes_questions
from vlmjax.train.loop import starting_point, train
from vlmjax.train.presets import PROMPT, TrainConfig, build_processor, initial_model, token_side


@dataclasses.dataclass(frozen=True)
class HeldOutQuestion:
    """A held-out question in the form the shared batch builder (`eval.batches.padded_batches`) reads."""
    question_id: int
    text: str
    image: Image.Image

    def load_image(self) -> Image.Image:
        return self.image


def held_out_batches(processor, images: dict[str, Image.Image], questions: Sequence[shapes.Sample],
                     batch_size: int, image_kind: str | None = None):
    """(questions of the batch, processor outputs) through `padded_batches`: one prompt length for the whole set,
    left padding, the last batch filled by repetition (its extra rows are dropped here)."""
    records = [HeldOutQuestion(q.question_id, q.question, images[q.image]) for q in questions]
    by_id = {q.question_id: q for q in questions}
    size = min(batch_size, len(records))
    for chunk, real, inputs in padded_batches(processor, records, size, prompt=PROMPT.replace("{image}", "<image>"),
                                              image_kind=image_kind):
        yield [by_id[r.question_id] for r in chunk[:real]], inputs


def evaluate_yes_no(model, processor, images: dict[str, Image.Image], questions: Sequence[shapes.Sample],
                    black_images: bool = False, batch_size: int = 64) -> dict:
    """First-token POPE scoring: p_yes from the yes/no logits after ``ASSISTANT:``; ``pope_metrics`` of the
    decisions (``says_yes``) plus ``p_yes``. With ``black_images`` every image is replaced by a black one."""
    yes_ids, no_ids = (answer_token_ids(processor.tokenizer, word) for word in ("yes", "no"))
    p_yes = []
    for chunk, inputs in held_out_batches(processor, images, questions, batch_size,
                                          "black" if black_images else None):
        logits = np.asarray(model(**inputs, logits="last").logits[: len(chunk), -1])
        p_yes.extend(yes_probability(logits, yes_ids, no_ids).tolist())
    metrics = pope_metrics(["yes" if yes else "no" for yes in says_yes(p_yes)], [q.answer for q in questions])
    return {**metrics, "p_yes": p_yes}


def parameter_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def evaluate_first_token(model, processor, images: dict[str, Image.Image], questions: Sequence[shapes.Sample],
                         batch_size: int = 64) -> dict[str, float]:
    """Accuracy of the most likely first reply token against the (one-word) answer, per question type: the
    held-out figure of the attribute and counting questions, whose answers are single words of the vocabulary."""
    right: dict[str, list[bool]] = {}
    for chunk, inputs in held_out_batches(processor, images, questions, batch_size):
        predicted = np.asarray(model(**inputs, logits="last").logits[: len(chunk), -1]).argmax(-1)
        for q, token in zip(chunk, predicted):
            right.setdefault(q.question_type, []).append(int(token) in answer_token_ids(processor.tokenizer, q.answer))
    return {kind: float(np.mean(values)) for kind, values in right.items()}


def run(cfg: TrainConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Generate data, initialise (or load ``cfg.init_from``), train, save to ``out_dir`` and evaluate on the held-out
    test subset. Training checkpoints into ``out_dir/checkpoints`` (removed once the model and its report are
    written), so a killed run started again with the same settings resumes where it stopped."""
    import vlmjax
    from converters.hf import save_hf

    started = time.perf_counter()
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch_dir:
        processor = build_processor(cfg)
        model = initial_model(cfg, processor, scratch_dir)  # first: a refused init_from costs no data generation
        images, questions = shapes_questions(cfg.n_images, cfg.seed, cfg.image_size, cfg.test_fraction, cfg.tasks)
        train_questions = questions["train"]
        test_questions = [q for q in questions["test"] if q.question_type == "pope"]
        open_questions = [q for q in questions["test"] if q.question_type in ("attribute", "count")]
        weights = answer_weights(train_questions) if cfg.balance_answers else None
        data = encode(processor, images, conversations(train_questions, cfg.seed), token_side(cfg),
                      cfg.label_objects, cfg.label_min_fraction, weights)
        data_seconds = time.perf_counter() - started
        params, history, train_seconds = train(model, data, cfg, progress, out_dir / "checkpoints")
        save_hf(params, model.config, model.hf_config, out_dir, source_dir=model.path)
    trained = vlmjax.load(out_dir, progress=False)
    real = evaluate_yes_no(trained, processor, images, test_questions)
    black = evaluate_yes_no(trained, processor, images, test_questions, black_images=True)
    answers, splits = [q.answer for q in test_questions], np.array([q.split for q in test_questions])
    by_split = lambda result: {split: float(first_token_correct(result["p_yes"], answers)[splits == split].mean())
                               for split in shapes.POPE_SPLITS}
    report = {"config": dataclasses.asdict(cfg), **starting_point(cfg, model), "parameters": parameter_count(params),
              "train_questions": len(train_questions), "train_images": len(data["pixel_values"]),
              "test_questions": len(test_questions), "train_seconds": round(train_seconds, 1),
              "data_seconds": round(data_seconds, 1), "device": jax.devices()[0].device_kind,
              "alignment_loss_last_50": float(np.mean(history["alignment"]["grounding"][-50:]))
              if cfg.alignment_steps else None,
              "answer_loss_first_50": float(np.mean(history["training"]["answer"][:50])),
              "answer_loss_last_50": float(np.mean(history["training"]["answer"][-50:])),
              "grounding_loss_last_50": float(np.mean(history["training"]["grounding"][-50:])),
              "loss_curves_per_100_steps": {f"{stage}.{part}": [round(float(np.mean(v[i:i + 100])), 4)
                                                                 for i in range(0, len(v), 100)]
                                            for stage, parts in history.items() for part, v in parts.items()},
              "test_accuracy": real["accuracy"], "test_accuracy_by_split": by_split(real),
              "test_f1": real["f1"], "test_yes_ratio": real["yes_ratio"],
              "black_image_accuracy": black["accuracy"], "black_image_accuracy_by_split": by_split(black),
              "black_image_yes_ratio": black["yes_ratio"]}
    if open_questions:
        report["test_first_token_accuracy"] = evaluate_first_token(trained, processor, images, open_questions)
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return report
