"""Sites of the forward pass and the hooks that read or change them.

Every model calls `site(name, value)` at the canonical points of its forward pass (see `BLOCK_SITES` and
`GLOBAL_SITES`; the full name of a block site is `blocks.{l}.{name}` for the decoder and
`vision.blocks.{l}.{name}` for the vision tower, whose blocks call `VISION_BLOCK_SITES`; InstructBLIP's Q-Former:
`qformer.blocks.{l}.{name}`, `QFORMER_BLOCK_SITES`, and its global `QFORMER_SITES`). docs/sites.md lists them
with their shapes (tests/test_docs.py checks the table against what each family's forward calls). A hook is a pytree (a `flax.struct` dataclass): its array fields
are traced, so one compiled forward serves every value of them (sweeps under `jax.vmap`, gradients with respect to
them), and its fields listed in `per_layer` carry a leading layer axis that the layer scan slices, so each layer
sees its own entry. Hooks compose: they run in the order given, each seeing the value the previous one returned
(`jax.jit` would hand a plain dict back in sorted key order: the model's entry points pass `vlmjax.api.ordered`).

A hook returns `(new_value, record)`; a record that is not None is returned by the compiled forward under
`outputs["hooks"][hook_name][site]`, stacked over layers for block sites. That is how metrics are reduced inside
the forward pass (a record of shape [B, H] per layer instead of the [B, H, N, N] pattern) and how captures work.
A hook whose `only_layers` is set runs at those layers only, and its records are stacked over just them (the scan
is split around them), so capturing one layer's [B, H, N, N] pattern never stores it for every layer.
"""

from __future__ import annotations

import difflib
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
from flax import struct

from vlmjax.errors import VlmJaxError

BLOCK_SITES = (
    "resid_pre",  # block input [B, N, D]
    "attn.input",  # normed input of attention [B, N, D]
    "attn.q",  # queries before rotary [B, N, H, hd]
    "attn.k",  # keys before rotary [B, N, KVH, hd]
    "attn.v",  # values [B, N, KVH, hd]
    "attn.rot_k",  # keys after rotary (what attention and the KV cache use) [B, N, KVH, hd]
    "attn.scores",  # pre-softmax scores after the causal/padding mask [B, H, Nq, Nk]
    "attn.pattern",  # post-softmax attention probabilities [B, H, Nq, Nk]
    "attn.z",  # per-head mixed values [B, N, H, hd]
    "attn.out",  # the attention update added to the residual [B, N, D]
    "resid_mid",  # residual after attention [B, N, D]
    "mlp.hidden",  # MLP neurons (act(gate) * up, or act(fc1)) [B, N, I]
    "mlp.out",  # the MLP update [B, N, D]
    "resid_post",  # block output [B, N, D]
)
GLOBAL_SITES = (
    "vision.embed",  # vision tower input after patch + position embedding and pre-norm [I, T, Dv]
    "vision.features",  # the selected vision hidden states fed to the projector [I, T, Dv']
    "projector.out",  # projected image features [I, T, D]
    "embed",  # decoder input embeddings after the image features are merged in [B, N, D]
    "final_norm",  # decoder output after the final norm [B, N, D]
    "logits",  # [B, N, V]
)
# The vision towers call every block site but `attn.rot_k`: CLIP has no rotary, and Qwen2-VL's vision rotary feeds
# only its own attention (no KV cache, no metric reads it).
VISION_BLOCK_SITES = tuple(s for s in BLOCK_SITES if s != "attn.rot_k")
# InstructBLIP's Q-Former (`qformer.blocks.{l}.*`, BERT-style post-norm: no attn.input, no rotary), whose query rows
# also cross-attend to the image at every `cross_attention_frequency`-th layer (the crossattn.* sites and resid_cross
# run at those layers only; their records are zero at the others).
QFORMER_BLOCK_SITES = (
    "resid_pre", "attn.q", "attn.k", "attn.v", "attn.scores", "attn.pattern", "attn.z", "attn.out", "resid_mid",
    "crossattn.q",  # queries of the cross-attention (the learned-query rows) [I, Q, Hq, hdq]
    "crossattn.k",  # keys from the vision features [I, Tv, Hq, hdq]
    "crossattn.v",  # values from the vision features [I, Tv, Hq, hdq]
    "crossattn.scores",  # pre-softmax scores [I, Hq, Q, Tv]
    "crossattn.pattern",  # post-softmax attention of each query over the image tokens [I, Hq, Q, Tv]
    "crossattn.z",  # per-head mixed values [I, Q, Hq, hdq]
    "crossattn.out",  # the cross-attention update [I, Q, Dq]
    "resid_cross",  # residual after cross-attention (query rows updated, text rows = resid_mid) [I, Nq, Dq]
    "mlp.hidden", "mlp.out", "resid_post",
)
QFORMER_SITES = (
    "qformer.embed",  # Q-Former input: the learned queries, then the instruction's embeddings, layer-normed [I, Nq, Dq]
    "qformer.out",  # the query rows of the last Q-Former layer, fed to the language projection [I, Q, Dq]
)
# each layer stack -> the sites its blocks call
STACKS = {"blocks": BLOCK_SITES, "vision.blocks": VISION_BLOCK_SITES, "qformer.blocks": QFORMER_BLOCK_SITES}


