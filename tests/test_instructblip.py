"""InstructBLIP family: parity with HF PyTorch (fp32, eager attention) on the decoder, the vision tower and the
Q-Former (its self- and cross-attention patterns per layer), query-token metadata from the input ids, greedy decoding
against HF generate, an intervention in the decoder and one in the Q-Former against torch-hook references, the round
trip to HF and `vlmjax convert`, clear errors."""

from typing import ClassVar

import jax.numpy as jnp
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import vlmjax
from converters import hf as hf_conv
from tests.family_fixtures import TOL, assert_hf_parity, long_text, random_images
from vlmjax import cli
from vlmjax import generate as gen
from vlmjax import interventions as iv
from vlmjax.errors import VlmJaxError
from vlmjax.hooks import Capture, Hook, QFormerCapture
from vlmjax.testing.tiny_instructblip import NUM_QUERY_TOKENS as Q
from vlmjax.testing.tiny_instructblip import make_tiny_instructblip
from vlmjax.verify import load_hf_model, run_hf
from vlmjax.visual import QUERY

PROMPTS = ["USER: what is in the image ? ASSISTANT:",
           "USER: how many red circle are there in the box on the left ? yes or no ? ASSISTANT: the"]


def _images(n, seed=0):
    return random_images([(40 + 20 * i, 60) for i in range(n)], seed)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("instructblip")
    _, processor = make_tiny_instructblip(path)
    processor.tokenizer.padding_side = "left"
    inputs = dict(processor(images=_images(2), text=PROMPTS, return_tensors="np", padding=True))
    assert not inputs["attention_mask"][0].all() and not inputs["qformer_attention_mask"][0].all()
    return dict(path=path, processor=processor, inputs=inputs, model=vlmjax.load(path, progress=False),
                hf=load_hf_model(path))


def _feed(inputs):
    return {k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()}


def _parity(tiny, inputs, **options):
    return assert_hf_parity(tiny["model"], tiny["hf"], inputs, **options)


def test_parity_left_padded_batch_of_two_images_with_vision_and_qformer(tiny):
    """Decoder logits, hidden states and attentions; the vision tower's output; every Q-Former layer's output,
    self-attention and cross-attention (layers 0 and 2 have one, layer 1 none) against HF's Q-Former run alone."""
    inputs, hf = tiny["inputs"], tiny["hf"]
    hooks = {"vision": Capture(sites=frozenset({"vision.features", "qformer.out", "projector.out"})),
             "qformer": QFormerCapture(sites=frozenset({"resid_post", "attn.pattern", "crossattn.pattern"}))}
    ours = _parity(tiny, inputs, hooks=hooks)
    feed = _feed(inputs)
    with torch.no_grad():
        image = hf.vision_model(feed["pixel_values"]).last_hidden_state
        queries = hf.query_tokens.expand(2, -1, -1)
        mask = torch.cat([torch.ones(2, Q, dtype=torch.long), feed["qformer_attention_mask"]], dim=1)
        theirs = hf.qformer(input_ids=feed["qformer_input_ids"], attention_mask=mask, query_embeds=queries,
                            encoder_hidden_states=image, output_hidden_states=True, output_attentions=True)
        projected = hf.language_projection(theirs.last_hidden_state[:, :Q])
    close = lambda a, b, **kw: np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=TOL, rtol=0, **kw)
    real = mask.numpy().astype(bool)  # the Q-Former's rows: queries, then the instruction's real tokens
    records = ours["hooks"]
    close(records["vision"]["vision.features"], image)
    close(records["vision"]["qformer.out"], theirs.last_hidden_state[:, :Q])
    close(records["vision"]["projector.out"], projected)
    close(ours["image_features"], projected)
    layers = records["qformer"]
    self_attentions = [a for a in theirs.attentions if a.shape[-2] == real.shape[1]]  # HF lists cross ones too
    assert len(self_attentions) == 3
    for layer in range(3):
        np.testing.assert_allclose(np.asarray(layers["resid_post"][layer])[real], theirs.hidden_states[layer + 1]
                                   .numpy()[real], atol=TOL, rtol=0)
        rows = np.broadcast_to(real[:, None, :, None], self_attentions[layer].shape)
        np.testing.assert_allclose(np.asarray(layers["attn.pattern"][layer])[rows],
                                   self_attentions[layer].numpy()[rows], atol=TOL, rtol=0)
    cross = np.asarray(layers["crossattn.pattern"])  # [Lq, I, H, Q, Tv]
    assert cross.shape == (3, 2, 4, Q, 17) and len(theirs.cross_attentions) == 2
    close(cross[0], theirs.cross_attentions[0])
    close(cross[2], theirs.cross_attentions[1])
    assert (cross[1] == 0).all()  # layer 1 has no cross-attention: its records are zero


