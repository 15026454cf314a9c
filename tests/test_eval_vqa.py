"""VQA accuracy with the official normalisation (hand-worked values) and open-ended shapes-world scoring."""


import numpy as np
import pytest

import vlmjax
from vlmjax.builtin import builtin_path
from vlmjax.data.shapes import generate_dataset
from vlmjax.errors import VlmJaxError
from vlmjax.eval.run import shapes_image_size
from vlmjax.eval.vqa import (evaluate_open_ended, normalize_answer, open_ended_questions, references,
                             score_open_ended, vqa_accuracy)


@pytest.mark.parametrize("raw, normal", [
    ("Two dogs.", "2 dogs"),
    ("the Red, circle!", "red circle"),  # ", " touches a space: deleted; "!" does not: a space, then stripped
    ("yes/no", "yes no"),
    ("1,000 ", "1000"),  # a digit-comma-digit group: every punctuation mark is deleted
    ("3.5", "3.5"),  # a period before a digit stays
    ("An\tOVAL", "oval"),
    ("dont know", "don't know"),
    ("none", "0"),
    ("(a) ten", "10"),
])
def test_normalisation(raw, normal):
    assert normalize_answer(raw) == normal


def test_accuracy_hand_worked():
    ten = lambda k, answer="red": [answer] * k + ["blue"] * (10 - k)
    # leave-one-out over ten: k matches -> (k * min((k-1)/3, 1) + (10-k) * min(k/3, 1)) / 10
    assert vqa_accuracy("Red.", ten(0)) == 0.0
    assert vqa_accuracy("red", ten(1)) == pytest.approx(0.3)
    assert vqa_accuracy("red", ten(2)) == pytest.approx(0.6)
    assert vqa_accuracy("the red", ten(3)) == pytest.approx(0.9)
    assert vqa_accuracy("RED", ten(4)) == 1.0
    assert vqa_accuracy("two", ten(3, "2")) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["2", "two"]) == pytest.approx(2 / 3)  # fewer than ten: min(#matches / 3, 1)
    assert vqa_accuracy("3", ["2"]) == 0.0
    with pytest.raises(VlmJaxError, match="reference"):
        vqa_accuracy("red", [])


def test_open_ended_shapes_questions_and_greedy_scoring(tmp_path):
    model = vlmjax.load("builtin:llava-shapes", progress=False)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(builtin_path("llava-shapes"))
    root = tmp_path / "data"
    generate_dataset(str(root), 12, seed=3, image_size=shapes_image_size(model, processor), test_fraction=0.5,
                     progress=False)
    questions = open_ended_questions(root, limit=3)
    kinds = [q.extra["kind"] for q in questions]
    assert set(kinds) == {"colour", "shape", "count"} and all(kinds.count(k) <= 3 for k in kinds)
    for q in questions:
        assert references(q) == [q.answer] * 10
        prefix = {"colour": "What color is the", "shape": "What shape is the", "count": "How many"}[q.extra["kind"]]
        assert q.question.startswith(prefix)
    out = tmp_path / "vqa.jsonl"
    records = evaluate_open_ended(model, processor, questions[:5], out, batch_size=4, progress=False)
    assert [r["id"] for r in records] == [q.question_id for q in questions[:5]]
    for r in records:
        assert r["accuracy"] == (1.0 if normalize_answer(r["prediction"]) == normalize_answer(r["answer"]) else 0.0)
    again = evaluate_open_ended(model, processor, questions, out, batch_size=4, progress=False)  # resumes
    assert again[:5] == records and len(again) == len(questions)
    assert len(out.read_text().splitlines()) == len(questions)
    table = score_open_ended(again)
    assert table["all"]["n"] == len(questions)
    assert table["all"]["accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in again]))
    with pytest.raises(VlmJaxError, match="kinds"):
        open_ended_questions(root, kinds=("size",))