@struct.dataclass
class Context:
    """What a hook may read besides the value at its site. Arrays are per batch; `layer` is traced in the scan."""

    stack: str = struct.field(pytree_node=False)
    visual_mask: Any = None  # [B, N] bool: visual-token positions of each sample (decoder stack and globals)
    key_padding: Any = None  # [B, N] bool: real (non-padding) tokens
    layer: Any = None  # scalar int32, the layer index (None at global sites)
    earlier: Any = None  # {site: value} of the sites already run in this block (after their hooks), e.g. resid_pre
    # first query row of the block of rows a hook sees at attn.scores / attn.pattern when attention runs in query
    # blocks (traced int32; None: every row). `query_rows` slices a per-token [B, N] array to the block's rows.
    query_start: Any = None


class Hook(struct.PyTreeNode):
    """Base class of interventions, metrics and captures. Subclasses implement `__call__`."""

    per_layer: ClassVar[tuple[str, ...]] = ()  # fields with a leading [num_layers] axis, sliced by the layer scan
    # True when the hook acts at attn.scores / attn.pattern the same on any block of query rows (reading per-query
    # data through `query_rows`) and records nothing there but through `AttentionRowProbe`, and reads neither site
    # from ctx.earlier. Attention then runs in query blocks (models/layers.py); one hook without it on the stack
    # makes the layer compute the whole [B, H, Nq, Nk] pattern, as a hook may need.
    query_blocks: ClassVar[bool] = False
    stack: ClassVar[str] = "blocks"  # which layer stack `per_layer` fields index
    only_layers: ClassVar[tuple[int, ...] | None] = None  # run only at these layers (a subclass may make it a field)

    def __call__(self, site: str, value, ctx: Context) -> tuple[Any, Any]:
        return value, None


ATTENTION_SITES = ("attn.scores", "attn.pattern")  # [B, H, Nq, Nk]: the token axis of a query is 2


def query_rows(ctx: Context, per_token: jax.Array, num_rows: int) -> jax.Array:
    """A per-token [B, N, ...] array restricted to the query rows an attention-site value holds: all of them, or
    the `num_rows` rows of the query block starting at `ctx.query_start` (rows past N, padding, read 0)."""
    if ctx.query_start is None:
        return per_token
    padded = jnp.pad(per_token, ((0, 0), (0, num_rows)) + ((0, 0),) * (per_token.ndim - 2))
    return jax.lax.dynamic_slice_in_dim(padded, ctx.query_start, num_rows, axis=1)


class AttentionRowProbe(Hook):
    """A probe whose record at attn.pattern depends on the pattern only through a few weighted sums of its query
    rows: `query_weights(ctx)` gives weightings [B, N] of the queries (e.g. a query set's mean), the rows
    `sum_i w[b, i] A[b, h, i, :]` ([B, H, 1, Nk] each, in fp32) go to `from_rows(rows, ctx)`. Attention run in
    query blocks sums each block's part of the rows, so such a probe never needs a layer's whole pattern."""

    query_blocks: ClassVar[bool] = True

    def query_weights(self, ctx: Context) -> tuple[jax.Array, ...]:
        raise NotImplementedError

    def from_rows(self, rows: tuple[jax.Array, ...], ctx: Context):
        raise NotImplementedError

    def rows(self, value: jax.Array, ctx: Context) -> tuple[jax.Array, ...]:
        """The weighted rows of the query rows in `value` (all of them, or one block's part)."""
        weights = (query_rows(ctx, w.astype(jnp.float32), value.shape[2]) for w in self.query_weights(ctx))
        return tuple(jnp.sum(value.astype(jnp.float32) * w[:, None, :, None], axis=2, keepdims=True) for w in weights)

    def __call__(self, site, value, ctx):
        if site != "attn.pattern":
            return value, None
        return value, self.from_rows(self.rows(value, ctx), ctx)


