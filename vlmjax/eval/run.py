"""POPE-style evaluation of a model on a question file: batched, resumable, logged.

Each sample's record (id, question, label, split, generated answer, p_yes, correct) is appended to a JSONL file as
soon as its batch is done; a killed run restarted on the same output skips what is already there. Every prompt is
padded to one length computed over the whole question set, so batches compile once and a sample's numbers do not
depend on which batch it fell in. Answers are generated greedily with the KV cache and parsed the official POPE way;
p_yes comes from the first decode step's yes/no logits (docs/methods.md §6).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from vlmjax.data.loaders import PopeRecord
from vlmjax.errors import VlmJaxError
from vlmjax.eval.batches import DEFAULT_PROMPT, null_image, padded_batches  # noqa: F401 (null_image: re-export)
from vlmjax.eval.pope import parse_yes_no, yes_probability
from vlmjax.eval.records import ResultsWriter, ScalarLogger
from vlmjax.api import ordered
from vlmjax.generate import generate


def answer_token_ids(tokenizer, word: str) -> list[int]:
    """Vocabulary ids that begin `word` in its usual spellings (lower/capitalised, with/without a leading space)."""
    ids = set()
    for form in (word, word.capitalize(), " " + word, " " + word.capitalize()):
        encoded = tokenizer.encode(form, add_special_tokens=False)
        if encoded and encoded[0] != tokenizer.unk_token_id:
            ids.add(encoded[0])
    if not ids:
        raise VlmJaxError(f"The tokenizer has no token for {word!r}; first-token scoring needs one.")
    return sorted(ids)


def evaluate_pope(model, processor, records: Sequence[PopeRecord], out_path, *, batch_size: int = 16,
                  max_new_tokens: int = 3, prompt: str = DEFAULT_PROMPT, image_kind: str | None = None,
                  hooks=None, logdir=None, progress: bool = True, data=None, overwrite: bool = False,
                  check_finite: bool = True) -> list[dict]:
    """Evaluate `records`, appending to `out_path`; returns every record of the file (earlier runs' included).

    The file's fingerprint (`vlmjax.fingerprint`: the model, these settings and `data`, the dataset directory or
    question file, else the questions themselves) must match for a resume; `overwrite` discards old records.
    With `check_finite`, non-finite first-step logits are traced back to the first site, layer and sample."""
    check_eval_arguments(records, batch_size, max_new_tokens)
    fingerprint = eval_fingerprint(model, records, data, prompt=prompt, max_new_tokens=max_new_tokens,
                                   image_kind=image_kind, hooks=hooks)
    tokenizer = processor.tokenizer
    yes_ids, no_ids = answer_token_ids(tokenizer, "yes"), answer_token_ids(tokenizer, "no")
    logger = ScalarLogger(str(logdir)) if logdir else None
    with ResultsWriter(str(out_path), id_key="id", fingerprint=fingerprint, overwrite=overwrite) as writer:
        pending = set(writer.pending([r.question_id for r in records]))
        bar = tqdm(total=len(records), initial=len(records) - len(pending), desc="POPE", unit="q",
                   disable=not progress)
        for chunk, real, inputs in padded_batches(processor, records, batch_size, pending=pending, prompt=prompt,
                                                  image_kind=image_kind):
            tokens, first = generate(model, dict(inputs), max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id, hooks=hooks, return_first_logits=True)
            if check_finite and not np.isfinite(first).all():
                locate_nonfinite(model, dict(inputs), hooks, [r.question_id for r in chunk[:real]])
            p_yes = yes_probability(first, yes_ids, no_ids)
            answers = tokenizer.batch_decode(tokens[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for r, answer, p in zip(chunk[:real], answers, p_yes):
                writer.write({"id": r.question_id, "question": r.text, "label": r.label,
                              "split": r.extra.get("split"), "prediction": answer.strip(), "p_yes": float(p),
                              "correct": parse_yes_no(answer) == r.label})
            bar.update(real)
            if logger is not None:
                done = writer.records
                logger.log(len(done), accuracy=float(np.mean([d["correct"] for d in done])))
        bar.close()
        results = writer.records
    if logger is not None:
        logger.close()
    return results


def check_eval_arguments(records, batch_size, max_new_tokens) -> None:
    if not records:
        raise VlmJaxError("No questions to evaluate: the question set (or --limit / --splits) selects none.")
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise VlmJaxError(f"{name} must be a positive integer, got {value!r}.")


def eval_fingerprint(model, records, data, **settings) -> dict:
    """What produced an evaluation's records (`vlmjax.fingerprint`)."""
    from vlmjax import fingerprint

    hooks = settings.pop("hooks")
    settings["hooks"] = fingerprint.of_tree(ordered(hooks)) if hooks else None
    if data is None:  # the questions themselves: a resume must ask the same ones
        data = {"questions": fingerprint.of_tree([str((r.question_id, r.text, r.label, r.image)) for r in records])}
    else:
        data = fingerprint.of_data(data)
    return {"model": fingerprint.of_model(model), "settings": settings, "data": data}


