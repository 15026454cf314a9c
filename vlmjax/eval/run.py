"""POPE-style evaluation of a model on a question file: batched, resumable, logged.

Each sample's record (id, question, label, split, generated answer, p_yes, correct) is appended to a JSONL file as
soon as its batch is done; a killed run restarted on the same output skips what is already there. Every prompt is
padded to one length computed over the whole question set, so batches compile once and a sample's numbers do not
depend on which batch it fell in. Answers are generated greedily with the KV cache and parsed the official POPE way;
p_yes comes from the first decode step's yes/no logits (docs/methods.md §6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from vlmjax.data.loaders import PopeRecord
from vlmjax.errors import VlmJaxError
from vlmjax.eval.batches import DEFAULT_PROMPT, null_image, padded_batches  # noqa: F401 (null_image: re-export)
from vlmjax.eval.pope import parse_yes_no, yes_probability
from vlmjax.eval.records import ResultsWriter, ScalarLogger
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
                  hooks=None, logdir=None, progress: bool = True) -> list[dict]:
    """Evaluate `records`, appending to `out_path`; returns every record of the file (earlier runs' included)."""
    tokenizer = processor.tokenizer
    yes_ids, no_ids = answer_token_ids(tokenizer, "yes"), answer_token_ids(tokenizer, "no")
    logger = ScalarLogger(str(logdir)) if logdir else None
    with ResultsWriter(str(out_path), id_key="id") as writer:
        pending = set(writer.pending([r.question_id for r in records]))
        bar = tqdm(total=len(records), initial=len(records) - len(pending), desc="POPE", unit="q",
                   disable=not progress)
        for chunk, real, inputs in padded_batches(processor, records, batch_size, pending=pending, prompt=prompt,
                                                  image_kind=image_kind):
            tokens, first = generate(model, dict(inputs), max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id, hooks=hooks, return_first_logits=True)
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
