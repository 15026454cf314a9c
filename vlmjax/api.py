"""The user-facing model object: `model = vlmjax.load(path)`, `out = model(**processor_outputs)`."""

from __future__ import annotations

import collections
import functools
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vlmjax import models
from vlmjax.errors import VlmJaxError
from vlmjax.models import vlm
from vlmjax.visual import VisualTokens

def ordered(hooks) -> collections.OrderedDict:
    """Hooks as an OrderedDict: `jax.jit` rebuilds a plain dict argument in sorted key order, which would silently
    change the order in which interventions compose; an OrderedDict keeps the caller's order."""
    return collections.OrderedDict(hooks or {})


class ModelOutput(dict):
    """A dict of named intermediates with attribute access (`out.logits`), like HF's ModelOutput."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"This output has no {name!r}; it has {sorted(self)}.") from None


def _to_numpy(x):
    if x is None:
        return None
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


class VLM:
    """A loaded model: its config, parameters (a plain pytree) and the pure forward function of its family."""

    def __init__(self, cfg, params, hf_config, path: Path | None = None):
        self.config = cfg
        self.params = params
        self.hf_config = hf_config
        self.path = path
        self.module = models.family(cfg.model_type)

    @property
    def dtype(self):
        return jax.tree.leaves(self.params)[0].dtype

    @property
    def compiler_options(self) -> dict[str, str]:
        """XLA options of this model's compiled functions (`jit`). On the CPU backend with 16-bit float parameters,
        XLA's while-loop invariant code motion is off: XLA:CPU computes bf16 in f32, and that pass would convert
        every layer's stacked weights to f32 before the layer scan (2x the model's bytes at once: a 7B bf16
        forward then needs ~40 GiB instead of ~16). Elsewhere none."""
        leaf = jax.tree.leaves(self.params)[0]
        half = jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype.itemsize == 2
        platforms = {d.platform for d in leaf.devices()} if callable(getattr(leaf, "devices", None)) else {
            jax.default_backend()}  # abstract parameters (jax.ShapeDtypeStruct) compile for the default backend
        on_cpu = platforms == {"cpu"}
        return {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"} if half and on_cpu else {}

    def jit(self, fn, **jit_kwargs):
        """`jax.jit(fn, **jit_kwargs)` with this model's `compiler_options`: use it for your own functions of
        `model.forward` (a bf16 model on CPU needs them to fit in memory; elsewhere it is plain `jax.jit`)."""
        return jax.jit(fn, compiler_options=self.compiler_options or None, **jit_kwargs)

    @property
    def num_layers(self) -> dict[str, int]:
        return self.module.num_layers(self.config)

    def __repr__(self):
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
        return f"VLM({self.config.model_type}, {n / 1e6:.2f}M params, {self.dtype}, from {self.path})"

    # -- inputs -------------------------------------------------------------------------------------------------
    def prepare(self, inputs: Mapping[str, Any]) -> tuple[dict, VisualTokens]:
        """Check and convert processor outputs (numpy or torch) into the batch the forward takes, with metadata."""
        return self.module.prepare_batch(self.config, {k: _to_numpy(v) for k, v in inputs.items()}, self.dtype)

    # -- forward ------------------------------------------------------------------------------------------------
    @functools.cached_property
    def _jitted(self):
        def run(params, batch, hooks, output_hidden_states, output_attentions, logits):
            return vlm.forward(params, batch, self.config, hooks, output_hidden_states=output_hidden_states,
                               output_attentions=output_attentions, logits=logits)

        return self.jit(run, static_argnames=("output_hidden_states", "output_attentions", "logits"))

    def forward(self, params, batch, hooks=None, **options):
        """The pure forward of this model's family with its config bound (use inside your own jit / vmap / grad):
        the family's Flax module merged with `params` inside the traced function (see vlmjax.models.vlm)."""
        return vlm.forward(params, batch, self.config, hooks, **options)

    def flax_module(self, params=None) -> vlm.VisionLanguageModel:
        """The Flax NNX module holding these params (or `params`): `nnx.display(model.flax_module())`."""
        return vlm.bind(self.config, self.params if params is None else params)

    def __call__(self, *, output_hidden_states: bool = False, output_attentions: bool = False, hooks=None,
                 logits: str | None = "all", params=None, check_finite: bool = False, **inputs) -> ModelOutput:
        """The forward on processor outputs. With `check_finite`, a VlmJaxError names the first site, layer and
        sample where a value stopped being finite (`vlmjax.checks.FiniteCheck`, reduced inside the forward)."""
        batch, meta = self.prepare(inputs)
        from vlmjax.checks import check_hooks, finite_hooks, raise_if_nonfinite
        from vlmjax.hooks import check_per_layer, validate_hooks

        check_hooks(hooks or {}, self, batch)
        hooks = {**ordered(hooks), **finite_hooks()} if check_finite else hooks
        check_per_layer(hooks or {}, self.num_layers)
        validate_hooks(hooks or {}, meta)
        out = self._jitted(self.params if params is None else params, batch, ordered(hooks),
                           output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                           logits=logits)
        if check_finite:
            raise_if_nonfinite(out["hooks"])
        out = ModelOutput(out)
        out["visual"] = meta
        return out


