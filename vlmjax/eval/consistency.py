"""Self-consistency as a reliability signal (docs/methods.md §5): sample K answers per question at temperature 0.7
with nucleus top-p 0.9 and take the frequency of the most common one (the agreement rate, 1/K to 1).

All K samples of a batch of questions run as one batch of B x K rows through `vlmjax.generate` with one PRNG key
(each row draws its own tokens), so a fixed key gives the same samples. Answers are compared after a canonical
form: the VQA normalisation by default, `vlmjax.eval.pope.parse_yes_no` for yes/no questions.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import jax
from PIL import Image

from vlmjax.errors import VlmJaxError
from vlmjax.eval.run import DEFAULT_PROMPT
from vlmjax.eval.vqa import normalize_answer
from vlmjax.generate import generate
from vlmjax.inputs import with_image

SAMPLES, TEMPERATURE, TOP_P = 10, 0.7, 0.9


def agreement_rate(answers: Sequence[str], canonical: Callable[[str], str] = normalize_answer) -> tuple[str, float]:
    """(majority answer, its frequency) among `answers` in canonical form; ties go to the answer seen first."""
    if not answers:
        raise VlmJaxError("Agreement needs at least one sampled answer.")
    majority, count = Counter(canonical(a) for a in answers).most_common(1)[0]
    return majority, count / len(answers)


def self_consistency(model, processor, images: Sequence[Image.Image], questions: Sequence[str], key, *,
                     k: int = SAMPLES, temperature: float = TEMPERATURE, top_p: float = TOP_P,
                     max_new_tokens: int = 4, prompt: str = DEFAULT_PROMPT, batch_size: int = 4,
                     canonical: Callable[[str], str] = normalize_answer, pad_to: int | None = None) -> list[dict]:
    """K sampled answers per (image, question) and their agreement: [{"samples", "majority", "agreement"}].
    `batch_size` questions (x K rows) per generate call; batch j uses `jax.random.fold_in(key, j)`. `pad_to`: pad
    every prompt to this many tokens (else to the batch's longest), so calls with prompts of different lengths
    share one compilation."""
    if len(images) != len(questions):
        raise VlmJaxError(f"{len(images)} images for {len(questions)} questions; pass one image per question.")
    if k < 1:
        raise VlmJaxError(f"k must be at least 1, got {k}.")
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    texts = [with_image(processor, prompt.format(question=q)) for q in questions]
    results = []
    for j, start in enumerate(range(0, len(images), batch_size)):
        chunk = range(start, min(start + batch_size, len(images)))
        inputs = dict(processor(images=[images[i] for i in chunk for _ in range(k)],
                                text=[texts[i] for i in chunk for _ in range(k)], return_tensors="np",
                                padding=True if pad_to is None else "max_length", max_length=pad_to))
        tokens = generate(model, inputs, max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p,
                          key=jax.random.fold_in(key, j), eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
        answers = [a.strip() for a in tokenizer.batch_decode(tokens[:, inputs["input_ids"].shape[1]:],
                                                              skip_special_tokens=True)]
        for n in range(len(chunk)):
            samples = answers[n * k:(n + 1) * k]
            majority, agreement = agreement_rate(samples, canonical)
            results.append({"samples": samples, "majority": majority, "agreement": agreement})
    return results
