"""Converted checkpoints: an orbax-checkpoint parameter tree beside the HF config and processor files.

Layout of a converted directory: config.json (the HF config), vlmjax.json (format marker and dtype), params/
(an orbax PyTree checkpoint), and the tokenizer / processor files copied from the source.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from converters.hf import copy_processor_files
from vlmjax.errors import VlmJaxError

MARKER = "vlmjax.json"
FORMAT = "vlmjax-orbax"


def is_converted(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def save(params: dict, hf_config, out_dir: str | os.PathLike, source_dir=None) -> Path:
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "params"
    if target.exists():
        raise VlmJaxError(f"{target} already exists; choose an empty output directory or delete it first.")
    dtype = str(jax.tree.leaves(params)[0].dtype)
    # Uncompressed, with one array's bytes in flight at a time: orbax otherwise writes every array at once and holds
    # their encoded chunks until they reach the disk, which grew `vlmjax convert` by 1.96x the checkpoint's bytes
    # against 1.41x now (scaled-down 7B shape; 1.22x at the full one, benchmarks/RESULTS.md). The price is disk:
    # 27% more for trained bf16 weights (builtin:llava-shapes-deep).
    in_flight_gb = math.ceil(max(x.nbytes for x in jax.tree.leaves(params)) / 1e6) / 1e3  # orbax counts 1e9 bytes
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, save_concurrent_gb=in_flight_gb)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(target, args=ocp.args.PyTreeSave(jax.tree.map(jnp.asarray, params)))
    hf_config.save_pretrained(str(out_dir))
    (out_dir / MARKER).write_text(json.dumps({"format": FORMAT, "version": 1, "dtype": dtype}, indent=2))
    if source_dir is not None:
        copy_processor_files(source_dir, out_dir)
    return out_dir


def restore(path: str | os.PathLike, abstract_params) -> dict:
    """Restore into the structure, shapes, dtypes and shardings of `abstract_params` (a tree of
    jax.ShapeDtypeStruct): jax arrays, each process reading what its devices hold."""
    path = Path(path).resolve()
    meta = json.loads((path / MARKER).read_text())
    if meta.get("format") != FORMAT:
        raise VlmJaxError(f"{path / MARKER} is not a vlmjax converted checkpoint marker (format {meta.get('format')!r}).")
    if not (path / "params").is_dir():
        raise VlmJaxError(f"{path} has no params/ directory; re-run `vlmjax convert`.")
    try:
        restored = ocp.StandardCheckpointer().restore(path / "params", abstract_params)
    except (ValueError, KeyError) as e:
        raise VlmJaxError(f"The converted checkpoint in {path} does not match its config.json: {e}") from None
    return restored


def stored_dtype(path) -> str:
    return json.loads((Path(path) / MARKER).read_text())["dtype"]