def test_parity_prompt_of_500_tokens(tiny):
    text = f"USER: {long_text()} ? ASSISTANT:"
    inputs = dict(tiny["processor"](images=_images(1, seed=3), text=[text], return_tensors="np"))
    assert inputs["input_ids"].shape[1] >= 500 and inputs["qformer_input_ids"].shape[1] >= 500
    _parity(tiny, inputs)


def test_query_tokens_are_the_visual_tokens_read_from_ids(tiny):
    """The processor writes the Q image tokens ahead of each prompt and of its left padding; the metadata follows
    the ids wherever they are."""
    model, inputs = tiny["model"], tiny["inputs"]
    _, meta = model.prepare(inputs)
    assert [(s.sample, s.start, s.length, s.grid) for s in meta.images] == [(0, 0, Q, (1, Q)), (1, 0, Q, (1, Q))]
    np.testing.assert_array_equal(meta.mask, inputs["input_ids"] == model.config.image_token_id)
    assert (meta.kind[meta.mask] == QUERY).all() and meta.grid_col[0, :Q].tolist() == list(range(Q))
    ids = inputs["input_ids"][1:]
    shifted = {**{k: v[1:] for k, v in inputs.items()}, "input_ids": np.roll(ids, 3, axis=1),
               "attention_mask": np.roll(inputs["attention_mask"][1:], 3, axis=1)}
    _, meta = model.prepare(shifted)
    assert meta.images[0].start == 3 and meta.positions(0).tolist() == list(range(3, 3 + Q))


def test_greedy_decoding_matches_hf_generate(tiny):
    inputs = tiny["inputs"]
    ref = tiny["hf"].generate(**_feed(inputs), max_new_tokens=12, do_sample=False, eos_token_id=2,
                              pad_token_id=3).numpy()
    ours = gen.generate(tiny["model"], inputs, 12, eos_token_id=2, pad_token_id=3)
    assert ref.shape[1] > inputs["input_ids"].shape[1] + 1
    np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)


class ZeroCrossAttention(Hook):
    """Zero the Q-Former's cross-attention update (the queries then never read the image)."""

    stack: ClassVar[str] = "qformer.blocks"

    def __call__(self, site, value, ctx):
        return (jnp.zeros_like(value), None) if site == "crossattn.out" else (value, None)


def test_interventions_in_the_decoder_and_the_qformer_match_torch_hooks(tiny):
    """VIAR on the query tokens at decoder layers 1-2 (HF: the additive mask edited at those keys) and the
    Q-Former's cross-attention update zeroed (HF: a forward hook on crossattention.output.dense)."""
    model, hf, inputs = tiny["model"], tiny["hf"], tiny["inputs"]
    valid = inputs["attention_mask"].astype(bool)
    plain = np.asarray(model(**inputs).logits)
    visual = torch.as_tensor(inputs["input_ids"] == model.config.image_token_id)

    def viar(module, args, kwargs):
        if module.layer_idx in (1, 2):
            kwargs["attention_mask"] = kwargs["attention_mask"] + 2.0 * visual[:, None, None, :]
        return args, kwargs

    zero = lambda module, args, output: torch.zeros_like(output)
    cases = [({"viar": iv.AttentionBias.on_layers(3, range(1, 3), bias=2.0)},
              lambda: [layer.self_attn.register_forward_pre_hook(viar, with_kwargs=True)
                       for layer in hf.language_model.model.layers]),
             ({"zero": ZeroCrossAttention()},
              lambda: [hf.qformer.encoder.layer[i].crossattention.output.dense.register_forward_hook(zero)
                       for i in (0, 2)])]
    for hooks, register in cases:
        ours = np.asarray(model(**inputs, hooks=hooks).logits)
        handles = register()
        try:
            with torch.no_grad():
                theirs = hf(**_feed(inputs)).logits.numpy()
        finally:
            for handle in handles:
                handle.remove()
        assert np.abs(ours - plain)[valid].max() > 1e-3, hooks
        assert np.abs(ours - theirs)[valid].max() < TOL, hooks
    blind = {k: v for k, v in inputs.items()}
    blind["pixel_values"] = inputs["pixel_values"][::-1].copy()  # other images: no effect without cross-attention
    np.testing.assert_allclose(np.asarray(model(**blind, hooks={"zero": ZeroCrossAttention()}).logits[1]),
                               np.asarray(model(**inputs, hooks={"zero": ZeroCrossAttention()}).logits[1]), atol=1e-6)


