"""One padded-batch builder for the evaluator and every study: the prompts of a question set, cut into batches of
`size` rows (the last one filled by repeating its last question) and padded to one prompt length computed over the
whole set, so a loop compiles once and a question's numbers never depend on the batch it fell in."""

from __future__ import annotations

from typing import Iterator, Sequence

from PIL import Image

from vlmjax.errors import VlmJaxError
from vlmjax.inputs import with_image

DEFAULT_PROMPT = "USER: <image> {question} ASSISTANT:"
NULL_IMAGES = ("black", "gray")


def null_image(image: Image.Image, kind: str) -> Image.Image:
    """An all-black or mid-gray image of the same size (docs/methods.md §1's null image)."""
    if kind not in NULL_IMAGES:
        raise VlmJaxError(f"Unknown null image {kind!r}; choose one of {NULL_IMAGES}.")
    return Image.new("RGB", image.size, (0, 0, 0) if kind == "black" else (128, 128, 128))


def prompt_texts(processor, records: Sequence, prompt: str = DEFAULT_PROMPT) -> dict:
    """{question id: prompt} with the processor's image placeholder; records have `question_id` and `text`."""
    return {r.question_id: with_image(processor, prompt.format(question=r.text))
            for r in records}


def prompt_length(processor, sample, texts: dict) -> int:
    """The longest prompt of the set once the processor expands the image placeholder, rounded up to a multiple of
    8: the sample's expanded length plus how much longer the longest text tokenises."""
    tokenize = lambda t: len(processor.tokenizer(t)["input_ids"])
    expanded = processor(images=[sample.load_image()], text=[texts[sample.question_id]], return_tensors="np")
    longest = expanded["input_ids"].shape[1] + max(map(tokenize, texts.values())) - tokenize(texts[sample.question_id])
    return int(-(-longest // 8) * 8)


def padded_batches(processor, records: Sequence, size: int, *, pending=None, prompt: str = DEFAULT_PROMPT,
                   image_kind: str | None = None) -> Iterator[tuple[list, int, dict]]:
    """(records of the batch, how many are real, processor outputs) for the records whose id is in `pending`
    (default: all), every batch `size` rows, every prompt one length; `image_kind` replaces each image by a null
    one. The tokenizer pads on the left, so every sample's last real token is the last position."""
    if not records:
        return
    processor.tokenizer.padding_side = "left"
    texts = prompt_texts(processor, records, prompt)
    length = prompt_length(processor, records[0], texts)
    todo = [r for r in records if pending is None or r.question_id in pending]
    for start in range(0, len(todo), size):
        chunk = todo[start:start + size]
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (size - real)
        images = [r.load_image() for r in chunk]
        if image_kind is not None:
            images = [null_image(image, image_kind) for image in images]
        inputs = processor(images=images, text=[texts[r.question_id] for r in chunk], return_tensors="np",
                           padding="max_length", max_length=length)
        yield chunk, real, dict(inputs)
