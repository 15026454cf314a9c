"""Interventions made twice for the tests: as vlmjax hooks, and independently on the HF PyTorch model with torch
hooks or with HF's eager attention computing edited scores. Works on every family's decoder (`hf.get_decoder()`:
the Llama of LLaVA and InstructBLIP, Qwen2.5-VL's Qwen2, PaliGemma's Gemma and Gemma 2).

A `Case` pairs the two; `assert_matches_hf(setup, case)` runs both on a test's setup (a dict with the vlmjax
`model`, the `hf` model, processor `inputs`, their `plain` vlmjax logits, `visual` [B, N] and `valid` [B, N] masks).
The builders below the cases return the torch hook handles of one change each."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Callable

import jax
import numpy as np
import torch

from vlmjax import interventions as iv

TOL = 1e-4  # fp32 logits, max |Δ| over real positions


@dataclasses.dataclass
class Case:
    """One change: vlmjax `hooks`; on the HF model, the torch hooks `register(hf)` returns and, if given, the edit
    `score_edit(layer, scores, mask)` of the decoder's eager attention scores (see `scores_edit`)."""

    hooks: dict
    register: Callable = lambda hf: []
    score_edit: Callable | None = None

    def __add__(self, other: Case) -> Case:
        """Both changes, self's first."""
        assert self.score_edit is None or other.score_edit is None, "one score edit per case"
        return Case({**self.hooks, **other.hooks}, lambda hf: self.register(hf) + other.register(hf),
                    self.score_edit or other.score_edit)


def assert_matches_hf(setup, case: Case) -> np.ndarray:
    """vlmjax with the case's hooks changes the logits (else the comparison proves nothing) and equals HF with its
    torch hooks within TOL at every real position; returns vlmjax's logits."""
    ours = np.asarray(setup["model"](**setup["inputs"], hooks=case.hooks)["logits"])
    hf = setup["hf"]
    with scores_edit(hf, case.score_edit) if case.score_edit else contextlib.nullcontext():
        theirs = hf_logits(hf, setup["inputs"], *case.register(hf))
    valid = setup["valid"]
    assert np.abs(ours - setup["plain"])[valid].max() > 1e-3
    assert np.abs(ours - theirs)[valid].max() < TOL
    return ours


def identity(model, visual) -> Case:
    """Every case's hooks below at their identity settings, under the cases' names: bias 0 and scale 1 at every
    layer, nothing else selected (the plain forward bit for bit, tests/test_interventions.py checks).
    `identity(...) + case` has one pytree structure for every case, so the cases share one compiled forward."""
    text = model.config.text
    layers, key = text.num_layers, jax.random.PRNGKey(0)
    return Case({
        "viar": iv.AttentionBias.on_layers(layers, None, bias=0.0),
        "block": iv.BlockTextToVisual.on_layers(layers, []),
        "remove": iv.RemoveVisualTokens.from_mask(layers, np.zeros_like(visual)),
        "uniform": iv.HeadMask.heads(layers, text.num_heads, mode="uniform"),
        "zero": iv.HeadMask.heads(layers, text.num_heads, mode="zero_output"),
        "knockout": iv.ZeroVisualStates.at_layers(layers, []),
        "soft": iv.ScaleVisualStates.at_layers(layers, None, visual, scale=1.0),
        "neurons": iv.NeuronAblation.zero(layers, text.intermediate_size, {}),
        "dims": iv.NeuronAblation.mean(layers, {}, np.ones((layers, text.hidden_size)), site="resid_post"),
        "noise_out": iv.NoiseAttentionOutput.on_layers(layers, key, []),
        "noise_qkv": iv.NoiseQKV.from_params(model.params["text"], key, [], scope="visual"),
    })


def _layers(setup) -> int:
    return setup["model"].config.text.num_layers


# ---------------------------------------------------------------------------------------------------------------------
# Cases


def visual_bias(setup, layers, bias: float) -> Case:
    """VIAR: `bias` at the visual keys for every query at `layers` (HF: added to the additive mask)."""
    visual = torch.as_tensor(setup["visual"])
    edit = lambda layer, mask: mask + bias * visual[:, None, None, :] if layer in layers else mask
    return Case({"viar": iv.AttentionBias.on_layers(_layers(setup), layers, bias=bias)}, lambda hf: mask_edit(hf, edit))


def blocked_keys(setup, block_layers) -> Case:
    """Text-to-visual attention blocked at `block_layers`, and every third visual token (other positions per sample)
    removed as a key at every layer (HF: finfo.min written into the mask)."""
    visual = setup["visual"]
    removed = visual & (np.cumsum(visual, 1) % 3 == 0)
    visual_t, removed_t = torch.as_tensor(visual), torch.as_tensor(removed)
    lowest = torch.finfo(torch.float32).min

    def edit(layer, mask):
        if layer in block_layers:
            mask = torch.where(~visual_t[:, None, :, None] & visual_t[:, None, None, :], lowest, mask)
        return torch.where(removed_t[:, None, None, :], lowest, mask)

    hooks = {"block": iv.BlockTextToVisual.on_layers(_layers(setup), block_layers),
             "remove": iv.RemoveVisualTokens.from_mask(_layers(setup), removed)}
    return Case(hooks, lambda hf: mask_edit(hf, edit))


