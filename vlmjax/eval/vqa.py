"""Open-ended question answering scored with the official VQA accuracy (docs/methods.md §6).

Normalisation, as the official evaluator (VQA v2 `vqaEval.py`) applies it to the prediction and the references:
newlines and tabs become spaces and the ends are stripped; punctuation (`; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`)
is deleted where it touches a space or the text holds a digit-comma-digit group, else replaced by a space; a period
not followed by a digit is deleted; then the text is lower-cased and split on spaces, number words zero..ten (and
"none") become digits, the articles a / an / the are dropped, and apostrophe-less contractions get their apostrophe
back (the common ones of the official table, e.g. "dont" -> "don't"). The official script normalises only when the
references disagree (its references are normalised already); here both sides are always normalised, which gives the
same score on such references and the intended one on raw ones.

Accuracy of a prediction against the annotators' answers: `min(#matches / 3, 1)`; with the usual ten answers it is
averaged over the ten subsets of nine, as the official evaluator does (an answer given by 3 of 10 annotators scores
0.9). A question with a single known answer (the shapes world) lists it as the answer of all ten annotators, so a
match scores 1 and anything else 0.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from vlmjax.data.loaders import VqaRecord, load_vqa
from vlmjax.errors import VlmJaxError
from vlmjax.eval.records import ResultsWriter
from vlmjax.eval.batches import DEFAULT_PROMPT, prompt_length
from vlmjax.generate import generate
from vlmjax.inputs import with_image

ANNOTATORS = 10
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
CONTRACTIONS = {"aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
                "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
                "isnt": "isn't", "itll": "it'll", "lets": "let's", "shouldnt": "shouldn't", "thats": "that's",
                "theres": "there's", "theyre": "they're", "wasnt": "wasn't", "werent": "weren't", "whats": "what's",
                "wont": "won't", "wouldnt": "wouldn't", "youre": "you're"}
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
OPEN_ENDED_KINDS = ("colour", "shape", "count")


def normalize_answer(text: str) -> str:
    """The official VQA normalisation of one answer (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if touches_space or digit_comma else " ")
    out = _PERIOD_NOT_BEFORE_DIGIT.sub("", out)
    words = [NUMBER_WORDS.get(word, word) for word in out.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction: min(#matching references / 3, 1) after normalisation, averaged over
    the leave-one-out subsets when there are ten references (the annotators' answers)."""
    if not references:
        raise VlmJaxError("VQA accuracy needs at least one reference answer.")
    answer = normalize_answer(prediction)
    matches = np.array([normalize_answer(r) == answer for r in references])
    if len(references) != ANNOTATORS:
        return min(int(matches.sum()) / 3, 1.0)
    return float(np.mean([min((matches.sum() - m) / 3, 1.0) for m in matches]))


def references(record: VqaRecord) -> list[str]:
    """The annotators' answers of a question: `extra["answers"]` when the file has them (VQA v2 style, strings or
    {"answer": ...} objects), else its one answer as given by all ten annotators."""
    given = record.extra.get("answers")
    if given:
        return [a["answer"] if isinstance(a, Mapping) else str(a) for a in given]
    return [record.answer] * ANNOTATORS


def open_ended_questions(root, subset: str = "test", kinds: Sequence[str] = OPEN_ENDED_KINDS,
                         limit: int | None = None) -> list[VqaRecord]:
    """The shapes world's open-ended questions (vlmjax.data.shapes): "What color is the X?" (kind "colour"), "What
    shape is the C object?" ("shape") and "How many Xs are in the box [...]?" ("count"), the first `limit` of each
    kind, each record's kind in `extra["kind"]`."""
    unknown = set(kinds) - set(OPEN_ENDED_KINDS)
    if unknown:
        raise VlmJaxError(f"Unknown open-ended kinds {sorted(unknown)}; choose from {OPEN_ENDED_KINDS}.")
    root = Path(root)
    by_kind = defaultdict(list)
    for stem in (f"attribute_{subset}", f"count_{subset}"):
        path = root / f"{stem}.jsonl"
        if not path.is_file():
            raise VlmJaxError(f"No {path.name} in {root}; generate the set with `python -m vlmjax.data.shapes`.")
        for record in load_vqa(str(path), str(root / "images")):
            kind = "count" if record.extra["question_type"] == "count" else record.extra["target"]["attribute"]
            by_kind[kind].append(VqaRecord(**{**record.__dict__, "extra": {**record.extra, "kind": kind}}))
    return [record for kind in kinds for record in by_kind[kind][:limit]]


def evaluate_open_ended(model, processor, questions: Sequence[VqaRecord], out_path, *, batch_size: int = 16,
                        max_new_tokens: int = 4, prompt: str = DEFAULT_PROMPT, hooks=None,
                        generate_options: Mapping | None = None, progress: bool = True) -> list[dict]:
    """Greedy answers to `questions`, each scored with `vqa_accuracy` against `references(record)`; records
    ({id, question, kind, answer, prediction, accuracy}) are appended to `out_path` as batches finish and a rerun
    resumes. Prompts are padded to one length (one compile). `generate_options` go to `vlmjax.generate.generate`
    (e.g. `{"dola_layers": [1, 2]}` to answer with DoLa)."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    texts = {r.question_id: with_image(processor, prompt.format(question=r.question)) for r in questions}
    length = prompt_length(processor, questions[0], texts) if questions else 0
    with ResultsWriter(str(out_path), id_key="id") as writer:
        todo = [r for r in questions if r.question_id in set(writer.pending([r.question_id for r in questions]))]
        bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc="VQA", unit="q",
                   disable=not progress)
        for start in range(0, len(todo), batch_size):
            chunk = list(todo[start:start + batch_size])
            real = len(chunk)
            chunk += [chunk[-1]] * (batch_size - real)  # a full batch keeps one compiled shape
            inputs = processor(images=[r.load_image() for r in chunk], text=[texts[r.question_id] for r in chunk],
                               return_tensors="np", padding="max_length", max_length=length)
            tokens = generate(model, dict(inputs), max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, hooks=hooks, **dict(generate_options or {}))
            answers = tokenizer.batch_decode(tokens[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for r, answer in zip(chunk[:real], answers):
                writer.write({"id": r.question_id, "question": r.question, "kind": r.extra.get("kind"),
                              "answer": r.answer, "prediction": answer.strip(),
                              "accuracy": vqa_accuracy(answer, references(r))})
            bar.update(real)
        bar.close()
        return writer.records


def score_open_ended(records: Iterable[Mapping]) -> dict[str, dict]:
    """Mean VQA accuracy and count per kind and over all records."""
    groups = defaultdict(list)
    for record in records:
        groups[record.get("kind") or "all"].append(record["accuracy"])
        if record.get("kind"):
            groups["all"].append(record["accuracy"])
    return {kind: {"n": len(values), "accuracy": float(np.mean(values))} for kind, values in groups.items()}