def jit_per_model(**jit_kwargs):
    """Decorator for a library function `fn(model, *args, **kwargs)`: jitted once per model by `model.jit` (with the
    model's compiler options), the model bound rather than traced; `jit_kwargs` name `fn`'s other arguments."""
    def wrap(fn):
        def compiled(model):
            """The jitted function of `model` (e.g. `compiled(model)._cache_size()`, how often it compiled)."""
            cache = model.__dict__.setdefault("_jit_per_model", {})
            if fn not in cache:
                cache[fn] = model.jit(functools.partial(fn, model), **jit_kwargs)
            return cache[fn]

        @functools.wraps(fn)
        def call(model, *args, **kwargs):
            return compiled(model)(*args, **kwargs)

        call.compiled = compiled
        return call

    return wrap


def load(path: str | os.PathLike, dtype=None, progress: bool = True, mesh=None, rules=None) -> VLM:
    """Load an HF checkpoint directory, a `vlmjax convert` output directory or a shipped model ("builtin:NAME").
    `dtype` defaults to the stored one for converted checkpoints and to float32 for HF directories. Each tensor is
    placed as soon as it is read: on the first device, or with `mesh` (vlmjax.sharding.make_mesh) sharded by
    `rules` (default vlmjax.sharding.DEFAULT_RULES), each process reading only the slices its devices hold."""
    from vlmjax.builtin import resolve as resolve_builtin
    from vlmjax.checks import check_params_finite, resolve_dtype

    path, dtype = resolve_builtin(path), resolve_dtype(dtype)

    from converters import hf as hf_conv
    from converters import orbax_io, streaming

    path = Path(path)
    hf_config = hf_conv.read_hf_config(path)
    cfg = models.from_hf(hf_config)
    check_dtype = getattr(models.family(cfg.model_type), "check_dtype", None)  # a family may refuse a dtype
    if check_dtype is not None:
        check_dtype(cfg, dtype or (orbax_io.stored_dtype(path) if orbax_io.is_converted(path) else jnp.float32))
    shardings = _placement(hf_conv.expected_shapes(cfg), mesh, rules)
    if orbax_io.is_converted(path):
        dtype = dtype or orbax_io.stored_dtype(path)
        abstract = {p: jax.ShapeDtypeStruct(s, jnp.dtype(dtype), sharding=shardings[p])
                    for p, s in hf_conv.expected_shapes(cfg).items()}
        params = orbax_io.restore(path, hf_conv.unflatten(abstract))
    else:
        params = streaming.load(path, cfg, dtype or jnp.float32, shardings, progress=progress)
    check_params_finite(params, path)
    return VLM(cfg, params, hf_config, path)


def _placement(shapes: dict, mesh, rules) -> dict:
    """{parameter path: Sharding}: by `rules` over `mesh`, or the first local device."""
    if mesh is None:
        if rules is not None:
            raise VlmJaxError("rules place parameters on a mesh: pass mesh= as well (vlmjax.sharding.make_mesh).")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return {p: device for p in shapes}
    from converters.hf import flatten, unflatten
    from vlmjax.sharding import DEFAULT_RULES, param_shardings

    abstract = unflatten({p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in shapes.items()})
    return flatten(param_shardings(abstract, mesh, DEFAULT_RULES if rules is None else rules))
