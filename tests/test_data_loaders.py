import json

import pytest
from PIL import Image

from vlmjax.data.loaders import DatasetError, iter_pope, load_pope, load_vqa


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 6), (10, 20, 30)).save(folder / "a.png")
    Image.new("L", (4, 4), 100).save(folder / "b.png")
    return folder


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _pope_line(question_id, image="a.png", label="yes", **extra):
    return json.dumps({"question_id": question_id, "image": image, "text": "Is there a cat?", "label": label, **extra})


def test_pope_records_load_lazily_with_extras(tmp_path, image_dir):
    path = _write(tmp_path / "pope.jsonl", [_pope_line(1), "", _pope_line(2, "b.png", "No", split="random")])
    records = load_pope(str(path), str(image_dir))
    assert [(r.question_id, r.label, r.line_number) for r in records] == [(1, "yes", 1), (2, "no", 3)]
    assert records[1].extra == {"split": "random"}
    assert records[0].text == "Is there a cat?"
    image = records[1].load_image()
    assert image.mode == "RGB" and image.size == (4, 4)


def test_vqa_records(tmp_path, image_dir):
    line = json.dumps({"question_id": "q7", "image": "a.png", "question": "What color?", "answer": "red", "k": 1})
    (record,) = load_vqa(str(_write(tmp_path / "vqa.jsonl", [line])), str(image_dir))
    assert (record.question_id, record.question, record.answer, record.extra) == ("q7", "What color?", "red", {"k": 1})
    assert record.load_image().getpixel((0, 0)) == (10, 20, 30)


def test_missing_image_names_line_path_and_folder(tmp_path, image_dir):
    path = _write(tmp_path / "pope.jsonl", [_pope_line(1), _pope_line(2, "missing.jpg")])
    with pytest.raises(DatasetError) as error:
        load_pope(str(path), str(image_dir))
    message = str(error.value)
    assert "line 2" in message and str(image_dir / "missing.jpg") in message
    assert f"image folder {image_dir}" in message and "Fix:" in message


def test_errors_surface_lazily_at_the_bad_line(tmp_path, image_dir):
    path = _write(tmp_path / "pope.jsonl", [_pope_line(1), "{oops"])
    records = iter_pope(str(path), str(image_dir))
    assert next(records).question_id == 1
    with pytest.raises(DatasetError, match="line 2"):
        next(records)


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ('{"question_id": 1, "image": "a.png", "text": "x", "label": "yes"', "not JSON"),
        ('["a", "b"]', "not a JSON object"),
        (json.dumps({"question_id": 9, "image": "a.png", "label": "yes"}), "missing key 'text'"),
        (json.dumps({"question_id": 9, "image": "a.png", "text": "x"}), "missing key 'label'"),
        (json.dumps({"image": "a.png", "text": "x", "label": "no"}), "missing key 'question_id'"),
        (_pope_line(9, label="maybe"), "label 'maybe' is not yes or no"),
        (_pope_line(9, label=True), "key 'label' must be a string"),
        (_pope_line(1), "duplicate question_id 1 \\(first at line 1\\)"),
    ],
)
def test_malformed_pope_lines_name_the_line_and_the_problem(tmp_path, image_dir, bad_line, expected):
    path = _write(tmp_path / "pope.jsonl", [_pope_line(1), "", bad_line])
    with pytest.raises(DatasetError, match=expected) as error:
        load_pope(str(path), str(image_dir))
    assert f"{path} line 3:" in str(error.value) and "Fix:" in str(error.value)
    assert isinstance(error.value, ValueError)


def test_malformed_vqa_line(tmp_path, image_dir):
    path = _write(tmp_path / "vqa.jsonl", [json.dumps({"question_id": 1, "image": "a.png", "question": "q"})])
    with pytest.raises(DatasetError, match="line 1: missing key 'answer'"):
        load_vqa(str(path), str(image_dir))


def test_missing_question_file_or_image_folder(tmp_path, image_dir):
    with pytest.raises(DatasetError, match="does not exist"):
        load_pope(str(tmp_path / "nope.jsonl"), str(image_dir))
    path = _write(tmp_path / "pope.jsonl", [_pope_line(1)])
    with pytest.raises(DatasetError, match="image folder .*nowhere does not exist"):
        load_pope(str(path), str(tmp_path / "nowhere"))