def head_masks(setup, uniform, zeroed) -> Case:
    """HeadMask in both conventions: the (layer, head) pairs `uniform` attend uniformly (HF: their allowed scores
    -> 0, masked ones kept), those `zeroed` have their mixed values zeroed (HF: a pre-hook on o_proj)."""
    text = setup["model"].config.text
    hooks = {"uniform": iv.HeadMask.heads(text.num_layers, text.num_heads, uniform, mode="uniform"),
             "zero": iv.HeadMask.heads(text.num_layers, text.num_heads, zeroed, mode="zero_output")}
    return Case(hooks, lambda hf: head_outputs_zeroed(hf, zeroed, text.head_dim), uniform_heads(uniform))


def visual_states(setup, knockout_layer: int, soft_layer: int) -> Case:
    """Visual hidden states zeroed at the input of `knockout_layer`, every second one scaled by 0.3 at the input of
    `soft_layer` (HF: pre-hooks on the decoder layers)."""
    visual = setup["visual"]
    soft = visual & (np.cumsum(visual, 1) % 2 == 0)
    hooks = {"knockout": iv.ZeroVisualStates.at_layers(_layers(setup), knockout_layer),
             "soft": iv.ScaleVisualStates.at_layers(_layers(setup), soft_layer, soft, scale=0.3)}
    visual_t, soft_t = torch.as_tensor(visual)[..., None], torch.as_tensor(soft)[..., None]
    return Case(hooks, lambda hf: [layer_input_edit(hf, knockout_layer, lambda h: torch.where(visual_t, 0.0, h)),
                                   layer_input_edit(hf, soft_layer, lambda h: torch.where(soft_t, 0.3 * h, h))])


def ablations(setup, neuron_layer: int, dim_layer: int) -> Case:
    """MLP neurons 3, 40, 77, 120 zeroed at `neuron_layer` (HF: a pre-hook on down_proj); residual dims 1, 5, 60 of
    `dim_layer`'s output set to random means (HF: a forward hook on the decoder layer)."""
    text = setup["model"].config.text
    neurons, dims = [3, 40, 77, 120], [1, 5, 60]
    means = np.random.default_rng(0).normal(size=(text.num_layers, text.hidden_size)).astype(np.float32)
    hooks = {"neurons": iv.NeuronAblation.zero(text.num_layers, text.intermediate_size, {neuron_layer: neurons}),
             "dims": iv.NeuronAblation.mean(text.num_layers, {dim_layer: dims}, means, site="resid_post")}

    def replace(units, values):
        def change(h):
            h[..., units] = values
            return h
        return change

    return Case(hooks, lambda hf: [mlp_neurons_edit(hf, neuron_layer, replace(neurons, 0.0)),
                                   layer_output_edit(hf, dim_layer, replace(dims, torch.as_tensor(means[dim_layer,
                                                                                                        dims])))])


def noise_substitutions(setup, out_layer: int, qkv_layers) -> Case:
    """Noise-Δ at `out_layer` (the update of every position -> the hook's draw times the update's per-token RMS;
    Gemma 2: the post-normed update) and Noise-QKV at `qkv_layers` on the visual positions (q, k, v -> the normed
    input times the hook's Gaussian kernel scaled by each HF weight's std, plus the projection's bias), with the
    vlmjax hooks' own draws."""
    key = jax.random.PRNGKey(7)
    noise_out = iv.NoiseAttentionOutput.on_layers(_layers(setup), jax.random.fold_in(key, 1), [out_layer])
    noise_qkv = iv.NoiseQKV.from_params(setup["model"].params["text"], key, qkv_layers, scope="visual")
    visual = torch.as_tensor(setup["visual"])[..., None]

    def replace_update(update):
        rms = update.pow(2).mean(-1, keepdim=True).sqrt()
        return torch.tensor(np.asarray(noise_out.noise(out_layer, tuple(update.shape)))) * rms

    def noisy_projection(layer):
        def change(which, projection, normed, output):
            weight = projection.weight
            kernel = torch.tensor(np.asarray(noise_qkv.kernel(layer, which, tuple(weight.T.shape), 1.0)))
            noisy = normed @ (kernel * weight.std(unbiased=False))
            if projection.bias is not None:
                noisy = noisy + projection.bias
            return torch.where(visual, noisy, output)
        return change

    register = lambda hf: [attention_update_edit(hf, out_layer, replace_update),
                           *(h for layer in qkv_layers for h in projections_edit(hf, layer, noisy_projection(layer)))]
    return Case({"noise_out": noise_out, "noise_qkv": noise_qkv}, register)


