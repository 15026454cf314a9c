"""PaliGemma family (PaliGemma 1 on Gemma, PaliGemma 2 on Gemma 2): parity with HF PyTorch (fp32, eager attention)
on logits, every layer's hidden states and attention and the vision tower; the prefix-LM mask and sliding window
against a NumPy rule; greedy decoding against HF generate; the three key layouts and the round trip to HF; the CLI;
the logit lens, DoLa and the answer-token helper through Gemma's head; token sets; clear errors."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import AutoConfig

import vlmjax
from converters import hf as hf_conv
from tests.family_fixtures import TOL, assert_hf_parity, checkpoints, long_text, random_images
from vlmjax import cli, models, probes
from vlmjax.dola import dola_scores
from vlmjax.errors import VlmJaxError
from vlmjax.generate import generate
from vlmjax.hooks import Capture
from vlmjax.models.decoder import unembed_matrix
from vlmjax.testing.tiny_paligemma import make_tiny_paligemma
from vlmjax.verify import compare, load_hf_model, run_hf

WINDOW = 8  # the tiny Gemma 2's sliding window
PROMPTS = ["<image>what is in the image ?", "<image>is there a red circle in the box on the left ? yes or no"]
SUFFIXES = ["yes", "no , the red circle is left of a blue square and the star"]  # 14 suffix tokens > WINDOW


def _images(n, seed=0, size=(40, 30)):
    return random_images([size] * n, seed)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`tiny(variant)`: each variant's (path, processor, model, hf model), built and loaded once."""
    return checkpoints(tmp_path_factory, make_tiny_paligemma)


@pytest.fixture(scope="module")
def padded(tiny):
    """{variant: (inputs, ours, HF's)} on a left-padded pair of prompts with suffixes, ours with captures of the
    vision features and the logit lens / visual attention records."""
    cache = {}

    def get(variant):
        if variant not in cache:
            _, processor, model, hf_model = tiny(variant)
            inputs = dict(processor(images=_images(2), text=PROMPTS, suffix=SUFFIXES, return_tensors="np",
                                    padding=True))
            hooks = {"features": Capture(sites=frozenset({"vision.features"})),
                     "lens": probes.LogitLens.from_model(model, k=3), "visual": probes.VisualAttention()}
            ours = model(**inputs, hooks=hooks, output_hidden_states=True, output_attentions=True)
            cache[variant] = (inputs, ours, run_hf(hf_model, inputs))
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", ["gemma", "gemma2"])
def test_parity_left_padded_batch_with_suffix(tiny, padded, variant):
    inputs, ours, theirs = padded(variant)
    assert not inputs["attention_mask"][0].all() and inputs["token_type_ids"].any(), "left padding and a suffix"
    result = compare(ours, theirs, inputs["attention_mask"])
    layers = tiny(variant)[2].config.text.num_layers
    assert len(result.hidden_states) == layers + 1 and len(result.attentions) == layers
    assert result.worst <= TOL, result.table()


@pytest.mark.parametrize("variant", ["gemma", "gemma2"])
def test_prefix_lm_mask_and_sliding_window(tiny, padded, variant):
    """Attention is non-zero exactly where a NumPy rule allows: real keys that are causal (within the window in
    Gemma 2's sliding layers) or where query and key are both prefix (token type 0), beyond the window too."""
    inputs, ours, _ = padded(variant)
    cfg = tiny(variant)[2].config.text
    real, prefix = inputs["attention_mask"].astype(bool), inputs["token_type_ids"] == 0
    i, j = np.arange(real.shape[1])[:, None], np.arange(real.shape[1])[None, :]
    sliding = [layer % 2 == 0 for layer in range(cfg.num_layers)] if variant == "gemma2" else [False] * 3
    assert list(cfg.layer_sliding) == sliding
    for layer, pattern in enumerate(ours["attentions"]):
        causal = (j <= i) & ((j > i - WINDOW) if sliding[layer] else True)
        allowed = (causal[None] | (prefix[:, :, None] & prefix[:, None, :])) & real[:, None, :]
        assert (allowed & (j > i)).any()  # prefix queries see later tokens
        assert not sliding[layer] or (~allowed & (j <= i) & real[:, None, :]).any()  # suffix queries: the window
        rows = np.broadcast_to(real[:, None, :, None], pattern.shape)
        seen = np.asarray(pattern) > 0
        np.testing.assert_array_equal(seen[rows], np.broadcast_to(allowed[:, None], pattern.shape)[rows])