def locate_nonfinite(model, inputs, hooks, ids) -> None:
    """Raise naming the first site, layer and sample of a non-finite value (the model's forward with its
    FiniteCheck), for a batch whose generated logits were not finite."""
    where = f" (questions {ids})"
    try:
        model(**inputs, hooks=hooks, logits="last", check_finite=True)
    except VlmJaxError as error:
        raise VlmJaxError(f"{error}{where}") from None
    raise VlmJaxError(f"The first decode step's logits are not finite{where}, though the forward's are.")


def load_shapes_pope(root, subset: str = "test", splits: Sequence[str] = ("random", "popular", "adversarial"),
                     limit: int | None = None) -> list[PopeRecord]:
    """POPE records of a generated shapes dataset (vlmjax.data.shapes), each split's first `limit` questions."""
    from vlmjax.data.loaders import load_pope

    root = Path(root)
    records = []
    for split in splits:
        path = root / f"pope_{subset}_{split}.jsonl"
        if not path.is_file():
            raise VlmJaxError(f"No {path.name} in {root}; generate the set with `python -m vlmjax.data.shapes`.")
        rows = load_pope(str(path), str(root / "images"))[:limit]
        records += [PopeRecord(**{**r.__dict__, "extra": {**r.extra, "split": split}}) for r in rows]
    return records


def shapes_dataset(data, out, n_images: int, seed: int, image_size: int, overwrite: bool = False) -> Path:
    """The shapes-world dataset to evaluate on. `data`, when given, must be a dataset (with its dataset.json) or an
    existing empty directory to generate into; without it the set lives in OUT/data, generated there when absent,
    and refused when it was generated with another n_images, seed or image size (unless `overwrite`, which
    regenerates it). Nothing is ever written into a directory that holds something else, e.g. a model."""
    import shutil

    from vlmjax.data.shapes import generate_dataset

    if data is not None:
        data = Path(data)
        if (data / "dataset.json").is_file():
            return data
        if not data.is_dir():
            raise VlmJaxError(f"--data {data} {'is a file' if data.exists() else 'does not exist'}: pass a shapes-world "
                              "dataset directory (python -m vlmjax.data.shapes DIR), an empty directory to generate "
                              "one into, or leave out --data to generate one into OUT/data.")
        if any(data.iterdir()):
            raise VlmJaxError(f"--data {data} is not a shapes-world dataset (no dataset.json) and is not empty"
                              f"{' (it holds a model: config.json)' if (data / 'config.json').exists() else ''}; "
                              "nothing is generated into it. Pass a dataset directory, an empty one, or leave out "
                              "--data to use OUT/data.")
    else:
        data = Path(out) / "data"
        if (data / "dataset.json").is_file():
            summary = json.loads((data / "dataset.json").read_text())
            wanted = {"n_images": n_images, "seed": seed, "image_size": [image_size, image_size]}
            differ = {k: (summary.get(k), v) for k, v in wanted.items() if summary.get(k) != v}
            if not differ:
                return data
            if not overwrite:
                raise VlmJaxError(f"{data} was generated with {', '.join(f'{k} {a}' for k, (a, _) in differ.items())}, "
                                  f"not {', '.join(f'{k} {b}' for k, (_, b) in differ.items())}: use a fresh output "
                                  "directory, pass --overwrite to regenerate it, or pass it as --data to reuse it.")
            shutil.rmtree(data)
    print(f"generating a shapes-world POPE set ({n_images} images of {image_size}x{image_size}, seed {seed}) in {data}")
    try:
        generate_dataset(str(data), n_images, seed, image_size=image_size)
    except ValueError as error:
        raise VlmJaxError(f"Cannot generate the shapes-world set: {error}.") from None
    return data


def shapes_image_size(model, processor, largest: int = 224) -> int:
    """Side of generated shapes-world images: the vision tower's input size where it has one (LLaVA), else the
    largest square the processor keeps unresized (Qwen2-VL's pixel budget, in multiples of patch x merge size),
    at most ``largest``."""
    side = getattr(model.config.vision, "image_size", None)
    if side:
        return side
    image_processor = processor.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    return min(largest, int(image_processor.size.longest_edge ** 0.5) // factor * factor)
