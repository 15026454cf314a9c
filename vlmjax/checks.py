"""Refusals before a wrong number can be made: dtypes, hooks against the model and batch, non-finite values.

- `resolve_dtype`: the documented dtypes and their usual aliases (fp32, bf16, fp16); anything else is refused.
- `check_hooks`: every hook is a Hook, names a real site (nearest names suggested), and its indices (positions,
  query indices, target token ids, layers) and per-layer widths fit the model and the batch, checked on the host.
- `FiniteCheck`: a hook recording at every site whether each sample's value is finite, reduced to [B] inside the
  compiled forward (so it costs one pass over values the forward computes anyway); `raise_if_nonfinite` names the
  first site, layer and sample where a value stopped being finite. `model(..., check_finite=True)` uses it; with
  the pure forward, add `finite_hooks()` last to the hooks and pass `out["hooks"]` to `raise_if_nonfinite`.
"""

from __future__ import annotations

import difflib
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.errors import VlmJaxError
from vlmjax.hooks import BLOCK_SITES, GLOBAL_SITES, QFORMER_SITES, STACKS, Capture, Hook

DTYPES = {"float32": "float32", "fp32": "float32", "f32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16"}


def resolve_dtype(dtype):
    """A jnp dtype from a name (float32 / bfloat16 / float16 or fp32 / bf16 / fp16) or a dtype object; None stays
    None. Integer and float64 weights are refused: vlmjax computes in these three float types only."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = dtype.lower()
    else:
        try:
            name = jnp.dtype(dtype).name
        except TypeError:
            name = repr(dtype)
    if name not in DTYPES:
        raise VlmJaxError(f"Unsupported dtype {dtype!r}: vlmjax loads weights as float32, bfloat16 or float16 "
                          "(aliases fp32, bf16, fp16).")
    return jnp.dtype(DTYPES[name])


def nearest(name: str, valid, what: str) -> str:
    """' Did you mean ...?' for a misspelt `name`, followed by the valid names."""
    close = difflib.get_close_matches(str(name), list(valid), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"{hint} Valid {what}: {', '.join(valid)}."


# ---------------------------------------------------------------------------------------------------------------------
# Hooks against the model and the batch


def _concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def _check_sites(name: str, hook: Hook) -> None:
    valid = STACKS[hook.stack] + ((*GLOBAL_SITES, *QFORMER_SITES) if isinstance(hook, Capture) else ())
    sites = getattr(hook, "sites", None) or ()
    if isinstance(getattr(hook, "site", None), str):
        sites = (*sites, hook.site)
    for site in sites:
        if site not in valid:
            full = " (a full name like blocks.3.resid_post goes to vlmjax.probes.capture)" if "." in site and \
                site.split(".")[0] in ("blocks", "vision", "qformer") else ""
            raise VlmJaxError(f"Hook {name!r}: unknown site {site!r}{full}.{nearest(site, valid, 'sites')}")


def _check_range(name: str, field: str, value, size: int, what: str) -> None:
    if not _concrete(value):
        return
    array = np.asarray(value)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer) or array.size == 0:
        return
    if array.min() < 0 or array.max() >= size:
        bad = array[(array < 0) | (array >= size)].flat[0]
        raise VlmJaxError(f"Hook {name!r} field {field!r} holds {int(bad)}, outside {what} [0, {size}).")


def _check_width(name: str, field: str, value, want: tuple, why: str) -> None:
    if _concrete(value) and tuple(np.shape(value)) != want:
        raise VlmJaxError(f"Hook {name!r} field {field!r} has shape {tuple(np.shape(value))}, but {why} needs "
                          f"{want}. Build it with the hook's constructor helper.")


def check_hooks(hooks: Mapping[str, Any], model, batch: Mapping[str, Any]) -> None:
    """Host-side checks of user hooks against the model and a prepared batch (see the module docstring)."""
    from vlmjax.interventions import HeadMask, NeuronAblation

    if not isinstance(hooks, Mapping):
        raise VlmJaxError(f"hooks must be a mapping of names to Hook objects, got {type(hooks).__name__}.")
    text = model.config.text
    length = np.shape(batch["input_ids"])[1]
    for name, hook in hooks.items():
        if not isinstance(hook, Hook):
            raise VlmJaxError(f"Hook {name!r} is a {type(hook).__name__} ({hook!r}), not a Hook: pass an intervention "
                              "or probe object, e.g. vlmjax.interventions.AttentionBias.on_layers(...).")
        _check_sites(name, hook)
        layers = model.num_layers[hook.stack]
        for layer in getattr(hook, "only_layers", None) or ():
            if not 0 <= layer < layers:
                raise VlmJaxError(f"Hook {name!r}: only_layers holds {layer}, but {hook.stack} has layers "
                                  f"0..{layers - 1}.")
        for field in ("positions", "query_index"):
            _check_range(name, field, getattr(hook, field, None), length, "the batch's token positions")
        _check_range(name, "target_ids", getattr(hook, "target_ids", None), text.vocab_size, "the vocabulary")
        if _concrete(getattr(hook, "region_mask", None)):  # (interventions' token masks have their validate)
            _check_width(name, "region_mask", hook.region_mask, np.shape(batch["input_ids"]),
                         "the batch [samples, tokens]")
        for field, value in vars(hook).items():
            if _concrete(value) and hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.floating) \
                    and np.isnan(np.asarray(value, np.float32)).any():
                raise VlmJaxError(f"Hook {name!r} field {field!r} holds NaN (at index "
                                  f"{np.argwhere(np.isnan(np.asarray(value, np.float32)))[0].tolist()}).")
        if isinstance(hook, HeadMask):
            _check_width(name, "keep", hook.keep, (layers, text.num_heads), "[layers, heads] of this model")
        if isinstance(hook, NeuronAblation):
            width = text.intermediate_size if hook.site == "mlp.hidden" else text.hidden_size
            for field in ("keep", "replacement"):
                _check_width(name, field, getattr(hook, field), (layers, width), f"{hook.site} [layers, width]")


# ---------------------------------------------------------------------------------------------------------------------
# Non-finite values, found inside the compiled forward

FINITE = "_finite"  # the hook names `finite_hooks` adds
FINITE_VISION = "_finite_vision"


class FiniteCheck(Hook):
    """Record [B] per site (stacked [L, B] over layers): True where the sample's whole value is finite. At
    attn.scores -inf counts as finite (a ruled-out score). Vision sites' first axis is the image (for Qwen2-VL's
    packed patches, a single row)."""

    def __call__(self, site, value, ctx):
        if not jnp.issubdtype(value.dtype, jnp.floating):
            return value, None
        ok = jnp.isfinite(value) | (value == -jnp.inf) if site == "attn.scores" else jnp.isfinite(value)
        return value, jnp.all(ok.reshape(ok.shape[0], -1), axis=1)


class VisionFiniteCheck(FiniteCheck):
    """FiniteCheck on the vision tower's blocks (its global sites are FiniteCheck's)."""

    stack: ClassVar[str] = "vision.blocks"

    def __call__(self, site, value, ctx):
        return super().__call__(site, value, ctx) if ctx.layer is not None else (value, None)


def finite_hooks() -> dict[str, Hook]:
    """Hooks to append (last, so they see every intervention's result) for `raise_if_nonfinite`."""
    return {FINITE: FiniteCheck(), FINITE_VISION: VisionFiniteCheck()}


def _first_bad(records: Mapping[str, Any]):
    """(site name, layer, bad rows) of the first site in forward order whose record has a False, else None."""
    vision, text = records.get(FINITE_VISION, {}), records.get(FINITE, {})

    def stack(prefix, recs):
        layers = max((np.shape(r)[0] for r in recs.values()), default=0)
        for layer in range(layers):
            for site in BLOCK_SITES:
                if site in recs and not np.asarray(recs[site][layer]).all():
                    return f"{prefix}.{layer}.{site}", layer, np.flatnonzero(~np.asarray(recs[site][layer]))
        return None

    order = [("vision.embed",), ("vision.blocks", vision), ("vision.features",), ("qformer.embed",), ("qformer.out",),
             ("projector.out",), ("embed",),
             ("blocks", text), ("final_norm",), ("logits",)]
    for entry in order:
        if len(entry) == 2:
            found = stack(*entry)
            if found:
                return found
        elif entry[0] in text and not np.asarray(text[entry[0]]).all():
            return entry[0], None, np.flatnonzero(~np.asarray(text[entry[0]]))
    return None


def raise_if_nonfinite(hook_records: dict) -> None:
    """Pop the FiniteCheck records from `out["hooks"]` and raise naming the first non-finite site, if any."""
    records = {name: hook_records.pop(name, {}) for name in (FINITE, FINITE_VISION)}
    found = _first_bad(records)
    if found is None:
        return
    site, layer, rows = found
    where = f"layer {layer}, " if layer is not None else ""
    unit = "image" if site.startswith("vision") else "sample"
    raise VlmJaxError(f"Non-finite value (NaN or inf) first at site {site} ({where}{unit} {rows.tolist()}). Check "
                      "what feeds it: pixel_values, the hooks' parameters (e.g. an infinite bias) or the weights.")


@jax.jit
def _finite_leaves(leaves):
    """Per leaf, whether every value is finite: reduced where the leaf lives (sharded or not), so no weight is
    copied to the host (a host copy would stay cached on each array: a second copy of the model in host memory)."""
    return jnp.stack([jnp.isfinite(leaf).all() for leaf in leaves])


def check_params_finite(params, path) -> None:
    """Refuse weights holding NaN or inf, naming the parameter (e.g. a corrupted checkpoint)."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(params)[0])
    finite = np.asarray(_finite_leaves(list(leaves)))
    if finite.all():
        return
    bad = int(np.flatnonzero(~finite)[0])
    leaf = leaves[bad]
    index = np.unravel_index(int(jnp.argmax(~jnp.isfinite(leaf).reshape(-1))), leaf.shape)
    name = "/".join(str(getattr(k, "key", k)) for k in paths[bad])
    raise VlmJaxError(f"The weights in {path} hold a non-finite value (NaN or inf) in {name} at index "
                      f"{[int(i) for i in index]} (a stacked parameter's first index is the layer). The checkpoint "
                      "is corrupt: re-save it from a good copy.")


# ---------------------------------------------------------------------------------------------------------------------
# Command-line arguments and output directories


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a batch size, a limit, a count)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def dtype_name(text: str) -> str:
    """argparse type: a dtype name resolve_dtype accepts, returned in its canonical spelling."""
    import argparse

    try:
        return resolve_dtype(text).name
    except VlmJaxError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def writable_dir(path, flag: str = "--out"):
    """`path` as a directory this process can write (created if absent); a file, or a read-only place, is refused."""
    import tempfile
    from pathlib import Path

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise VlmJaxError(f"{flag} {path} is a file, not a directory: pass a directory for the results.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        raise VlmJaxError(f"{flag} {path} cannot be written ({error.strerror}): pass a writable directory.") from None
    return path
