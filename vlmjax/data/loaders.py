"""Loaders for real question files: POPE JSONL and a generic VQA JSONL, each paired with an image folder.

Both formats have one JSON object per line (blank lines are skipped):
- POPE: ``{"question_id", "image", "text", "label"}`` with label "yes" or "no" (any case; stored lower-case);
- VQA: ``{"question_id", "image", "question", "answer"}`` with a string answer.
Other keys are kept in ``record.extra``. ``image`` is a path relative to the image folder.

Every line is validated and its image file checked for existence while iterating, so a bad file fails at the line
that is wrong, before a long run reaches it; pixels are only read by ``record.load_image()``. Problems raise
``DatasetError`` naming the file, the line number, what is wrong and how to fix it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator

from PIL import Image

from vlmjax.errors import VlmJaxError

POPE_KEYS = ("question_id", "image", "text", "label")
VQA_KEYS = ("question_id", "image", "question", "answer")


class DatasetError(VlmJaxError):
    """A question file or image folder is unusable; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class _ImageRecord:
    question_id: int | str
    image: str
    image_path: str
    line_number: int
    extra: dict = field(default_factory=dict)

    def load_image(self) -> Image.Image:
        """Read the image from disk now, as RGB (not cached, so holding many records holds no pixels)."""
        with Image.open(self.image_path) as image:
            return image.convert("RGB")


@dataclass(frozen=True)
class PopeRecord(_ImageRecord):
    """One POPE question: ``text`` is the question, ``label`` is "yes" or "no"."""

    text: str = ""
    label: str = ""


@dataclass(frozen=True)
class VqaRecord(_ImageRecord):
    """One VQA question with its reference answer."""

    question: str = ""
    answer: str = ""


def _iter_objects(question_file: str, image_dir: str, required: tuple[str, ...]) -> Iterator[tuple[int, dict, str]]:
    """Yield (line number, validated object, image path) for each non-blank line."""
    if not os.path.isfile(question_file):
        raise DatasetError(f"question file {question_file} does not exist. Fix: pass the path of a JSONL file.")
    if not os.path.isdir(image_dir):
        raise DatasetError(f"image folder {image_dir} does not exist (needed for {question_file}). "
                           "Fix: pass the folder that holds the images named in the question file.")
    expected = "a JSON object with keys " + ", ".join(required)
    first_seen: dict = {}
    with open(question_file, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{question_file} line {line_number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{where}: not JSON ({error.msg} at column {error.colno}). "
                                   f"Fix: each line must be {expected}.") from None
            if not isinstance(data, dict):
                raise DatasetError(f"{where}: not a JSON object (got {type(data).__name__}). "
                                   f"Fix: each line must be {expected}.")
            for key in required:
                if key not in data:
                    raise DatasetError(f"{where}: missing key {key!r} (keys present: {', '.join(sorted(data))}). "
                                       f"Fix: each line must be {expected}.")
            for key in required[1:]:
                if not isinstance(data[key], str):
                    raise DatasetError(f"{where}: key {key!r} must be a string, got {data[key]!r}. "
                                       f"Fix: each line must be {expected}.")
            question_id = data["question_id"]
            if not isinstance(question_id, (int, str)) or isinstance(question_id, bool):
                raise DatasetError(f"{where}: question_id must be an integer or a string, got {question_id!r}. "
                                   "Fix: give every question a unique integer or string id.")
            if question_id in first_seen:
                raise DatasetError(f"{where}: duplicate question_id {question_id!r} (first at line "
                                   f"{first_seen[question_id]}). Fix: give every question a unique id.")
            first_seen[question_id] = line_number
            image_path = os.path.join(image_dir, data["image"])
            if not os.path.isfile(image_path):
                raise DatasetError(f"{where}: image {data['image']!r} not found: looked for {image_path} in image "
                                   f"folder {image_dir}. Fix: pass the folder that holds the images as image_dir, "
                                   "or correct the image name in the question file.")
            yield line_number, data, image_path


def iter_pope(question_file: str, image_dir: str) -> Iterator[PopeRecord]:
    """Yield POPE records in file order, validating each line (see module docstring)."""
    for line_number, data, image_path in _iter_objects(question_file, image_dir, POPE_KEYS):
        label = data["label"].strip().lower()
        if label not in ("yes", "no"):
            raise DatasetError(f"{question_file} line {line_number}: label {data['label']!r} is not yes or no. "
                               'Fix: POPE labels must be "yes" or "no".')
        extra = {k: v for k, v in data.items() if k not in POPE_KEYS}
        yield PopeRecord(data["question_id"], data["image"], image_path, line_number, extra, data["text"], label)


def iter_vqa(question_file: str, image_dir: str) -> Iterator[VqaRecord]:
    """Yield generic VQA records in file order, validating each line (see module docstring)."""
    for line_number, data, image_path in _iter_objects(question_file, image_dir, VQA_KEYS):
        extra = {k: v for k, v in data.items() if k not in VQA_KEYS}
        yield VqaRecord(data["question_id"], data["image"], image_path, line_number, extra, data["question"],
                        data["answer"])


def load_pope(question_file: str, image_dir: str) -> list[PopeRecord]:
    """All POPE records of a file; validates every line up front."""
    return list(iter_pope(question_file, image_dir))


def load_vqa(question_file: str, image_dir: str) -> list[VqaRecord]:
    """All VQA records of a file; validates every line up front."""
    return list(iter_vqa(question_file, image_dir))