def test_vision_tower_output(tiny, padded):
    inputs, ours, _ = padded("gemma2")
    hf_model = tiny("gemma2")[3]
    with torch.no_grad():
        theirs = hf_model.model.get_image_features(torch.as_tensor(inputs["pixel_values"]))
    features = np.asarray(ours["hooks"]["features"]["vision.features"])
    assert features.shape == (2, 16, 32)  # 4 x 4 patches, no CLS token
    np.testing.assert_allclose(features, theirs.last_hidden_state.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(ours["image_features"]), theirs.pooler_output.numpy(), atol=TOL, rtol=0)


def test_parity_long_prompt_past_the_window(tiny):
    _, processor, model, hf_model = tiny("gemma2")
    inputs = dict(processor(images=_images(1, 1), text=["<image>" + long_text()], suffix=[long_text(20)],
                            return_tensors="np"))
    assert inputs["input_ids"].shape[1] >= 500 and inputs["token_type_ids"].sum() > WINDOW
    assert_hf_parity(model, hf_model, inputs)


def test_greedy_generate_equals_hf(tiny):
    """The prompt is prefix (bidirectional), the decoded tokens are suffix (causal), 12 of them: past the window."""
    _, processor, model, hf_model = tiny("gemma2")
    inputs = dict(processor(images=_images(2, 2), text=PROMPTS, return_tensors="np", padding=True))
    inputs.pop("labels")
    new = 12
    with torch.no_grad():
        ref = hf_model.generate(**{k: torch.as_tensor(v) for k, v in inputs.items()}, max_new_tokens=new,
                                do_sample=False, eos_token_id=2, pad_token_id=3).numpy()
    ours = generate(model, inputs, max_new_tokens=new, eos_token_id=2, pad_token_id=3)
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)
    assert (ours[:, ref.shape[1]:] == 3).all()


def test_key_layouts_and_round_trip_to_hf(tiny, padded, tmp_path):
    """transformers saves PaliGemma as vision_tower.* / language_model.model.*; hub checkpoints carry
    vision_tower.vision_model.*; save_hf writes model.vision_tower.* / model.language_model.*. All load to the same
    parameters, and HF's logits from the written directory are bit-identical."""
    for variant in ("gemma", "gemma2"):
        path, _, model, hf_model = tiny(variant)
        saved = load_file(path / "model.safetensors")
        assert "vision_tower.embeddings.patch_embedding.bias" in saved and "lm_head.weight" not in saved
        hub = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in saved.items()}
        (tmp_path / variant).mkdir()
        save_file(hub, tmp_path / variant / "model.safetensors")
        shutil.copy(path / "config.json", tmp_path / variant / "config.json")
        out = hf_conv.save_hf(model.params, model.config, model.hf_config, tmp_path / f"{variant}_out")
        written = load_file(out / "model.safetensors")
        assert ("model.language_model.layers.0.pre_feedforward_layernorm.weight" in written) == (variant == "gemma2")
        assert "model.vision_tower.post_layernorm.weight" in written and len(written) == len(saved)
        for other in (tmp_path / variant, out):
            for a, b in zip(_leaves(vlmjax.load(other, progress=False).params), _leaves(model.params), strict=True):
                np.testing.assert_array_equal(a, b)
        inputs = padded(variant)[0]
        np.testing.assert_array_equal(run_hf(load_hf_model(out), inputs)["logits"], run_hf(hf_model, inputs)["logits"])


def test_cli_info_names_the_family_and_its_image_tokens(tiny, capsys):
    """verify and convert run for every family in test_cli_families; what info says of PaliGemma is its own."""
    path = tiny("gemma2")[0]
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "model_type: paligemma" in out and "with this processor: 16" in out