def test_round_trip_to_hf_and_convert(tiny, tmp_path):
    """save_hf writes InstructBLIP's own layout (language_model.model.*, cross-attention at layers 0 and 2 only),
    which HF loads to bit-identical logits; `vlmjax convert` keeps the Q-Former tokenizer beside the weights."""
    model, path, inputs = tiny["model"], tiny["path"], tiny["inputs"]
    out_dir = hf_conv.save_hf(model.params, model.config, model.hf_config, tmp_path / "hf", source_dir=path)
    saved = load_file(out_dir / "model.safetensors")
    assert set(saved) == set(load_file(path / "model.safetensors"))
    assert "qformer.encoder.layer.2.crossattention.output.dense.weight" in saved
    np.testing.assert_array_equal(run_hf(load_hf_model(out_dir), inputs)["logits"], run_hf(tiny["hf"], inputs)["logits"])
    assert cli.main(["convert", str(path), str(tmp_path / "conv")]) == 0
    converted = vlmjax.load(tmp_path / "conv")
    processor = vlmjax.load_processor(tmp_path / "conv")
    again = dict(processor(images=_images(2), text=PROMPTS, return_tensors="np", padding=True))
    np.testing.assert_array_equal(again["qformer_input_ids"], inputs["qformer_input_ids"])
    np.testing.assert_array_equal(np.asarray(converted(**inputs).logits), np.asarray(model(**inputs).logits))


def test_errors_name_the_problem(tiny):
    model, inputs = tiny["model"], tiny["inputs"]
    three = {**inputs, "pixel_values": np.concatenate([inputs["pixel_values"], inputs["pixel_values"][:1]])}
    with pytest.raises(VlmJaxError, match="exactly one image per prompt.*3 image"):
        model.prepare(three)
    with pytest.raises(VlmJaxError, match="several images per prompt"):
        model.prepare({**inputs, "pixel_values": inputs["pixel_values"][:, None]})
    doubled = np.concatenate([inputs["input_ids"][:, :Q], inputs["input_ids"]], axis=1)
    with pytest.raises(VlmJaxError, match=f"Sample 0 has {2 * Q} image tokens.*one image per prompt"):
        model.prepare({**inputs, "input_ids": doubled, "attention_mask": np.ones_like(doubled)})
    with pytest.raises(VlmJaxError, match="qformer_input_ids is required"):
        model.prepare({k: v for k, v in inputs.items() if not k.startswith("qformer")})
    with pytest.raises(VlmJaxError, match="outside the Q-Former vocabulary"):
        model.prepare({**inputs, "qformer_input_ids": inputs["qformer_input_ids"] + 1000})


def test_key_table_maps_cross_attention_to_its_hf_layers(tiny, tmp_path):
    """A missing cross-attention tensor is named at its HF layer (2, slot 1); one at a layer without
    cross-attention is unexpected."""
    tensors = load_file(tiny["path"] / "model.safetensors")
    key = "qformer.encoder.layer.{}.crossattention.output.dense.weight"
    tensors[key.format(1)] = tensors.pop(key.format(2))
    (tmp_path / "m").mkdir()
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    shutil.copy(tiny["path"] / "config.json", tmp_path / "m" / "config.json")
    with pytest.raises(VlmJaxError, match=rf"missing tensors: \['{key.format(2)}'\]; unexpected tensors: "
                                          rf"\['{key.format(1)}'\]"):
        vlmjax.load(tmp_path / "m", progress=False)