class Capture(Hook):
    """Return the value at each named site: global sites, and decoder block sites stacked over layers [L, ...]
    (over `only_layers` only, in increasing order, when given)."""

    sites: frozenset = struct.field(pytree_node=False, default=frozenset())
    only_layers: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)

    @property
    def query_blocks(self) -> bool:
        return not self.sites & set(ATTENTION_SITES)

    def __call__(self, site, value, ctx):
        return (value, value) if site in self.sites else (value, None)


class VisionCapture(Capture):
    """Capture on the vision tower's blocks (`vision.blocks.{l}.*`)."""

    stack: ClassVar[str] = "vision.blocks"


class QFormerCapture(Capture):
    """Capture on InstructBLIP's Q-Former blocks (`qformer.blocks.{l}.*`)."""

    stack: ClassVar[str] = "qformer.blocks"


class SiteRunner:
    """Runs the hooks at each site while a model function is traced and keeps their records."""

    def __init__(self, hooks: Mapping[str, Hook], ctx: Context):
        self.hooks = hooks
        self.ctx = ctx.replace(earlier={})
        self.records: dict[str, dict[str, Any]] = {}

    def __call__(self, site: str, value):
        in_block = self.ctx.layer is not None
        for name, hook in self.hooks.items():
            if in_block and hook.stack != self.ctx.stack:
                continue
            if self.ctx.query_start is not None and isinstance(hook, AttentionRowProbe) and site == "attn.pattern":
                record = hook.rows(value, self.ctx)  # this block's part of the rows (see `query_block`)
            else:
                value, record = hook(site, value, self.ctx)
            if record is not None:
                if self.ctx.query_start is not None and not isinstance(hook, AttentionRowProbe):
                    raise VlmJaxError(f"Hook {name!r} ({type(hook).__name__}) says query_blocks = True but records "
                                      f"at {site}; a record there needs the whole pattern: set query_blocks = "
                                      "False, or make it an AttentionRowProbe.")
                self.records.setdefault(name, {})[site] = record
        self.ctx = self.ctx.replace(earlier={**self.ctx.earlier, site: value})
        return value

    def query_blocks(self) -> bool:
        """Whether this block's attention may run in query blocks: every hook on its stack allows it."""
        return all(hook.query_blocks for hook in self.hooks.values() if hook.stack == self.ctx.stack)

    def query_block(self, start) -> "SiteRunner":
        """A runner for the attention sites of one block of query rows from `start`: the same hooks, an
        AttentionRowProbe recording its part of the rows (summed over the blocks by `finish_query_blocks`)."""
        runner = SiteRunner(self.hooks, self.ctx.replace(query_start=start))
        runner.ctx = runner.ctx.replace(earlier=self.ctx.earlier)
        return runner

    def finish_query_blocks(self, block_records: Mapping[str, Mapping[str, Any]]) -> None:
        """Keep the row probes' records from their rows stacked over the query blocks [blocks, ...]."""
        for name, sites in block_records.items():
            rows = jax.tree.map(lambda r: r.sum(0), sites["attn.pattern"])
            self.records.setdefault(name, {})["attn.pattern"] = self.hooks[name].from_rows(rows, self.ctx)

    def add_records(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        """Keep the records of a layer scan (or another runner) with this runner's: {hook name: {site: record}}."""
        for name, r in records.items():
            self.records.setdefault(name, {}).update(r)


def split_per_layer(hooks: Mapping[str, Hook], stack: str, start: int, stop: int):
    """(scanned, rebuild): the per-layer fields of hooks on `stack` sliced to [start, stop), and a function that
    puts one layer's slice back into the hooks inside the scan body."""
    scanned = {}
    for name, hook in hooks.items():
        if hook.stack == stack and hook.per_layer:
            scanned[name] = {f: getattr(hook, f)[start:stop] for f in hook.per_layer}

    def rebuild(layer_slices):
        return {
            name: (hook.replace(**layer_slices[name]) if name in layer_slices else hook) for name, hook in hooks.items()
        }

    return scanned, rebuild


def check_per_layer(hooks: Mapping[str, Hook], num_layers: Mapping[str, int]):
    """Clear error when a hook's per-layer array does not have one entry per layer of its stack."""
    for name, hook in hooks.items():
        for f in hook.per_layer:
            arr = getattr(hook, f)
            n = num_layers[hook.stack]
            if jnp.ndim(arr) == 0 or jnp.shape(arr)[0] != n:
                raise VlmJaxError(
                    f"Hook {name!r} field {f!r} must have a leading axis of {n} (one entry per layer of "
                    f"{hook.stack!r}), got shape {jnp.shape(arr)}. Build it with the hook's constructor helper."
                )


def validate_hooks(hooks: Mapping[str, Hook], meta) -> None:
    """Host-side checks of hooks against a batch's visual metadata (e.g. an empty visual set where one is needed):
    every hook with a `validate(meta, name)` method raises a clear error before anything is traced."""
    for name, hook in hooks.items():
        check = getattr(hook, "validate", None)
        if check is not None:
            check(meta, name)


def parse_site(name: str, num_layers: Mapping[str, int]) -> tuple[str, int | None, str]:
    """'blocks.3.attn.pattern' -> ('blocks', 3, 'attn.pattern'); 'logits' -> ('', None, 'logits').

    Raises a clear error naming the nearest valid site for a typo or an out-of-range layer."""
    if name in GLOBAL_SITES + QFORMER_SITES:
        return "", None, name
    for stack in sorted(STACKS, key=len, reverse=True):
        prefix = stack + "."
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            layer_str, _, site = rest.partition(".")
            if layer_str.isdigit() and site in STACKS[stack]:
                layer = int(layer_str)
                n = num_layers.get(stack, 0)
                if not 0 <= layer < n:
                    raise VlmJaxError(f"Site {name!r}: layer {layer} out of range; {stack} has layers 0..{n - 1}.")
                return stack, layer, site
            break
    examples = [*GLOBAL_SITES, *QFORMER_SITES] + [f"{s}.0.{b}" for s, sites in STACKS.items() for b in sites]
    close = difflib.get_close_matches(name, examples, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise VlmJaxError(f"Unknown site {name!r}.{hint} Valid: {', '.join(GLOBAL_SITES)}, or blocks.<l>.<site> with "
                      f"<site> in {', '.join(BLOCK_SITES)}, or vision.blocks.<l>.<site> with the same but attn.rot_k "
                      f"(InstructBLIP also: {', '.join(QFORMER_SITES)}, qformer.blocks.<l>.<site> with <site> in "
                      f"{', '.join(QFORMER_BLOCK_SITES)}).")



def scan_layers(block, layer_params, x, hooks: Mapping[str, Hook], ctx: Context, start: int, stop: int):
    """Run layers [start, stop) of a stack under `jax.lax.scan`: (x_out, records stacked over those layers).

    `block(p, x, run)` is one layer; `run` is the SiteRunner it calls at each site. The scan is split at the
    layers named by hooks' `only_layers`; such a hook runs only there and its records stack over those layers."""
    cuts = {start, stop}
    for hook in hooks.values():
        if hook.stack == ctx.stack and hook.only_layers is not None:
            cuts.update(c for layer in hook.only_layers if start <= layer < stop for c in (layer, layer + 1))
    bounds = sorted(cuts)
    parts: dict[str, list] = {}
    for seg_start, seg_stop in zip(bounds[:-1], bounds[1:]):
        active = {name: hook for name, hook in hooks.items() if hook.stack != ctx.stack
                  or hook.only_layers is None or seg_start in hook.only_layers}
        x, records = _scan_segment(block, layer_params, x, active, ctx, seg_start, seg_stop)
        for name, record in records.items():
            parts.setdefault(name, []).append(record)
    records = {name: rs[0] if len(rs) == 1 else jax.tree.map(lambda *r: jnp.concatenate(r, axis=0), *rs)
               for name, rs in parts.items()}
    return x, records


def _scan_segment(block, layer_params, x, hooks: Mapping[str, Hook], ctx: Context, start: int, stop: int):
    scanned, rebuild = split_per_layer(hooks, ctx.stack, start, stop)
    params = jax.tree.map(lambda p: p[start:stop], layer_params)

    def body(h, xs):
        p, layer, hook_slices = xs
        runner = SiteRunner(rebuild(hook_slices), ctx.replace(layer=layer))
        h = block(p, h, runner)
        return h, runner.records

    return jax.lax.scan(body, x, (params, jnp.arange(start, stop, dtype=jnp.int32), scanned))