# ---------------------------------------------------------------------------------------------------------------------
# HF side: torch hooks and the edited eager attention


def decoder_layers(hf):
    return hf.get_decoder().layers


def hf_logits(hf, inputs, *handles) -> np.ndarray:
    """HF's logits on processor outputs with the torch hooks `handles` in place (removed afterwards)."""
    feed = {k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()}
    try:
        with torch.no_grad():
            return hf(**feed).logits.float().numpy()
    finally:
        for handle in handles:
            handle.remove()


def mask_edit(hf, edit) -> list:
    """Forward pre-hooks on every decoder self-attention replacing the 4D additive mask by edit(layer, mask)."""

    def pre(module, args, kwargs):
        kwargs["attention_mask"] = edit(module.layer_idx, kwargs["attention_mask"].clone())
        return args, kwargs

    return [layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True) for layer in decoder_layers(hf)]


@contextlib.contextmanager
def scores_edit(hf, edit):
    """The decoder's eager attention with edit(layer, scores, mask) applied to the pre-softmax scores after the mask
    (soft-capped before it where the layer soft-caps, as Gemma 2's); every other attention (the vision tower's, which
    may share the modeling file) runs HF's own."""
    attention = [layer.self_attn for layer in decoder_layers(hf)]
    decoder_ids = {id(module) for module in attention}
    modeling = sys.modules[type(attention[0]).__module__]
    original = modeling.eager_attention_forward

    def edited(module, query, key, value, attention_mask, scaling, dropout=0.0, softcap=None, **kwargs):
        key = key.repeat_interleave(module.num_key_value_groups, dim=1)
        value = value.repeat_interleave(module.num_key_value_groups, dim=1)
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = edit(module.layer_idx, scores + attention_mask, attention_mask)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights

    def eager(module, *args, **kwargs):
        return (edited if id(module) in decoder_ids else original)(module, *args, **kwargs)

    modeling.eager_attention_forward = eager
    try:
        yield
    finally:
        modeling.eager_attention_forward = original


def uniform_heads(pairs):
    """A `scores_edit` edit for HeadMask "uniform": the (layer, head) pairs' allowed scores -> 0, masked ones kept."""

    def edit(layer, scores, mask):
        for masked_layer, head in pairs:
            if layer == masked_layer:
                scores[:, head] = mask[:, 0]
        return scores

    return edit


def head_outputs_zeroed(hf, pairs, head_dim: int) -> list:
    """Pre-hooks on o_proj zeroing the mixed values of the (layer, head) pairs."""

    def zero_heads(layer):
        def pre(module, args):
            z = args[0].clone()
            for masked_layer, head in pairs:
                if layer == masked_layer:
                    z[..., head * head_dim:(head + 1) * head_dim] = 0
            return (z,)
        return pre

    layers = decoder_layers(hf)
    return [layers[l].self_attn.o_proj.register_forward_pre_hook(zero_heads(l)) for l in {l for l, _ in pairs}]


def layer_input_edit(hf, layer: int, change):
    """A pre-hook on decoder layer `layer`: its input hidden states h -> change(h) (resid_pre)."""

    def pre(module, args, kwargs):
        return (change(args[0].clone()),) + args[1:], kwargs

    return decoder_layers(hf)[layer].register_forward_pre_hook(pre, with_kwargs=True)


def layer_output_edit(hf, layer: int, change):
    """A forward hook on decoder layer `layer`: its output h -> change(h) (resid_post)."""
    return decoder_layers(hf)[layer].register_forward_hook(lambda module, args, output: change(output.clone()))


def mlp_neurons_edit(hf, layer: int, change):
    """A pre-hook on the MLP's down projection of `layer`: its input, the MLP neurons, -> change(neurons)."""
    return decoder_layers(hf)[layer].mlp.down_proj.register_forward_pre_hook(
        lambda module, args: (change(args[0].clone()),))


def attention_update_edit(hf, layer: int, change):
    """A forward hook replacing the attention update that layer `layer` adds to its residual by change(update): the
    self-attention's output, or in Gemma 2 (norms after attention and MLP too) the post-attention norm's output."""
    block = decoder_layers(hf)[layer]
    if hasattr(block, "pre_feedforward_layernorm"):
        return block.post_attention_layernorm.register_forward_hook(lambda module, args, output: change(output))
    return block.self_attn.register_forward_hook(lambda module, args, output: (change(output[0]), *output[1:]))


def projections_edit(hf, layer: int, change) -> list:
    """Forward hooks on q_proj, k_proj, v_proj of `layer`: output -> change(which, projection, input, output), which
    0, 1, 2 for q, k, v."""
    attn = decoder_layers(hf)[layer].self_attn
    hook = lambda which, projection: lambda module, args, output: change(which, projection, args[0], output)
    return [p.register_forward_hook(hook(which, p)) for which, p in enumerate((attn.q_proj, attn.k_proj, attn.v_proj))]
