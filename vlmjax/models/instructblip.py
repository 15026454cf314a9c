"""InstructBLIP (Vicuna): BLIP-2 ViT -> Q-Former (learned queries that read the instruction and cross-attend to the
image) -> language projection -> the query outputs written over the image tokens -> Llama decoder.

`InstructBlip` is the family's NNX module on the VLM skeleton (models/vlm.py; `vlm.forward(params, batch, cfg,
hooks)` is pure and jittable). `batch` holds input_ids [B, N], attention_mask [B, N], optionally position_ids, and
with images pixel_values [B, C, S, S] (one image per prompt), qformer_input_ids [B, Nt] and qformer_attention_mask
[B, Nt] (the instruction as the Q-Former's BERT tokenizer reads it).

Visual tokens. HF's processor (transformers 5.24) writes `num_query_tokens` (Q, 32 in the released models) image
tokens before each prompt, ahead of its BOS and of the tokenizer's left padding; the forward writes the Q projected
query outputs over them in order (HF's masked_scatter). The metadata reads them from the input ids per sample, as for
every family: kind QUERY, laid on a 1 x Q line by query index (`ImageSpan.grid` = (1, Q)). The queries have no
position in the image, so analyses on that line (a map's spatial entropy, top-attended queries) describe query
order, and a pixel box cannot select them. One image per prompt: the Q-Former reads each prompt's instruction with
its own image, so a prompt with several images is refused.

Vision tower: a pre-norm ViT with a CLS token, learned positions, a fused qkv projection whose bias is (q, k, v) as
stored (the released checkpoints hold zeros for k: BLIP-2's ViT has separate q and v biases), exact-GELU fc MLP and
a final LayerNorm; the Q-Former reads the last layer's output after that norm (`vision.features`).

Q-Former: BERT-style post-norm layers over [Q learned queries; the instruction's tokens] (the queries carry no
position embedding; the text gets positions 0..Nt-1, padding included, as HF). Self-attention spans both (padding
keys masked); at every `cross_attention_frequency`-th layer (0, f, 2f, ...) the query rows also cross-attend to the
vision features; then the query rows go through their own feed-forward (HF's intermediate_query / output_query) and
the text rows through the text one. Only the query rows of the last layer go on (`qformer.out`).

Layer stacking. The Q-Former runs as one layer scan like the other stacks: the self-attention and both
feed-forwards are stacked [Lq, ...] (`qformer/layers`), the cross-attention only over the layers that have it
[Lq / f, ...] (`qformer/crossattn/layers`, HF layer l <-> slot l // f), and the scan body runs it under `lax.cond`
on l % f == 0 with slot l // f. So one compiled block serves both kinds of layer whatever the pattern, the params
mirror HF's (no zero-filled cross weights, nothing extra in the checkpoint written back), and hooks see every
layer in order under its own index (records of the crossattn.* sites are zero at layers without cross-attention).
Stacking the two kinds as two scans would need the layers interleaved by hand and would split per-layer hooks
between them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmjax.config import CLIPVisionConfig, DecoderConfig, decoder_from_hf
from vlmjax.errors import VlmJaxError
from vlmjax.hooks import Context, SiteRunner
from vlmjax.inputs import text_batch
from vlmjax.models import clip, decoder
from vlmjax.models.clip import CLIPBlock, patchify
from vlmjax.models.decoder import Decoder
from vlmjax.models.layers import (LayerNorm, Linear, activation, additive_mask, attention, key_rows, scan_stack,
                                  weight)
from vlmjax.models.llava import decode_start  # noqa: F401  (family interface: HF's generation positions)
from vlmjax.models.vlm import VisionLanguageModel
from vlmjax.visual import QUERY, ImageSpan, VisualTokens

ACCEPTED_INPUTS = ("input_ids", "attention_mask", "pixel_values", "qformer_input_ids", "qformer_attention_mask",
                   "position_ids")


@dataclasses.dataclass(frozen=True)
class BlipVisionConfig(CLIPVisionConfig):
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    qkv_bias: bool = True


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    max_position_embeddings: int
    encoder_hidden_size: int  # the vision tower's width (cross-attention keys and values)
    cross_attention_frequency: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @property
    def cross_layers(self) -> tuple[int, ...]:
        """The layers with cross-attention to the image (HF: layer_idx % cross_attention_frequency == 0)."""
        return tuple(range(0, self.num_layers, self.cross_attention_frequency))


@dataclasses.dataclass(frozen=True)
class InstructBlipConfig:
    vision: BlipVisionConfig
    qformer: QFormerConfig
    text: DecoderConfig
    image_token_id: int
    num_query_tokens: int
    model_type: str = "instructblip"


def config_from_hf(hf_config) -> InstructBlipConfig:
    tc, vc, qc = hf_config.text_config, hf_config.vision_config, hf_config.qformer_config
    if not getattr(hf_config, "use_decoder_only_language_model", True):
        raise VlmJaxError(f"This InstructBLIP uses an encoder-decoder language model ({tc.model_type!r}, e.g. the "
                          "Flan-T5 variants); vlmjax runs the decoder-only (Vicuna / Llama) InstructBLIP models.")
    if hf_config.image_token_index is None:
        raise VlmJaxError("config.json has no image_token_index: this InstructBLIP checkpoint predates the processor "
                          "that writes image tokens into the prompt. Set image_token_index to the tokenizer's <image> "
                          "token id (and save the processor with num_query_tokens).")
    if not isinstance(vc.image_size, int) or not isinstance(vc.patch_size, int):
        raise VlmJaxError(f"vision_config image_size / patch_size must be integers (square images), got "
                          f"{vc.image_size!r} / {vc.patch_size!r}.")
    vision = BlipVisionConfig(hidden_size=int(vc.hidden_size), intermediate_size=int(vc.intermediate_size),
                              num_layers=int(vc.num_hidden_layers), num_heads=int(vc.num_attention_heads),
                              image_size=vc.image_size, patch_size=vc.patch_size, num_channels=3,
                              layer_norm_eps=float(vc.layer_norm_eps), hidden_act=vc.hidden_act,
                              qkv_bias=bool(vc.qkv_bias))
    qformer = QFormerConfig(hidden_size=int(qc.hidden_size), intermediate_size=int(qc.intermediate_size),
                            num_layers=int(qc.num_hidden_layers), num_heads=int(qc.num_attention_heads),
                            vocab_size=int(qc.vocab_size), max_position_embeddings=int(qc.max_position_embeddings),
                            encoder_hidden_size=int(vc.hidden_size),
                            cross_attention_frequency=int(qc.cross_attention_frequency),
                            layer_norm_eps=float(qc.layer_norm_eps), hidden_act=qc.hidden_act)
    return InstructBlipConfig(vision=vision, qformer=qformer, text=decoder_from_hf(tc),
                              image_token_id=int(hf_config.image_token_index),
                              num_query_tokens=int(hf_config.num_query_tokens))


def num_layers(cfg: InstructBlipConfig) -> dict[str, int]:
    return {"blocks": cfg.text.num_layers, "vision.blocks": cfg.vision.num_layers,
            "qformer.blocks": cfg.qformer.num_layers}


conv_kernel_shape = clip.conv_kernel_shape


def cross_attention_layers(cfg: InstructBlipConfig) -> tuple[int, ...]:
    """The HF layer of each slot of the stacked cross-attention params (the key table's layer map)."""
    return cfg.qformer.cross_layers


def _hf_decoder_row(row):
    """A decoder key-table row in InstructBLIP's layout: its language model is an HF CausalLM under
    `language_model` (language_model.model.*, language_model.lm_head.*)."""
    template, path, transform = row
    for new, ours in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")):
        if template.startswith(new):
            template = ours + template[len(new):]
    return template, path, transform


_VM, _QL = "vision_model.", "qformer.encoder.layer.{i}."
_CROSS = (("crossattention.attention.query", "q"), ("crossattention.attention.key", "k"),
          ("crossattention.attention.value", "v"), ("crossattention.output.dense", "o"))
KEY_ROWS = (
    (_VM + "embeddings.patch_embedding.weight", "vision/patch_embed/kernel", "conv"),
    (_VM + "embeddings.patch_embedding.bias", "vision/patch_embed/bias", "none"),
    (_VM + "embeddings.class_embedding", "vision/class_embed", "none"),
    (_VM + "embeddings.position_embedding", "vision/pos_embed", "none"),
    *key_rows(_VM, "vision/", (("post_layernorm", "post_norm"),), "norm"),
    *key_rows(_VM + "encoder.layers.{i}.", "vision/layers/", (
        ("self_attn.qkv", "qkv"), ("self_attn.projection", "proj"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"))),
    *key_rows(_VM + "encoder.layers.{i}.", "vision/layers/", (("layer_norm1", "norm1"), ("layer_norm2", "norm2")),
              "norm"),
    ("query_tokens", "query_tokens", "none"),
    ("qformer.embeddings.word_embeddings.weight", "qformer/word_embed", "none"),
    ("qformer.embeddings.position_embeddings.weight", "qformer/pos_embed", "none"),
    *key_rows("qformer.embeddings.", "qformer/", (("layernorm", "embed_norm"),), "norm"),
    *key_rows(_QL, "qformer/layers/", (
        ("attention.attention.query", "q"), ("attention.attention.key", "k"), ("attention.attention.value", "v"),
        ("attention.output.dense", "o"), ("intermediate_query.dense", "fc1_query"),
        ("output_query.dense", "fc2_query"), ("intermediate.dense", "fc1_text"), ("output.dense", "fc2_text"))),
    *key_rows(_QL, "qformer/layers/", (("attention.output.LayerNorm", "attn_norm"),
                                        ("output_query.LayerNorm", "mlp_norm_query"),
                                        ("output.LayerNorm", "mlp_norm_text")), "norm"),
    *(row + (cross_attention_layers,) for row in (
        *key_rows(_QL, "qformer/crossattn/layers/", _CROSS),
        *key_rows(_QL, "qformer/crossattn/layers/", (("crossattention.output.LayerNorm", "norm"),), "norm"))),
    *key_rows("", "", (("language_projection", "projector"),)),
    *map(_hf_decoder_row, decoder.KEY_ROWS),
)


# -- host-side inputs ----------------------------------------------------------------------------------------------


def visual_tokens(input_ids: np.ndarray, image_token_id: int, queries: int, num_images: int) -> VisualTokens:
    """Metadata: per sample, none or one contiguous run of `queries` image tokens, sample s showing image s."""
    meta = VisualTokens.empty(input_ids == image_token_id)
    mask, images, b = meta.mask, meta.images, len(input_ids)
    for s in range(b):
        pos = np.flatnonzero(mask[s])
        if len(pos) == 0:
            continue
        if len(pos) != queries or pos[-1] - pos[0] != queries - 1:
            several = " InstructBLIP takes one image per prompt." if len(pos) > queries else ""
            raise VlmJaxError(
                f"Sample {s} has {len(pos)} image tokens{' in several runs' if len(pos) == queries else ''}; "
                f"InstructBLIP writes one contiguous run of num_query_tokens={queries} per prompt (its processor "
                f"puts them before the prompt).{several} Build the prompt with the model's processor and no image "
                "placeholder in the text.")
        meta.image_index[s, pos], meta.kind[s, pos] = s, QUERY
        meta.grid_row[s, pos], meta.grid_col[s, pos] = 0, np.arange(queries)
        images.append(ImageSpan(sample=s, start=int(pos[0]), length=queries, grid=(1, queries)))
    if num_images and (num_images != b or len(images) != b):
        raise VlmJaxError(
            f"InstructBLIP takes exactly one image per prompt (its Q-Former reads each prompt's instruction with its "
            f"image): got {num_images} image(s) for {b} prompt(s), {len(images)} of which hold image tokens. Pass one "
            "image per prompt, through the processor with the prompts.")
    if not num_images and images:
        raise VlmJaxError(f"input_ids hold image tokens for {len(images)} prompt(s) but no pixel_values were given. "
                          "Pass the processor's pixel_values (and qformer_input_ids) for the images.")
    return meta


def prepare_batch(cfg: InstructBlipConfig, inputs: dict, dtype) -> tuple[dict, VisualTokens]:
    """Check processor outputs and build the batch plus visual-token metadata."""
    batch = text_batch(inputs, cfg.text.vocab_size, (cfg.image_token_id,), ACCEPTED_INPUTS)
    b = batch["input_ids"].shape[0]
    pixels = inputs.get("pixel_values")
    if pixels is not None:
        pixels = np.asarray(pixels)
        if pixels.ndim == 5:
            raise VlmJaxError(f"pixel_values has shape {tuple(pixels.shape)}: several images per prompt (or video "
                              "frames). InstructBLIP takes one image per prompt, [prompts, C, H, W].")
        batch["pixel_values"] = pixels = clip.checked_pixels(cfg.vision, pixels, dtype)
        batch.update(_qformer_text(cfg, inputs, b))
    meta = visual_tokens(batch["input_ids"], cfg.image_token_id, cfg.num_query_tokens,
                         0 if pixels is None else pixels.shape[0])
    return batch, meta


def _qformer_text(cfg: InstructBlipConfig, inputs: dict, batch_size: int) -> dict:
    """qformer_input_ids [B, Nt] int32 and qformer_attention_mask [B, Nt] bool, checked."""
    ids = inputs.get("qformer_input_ids")
    if ids is None:
        raise VlmJaxError("qformer_input_ids is required with pixel_values: InstructBLIP's Q-Former reads the "
                          "instruction with the image. Pass the processor's qformer_input_ids and "
                          "qformer_attention_mask.")
    ids = np.asarray(ids)
    ids = ids[None] if ids.ndim == 1 else ids
    q = cfg.qformer
    if ids.ndim != 2 or ids.shape[0] != batch_size or not np.issubdtype(ids.dtype, np.integer):
        raise VlmJaxError(f"qformer_input_ids must be integers [prompts, length] with one row per prompt "
                          f"({batch_size}), got {ids.dtype} {ids.shape}.")
    if ids.size and (ids.min() < 0 or ids.max() >= q.vocab_size):
        raise VlmJaxError(f"qformer_input_ids hold ids outside the Q-Former vocabulary [0, {q.vocab_size}). Use the "
                          "model's Q-Former tokenizer (the processor's qformer_tokenizer).")
    if ids.shape[1] > q.max_position_embeddings:
        raise VlmJaxError(f"The Q-Former's instruction is {ids.shape[1]} tokens, more than its "
                          f"max_position_embeddings={q.max_position_embeddings}. Shorten the prompt, or truncate the "
                          "Q-Former's copy of it (processor.qformer_tokenizer with truncation=True, max_length=...).")
    mask = inputs.get("qformer_attention_mask")
    mask = np.ones(ids.shape, bool) if mask is None else np.asarray(mask).reshape(-1, ids.shape[-1])
    if mask.shape != ids.shape:
        raise VlmJaxError(f"qformer_attention_mask has shape {mask.shape} but qformer_input_ids has {ids.shape}.")
    return {"qformer_input_ids": ids.astype(np.int32), "qformer_attention_mask": mask.astype(bool)}


# -- vision tower --------------------------------------------------------------------------------------------------


class VisionBlock(CLIPBlock):
    """CLIP's block with a fused qkv projection (bias as stored, `qkv_bias`) and the output projection `proj`."""

    def init_attention(self, cfg: BlipVisionConfig, rngs: nnx.Rngs) -> None:
        d, L = cfg.hidden_size, (cfg.num_layers,)
        self.qkv = Linear(d, 3 * d, bias=cfg.qkv_bias, layers=L, rngs=rngs)
        self.proj = Linear(d, d, layers=L, rngs=rngs)

    def qkv_heads(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        b, n, d = h.shape
        qkv = self.qkv(h).reshape(b, n, 3, self.cfg.num_heads, d // self.cfg.num_heads)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    @property
    def out_proj(self) -> Linear:
        return self.proj


class VisionTower(nnx.Module):
    """Params: patch_embed (the Conv2d as a matmul on flattened patches, with its bias), class_embed [1, 1, Dv] and
    pos_embed [1, P + 1, Dv] (HF's shapes), layers, post_norm."""

    def __init__(self, cfg: BlipVisionConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.cfg = cfg
        self.patch_embed = Linear(cfg.num_channels * cfg.patch_size**2, d, rngs=rngs)
        self.class_embed = weight(rngs, 1, 1, d)
        self.pos_embed = weight(rngs, 1, cfg.num_patches + 1, d)
        self.layers = VisionBlock(cfg, rngs=rngs)
        self.post_norm = LayerNorm(d, cfg.layer_norm_eps)

    def __call__(self, pixel_values: jax.Array, hooks, site: SiteRunner) -> jax.Array:
        """[I, P + 1, Dv]: the last layer's output after the final norm (what the Q-Former cross-attends to)."""
        dtype = self.patch_embed.kernel[...].dtype
        patches = self.patch_embed(patchify(pixel_values.astype(dtype), self.cfg.patch_size))
        cls = jnp.broadcast_to(self.class_embed[...], (patches.shape[0], 1, patches.shape[-1])).astype(dtype)
        x = site("vision.embed", jnp.concatenate([cls, patches], axis=1) + self.pos_embed[...].astype(dtype))
        x, records = scan_stack(self.layers, lambda layer, h, run: layer(h, run), x, hooks,
                                Context(stack="vision.blocks"), 0, self.cfg.num_layers)
        site.add_records(records)
        return self.post_norm(x)


# -- Q-Former ------------------------------------------------------------------------------------------------------


class QFormerBlock(nnx.Module):
    """Every Q-Former layer's self-attention and feed-forwards (queries' and text's), stacked [Lq, ...]."""

    def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
        d, i, L, eps = cfg.hidden_size, cfg.intermediate_size, (cfg.num_layers,), cfg.layer_norm_eps
        self.cfg = cfg
        self.q, self.k, self.v, self.o = (Linear(d, d, layers=L, rngs=rngs) for _ in range(4))
        self.attn_norm = LayerNorm(d, eps, layers=L)
        self.fc1_query, self.fc1_text = (Linear(d, i, layers=L, rngs=rngs) for _ in range(2))
        self.fc2_query, self.fc2_text = (Linear(i, d, layers=L, rngs=rngs) for _ in range(2))
        self.mlp_norm_query, self.mlp_norm_text = (LayerNorm(d, eps, layers=L) for _ in range(2))

    def __call__(self, x, run: SiteRunner, mask_add, cross, queries: int) -> jax.Array:
        """One post-norm layer on x [I, Nq, Dq] (queries first); `cross(h, run)` is the layer's cross-attention."""
        cfg, (b, n, d) = self.cfg, x.shape
        heads, act = cfg.num_heads, activation(cfg.hidden_act)
        x = run("resid_pre", x)
        q, k, v = (run(f"attn.{name}", proj(x).reshape(b, n, heads, d // heads))
                   for name, proj in (("q", self.q), ("k", self.k), ("v", self.v)))
        z = attention(q, k, v, mask_add, run, (d // heads) ** -0.5)
        h = run("resid_mid", self.attn_norm(x + run("attn.out", self.o(z.reshape(b, n, d)))))
        h = cross(h, run)
        hidden = run("mlp.hidden", jnp.concatenate([act(self.fc1_query(h[:, :queries])),
                                                    act(self.fc1_text(h[:, queries:]))], axis=1))
        update = run("mlp.out", jnp.concatenate([self.fc2_query(hidden[:, :queries]),
                                                 self.fc2_text(hidden[:, queries:])], axis=1))
        out = jnp.concatenate([self.mlp_norm_query(h[:, :queries] + update[:, :queries]),
                               self.mlp_norm_text(h[:, queries:] + update[:, queries:])], axis=1)
        return run("resid_post", out)


class CrossAttentionBlock(nnx.Module):
    """The cross-attention of the layers that have one, stacked [Lq / f, ...]: query rows -> vision features."""

    def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
        d, dv, L = cfg.hidden_size, cfg.encoder_hidden_size, (len(cfg.cross_layers),)
        self.cfg = cfg
        self.q, self.o = (Linear(d, d, layers=L, rngs=rngs) for _ in range(2))
        self.k, self.v = (Linear(dv, d, layers=L, rngs=rngs) for _ in range(2))
        self.norm = LayerNorm(d, cfg.layer_norm_eps, layers=L)

    def __call__(self, h, image, run: SiteRunner, queries: int) -> jax.Array:
        """h [I, Nq, Dq] with the query rows updated by attending to image [I, Tv, Dv] (no mask: every image token
        is real); the crossattn.* sites."""
        heads, (b, _, d) = self.cfg.num_heads, h.shape
        site = lambda name, value: run(name.replace("attn.", "crossattn.", 1), value)
        rows = h[:, :queries]
        q = site("attn.q", self.q(rows).reshape(b, queries, heads, d // heads))
        k = site("attn.k", self.k(image).reshape(b, image.shape[1], heads, d // heads))
        v = site("attn.v", self.v(image).reshape(b, image.shape[1], heads, d // heads))
        z = attention(q, k, v, None, site, (d // heads) ** -0.5)
        rows = self.norm(rows + site("attn.out", self.o(z.reshape(b, queries, d))))
        return run("resid_cross", jnp.concatenate([rows, h[:, queries:]], axis=1))


class CrossAttention(nnx.Module):
    def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
        self.layers = CrossAttentionBlock(cfg, rngs=rngs)


class QFormer(nnx.Module):
    """Params: word_embed [Vq, Dq], pos_embed [Pq, Dq], embed_norm, layers (`QFormerBlock`), crossattn.layers
    (`CrossAttentionBlock`)."""

    def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.cfg = cfg
        self.word_embed = weight(rngs, cfg.vocab_size, d)
        self.pos_embed = weight(rngs, cfg.max_position_embeddings, d)
        self.embed_norm = LayerNorm(d, cfg.layer_norm_eps)
        self.layers = QFormerBlock(cfg, rngs=rngs)
        self.crossattn = CrossAttention(cfg, rngs=rngs)

    def __call__(self, query_tokens, text_ids, text_mask, image, hooks, site: SiteRunner) -> jax.Array:
        """[I, Nq, Dq]: the last layer's rows (queries, then text) for query_tokens [1, Q, Dq], the instruction
        text_ids / text_mask [I, Nt] and the vision features image [I, Tv, Dv]."""
        cfg, (b, nt), queries = self.cfg, text_ids.shape, query_tokens.shape[1]
        dtype = self.word_embed[...].dtype
        text = self.word_embed[...][text_ids] + self.pos_embed[...][:nt][None]
        x = jnp.concatenate([jnp.broadcast_to(query_tokens.astype(dtype), (b, queries, text.shape[-1])), text], 1)
        x = site("qformer.embed", self.embed_norm(x))
        key_padding = jnp.concatenate([jnp.ones((b, queries), bool), text_mask.astype(bool)], axis=1)
        mask_add = additive_mask(key_padding[:, None, None, :], dtype)
        cross_graph, cross_state = nnx.split(self.crossattn.layers)
        every = cfg.cross_attention_frequency

        def cross(h, run):
            """The layer's cross-attention if it has one (slot l // f), else h; records zero at other layers."""
            def attend(h):
                inner = SiteRunner(run.hooks, run.ctx)
                inner.ctx = run.ctx
                slot = jax.tree.map(lambda p: p[run.ctx.layer // every], cross_state)
                return nnx.merge(cross_graph, slot)(h, image, inner, queries), inner.records

            empty = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(attend, h)[1])
            h, records = jax.lax.cond(run.ctx.layer % every == 0, attend, lambda h: (h, empty), h)
            run.add_records(records)
            return h

        ctx = Context(stack="qformer.blocks", key_padding=key_padding)
        x, records = scan_stack(self.layers, lambda layer, h, run: layer(h, run, mask_add, cross, queries), x, hooks,
                                ctx, 0, cfg.num_layers)
        site.add_records(records)
        return x


# -- model ---------------------------------------------------------------------------------------------------------


class InstructBlip(VisionLanguageModel):
    def __init__(self, cfg: InstructBlipConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision, rngs=rngs)
        self.query_tokens = weight(rngs, 1, cfg.num_query_tokens, cfg.qformer.hidden_size)
        self.qformer = QFormer(cfg.qformer, rngs=rngs)
        self.projector = Linear(cfg.qformer.hidden_size, cfg.text.hidden_size, rngs=rngs)
        self.text = Decoder(cfg.text, rngs=rngs)

    def image_features(self, batch, hooks, site, equal_images=None) -> jax.Array:
        """[I, Q, D]: the vision tower, the Q-Former's query rows reading it with each prompt's instruction, projected."""
        image = site("vision.features", self.vision(batch["pixel_values"], hooks, site))
        rows = self.qformer(self.query_tokens[...], batch["qformer_input_ids"], batch["qformer_attention_mask"],
                            image, hooks, site)
        queries = site("qformer.out", rows[:, :self.cfg.num_query_tokens])
        return site("projector.out", self.projector(queries))


Model = InstructBlip
