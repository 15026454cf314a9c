"""Streaming HF checkpoint reading: each tensor, or only the slices this process's devices hold, placed at once.

The safetensors headers give every tensor's dtype, shape and byte range, so the whole checkpoint is matched against
the model's parameters (missing, unexpected and mis-shaped tensors reported by name) before any data is read. Each
parameter is then built with `jax.make_array_from_callback`: for every local device, the callback reads the stored
rows that device needs, in blocks, and keeps only its columns, converted to vlmjax layout and the target dtype. A stacked [L, ...] parameter starts as a zero buffer on its devices and receives one layer at a time
through a donated in-place update, so no stack is ever built on the host. Host memory thus stays bounded by the
largest single tensor plus what the local devices hold; on a multi-host mesh each process reads only its share.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from converters.hf import _describe, _stacked, _weight_files, expected_shapes, model_module, unflatten
from converters.keymaps import KeyMap, is_ignored
from vlmjax.errors import VlmJaxError

SAFETENSORS_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}


READ_BYTES = 32 << 20  # rows are read in blocks of about this size


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file."""

    key: str
    file: Path
    dtype: np.dtype
    shape: tuple
    offset: int

    def rows(self, handle, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the stored tensor, read (not mapped) into a fresh array."""
        row_items = int(np.prod(self.shape[1:]))
        out = np.empty((stop - start, *self.shape[1:]), self.dtype)
        handle.seek(self.offset + start * row_items * self.dtype.itemsize)
        if handle.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
            raise VlmJaxError(f"{self.file} ends inside tensor {self.key}: the file is truncated; download or "
                              "save it again.")
        return out


def read_header(file: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file (its JSON header: dtype, shape and byte range of each)."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    start = 8 + size
    out = {}
    for key, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise VlmJaxError(f"{file.name}: tensor {key} has dtype {info['dtype']}, which vlmjax does not read.")
        out[key] = StoredTensor(key, file, np.dtype(SAFETENSORS_DTYPES[info["dtype"]]), tuple(info["shape"]),
                                start + info["data_offsets"][0])
    return out


def _our_shape(shape: tuple, transform: str) -> tuple:
    if transform == "linear":
        return shape[::-1]
    if transform == "conv":
        return (int(np.prod(shape[1:])), shape[0])
    return shape


def plan(path: str | os.PathLike, cfg) -> dict[str, dict]:
    """{parameter path: {layer (None for an unstacked parameter): (StoredTensor, transform)}}, checked against
    the shapes the config implies, from the headers alone."""
    path = Path(path)
    keymap = KeyMap(model_module(cfg).KEY_ROWS, cfg)
    shapes = expected_shapes(cfg)
    stored: dict[str, StoredTensor] = {}
    for file in sorted(set(_weight_files(path).values())):
        stored.update(read_header(file))
    out: dict[str, dict] = {p: {} for p in shapes}
    unexpected, tied_head = [], "text/lm_head/kernel" not in shapes
    for key, tensor in stored.items():
        if is_ignored(key):
            continue
        found = keymap.lookup(key)
        if found is None:
            unexpected.append(key)
            continue
        p, layer, transform = found
        if p == "text/lm_head/kernel" and tied_head:
            continue  # tied to the embeddings: HF may still store a copy
        if p not in shapes or (layer is not None and layer >= shapes[p][0]):
            unexpected.append(key)
            continue
        want = shapes[p][1:] if layer is not None else shapes[p]
        if _our_shape(tensor.shape, transform) != tuple(want):
            raise VlmJaxError(
                f"Shape mismatch for {key}: the checkpoint has {_our_shape(tensor.shape, transform)} (after "
                f"conversion to vlmjax layout), config.json implies {tuple(want)}. The config and the weights "
                "disagree: check hidden sizes, head counts and vocab_size in config.json.")
        out[p][layer] = (tensor, transform)
    missing = []
    for p, parts in out.items():
        expected = range(shapes[p][0]) if _stacked(p) else [None]
        absent = [i for i in expected if i not in parts]
        if absent:
            missing.append(_describe(keymap, p, absent))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        raise VlmJaxError(f"The checkpoint in {path} does not match its config ({'; '.join(parts)}). "
                          "Check that config.json belongs to these weights (layer counts, tie_word_embeddings, "
                          "attention_bias), or re-save the model with save_pretrained.")
    return out


def read_slice(tensor: StoredTensor, transform: str, index: tuple, dtype) -> np.ndarray:
    """`index` (slices in vlmjax layout) of one stored tensor, in vlmjax layout and `dtype`. The stored rows it
    needs are read in blocks straight into the result (transposed for linear kernels), so beyond the result only
    one block is held; nothing is memory-mapped, so no file pages count against the process."""
    with open(tensor.file, "rb") as handle:
        if transform == "conv":  # small (the patch embedding): whole, then reshaped
            whole = tensor.rows(handle, 0, tensor.shape[0])
            return np.ascontiguousarray(whole.reshape(tensor.shape[0], -1).T[index], dtype=dtype)
        stored = (index[1], index[0]) if transform == "linear" else index  # the slices in stored layout
        first, last, _ = stored[0].indices(tensor.shape[0])
        shape = tuple(len(range(*sl.indices(n))) for sl, n in zip(index, _our_shape(tensor.shape, transform)))
        out = np.empty(shape, dtype)
        step = max(1, READ_BYTES // max(1, int(np.prod(tensor.shape[1:])) * tensor.dtype.itemsize))
        for start in range(first, last, step):
            stop = min(start + step, last)
            block = tensor.rows(handle, start, stop)[(slice(None), *stored[1:])]
            if transform == "linear":
                out[:, start - first:stop - first] = block.T
            else:
                out[start - first:stop - first] = block
        return out


def _layer_sharding(sharding):
    """The sharding of one layer of a stacked parameter, or None when the layer axis itself is split."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
        if spec and spec[0] is not None:
            return None
        return NamedSharding(sharding.mesh, P(*spec[1:]), memory_kind=sharding.memory_kind)
    return sharding


def _place_stacked(shape, dtype, sharding, parts) -> jax.Array:
    """A stacked [L, ...] parameter built on its devices one layer at a time (a donated in-place update)."""
    layer_sharding = _layer_sharding(sharding)
    if layer_sharding is None:  # the layer axis is split: each device reads its layers' slices directly
        def local(index):
            layers = range(*index[0].indices(shape[0]))
            return np.stack([read_slice(*parts[i], index[1:], dtype) for i in layers])

        return jax.make_array_from_callback(shape, sharding, local)
    stack = jnp.zeros(shape, dtype, device=sharding)
    for i in range(shape[0]):
        layer = jax.make_array_from_callback(shape[1:], layer_sharding,
                                             lambda index, i=i: read_slice(*parts[i], index, dtype))
        stack = _put_layer(stack, layer, i)
    return stack


@functools.partial(jax.jit, donate_argnums=0)
def _put_layer(stack, layer, i):
    """stack[i] = layer, in place (the stack's buffer is donated); the layer axis is not split, so each device
    writes its own part."""
    return jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0)


def load(path: str | os.PathLike, cfg, dtype=jnp.float32, shardings: dict | None = None,
         progress: bool = True) -> dict:
    """The vlmjax parameter tree of an HF checkpoint directory as jax arrays, each placed by `shardings` (a flat
    {path: Sharding}; default: the first local device) as soon as it is read."""
    shapes = expected_shapes(cfg)
    tensors = plan(path, cfg)
    dtype = np.dtype(jnp.dtype(dtype))
    default = SingleDeviceSharding(jax.local_devices()[0])
    out = {}
    bar = tqdm(total=sum(len(v) for v in tensors.values()), desc="placing tensors", unit="tensor",
               disable=not progress)
    for p, shape in shapes.items():
        sharding = (shardings or {}).get(p, default)
        parts = tensors[p]
        if _stacked(p):
            out[p] = _place_stacked(shape, dtype, sharding, parts)
        else:
            out[p] = jax.make_array_from_callback(shape, sharding,
                                                  lambda index, t=parts[None]: read_slice(*t, index, dtype))
        bar.update(len(parts))
    bar.close()
    return unflatten(out)