def test_logit_lens_and_dola_read_gemmas_head(tiny, padded):
    """Through the final (1 + w) norm, the unembedding and the soft-cap, the lens at the last layer is the model's
    own output distribution, and DoLa's early exit at the last layer's residual contrasts to zero."""
    inputs, ours, _ = padded("gemma2")
    model = tiny("gemma2")[2]
    last = np.asarray(ours["logits"])[:, -1].astype(np.float64)
    probs = np.exp(last - last.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    lens = ours["hooks"]["lens"]["resid_post"]
    np.testing.assert_array_equal(np.asarray(lens["top_ids"])[-1, :, 0], np.argsort(-probs, -1)[:, :3])
    np.testing.assert_allclose(np.asarray(lens["top_probs"])[-1, :, 0], np.sort(probs, -1)[:, ::-1][:, :3], atol=1e-5)
    text, cfg = model.params["text"], model.config.text
    contrast = jax.jit(dola_scores, static_argnames=("eps", "norm_offset", "softcap"))
    scores, _ = contrast(np.asarray(ours["logits"])[:, -1], np.asarray(ours["resid_final"])[None, :, -1],
                         text["final_norm"]["scale"], unembed_matrix(text), eps=cfg.rms_norm_eps,
                         norm_offset=cfg.norm_offset, softcap=cfg.final_logit_softcap)
    finite = np.isfinite(np.asarray(scores))
    assert finite.sum() >= 2 and np.abs(np.asarray(scores)[finite]).max() < 1e-4


def test_token_sets_and_visual_attention_against_hf(padded):
    """The image leads each prompt (after the left padding); T, the real tokens after the last visual token, is BOS,
    the prompt and the suffix; the text-to-visual mass per layer and head is NumPy's on HF's attentions."""
    inputs, ours, theirs = padded("gemma")
    meta, ids = ours["visual"], inputs["input_ids"]
    real = inputs["attention_mask"].astype(bool)
    assert [(image.sample, image.start, image.length, image.grid) for image in meta.images] == [
        (b, int(np.argmax(real[b])), 16, (4, 4)) for b in range(2)]
    assert (ids[np.arange(2), [image.start + 16 for image in meta.images]] == 1).all()  # BOS follows the image
    text = real & (np.arange(ids.shape[1]) >= np.array([image.start + 16 for image in meta.images])[:, None])
    mass = np.asarray(ours["hooks"]["visual"]["attn.pattern"]["mass"])
    for layer, attention in enumerate(theirs["attentions"]):
        for b in range(2):
            expected = attention[b][:, text[b]][:, :, meta.mask[b]].sum(-1).mean(-1)
            np.testing.assert_allclose(mass[layer, b], expected, atol=1e-5, rtol=0)


def test_errors_for_unsupported_input(tiny, tmp_path):
    path, processor, model, _ = tiny("gemma")
    inputs = dict(processor(images=_images(1), text=PROMPTS[:1], return_tensors="np"))
    with pytest.raises(VlmJaxError, match="token_type_ids must be 0 .* or 1"):
        model.prepare({**inputs, "token_type_ids": inputs["token_type_ids"] + 2})
    with pytest.raises(VlmJaxError, match=r"pixel_values must have shape \[images, 3, 28, 28\].*no video"):
        model.prepare({**inputs, "pixel_values": inputs["pixel_values"][:, None]})
    with pytest.raises(VlmJaxError, match="Unexpected input.*pixel_values_videos"):
        model.prepare({**inputs, "pixel_values_videos": inputs["pixel_values"]})
    with pytest.raises(VlmJaxError, match="pixel_values holds 2 image.*tokens for 1"):
        model.prepare({**inputs, "pixel_values": np.concatenate([inputs["pixel_values"]] * 2)})
    raw = json.loads((path / "config.json").read_text())
    for change, message in ((lambda c: c["vision_config"].update(vision_use_head=True), "vision_use_head"),
                            (lambda c: c["text_config"].update(model_type="llama"), "text model_type 'llama'"),
                            (lambda c: c.update(projection_dim=48), "projection_dim .48. must equal")):
        config = json.loads(json.dumps(raw))
        change(config)
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(VlmJaxError, match=message):
            models.from_hf(AutoConfig.from_pretrained(tmp_path))
