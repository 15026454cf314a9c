"""Hugging Face checkpoint directory <-> vlmjax parameter pytree.

Reading goes one tensor at a time (safetensors, single file or sharded with an index) into preallocated stacked
arrays of the target dtype, so peak host memory is the converted model plus one tensor. Every tensor is checked
against the shape the model expects; missing, unexpected and mis-shaped tensors are reported by name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from converters.keymaps import KeyMap
from vlmjax import models
from vlmjax.errors import VlmJaxError
from vlmjax.models import vlm

PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "preprocessor_config.json", "processor_config.json", "chat_template.json",
    "chat_template.jinja", "generation_config.json",
)
PROCESSOR_DIRS = ("qformer_tokenizer",)  # InstructBLIP's processor keeps its Q-Former tokenizer in a subfolder


def read_hf_config(path: str | os.PathLike):
    """The transformers config of a checkpoint directory, with clear errors for a missing or foreign config."""
    path = Path(path)
    if not path.exists():
        raise VlmJaxError(f"{path} does not exist. vlmjax loads local directories only (no model hub is reached): "
                          "save the checkpoint to a directory (save_pretrained) and pass its path.")
    if not path.is_dir():
        raise VlmJaxError(f"{path} is not a directory. Pass the path of an HF checkpoint directory "
                          "(config.json + *.safetensors) or of a directory written by `vlmjax convert`.")
    if not (path / "config.json").is_file():
        raise VlmJaxError(f"No config.json in {path}. An HF checkpoint directory needs config.json beside its "
                          "*.safetensors files (save it with model.save_pretrained(dir)).")
    from transformers import AutoConfig

    try:
        raw = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise VlmJaxError(f"{path / 'config.json'} is not valid JSON ({error}). The file is corrupt: restore it from "
                          "the checkpoint's source (or re-save the model with save_pretrained).") from None
    if not isinstance(raw, dict):
        raise VlmJaxError(f"{path / 'config.json'} holds a {type(raw).__name__}, not a JSON object: restore it from "
                          "the checkpoint's source.")
    models.family(raw.get("model_type"))  # clear error if unsupported
    return AutoConfig.from_pretrained(str(path))


def model_module(cfg):
    return models.family(cfg.model_type)


def expected_shapes(cfg) -> dict[str, tuple]:
    """Flat {'a/b/c': shape} of the parameters the model expects."""
    flat = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/")
            else:
                flat[prefix + k] = tuple(v)

    walk(vlm.param_shapes(cfg), "")
    return flat


def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}/"))
        else:
            flat[prefix + k] = v
    return flat


def _weight_files(path: Path) -> dict[str, Path]:
    """{hf key: file} from the sharded index, or from the single model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {k: path / f for k, f in weight_map.items()}
        missing = sorted({str(f) for f in files.values() if not f.is_file()})
        if missing:
            raise VlmJaxError(f"The index {index.name} names shard files that are not in {path}: {missing}.")
        return files
    singles = sorted(path.glob("*.safetensors"))
    if not singles:
        extra = " (PyTorch .bin weights are not read: re-save with safe_serialization=True)" if list(
            path.glob("*.bin")) else ""
        raise VlmJaxError(f"No *.safetensors weights in {path}{extra}. Save the model with "
                          "model.save_pretrained(dir) so the directory holds model.safetensors.")
    files = {}
    for f in singles:
        with _open_safetensors(f) as sf:
            files.update({k: f for k in sf.keys()})
    return files


class _open_safetensors:
    """`safe_open` whose failures (a truncated or zero-byte file) name the file and the fix."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        try:
            self.handle = safe_open(str(self.path), framework="flax")
        except (SafetensorError, OSError) as error:  # a truncated, zero-byte or unreadable file
            raise self.refuse(error) from None
        return self.handle.__enter__()

    def __exit__(self, kind, error, trace):
        self.handle.__exit__(kind, error, trace)
        if isinstance(error, SafetensorError):
            raise self.refuse(error) from None

    def refuse(self, error) -> VlmJaxError:
        return VlmJaxError(f"{self.path} is not a readable safetensors file ({error}; "
                           f"{self.path.stat().st_size} bytes): it is truncated or corrupt. Copy it again from the "
                           "checkpoint's source, or re-save the model with save_pretrained.")


def _to_hf(array: np.ndarray, transform: str, hf_shape=None) -> np.ndarray:
    if transform == "linear":
        return array.T
    if transform == "conv":
        return array.T.reshape(hf_shape)
    return array


def _stacked(path: str) -> bool:
    return "/layers/" in path


def _describe(keymap: KeyMap, path: str, layers) -> str:
    template = next(t for t, p, _ in keymap.rows if p == path)
    if "{i}" in template:
        layers = [keymap.hf_layer(path, slot) for slot in layers]
        return template.replace("{i}", str(layers) if len(layers) > 1 else str(layers[0]))
    return template


def save_hf(params: dict, cfg, hf_config, out_dir: str | os.PathLike, source_dir: str | os.PathLike | None = None,
            max_shard_bytes: int = 4 << 30) -> Path:
    """Write vlmjax params as an HF checkpoint directory (newest key layout, sharded safetensors with an index
    when larger than `max_shard_bytes`), with the config and, if `source_dir` is given, its processor files."""
    from safetensors.flax import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = model_module(cfg)
    keymap = KeyMap(module.KEY_ROWS, cfg)
    flat = flatten(jax.tree.map(np.asarray, params))
    conv_shape = module.conv_kernel_shape(cfg)
    tensors = {}
    for p, array in flat.items():
        for key, layer, transform in keymap.hf_keys(p, array.shape[0] if _stacked(p) else None):
            value = array[layer] if layer is not None else array
            tensors[key] = np.ascontiguousarray(_to_hf(value, transform, conv_shape))
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensors[key]
        size += nbytes
    shards.append(current)
    for old in out_dir.glob("model*.safetensors*"):
        old.unlink()
    if len(shards) == 1:
        save_file({k: jnp.asarray(v) for k, v in shards[0].items()}, str(out_dir / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: jnp.asarray(v) for k, v in shard.items()}, str(out_dir / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.nbytes for v in tensors.values())
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf_config.save_pretrained(str(out_dir))
    if source_dir is not None:
        copy_processor_files(source_dir, out_dir)
    return out_dir


def copy_processor_files(source_dir, out_dir):
    if Path(source_dir).resolve() == Path(out_dir).resolve():
        return
    for name in PROCESSOR_FILES:
        src = Path(source_dir) / name
        if src.is_file():
            shutil.copy2(src, Path(out_dir) / name)
    for name in PROCESSOR_DIRS:
        src = Path(source_dir) / name
        if src.is_dir():
            shutil.copytree(src, Path(out_dir) / name, dirs_exist_ok=True)
