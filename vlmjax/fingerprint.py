"""Fingerprints of what produced a results file, so that a resume never mixes records of two runs.

A fingerprint is a small JSON dict with three parts: `model` (its resolved path and hashes of config.json and of
the weights index: each weight file's name, size and first and last MiB, which hold the safetensors header and
differ between any two trainings), `settings` (whatever changes the numbers: dtype, prompt, hooks, a study's
config) and `data` (a hash of the question set's files). It is written beside the records
(`results.jsonl` -> `results.fingerprint.json`) when a run starts; a run that finds records on disk resumes only if
the stored fingerprint equals its own, and is otherwise refused with a message naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from vlmjax.errors import VlmJaxError

_EDGE = 1 << 20  # bytes read from each end of a weight file


def _sha(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()[:16]


def _file_edges(path: Path) -> bytes:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(_EDGE)
        handle.seek(max(size - _EDGE, len(head)))
        return f"{path.name}:{size}:".encode() + head + handle.read()


def of_model(model) -> dict:
    """Model identity: resolved path, hash of config.json, hash of the weights index (+ stored dtype)."""
    path = Path(model.path).resolve()
    weights = sorted(p for p in path.rglob("*") if p.is_file() and (
        p.suffix == ".safetensors" or p.name.endswith(".index.json") or p.relative_to(path).parts[0] == "params"))
    return {"path": str(path), "config": _sha((path / "config.json").read_bytes()),
            "weights": _sha(*(_file_edges(p) for p in weights)), "dtype": str(model.dtype)}


def of_data(source) -> dict:
    """Dataset identity: a shapes-world directory (its dataset.json and question files) or a question file."""
    source = Path(source).resolve()
    if source.is_dir():
        files = [source / "dataset.json", *sorted(source.glob("*.jsonl"))]
    else:
        files = [source]
    return {"path": str(source), "hash": _sha(*(f.name.encode() + f.read_bytes() for f in files if f.is_file()))}


def of_tree(tree) -> str:
    """A hash of a pytree (e.g. hooks): its structure and static fields, and the bytes of its arrays."""
    import jax

    leaves, treedef = jax.tree.flatten(tree)
    return _sha(str(treedef).encode(), *(np.asarray(x).tobytes() + str(np.shape(x)).encode() for x in leaves))


def differences(stored: Mapping, current: Mapping, where: tuple[str, str] = ("on disk", "now"),
                prefix: str = "") -> list[str]:
    """Every leaf of two nested dicts that differs, as "a.b: stored-value on disk, current-value now"."""
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += differences(a, b, where, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {json.dumps(a)} {where[0]}, {json.dumps(b)} {where[1]}")
    return out


def sidecar(records_path) -> Path:
    """Where the fingerprint of a records file lives: `x.jsonl` -> `x.fingerprint.json`."""
    path = Path(records_path)
    return path.with_name(path.stem + ".fingerprint.json")


def claim(fingerprint_path, fingerprint: Mapping[str, Any], has_records: bool, records: str) -> None:
    """Refuse to add to `records` (which `has_records`) unless the stored fingerprint equals `fingerprint`; then
    store it. The message names every differing part (model, settings, data) and the two ways out."""
    fingerprint_path = Path(fingerprint_path)
    fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back: tuples as lists
    fix = ("Resume only with the model, settings and data that wrote them: write to a fresh output directory, "
           "or pass --overwrite (overwrite=True) to discard the old records.")
    if has_records:
        if not fingerprint_path.is_file():
            raise VlmJaxError(f"{records} holds records but no fingerprint ({fingerprint_path.name} is missing), so "
                              f"nothing says which model and settings produced them. {fix}")
        try:
            stored = json.loads(fingerprint_path.read_text())
        except json.JSONDecodeError:
            raise VlmJaxError(f"{fingerprint_path} is not valid JSON. {fix}") from None
        differing = differences(stored, fingerprint)
        if differing:
            kinds = sorted({d.split(".")[0].split(":")[0] for d in differing})
            raise VlmJaxError(f"{records} was written with a different {' and '.join(kinds)}: "
                              f"{'; '.join(differing)}. {fix}")
    temporary = fingerprint_path.with_name(fingerprint_path.name + ".tmp")
    temporary.write_text(json.dumps(fingerprint, indent=1))
    os.replace(temporary, fingerprint_path)
